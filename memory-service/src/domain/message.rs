//! A message to store, validated.

use std::collections::BTreeMap;

use maitre_api::memory::v1 as pb;
use maitre_runtime::status::FieldViolations;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use maitre_runtime::fields;

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
    /// The caller left `conversation_id` empty (asked for a new one).
    pub new_conversation: bool,
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
pub const MAX_CHANNEL_CHARS: usize = 64;

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

        let new_conversation = conversation_id.is_empty();
        let conversation_id = if new_conversation {
            Some(Uuid::now_v7())
        } else {
            fields::uuid(&mut v, "conversation_id", &conversation_id)
        };
        let user_id = fields::identifier(&mut v, "user_id", &user_id);
        // Optional, and held to the identifier rule: "web" and "web " would
        // be two channels that look like one.
        if !channel.is_empty() {
            fields::bounded_identifier(&mut v, "channel", &channel, MAX_CHANNEL_CHARS);
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
                new_conversation,
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

/// Appends `bytes` with its length, so that no two different sequences of
/// fields encode alike ("ab" + "c" vs "a" + "bc").
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_optional_i32(out: &mut Vec<u8>, value: Option<i32>) {
    match value {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

impl NewMessage {
    /// SHA-256 of everything in the request that decides what is written,
    /// stored with its `request_id`: a later call with the same key must
    /// carry the same fingerprint to be answered as a replay.
    ///
    /// The canonical form is an encoding of its own, not the request's prost
    /// encoding: prost writes `map` fields (`metadata`, `emotion.scores`) in
    /// the iteration order of a `HashMap`, which differs between processes
    /// and even between two maps of one process, so one request would have
    /// many fingerprints. Here every field is written in a fixed order with
    /// its length, maps in key order, numbers big-endian, floats by their
    /// bits; values are the validated ones (a label is compared as stored,
    /// lower-cased). `conversation_id` counts as sent: empty ("a new
    /// conversation") stays empty, so a retry of such a call replays instead
    /// of differing by the id generated for it. `user_id` and `request_id`
    /// are the key itself. A version byte leaves room to change the form.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut out = vec![1_u8];
        if self.new_conversation {
            put(&mut out, b"");
        } else {
            put(&mut out, self.conversation_id.as_bytes());
        }
        put(&mut out, self.channel.as_bytes());
        out.extend_from_slice(&self.role.as_i16().to_be_bytes());
        put(&mut out, self.content.as_bytes());
        match &self.emotion {
            None => out.push(0),
            Some(e) => {
                out.push(1);
                out.extend_from_slice(&e.score.to_bits().to_be_bytes());
                put(&mut out, e.label.as_bytes());
                out.extend_from_slice(&(e.scores.len() as u64).to_be_bytes());
                for (key, value) in &e.scores {
                    put(&mut out, key.as_bytes());
                    out.extend_from_slice(&value.to_bits().to_be_bytes());
                }
            }
        }
        out.extend_from_slice(&(self.metadata.len() as u64).to_be_bytes());
        for (key, value) in &self.metadata {
            put(&mut out, key.as_bytes());
            put(&mut out, value.as_bytes());
        }
        put_optional_i32(&mut out, self.input_tokens);
        put_optional_i32(&mut out, self.output_tokens);
        out.extend_from_slice(&(self.tool_calls.len() as u64).to_be_bytes());
        for call in &self.tool_calls {
            put(&mut out, call.id.as_bytes());
            put(&mut out, call.name.as_bytes());
            put(&mut out, call.arguments_json.as_bytes());
        }
        out.extend_from_slice(&(self.tool_results.len() as u64).to_be_bytes());
        for result in &self.tool_results {
            put(&mut out, result.tool_call_id.as_bytes());
            put(&mut out, result.content.as_bytes());
            out.push(u8::from(result.is_error));
        }
        Sha256::digest(&out).into()
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn request() -> pb::StoreMessageRequest {
        pb::StoreMessageRequest {
            conversation_id: String::new(),
            user_id: "ana".into(),
            channel: "web".into(),
            role: pb::Role::User as i32,
            content: "a table for two".into(),
            emotion: Some(pb::Emotion {
                score: 0.5,
                label: "joy".into(),
                scores: (0..20).map(|i| (format!("e{i}"), 0.5)).collect(),
            }),
            metadata: (0..20)
                .map(|i| (format!("k{i}"), format!("v{i}")))
                .collect(),
            request_id: "r1".into(),
            ..Default::default()
        }
    }

    fn fingerprint(request: pb::StoreMessageRequest) -> [u8; 32] {
        NewMessage::parse(request, &Limits::default())
            .expect("valid")
            .fingerprint()
    }

    #[test]
    fn one_request_has_one_fingerprint_whatever_its_maps_order() {
        let first = fingerprint(request());
        for _ in 0..20 {
            // Each HashMap iterates in its own random order.
            let mut again = request();
            again.metadata = again.metadata.into_iter().collect::<HashMap<_, _>>();
            assert_eq!(fingerprint(again), first);
        }
        // The key is not part of it; the label is compared as stored.
        let mut other_key = request();
        other_key.request_id = "r2".into();
        other_key.emotion.as_mut().expect("emotion").label = " JOY ".into();
        assert_eq!(fingerprint(other_key), first);
    }

    #[test]
    fn every_written_field_changes_the_fingerprint() {
        let base = fingerprint(request());
        type Change = fn(&mut pb::StoreMessageRequest);
        let changes: Vec<(&str, Change)> = vec![
            ("conversation", |r| {
                r.conversation_id = "0192f0c1-7b2a-7cc3-9d4e-1a2b3c4d5e6f".into()
            }),
            ("channel", |r| r.channel = "sms".into()),
            ("role", |r| r.role = pb::Role::Assistant as i32),
            ("content", |r| r.content.push('!')),
            ("no emotion", |r| r.emotion = None),
            ("score", |r| r.emotion.as_mut().expect("e").score = 0.25),
            ("label", |r| {
                r.emotion.as_mut().expect("e").label = "calm".into()
            }),
            ("scores", |r| {
                r.emotion
                    .as_mut()
                    .expect("e")
                    .scores
                    .insert("e0".into(), 0.75);
            }),
            ("metadata value", |r| {
                r.metadata.insert("k0".into(), "other".into());
            }),
            ("metadata key", |r| {
                let v = r.metadata.remove("k0").expect("k0");
                r.metadata.insert("k00".into(), v);
            }),
            ("tokens", |r| {
                r.token_usage = Some(pb::TokenUsage {
                    input_tokens: 1,
                    output_tokens: 0,
                })
            }),
            ("tool call", |r| {
                r.tool_calls.push(pb::ToolCall {
                    id: "c".into(),
                    name: "book".into(),
                    arguments_json: "{}".into(),
                })
            }),
            ("tool result", |r| {
                r.tool_results.push(pb::ToolResult {
                    tool_call_id: "c".into(),
                    content: "ok".into(),
                    is_error: false,
                })
            }),
        ];
        for (what, change) in changes {
            let mut changed = request();
            change(&mut changed);
            assert_ne!(fingerprint(changed), base, "{what}");
        }
    }

    #[test]
    fn field_boundaries_are_part_of_the_fingerprint() {
        let mut a = request();
        a.metadata = HashMap::from([("ab".into(), "c".into())]);
        let mut b = request();
        b.metadata = HashMap::from([("a".into(), "bc".into())]);
        assert_ne!(fingerprint(a), fingerprint(b));
    }
}
