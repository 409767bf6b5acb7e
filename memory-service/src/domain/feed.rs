//! WatchMessages' request: where the stream starts and what it lets through.

use maitre_api::memory::v1 as pb;
use maitre_runtime::{fields, status::FieldViolations};
use uuid::Uuid;

use super::message::{MAX_CHANNEL_CHARS, Role};

/// A position in the message feed, as a client holds it: the decimal
/// position. Opaque by contract; plain so that grpcurl users can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeedCursor(pub i64);

impl FeedCursor {
    pub fn encode(self) -> String {
        self.0.to_string()
    }

    /// Any non-negative position; whether the feed ever issued it is the
    /// store's to say.
    pub fn parse(value: &str) -> Option<Self> {
        if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        value.parse().ok().map(Self)
    }
}

/// Which messages a watcher gets; `None` lets everything through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFilter {
    pub role: Option<Role>,
    pub channel: Option<String>,
    pub user_id: Option<String>,
    pub conversation_id: Option<Uuid>,
}

/// A validated WatchMessages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchQuery {
    /// `None`: start at the feed's end ("now").
    pub after: Option<FeedCursor>,
    pub filter: WatchFilter,
}

impl WatchQuery {
    pub fn parse(request: pb::WatchMessagesRequest) -> Result<Self, FieldViolations> {
        let pb::WatchMessagesRequest {
            cursor,
            role,
            channel,
            user_id,
            conversation_id,
        } = request;
        let mut v = FieldViolations::new();
        let after = if cursor.is_empty() {
            None
        } else {
            let parsed = FeedCursor::parse(&cursor);
            if parsed.is_none() {
                v.add(
                    "cursor",
                    "INVALID_CURSOR",
                    "not a cursor of this feed: send one a WatchMessagesResponse carried, \
                     or none to start now",
                );
            }
            parsed
        };
        let role = match fields::known_enum::<pb::Role>(&mut v, "role", role) {
            Some(pb::Role::Unspecified) | None => None,
            Some(r) => Role::from_i16(r as i16),
        };
        let channel = (!channel.is_empty()
            && fields::bounded_identifier(&mut v, "channel", &channel, MAX_CHANNEL_CHARS))
        .then_some(channel);
        let user_id = fields::optional_identifier(&mut v, "user_id", &user_id);
        let conversation_id = if conversation_id.is_empty() {
            None
        } else {
            fields::uuid(&mut v, "conversation_id", &conversation_id)
        };
        v.into_result()?;
        Ok(Self {
            after,
            filter: WatchFilter {
                role,
                channel,
                user_id,
                conversation_id,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_plain_positions_and_nothing_else() {
        assert_eq!(FeedCursor::parse("0"), Some(FeedCursor(0)));
        assert_eq!(FeedCursor::parse("42"), Some(FeedCursor(42)));
        assert_eq!(FeedCursor(42).encode(), "42");
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1e3",
            "99999999999999999999",
            "١",
        ] {
            assert_eq!(FeedCursor::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            FeedCursor::parse("9223372036854775807"),
            Some(FeedCursor(i64::MAX))
        );
        assert_eq!(FeedCursor::parse("9223372036854775808"), None);
    }

    #[test]
    fn an_empty_request_watches_everything_from_now() {
        let query = WatchQuery::parse(pb::WatchMessagesRequest::default()).expect("valid");
        assert_eq!(query.after, None);
        assert_eq!(query.filter, WatchFilter::default());
    }

    #[test]
    fn every_bad_field_is_named() {
        let error = WatchQuery::parse(pb::WatchMessagesRequest {
            cursor: "abc".into(),
            role: 99,
            channel: " web".into(),
            user_id: "a\u{202e}b".into(),
            conversation_id: "not-a-uuid".into(),
        })
        .expect_err("invalid");
        assert_eq!(
            error.fields(),
            ["cursor", "role", "channel", "user_id", "conversation_id"]
        );
    }
}
