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

/// GetContext's answer: the conversation, its state, and the window's
/// messages as one array per column, oldest first (None: an empty window).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContextRow {
    #[sqlx(flatten)]
    pub conversation: ConversationRow,
    pub state_version: Option<i64>,
    pub state_json: Option<String>,
    pub state_updated_at: Option<DateTime<Utc>>,
    pub m_seq: Option<Vec<i64>>,
    pub m_id: Option<Vec<Uuid>>,
    pub m_role: Option<Vec<i16>>,
    pub m_content: Option<Vec<String>>,
    pub m_emotion_score: Option<Vec<Option<f64>>>,
    pub m_emotion_label: Option<Vec<Option<String>>>,
    /// JSON text, parsed here: one column, not one per message.
    pub m_emotion_scores: Option<Vec<Option<String>>>,
    pub m_metadata: Option<Vec<String>>,
    pub m_input_tokens: Option<Vec<Option<i32>>>,
    pub m_output_tokens: Option<Vec<Option<i32>>>,
    pub m_tool_calls: Option<Vec<Option<String>>>,
    pub m_tool_results: Option<Vec<Option<String>>>,
    pub m_request_id: Option<Vec<Option<String>>>,
    pub m_created_at: Option<Vec<DateTime<Utc>>>,
    /// The window's tokens as the budget counted them.
    pub m_token_count: i64,
}

impl ContextRow {
    /// The window's messages, oldest first. A JSON column that does not
    /// parse (never written so by this service) reads as absent.
    pub fn messages(&mut self) -> Vec<MessageRow> {
        fn json<T: serde::de::DeserializeOwned>(text: Option<String>) -> Option<Json<T>> {
            text.and_then(|t| serde_json::from_str(&t).ok()).map(Json)
        }
        fn column<T>(values: &mut Option<Vec<T>>) -> std::vec::IntoIter<T> {
            values.take().unwrap_or_default().into_iter()
        }
        let mut ids = column(&mut self.m_id);
        let mut roles = column(&mut self.m_role);
        let mut contents = column(&mut self.m_content);
        let mut scores = column(&mut self.m_emotion_score);
        let mut labels = column(&mut self.m_emotion_label);
        let mut per_emotion = column(&mut self.m_emotion_scores);
        let mut metadata = column(&mut self.m_metadata);
        let mut inputs = column(&mut self.m_input_tokens);
        let mut outputs = column(&mut self.m_output_tokens);
        let mut calls = column(&mut self.m_tool_calls);
        let mut results = column(&mut self.m_tool_results);
        let mut request_ids = column(&mut self.m_request_id);
        let mut created = column(&mut self.m_created_at);
        let mut messages = Vec::new();
        for seq in column(&mut self.m_seq) {
            let (Some(id), Some(role), Some(content), Some(created_at)) =
                (ids.next(), roles.next(), contents.next(), created.next())
            else {
                break;
            };
            messages.push(MessageRow {
                conversation_id: self.conversation.id,
                seq,
                id,
                role,
                content,
                emotion_score: scores.next().flatten(),
                emotion_label: labels.next().flatten(),
                emotion_scores: json(per_emotion.next().flatten()),
                metadata: json(metadata.next()).unwrap_or_default(),
                input_tokens: inputs.next().flatten(),
                output_tokens: outputs.next().flatten(),
                tool_calls: json(calls.next().flatten()),
                tool_results: json(results.next().flatten()),
                request_id: request_ids.next().flatten(),
                created_at,
            });
        }
        messages
    }
}
