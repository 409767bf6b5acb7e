//! Validated read requests, including their decoded page cursors.

use maitre_api::memory::v1 as pb;
use maitre_runtime::{pagination, status::FieldViolations};
use uuid::Uuid;

use maitre_runtime::fields;

use super::Limits;

/// Default page size of every listing.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Default number of points in an emotion history.
pub const DEFAULT_HISTORY_LIMIT: u32 = 20;

/// Direction of a message listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

/// ListMessages, validated: `after` is the last sequence already served.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePage {
    pub conversation_id: Uuid,
    pub page_size: u32,
    pub order: Order,
    pub after: Option<i64>,
}

impl MessagePage {
    /// Binds page tokens to the conversation and the order.
    pub fn token_query(conversation_id: Uuid, order: Order) -> String {
        format!("ListMessages|{conversation_id}|{order:?}")
    }

    pub fn parse(
        request: pb::ListMessagesRequest,
        limits: &Limits,
    ) -> Result<Self, FieldViolations> {
        let pb::ListMessagesRequest {
            conversation_id,
            page_size,
            page_token,
            order,
        } = request;
        let mut v = FieldViolations::new();
        let conversation_id = fields::uuid(&mut v, "conversation_id", &conversation_id);
        let page_size = fields::page_size(
            &mut v,
            "page_size",
            page_size,
            DEFAULT_PAGE_SIZE,
            limits.max_page_size,
        );
        let order = match fields::known_enum::<pb::SortOrder>(&mut v, "order", order) {
            Some(pb::SortOrder::NewestFirst) => Order::NewestFirst,
            _ => Order::OldestFirst,
        };
        let after = conversation_id.and_then(|id| {
            pagination::decode_field::<i64>(
                &mut v,
                "page_token",
                &Self::token_query(id, order),
                &page_token,
            )
        });
        v.into_result()?;
        let conversation_id = conversation_id.ok_or_else(FieldViolations::new)?;
        Ok(Self {
            conversation_id,
            page_size,
            order,
            after,
        })
    }
}

/// GetEmotionHistory, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub conversation_id: Uuid,
    pub limit: u32,
}

impl HistoryQuery {
    pub fn parse(
        request: pb::GetEmotionHistoryRequest,
        limits: &Limits,
    ) -> Result<Self, FieldViolations> {
        let pb::GetEmotionHistoryRequest {
            conversation_id,
            limit,
        } = request;
        let mut v = FieldViolations::new();
        let conversation_id = fields::uuid(&mut v, "conversation_id", &conversation_id);
        let limit = fields::page_size(
            &mut v,
            "limit",
            limit,
            DEFAULT_HISTORY_LIMIT,
            limits.max_history_limit,
        );
        v.into_result()?;
        let conversation_id = conversation_id.ok_or_else(FieldViolations::new)?;
        Ok(Self {
            conversation_id,
            limit,
        })
    }
}

/// Where a ListConversations page resumes: still among the active
/// conversations, or already among the closed ones, below `last_seq` (the
/// server-assigned creation order of the last conversation served).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConversationCursor {
    pub in_closed: bool,
    pub last_seq: i64,
}

/// ListConversations, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationPage {
    pub user_id: String,
    pub active_only: bool,
    pub page_size: u32,
    pub after: Option<ConversationCursor>,
}

impl ConversationPage {
    /// Binds page tokens to the user and the filter. `v2`: tokens of the
    /// id-ordered listing (before `seq`) are refused, not misread.
    pub fn token_query(user_id: &str, active_only: bool) -> String {
        format!("ListConversations|v2|{user_id}|{active_only}")
    }

    pub fn parse(
        request: pb::ListConversationsRequest,
        limits: &Limits,
    ) -> Result<Self, FieldViolations> {
        let pb::ListConversationsRequest {
            user_id,
            filter,
            page_size,
            page_token,
        } = request;
        let mut v = FieldViolations::new();
        let user_id = fields::identifier(&mut v, "user_id", &user_id);
        let active_only = matches!(
            fields::known_enum::<pb::ConversationFilter>(&mut v, "filter", filter),
            Some(pb::ConversationFilter::ActiveOnly)
        );
        let page_size = fields::page_size(
            &mut v,
            "page_size",
            page_size,
            DEFAULT_PAGE_SIZE,
            limits.max_page_size,
        );
        let after = user_id.as_ref().and_then(|user| {
            pagination::decode_field(
                &mut v,
                "page_token",
                &Self::token_query(user, active_only),
                &page_token,
            )
        });
        v.into_result()?;
        let user_id = user_id.ok_or_else(FieldViolations::new)?;
        Ok(Self {
            user_id,
            active_only,
            page_size,
            after,
        })
    }
}

/// A request naming one conversation.
pub fn conversation_id(value: &str) -> Result<Uuid, FieldViolations> {
    let mut v = FieldViolations::new();
    let id = fields::uuid(&mut v, "conversation_id", value);
    v.into_result()?;
    id.ok_or_else(FieldViolations::new)
}

/// A request naming one user.
/// The user id of a DeleteUserData: any id that can have been stored,
/// including ids from before the stricter identifier rules.
pub fn erasable_user_id(value: &str) -> Result<String, FieldViolations> {
    let mut v = FieldViolations::new();
    let id = fields::stored_identifier(&mut v, "user_id", value);
    v.into_result()?;
    id.ok_or_else(FieldViolations::new)
}

pub fn user_id(value: &str) -> Result<String, FieldViolations> {
    let mut v = FieldViolations::new();
    let id = fields::identifier(&mut v, "user_id", value);
    v.into_result()?;
    id.ok_or_else(FieldViolations::new)
}
