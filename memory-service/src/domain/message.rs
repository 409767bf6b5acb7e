//! A message to store, validated.

use std::collections::BTreeMap;

use maitre::{api::memory::v1 as pb, status::FieldViolations};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use maitre::fields;

use super::{Limits, emotion::Emotion};

/// Who wrote a message. Stored as the proto enum's number, which the
/// contract never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    System,
    Tool,
}

impl Role {
    pub fn as_i16(self) -> i16 {
        self.to_proto() as i16
    }

    pub fn to_proto(self) -> pb::Role {
        match self {
            Role::User => pb::Role::User,
            Role::Assistant => pb::Role::Assistant,
            Role::System => pb::Role::System,
            Role::Tool => pb::Role::Tool,
        }
    }

    pub fn from_i16(value: i16) -> Option<Self> {
        match pb::Role::try_from(i32::from(value)).ok()? {
            pb::Role::User => Some(Role::User),
            pb::Role::Assistant => Some(Role::Assistant),
            pb::Role::System => Some(Role::System),
            pb::Role::Tool => Some(Role::Tool),
            pb::Role::Unspecified => None,
        }
    }
}

/// A tool call as stored (JSON in the row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments_json: String,
}

/// A tool result as stored (JSON in the row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub tool_call_id: String,
    pub content: String,
    pub is_error: bool,
}

/// A validated StoreMessage request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Given by the caller, or a fresh UUIDv7 for a new conversation.
    pub conversation_id: Uuid,
    pub user_id: String,
    pub channel: String,
    pub role: Role,
    pub content: String,
    pub emotion: Option<Emotion>,
    pub metadata: BTreeMap<String, String>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    pub tool_calls: Vec<ToolCall>,
    pub tool_results: Vec<ToolResult>,
    pub request_id: Option<String>,
}

/// Longest channel name, in characters.
const MAX_CHANNEL_CHARS: usize = 64;

impl NewMessage {
    /// Validates every field; reports every bad one.
    pub fn parse(
        request: pb::StoreMessageRequest,
        limits: &Limits,
    ) -> Result<Self, FieldViolations> {
        // Destructured so that a new proto field fails to compile until handled.
        let pb::StoreMessageRequest {
            conversation_id,
            user_id,
            channel,
            role,
            content,
            emotion,
            metadata,
            token_usage,
            tool_calls,
            tool_results,
            request_id,
        } = request;
        let mut v = FieldViolations::new();

        let conversation_id = if conversation_id.is_empty() {
            Some(Uuid::now_v7())
        } else {
            fields::uuid(&mut v, "conversation_id", &conversation_id)
        };
        let user_id = fields::identifier(&mut v, "user_id", &user_id);
        if channel.chars().count() > MAX_CHANNEL_CHARS || channel.chars().any(char::is_control) {
            v.add(
                "channel",
                "INVALID_CHANNEL",
                format!("must be at most {MAX_CHANNEL_CHARS} printable characters"),
            );
        }
        let role = match fields::known_enum::<pb::Role>(&mut v, "role", role) {
            Some(pb::Role::Unspecified) => {
                v.add(
                    "role",
                    "REQUIRED",
                    "must be USER, ASSISTANT, SYSTEM or TOOL",
                );
                None
            }
            Some(r) => Role::from_i16(r as i16),
            None => None,
        };
        if content.trim().is_empty() && tool_calls.is_empty() && tool_results.is_empty() {
            v.add(
                "content",
                "REQUIRED",
                "must be set (may be empty only with tool calls or results)",
            );
        } else if content.len() > limits.max_content_bytes {
            v.add(
                "content",
                "TOO_LONG",
                format!("must be at most {} bytes", limits.max_content_bytes),
            );
        }
        if content.contains('\0') {
            v.add(
                "content",
                "INVALID_CHARACTERS",
                "must not contain NUL characters",
            );
        }
        let emotion = emotion.and_then(|e| parse_emotion(&mut v, e, limits));
        check_metadata(&mut v, &metadata, limits);
        let (input_tokens, output_tokens) = token_usage
            .map(|t| {
                (
                    token_count(&mut v, "token_usage.input_tokens", t.input_tokens),
                    token_count(&mut v, "token_usage.output_tokens", t.output_tokens),
                )
            })
            .unwrap_or((None, None));
        if tool_calls.len() + tool_results.len() > limits.max_tool_items {
            v.add(
                "tool_calls",
                "TOO_MANY",
                format!(
                    "at most {} tool calls and results together",
                    limits.max_tool_items
                ),
            );
        }
        let tool_bytes: usize = tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments_json.len())
            .chain(
                tool_results
                    .iter()
                    .map(|r| r.tool_call_id.len() + r.content.len()),
            )
            .sum();
        if tool_bytes > limits.max_content_bytes {
            v.add(
                "tool_results",
                "TOO_LONG",
                format!(
                    "tool calls and results must total at most {} bytes",
                    limits.max_content_bytes
                ),
            );
        }
        // PostgreSQL's jsonb cannot hold NUL characters.
        let has_nul = |text: &str| text.contains('\0');
        if tool_calls
            .iter()
            .any(|c| has_nul(&c.id) || has_nul(&c.name) || has_nul(&c.arguments_json))
        {
            v.add(
                "tool_calls",
                "INVALID_CHARACTERS",
                "must not contain NUL characters",
            );
        }
        if tool_results
            .iter()
            .any(|r| has_nul(&r.tool_call_id) || has_nul(&r.content))
        {
            v.add(
                "tool_results",
                "INVALID_CHARACTERS",
                "must not contain NUL characters",
            );
        }
        let request_id = fields::optional_identifier(&mut v, "request_id", &request_id);

