//! Parsers for the fields several requests share. Each records a violation
//! and returns `None` (or a default) instead of failing fast, so a request
//! with three bad fields gets three violations.

use crate::status::FieldViolations;
use uuid::Uuid;

/// Longest user id / request id, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// A required UUID.
pub fn uuid(v: &mut FieldViolations, field: &str, value: &str) -> Option<Uuid> {
    if value.is_empty() {
        v.add(field, "REQUIRED", "must be set");
        return None;
    }
    match Uuid::try_parse(value) {
        Ok(id) => Some(id),
        Err(_) => {
            v.add(
                field,
                "INVALID_UUID",
                "must be a UUID like 0192f0c1-7b2a-7cc3-9d4e-1a2b3c4d5e6f",
            );
            None
        }
    }
}

/// A required, bounded, printable identifier such as a user id.
pub fn identifier(v: &mut FieldViolations, field: &str, value: &str) -> Option<String> {
    if value.trim().is_empty() {
        v.add(field, "REQUIRED", "must be set");
        return None;
    }
    optional_identifier(v, field, value)
}

/// An optional identifier: empty means absent.
pub fn optional_identifier(v: &mut FieldViolations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.chars().count() > MAX_ID_CHARS {
        v.add(
            field,
            "TOO_LONG",
            format!("must be at most {MAX_ID_CHARS} characters"),
        );
        return None;
    }
    if value.chars().any(char::is_control) {
        v.add(
            field,
            "INVALID_CHARACTERS",
            "must not contain control characters",
        );
        return None;
    }
    Some(value.to_owned())
}

/// A page size: 0 means `default`, otherwise 1..=max.
pub fn page_size(v: &mut FieldViolations, field: &str, value: i32, default: u32, max: u32) -> u32 {
    match value {
        0 => default.min(max),
        n if n < 0 => {
            v.add(
                field,
                "OUT_OF_RANGE",
                format!("must be between 0 and {max}"),
            );
            default
        }
        n if n as u32 > max => {
            v.add(
                field,
                "OUT_OF_RANGE",
                format!("must be between 0 and {max}"),
            );
            default
        }
        n => n as u32,
    }
}

/// A proto enum value that this server knows.
pub fn known_enum<E: TryFrom<i32>>(v: &mut FieldViolations, field: &str, value: i32) -> Option<E> {
    match E::try_from(value) {
        Ok(e) => Some(e),
        Err(_) => {
            v.add(
                field,
                "UNKNOWN_ENUM_VALUE",
                format!("{value} is not a known value"),
            );
            None
        }
    }
}

/// A required timestamp within `[earliest, latest]`.
pub fn timestamp(
    v: &mut FieldViolations,
    field: &str,
    value: Option<&prost_types::Timestamp>,
    earliest: chrono::DateTime<chrono::Utc>,
    latest: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let Some(ts) = value else {
        v.add(field, "REQUIRED", "must be set");
        return None;
    };
    // chrono reads nanos of 1e9 and more as a leap second; proto does not.
    let parsed = u32::try_from(ts.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| chrono::DateTime::from_timestamp(ts.seconds, nanos));
    match parsed {
        Some(time) if time >= earliest && time <= latest => Some(time),
        Some(_) => {
            v.add(
                field,
                "OUT_OF_RANGE",
                format!("must be between {earliest} and {latest}"),
            );
            None
        }
        None => {
            v.add(field, "INVALID_TIMESTAMP", "is not a valid timestamp");
            None
        }
    }
}

/// A proto Timestamp from a chrono time.
pub fn to_timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}
