//! Conversation state and context requests, validated.
//!
//! A state is one JSON object. It is checked here as far as the request
//! alone allows (JSON syntax, an object, nesting, no NUL, size as sent) and
//! passed on as the caller's text: PostgreSQL parses it into jsonb, keeping
//! numbers exact, and checks what depends on the stored state (the merged
//! result, its stored size) in the statement that writes it.

use maitre_api::memory::v1 as pb;
use maitre_runtime::{fields, status::FieldViolations};
use serde_json::Value;
use uuid::Uuid;

use super::Limits;

/// Deepest nesting of objects and arrays in a state or a patch. The merge
/// patch recurses once per level in the database; this keeps it shallow.
pub const MAX_STATE_DEPTH: usize = 32;
/// Most digits in a number of a state or a patch, and the largest exponent
/// (either sign): jsonb keeps numbers exactly and prints them written out,
/// so `1e-16383`, five bytes as sent, would be 16,385 as stored and read.
pub const MAX_NUMBER_DIGITS: usize = 64;
pub const MAX_NUMBER_EXPONENT: u32 = 64;
/// GetContext's token budget when the request leaves it 0.
pub const DEFAULT_TOKEN_BUDGET: u32 = 4096;
/// Largest token budget a GetContext may ask for.
pub const MAX_TOKEN_BUDGET: u32 = 1_000_000;
/// GetContext's message cap when the request leaves it 0.
pub const DEFAULT_CONTEXT_MESSAGES: u32 = 100;

/// What an UpdateConversationState writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// The whole new state (a JSON object, as sent).
    Replace(String),
    /// An RFC 7396 merge patch of the current state (any JSON, as sent).
    MergePatch(String),
}

impl StateChange {
    pub fn json(&self) -> &str {
        match self {
            StateChange::Replace(json) | StateChange::MergePatch(json) => json,
        }
    }

    pub fn is_patch(&self) -> bool {
        matches!(self, StateChange::MergePatch(_))
    }
}

/// UpdateConversationState, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUpdate {
    pub conversation_id: Uuid,
    /// The version the change is based on; 0 = never written.
    pub expected_version: i64,
    pub change: StateChange,
}