        v.into_result()?;
        match (conversation_id, user_id, role) {
            (Some(conversation_id), Some(user_id), Some(role)) => Ok(Self {
                conversation_id,
                user_id,
                channel,
                role,
                content,
                emotion,
                metadata: metadata.into_iter().collect(),
                input_tokens,
                output_tokens,
                tool_calls: tool_calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: c.id,
                        name: c.name,
                        arguments_json: c.arguments_json,
                    })
                    .collect(),
                tool_results: tool_results
                    .into_iter()
                    .map(|r| ToolResult {
                        tool_call_id: r.tool_call_id,
                        content: r.content,
                        is_error: r.is_error,
                    })
                    .collect(),
                request_id,
            }),
            // Unreachable: each None above recorded a violation.
            _ => Err(FieldViolations::new()),
        }
    }
}

fn parse_emotion(
    v: &mut FieldViolations,
    emotion: pb::Emotion,
    limits: &Limits,
) -> Option<Emotion> {
    let pb::Emotion {
        score,
        label,
        scores,
    } = emotion;
    let mut ok = true;
    if !score.is_finite() || !(-1.0..=1.0).contains(&score) {
        v.add("emotion.score", "OUT_OF_RANGE", "must be between -1 and 1");
        ok = false;
    }
    let label = label.trim().to_lowercase();
    if !valid_label(&label, limits) {
        v.add(
            "emotion.label",
            "INVALID_LABEL",
            format!(
                "must be 1-{} characters of a-z, 0-9, '_' or '-'",
                limits.max_label_chars
            ),
        );
        ok = false;
    }
    if scores.len() > limits.max_emotion_scores {
        v.add(
            "emotion.scores",
            "TOO_MANY",
            format!("at most {} entries", limits.max_emotion_scores),
        );
        ok = false;
    }
    for (key, value) in &scores {
        if !valid_label(key, limits) || !value.is_finite() || !(0.0..=1.0).contains(value) {
            v.add(
                "emotion.scores",
                "INVALID_SCORE",
                "keys must be labels and values between 0 and 1",
            );
            ok = false;
            break;
        }
    }
    ok.then(|| Emotion {
        score,
        label,
        scores: scores.into_iter().collect(),
    })
}

fn valid_label(label: &str, limits: &Limits) -> bool {
    !label.is_empty()
        && label.chars().count() <= limits.max_label_chars
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn check_metadata(
    v: &mut FieldViolations,
    metadata: &std::collections::HashMap<String, String>,
    limits: &Limits,
) {
    if metadata.len() > limits.max_metadata_entries {
        v.add(
            "metadata",
            "TOO_MANY",
            format!("at most {} entries", limits.max_metadata_entries),
        );
    }
    let bytes: usize = metadata.iter().map(|(k, val)| k.len() + val.len()).sum();
    if bytes > limits.max_metadata_bytes {
        v.add(
            "metadata",
            "TOO_LONG",
            format!(
                "keys and values must total at most {} bytes",
                limits.max_metadata_bytes
            ),
        );
    }
    if metadata.keys().any(String::is_empty) {
        v.add("metadata", "EMPTY_KEY", "keys must not be empty");
    }
    if metadata
        .iter()
        .any(|(k, val)| k.contains('\0') || val.contains('\0'))
    {
        v.add(
            "metadata",
            "INVALID_CHARACTERS",
            "must not contain NUL characters",
        );
    }
}

fn token_count(v: &mut FieldViolations, field: &str, value: u32) -> Option<i32> {
    match i32::try_from(value) {
        Ok(n) => Some(n),
        Err(_) => {
            v.add(field, "OUT_OF_RANGE", "must be below 2^31");
            None
        }
    }
}
