//! Rows and domain values to proto messages.

use chrono::{DateTime, Utc};
use maitre_api::memory::v1 as pb;
use prost_types::Timestamp;

use crate::{
    domain::{EmotionStats, NewMessage, Role, Trend},
    store::rows::{ConversationRow, EmotionPointRow, MessageRow},
};

pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    maitre_runtime::fields::to_timestamp(time)
}

fn trend(trend: Trend) -> pb::EmotionTrend {
    match trend {
        Trend::InsufficientData => pb::EmotionTrend::InsufficientData,
        Trend::Improving => pb::EmotionTrend::Improving,
        Trend::Stable => pb::EmotionTrend::Stable,
        Trend::Declining => pb::EmotionTrend::Declining,
    }
}

/// A conversation's state; `version` None (never written) reads as version
/// 0 and "{}".
pub fn state(
    conversation_id: uuid::Uuid,
    version: Option<i64>,
    state_json: Option<String>,
    updated_at: Option<DateTime<Utc>>,
) -> pb::ConversationState {
    pb::ConversationState {
        conversation_id: conversation_id.to_string(),
        version: version.unwrap_or(0),
        state_json: state_json.unwrap_or_else(|| "{}".into()),
        update_time: version.and(updated_at).map(timestamp),
    }
}

pub fn conversation(row: ConversationRow) -> pb::Conversation {
    let stats = EmotionStats::from_aggregates(
        row.scored_count,
        row.score_sum,
        row.label_counts.0,
        &row.recent_scores,
        row.last_score,
    );
    pb::Conversation {
        conversation_id: row.id.to_string(),
        user_id: row.user_id,
        channel: row.channel,
        message_count: row.message_count,
        emotion_stats: Some(pb::EmotionStats {
            scored_message_count: stats.scored_count,
            average_score: stats.average,
            label_counts: stats.label_counts.into_iter().collect(),
            trend: trend(stats.trend) as i32,
            recent_average_score: stats.recent_average,
            last_score: stats.last_score,
        }),
        active: row.closed_at.is_none(),
        create_time: Some(timestamp(row.created_at)),
        last_message_time: Some(timestamp(row.last_message_at)),
    }
}

/// The stored message, built from the request's values and what the insert
/// returned: no read after the write.
pub fn stored_message(
    message: NewMessage,
    message_id: uuid::Uuid,
    sequence: i64,
    created_at: DateTime<Utc>,
) -> pb::Message {
    pb::Message {
        message_id: message_id.to_string(),
        conversation_id: message.conversation_id.to_string(),
        sequence,
        role: message.role.to_proto() as i32,
        content: message.content,
        emotion: message.emotion.map(|e| pb::Emotion {
            score: e.score,
            label: e.label,
            scores: e.scores.into_iter().collect(),
        }),
        metadata: message.metadata.into_iter().collect(),
        token_usage: token_usage(message.input_tokens, message.output_tokens),
        tool_calls: message.tool_calls.into_iter().map(tool_call).collect(),
        tool_results: message.tool_results.into_iter().map(tool_result).collect(),
        create_time: Some(timestamp(created_at)),
        request_id: message.request_id.unwrap_or_default(),
    }
}

pub fn message(row: MessageRow) -> pb::Message {
    let emotion = row.emotion_score.map(|score| pb::Emotion {
        score,
        label: row.emotion_label.unwrap_or_default(),
        scores: row
            .emotion_scores
            .map(|s| s.0.into_iter().collect())
            .unwrap_or_default(),
    });
    pb::Message {
        message_id: row.id.to_string(),
        conversation_id: row.conversation_id.to_string(),
        sequence: row.seq,
        role: Role::from_i16(row.role)
            .map(|r| r.to_proto())
            .unwrap_or_default() as i32,
        content: row.content,
        emotion,
        metadata: row.metadata.0.into_iter().collect(),
        token_usage: token_usage(row.input_tokens, row.output_tokens),
        tool_calls: row
            .tool_calls
            .map(|c| c.0)
            .unwrap_or_default()
            .into_iter()
            .map(tool_call)
            .collect(),
        tool_results: row
            .tool_results
            .map(|r| r.0)
            .unwrap_or_default()
            .into_iter()
            .map(tool_result)
            .collect(),
        create_time: Some(timestamp(row.created_at)),
        request_id: row.request_id.unwrap_or_default(),
    }
}

pub fn emotion_point(row: EmotionPointRow) -> pb::EmotionPoint {
    pb::EmotionPoint {
        message_id: row.id.to_string(),
        sequence: row.seq,
        score: row.emotion_score,
        label: row.emotion_label,
        create_time: Some(timestamp(row.created_at)),
    }
}

fn token_usage(input: Option<i32>, output: Option<i32>) -> Option<pb::TokenUsage> {
    (input.is_some() || output.is_some()).then(|| pb::TokenUsage {
        input_tokens: input.unwrap_or_default().max(0) as u32,
        output_tokens: output.unwrap_or_default().max(0) as u32,
    })
}

fn tool_call(c: crate::domain::message::ToolCall) -> pb::ToolCall {
    pb::ToolCall {
        id: c.id,
        name: c.name,
        arguments_json: c.arguments_json,
    }
}

fn tool_result(r: crate::domain::message::ToolResult) -> pb::ToolResult {
    pb::ToolResult {
        tool_call_id: r.tool_call_id,
        content: r.content,
        is_error: r.is_error,
    }
}