impl StateUpdate {
    pub fn parse(
        request: pb::UpdateConversationStateRequest,
        limits: &Limits,
    ) -> Result<Self, FieldViolations> {
        use pb::update_conversation_state_request::Update;
        let pb::UpdateConversationStateRequest {
            conversation_id,
            expected_version,
            update,
        } = request;
        let mut v = FieldViolations::new();
        let conversation_id = fields::uuid(&mut v, "conversation_id", &conversation_id);
        if expected_version < 0 {
            v.add(
                "expected_version",
                "OUT_OF_RANGE",
                "must be 0 (never written) or the version last read",
            );
        }
        let change = match update {
            Some(Update::StateJson(json)) => {
                check_json(&mut v, "state_json", &json, true, limits.max_state_bytes);
                Some(StateChange::Replace(json))
            }
            Some(Update::MergePatchJson(json)) => {
                check_json(
                    &mut v,
                    "merge_patch_json",
                    &json,
                    false,
                    limits.max_state_bytes,
                );
                Some(StateChange::MergePatch(json))
            }
            None => {
                v.add(
                    "update",
                    "REQUIRED",
                    "set state_json (the whole new state) or merge_patch_json (an RFC 7396 merge patch)",
                );
                None
            }
        };
        v.into_result()?;
        match (conversation_id, change) {
            (Some(conversation_id), Some(change)) => Ok(Self {
                conversation_id,
                expected_version,
                change,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// Adds a violation unless `json` is JSON that PostgreSQL's jsonb stores as
/// sent: within `max_bytes`, nested at most [`MAX_STATE_DEPTH`] deep, no NUL
/// character (jsonb refuses `\u0000`), and an object when `object`.
fn check_json(v: &mut FieldViolations, field: &str, json: &str, object: bool, max_bytes: usize) {
    if json.len() > max_bytes {
        v.add(
            field,
            "STATE_TOO_LARGE",
            format!("{} bytes; a state is at most {max_bytes} bytes", json.len()),
        );
        return;
    }
    if let Some(number) = oversized_number(json) {
        v.add(
            field,
            "INVALID_STATE_JSON",
            format!(
                "the number {number:.40} has more than {MAX_NUMBER_DIGITS} digits or an exponent \
                 beyond ±{MAX_NUMBER_EXPONENT}; send it as a string"
            ),
        );
        return;
    }
    let value = match serde_json::from_str::<Value>(json) {
        Ok(value) => value,
        Err(error) => {
            v.add(field, "INVALID_STATE_JSON", format!("not JSON: {error}"));
            return;
        }
    };
    if object && !value.is_object() {
        v.add(field, "INVALID_STATE_JSON", "a state must be a JSON object");
    } else if depth(&value) > MAX_STATE_DEPTH {
        v.add(
            field,
            "INVALID_STATE_JSON",
            format!("nested deeper than {MAX_STATE_DEPTH} levels"),
        );
    } else if holds_nul(&value) {
        v.add(
            field,
            "INVALID_STATE_JSON",
            "holds a NUL character (\\u0000), which cannot be stored",
        );
    }
}

/// The first number token outside strings whose digits or exponent pass
/// the bounds above. A scan of the text as sent, since a parsed number no
/// longer says how it was written.
fn oversized_number(json: &str) -> Option<&str> {
    let bytes = json.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            i += 1;
        } else if b == b'-' || b.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                i += 1;
            }
            let token = &json[start..i];
            let (mantissa, exponent) = match token.find(['e', 'E']) {
                Some(at) => (&token[..at], &token[at + 1..]),
                None => (token, ""),
            };
            let digits = mantissa.bytes().filter(u8::is_ascii_digit).count();
            let exponent = exponent
                .trim_start_matches(['+', '-'])
                .trim_start_matches('0');
            let exponent_too_large = exponent.len() > 3
                || exponent
                    .parse::<u32>()
                    .is_ok_and(|e| e > MAX_NUMBER_EXPONENT);
            if digits > MAX_NUMBER_DIGITS || exponent_too_large {
                return Some(token);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(members) => members
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        _ => false,
    }
}

/// GetContext, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextQuery {
    pub conversation_id: Uuid,
    pub token_budget: u32,
    pub max_messages: u32,
}

impl ContextQuery {
    pub fn parse(request: pb::GetContextRequest, limits: &Limits) -> Result<Self, FieldViolations> {
        let pb::GetContextRequest {
            conversation_id,
            token_budget,
            max_messages,
        } = request;
        let mut v = FieldViolations::new();
        let conversation_id = fields::uuid(&mut v, "conversation_id", &conversation_id);
        let token_budget = fields::page_size(
            &mut v,
            "token_budget",
            token_budget,
            DEFAULT_TOKEN_BUDGET,
            MAX_TOKEN_BUDGET,
        );
        let max_messages = fields::page_size(
            &mut v,
            "max_messages",
            max_messages,
            DEFAULT_CONTEXT_MESSAGES,
            limits.max_page_size,
        );
        v.into_result()?;
        let conversation_id = conversation_id.ok_or_else(FieldViolations::new)?;
        Ok(Self {
            conversation_id,
            token_budget,
            max_messages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::update_conversation_state_request::Update;

    fn update(update: Option<Update>, expected_version: i64) -> pb::UpdateConversationStateRequest {
        pb::UpdateConversationStateRequest {
            conversation_id: Uuid::now_v7().to_string(),
            expected_version,
            update,
        }
    }

    fn refused(request: pb::UpdateConversationStateRequest) -> Vec<String> {
        let limits = Limits {
            max_state_bytes: 64,
            ..Limits::default()
        };
        match StateUpdate::parse(request, &limits) {
            Ok(parsed) => panic!("accepted: {parsed:?}"),
            Err(v) => v.fields().into_iter().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn accepts_an_object_or_any_patch() {
        let limits = Limits::default();
        let ok = StateUpdate::parse(
            update(Some(Update::StateJson(r#"{"a": 1}"#.into())), 0),
            &limits,
        );
        assert!(ok.is_ok_and(|u| !u.change.is_patch()));
        let ok = StateUpdate::parse(
            update(Some(Update::MergePatchJson(r#"{"a": null}"#.into())), 3),
            &limits,
        );
        assert!(ok.is_ok_and(|u| u.change.is_patch() && u.expected_version == 3));
    }

    #[test]
    fn refuses_what_jsonb_or_the_limits_would_not_take() {
        let state = |json: &str| update(Some(Update::StateJson(json.into())), 0);
        assert_eq!(refused(state("[1, 2]")), ["state_json"]);
        assert_eq!(refused(state("{\"a\": ")), ["state_json"]);
        assert_eq!(refused(state(r#"{"a": "\u0000"}"#)), ["state_json"]);
        assert_eq!(refused(state(r#"{"\u0000": 1}"#)), ["state_json"]);
        assert_eq!(
            refused(state(&format!("{{\"a\": \"{}\"}}", "x".repeat(64)))),
            ["state_json"]
        );
        assert_eq!(refused(state(r#"{"n": 1e-16383}"#)), ["state_json"]);
        assert_eq!(refused(state(r#"{"n": 1E+65}"#)), ["state_json"]);
        assert_eq!(
            refused(state(&format!("{{\"n\": {}}}", "9".repeat(65)))),
            ["state_json"]
        );
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_STATE_DEPTH + 1),
            "]".repeat(MAX_STATE_DEPTH + 1)
        );
        assert_eq!(
            refused(update(
                Some(Update::MergePatchJson(format!("{{\"a\": {deep}}}"))),
                1
            )),
            ["merge_patch_json"]
        );
        assert_eq!(refused(update(None, 0)), ["update"]);
        assert_eq!(
            refused(update(Some(Update::StateJson("{}".into())), -1)),
            ["expected_version"]
        );
    }

    #[test]
    fn numbers_are_bounded_outside_strings_only() {
        assert_eq!(
            oversized_number(r#"{"a": "1e99999", "b\"1e999": [1e64, -0.5e-64, 12]}"#),
            None
        );
        assert_eq!(oversized_number(&format!("[{}]", "1".repeat(64))), None);
        assert_eq!(oversized_number("[1, 2e65]"), Some("2e65"));
        assert_eq!(oversized_number("[1e-0000000065]"), Some("1e-0000000065"));
        assert_eq!(oversized_number("[1e0000000064]"), None);
    }

    #[test]
    fn context_defaults_and_bounds() {
        let limits = Limits::default();
        let request = |token_budget, max_messages| pb::GetContextRequest {
            conversation_id: Uuid::now_v7().to_string(),
            token_budget,
            max_messages,
        };
        let q = ContextQuery::parse(request(0, 0), &limits).unwrap();
        assert_eq!(
            (q.token_budget, q.max_messages),
            (DEFAULT_TOKEN_BUDGET, DEFAULT_CONTEXT_MESSAGES)
        );
        assert!(ContextQuery::parse(request(-1, 0), &limits).is_err());
        assert!(ContextQuery::parse(request(1_000_001, 0), &limits).is_err());
        assert!(ContextQuery::parse(request(10, 501), &limits).is_err());
    }
}
