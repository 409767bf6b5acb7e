//! Rows as read from the `memory` schema.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::message::{ToolCall, ToolResult};

/// A `memory.conversations` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub id: Uuid,
    /// Server-assigned creation order (ListConversations pages on it).
    pub seq: i64,
    pub user_id: String,
    pub channel: String,
    pub created_at: DateTime<Utc>,
    pub last_message_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub message_count: i64,
    pub scored_count: i64,
    pub score_sum: f64,
    pub label_counts: Json<BTreeMap<String, i64>>,
    pub recent_scores: Vec<f64>,
    pub last_score: Option<f64>,
}

/// A `memory.messages` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub conversation_id: Uuid,
    pub seq: i64,
    pub id: Uuid,
    pub role: i16,
    pub content: String,
    pub emotion_score: Option<f64>,
    pub emotion_label: Option<String>,
    pub emotion_scores: Option<Json<BTreeMap<String, f64>>>,
    pub metadata: Json<BTreeMap<String, String>>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    pub tool_calls: Option<Json<Vec<ToolCall>>>,
    pub tool_results: Option<Json<Vec<ToolResult>>>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// One point of an emotion history (read from the covering index alone).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EmotionPointRow {
    pub id: Uuid,
    pub seq: i64,
    pub emotion_score: f64,
    pub emotion_label: String,
    pub created_at: DateTime<Utc>,
}

/// A conversation's state as read: `version` (and the rest) absent while
/// the state was never written.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StateRow {
    pub conversation_id: Uuid,
    pub version: Option<i64>,
    pub state_json: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// One row of GetContext's answer: the conversation and its state on every
/// row, and one message of the window (none when the window is empty).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContextRow {
    #[sqlx(flatten)]
    pub conversation: ConversationRow,
    pub state_version: Option<i64>,
    pub state_json: Option<String>,
    pub state_updated_at: Option<DateTime<Utc>>,
    pub m_seq: Option<i64>,
    pub m_id: Option<Uuid>,
    pub m_role: Option<i16>,
    pub m_content: Option<String>,
    pub m_emotion_score: Option<f64>,
    pub m_emotion_label: Option<String>,
    pub m_emotion_scores: Option<Json<BTreeMap<String, f64>>>,
    pub m_metadata: Option<Json<BTreeMap<String, String>>>,
    pub m_input_tokens: Option<i32>,
    pub m_output_tokens: Option<i32>,
    pub m_tool_calls: Option<Json<Vec<ToolCall>>>,
    pub m_tool_results: Option<Json<Vec<ToolResult>>>,
    pub m_request_id: Option<String>,
    pub m_created_at: Option<DateTime<Utc>>,
    /// The message's tokens as the budget counted them.
    pub m_tokens: Option<i64>,
}

impl ContextRow {
    /// The row's message, if the window holds one, with its tokens.
    pub fn message(&mut self) -> Option<(MessageRow, i64)> {
        let (seq, id, role, content, metadata, created_at) = (
            self.m_seq?,
            self.m_id?,
            self.m_role?,
            self.m_content.take()?,
            self.m_metadata.take()?,
            self.m_created_at?,
        );
        let message = MessageRow {
            conversation_id: self.conversation.id,
            seq,
            id,
            role,
            content,
            emotion_score: self.m_emotion_score,
            emotion_label: self.m_emotion_label.take(),
            emotion_scores: self.m_emotion_scores.take(),
            metadata,
            input_tokens: self.m_input_tokens,
            output_tokens: self.m_output_tokens,
            tool_calls: self.m_tool_calls.take(),
            tool_results: self.m_tool_results.take(),
            request_id: self.m_request_id.take(),
            created_at,
        };
        Some((message, self.m_tokens.unwrap_or_default()))
    }
}
