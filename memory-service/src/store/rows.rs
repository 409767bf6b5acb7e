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
