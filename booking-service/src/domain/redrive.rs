//! RetryFollowUp(s): re-driving FAILED follow-ups (the dead letter), validated.

use chrono::{DateTime, Utc};
use maitre_api::booking::v1 as pb;
use maitre_runtime::{fields, pagination, status::FieldViolations};
use uuid::Uuid;

/// Most follow-ups one RetryFollowUps call handles: each call is one short
/// transaction, whatever the size of the dead letter.
pub const MAX_REDRIVE_BATCH: u32 = 1000;

/// The follow-up id of a RetryFollowUp request.
pub fn follow_up_id(request: &pb::RetryFollowUpRequest) -> Result<Uuid, FieldViolations> {
    let mut v = FieldViolations::new();
    let id = fields::uuid(&mut v, "follow_up_id", &request.follow_up_id);
    v.into_result()?;
    id.ok_or_else(FieldViolations::new)
}

/// A validated RetryFollowUps request: FAILED follow-ups that failed in
/// [`from`, `until`), after the keyset `after` (failed at, id).
#[derive(Debug, Clone, PartialEq)]
pub struct RedriveBatch {
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub limit: u32,
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

impl RedriveBatch {
    /// The page-token fingerprint: a token only continues a window with the
    /// same start; it carries the window's end itself, so that a window left
    /// open (`failed_before` unset: until the first call's now) stays the
    /// same window on every continuation.
    fn token_query(from: DateTime<Utc>) -> String {
        format!("RetryFollowUps|{}", from.timestamp_micros())
    }

    pub fn next_token(&self, last: (DateTime<Utc>, Uuid)) -> String {
        pagination::encode(&Self::token_query(self.from), &(self.until, last))
    }

    /// `now` closes the window when `failed_before` is unset; a continuation
    /// keeps the end of the window of the call that issued its token.
    pub fn parse(
        request: pb::RetryFollowUpsRequest,
        now: DateTime<Utc>,
    ) -> Result<Self, FieldViolations> {
        let pb::RetryFollowUpsRequest {
            state,
            failed_after,
            failed_before,
            limit,
            page_token,
        } = request;
        let mut v = FieldViolations::new();
        if state != pb::FollowUpState::Failed as i32 {
            v.add(
                "state",
                "ONLY_FAILED",
                "must be FOLLOW_UP_STATE_FAILED: only FAILED follow-ups can be re-driven",
            );
        }
        let earliest = DateTime::<Utc>::UNIX_EPOCH;
        let latest = now + chrono::Duration::days(1);
        let from = match failed_after {
            None => Some(earliest),
            Some(ts) => fields::timestamp(&mut v, "failed_after", Some(&ts), earliest, latest),
        };
        let until = match failed_before {
            None => Some(now),
            Some(ts) => fields::timestamp(&mut v, "failed_before", Some(&ts), earliest, latest),
        };
        if let (Some(from), Some(until)) = (from, until)
            && from > until
        {
            v.add(
                "failed_after",
                "OUT_OF_RANGE",
                "must not be after failed_before",
            );
        }
        let limit = fields::page_size(&mut v, "limit", limit, MAX_REDRIVE_BATCH, MAX_REDRIVE_BATCH);
        let mut until = until;
        let after = match (from, page_token.is_empty()) {
            (Some(from), false) => {
                match pagination::decode::<(DateTime<Utc>, (DateTime<Utc>, Uuid))>(
                    &Self::token_query(from),
                    &page_token,
                ) {
                    Ok((token_until, _))
                        if failed_before.is_some() && until != Some(token_until) =>
                    {
                        v.add(
                            "page_token",
                            "INVALID_PAGE_TOKEN",
                            "page_token belongs to a different failed_before",
                        );
                        None
                    }
                    Ok((token_until, key)) => {
                        until = Some(token_until);
                        Some(key)
                    }
                    Err(e) => {
                        v.add("page_token", "INVALID_PAGE_TOKEN", e.to_string());
                        None
                    }
                }
            }
            _ => None,
        };
        v.into_result()?;
        match (from, until) {
            (Some(from), Some(until)) => Ok(Self {
                from,
                until,
                limit,
                after,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::RetryFollowUpsRequest {
        pb::RetryFollowUpsRequest {
            state: pb::FollowUpState::Failed as i32,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_to_every_failure_until_now_in_batches_of_1000() {
        let now = Utc::now();
        let batch = RedriveBatch::parse(request(), now).expect("valid");
        assert_eq!(batch.from, DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(batch.until, now);
        assert_eq!(batch.limit, MAX_REDRIVE_BATCH);
        assert_eq!(batch.after, None);
    }

    #[test]
    fn refuses_other_states_big_batches_and_inverted_windows() {
        let now = Utc::now();
        let fields = |r| {
            RedriveBatch::parse(r, now)
                .expect_err("invalid")
                .fields()
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            fields(pb::RetryFollowUpsRequest {
                state: pb::FollowUpState::Pending as i32,
                ..request()
            }),
            ["state"]
        );
        assert_eq!(
            fields(pb::RetryFollowUpsRequest {
                limit: 1001,
                ..request()
            }),
            ["limit"]
        );
        assert_eq!(
            fields(pb::RetryFollowUpsRequest {
                failed_after: Some(fields::to_timestamp(now)),
                failed_before: Some(fields::to_timestamp(now - chrono::Duration::hours(1))),
                ..request()
            }),
            ["failed_after"]
        );
    }

    #[test]
    fn a_token_continues_only_its_own_window() {
        let now = Utc::now();
        let until = fields::to_timestamp(now);
        let first = RedriveBatch::parse(
            pb::RetryFollowUpsRequest {
                failed_before: Some(until),
                ..request()
            },
            now,
        )
        .expect("valid");
        let token = first.next_token((now, Uuid::nil()));
        let next = RedriveBatch::parse(
            pb::RetryFollowUpsRequest {
                failed_before: Some(until),
                page_token: token.clone(),
                ..request()
            },
            now,
        )
        .expect("valid");
        assert_eq!(next.after, Some((now, Uuid::nil())));
        // Left open, the window keeps the end the token carries.
        let open = RedriveBatch::parse(
            pb::RetryFollowUpsRequest {
                page_token: token.clone(),
                ..request()
            },
            now + chrono::Duration::seconds(5),
        )
        .expect("valid");
        assert_eq!(open.until, now);
        let other = RedriveBatch::parse(
            pb::RetryFollowUpsRequest {
                failed_before: Some(fields::to_timestamp(now - chrono::Duration::hours(1))),
                page_token: token.clone(),
                ..request()
            },
            now,
        );
        assert!(other.is_err(), "another window refuses the token");
        let other_start = RedriveBatch::parse(
            pb::RetryFollowUpsRequest {
                failed_after: Some(fields::to_timestamp(now - chrono::Duration::hours(1))),
                page_token: token,
                ..request()
            },
            now,
        );
        assert!(other_start.is_err(), "another start refuses the token");
    }
}
