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

/// A required, bounded identifier such as a user id: see [`identifier_chars`]
/// for what it may hold.
pub fn identifier(v: &mut FieldViolations, field: &str, value: &str) -> Option<String> {
    if value.trim().is_empty() {
        v.add(field, "REQUIRED", "must be set");
        return None;
    }
    optional_identifier(v, field, value)
}

/// An identifier that names data already stored, for erasure: not blank,
/// bounded, no control characters, but not held to the rest of
/// [`identifier_chars`], because ids stored before those rules (a trailing
/// space, say) must still be erasable.
pub fn stored_identifier(v: &mut FieldViolations, field: &str, value: &str) -> Option<String> {
    if value.trim().is_empty() {
        v.add(field, "REQUIRED", "must be set");
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
    // Control characters were never accepted into a stored id.
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

/// An optional identifier: empty means absent.
pub fn optional_identifier(v: &mut FieldViolations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    bounded_identifier(v, field, value, MAX_ID_CHARS).then(|| value.to_owned())
}

/// Checks a non-empty identifier of at most `max_chars` characters against
/// the rules of [`identifier_chars`]; records one violation and returns
/// false when it breaks one.
pub fn bounded_identifier(
    v: &mut FieldViolations,
    field: &str,
    value: &str,
    max_chars: usize,
) -> bool {
    if value.chars().count() > max_chars {
        v.add(
            field,
            "TOO_LONG",
            format!("must be at most {max_chars} characters"),
        );
        return false;
    }
    match identifier_chars(value) {
        Ok(()) => true,
        Err(problem) => {
            v.add(field, problem.reason(), problem.description());
            false
        }
    }
}

/// Why an identifier's characters were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentifierProblem {
    /// Leading or trailing whitespace: `"alice "` would be another user than
    /// `"alice"` while every log and screen shows the same name.
    SurroundingWhitespace,
    /// A character that shows nothing or changes how the rest is shown.
    InvisibleCharacter,
    /// Not in Unicode normalization form C: `"é"` as `e` + U+0301 would be
    /// another user than the precomposed `"é"`.
    NotNormalized,
}

impl IdentifierProblem {
    pub fn reason(self) -> &'static str {
        match self {
            Self::SurroundingWhitespace => "SURROUNDING_WHITESPACE",
            Self::InvisibleCharacter => "INVALID_CHARACTERS",
            Self::NotNormalized => "NOT_NORMALIZED",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::SurroundingWhitespace => "must not start or end with whitespace",
            Self::InvisibleCharacter => {
                "must not contain control, format (bidi, zero-width), invisible or \
                 separator characters other than the ASCII space"
            }
            Self::NotNormalized => "must be in Unicode normalization form C (NFC)",
        }
    }
}

/// The one rule for identifiers (user ids, customer ids, channels, request
/// ids) in both services: two identifiers are equal only if they look equal,
/// so that one customer cannot be split into two (or two merged into one)
/// by characters nobody sees. Refused:
/// - leading or trailing whitespace (any Unicode `White_Space`);
/// - control characters (`Cc`) and every format character (`Cf`): bidi
///   embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069),
///   marks (U+200E, U+200F, U+061C), zero-width characters (U+200B–U+200D,
///   U+2060, U+FEFF), the soft hyphen (U+00AD), tags, …;
/// - line and paragraph separators and every space other than U+0020 (a
///   no-break space looks like a space and is not one);
/// - characters that render as nothing: Hangul fillers, the braille blank,
///   the combining grapheme joiner, variation selectors;
/// - private-use, unassigned and noncharacter code points (nothing can say
///   what they show);
/// - text not in NFC.
pub fn identifier_chars(value: &str) -> Result<(), IdentifierProblem> {
    use unicode_normalization::{IsNormalized, is_nfc_quick};
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

    let starts_or_ends_blank =
        value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace);
    if starts_or_ends_blank {
        return Err(IdentifierProblem::SurroundingWhitespace);
    }
    let invisible = |c: char| {
        matches!(
            c.general_category(),
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::PrivateUse
                | GeneralCategory::Unassigned
                | GeneralCategory::Surrogate
        ) || (c.general_category() == GeneralCategory::SpaceSeparator && c != ' ')
            || matches!(
                c,
                '\u{034F}'
                    | '\u{115F}'
                    | '\u{1160}'
                    | '\u{180B}'..='\u{180F}'
                    | '\u{2800}'
                    | '\u{3164}'
                    | '\u{FE00}'..='\u{FE0F}'
                    | '\u{FFA0}'
                    | '\u{E0100}'..='\u{E01EF}'
            )
    };
    if value.chars().any(invisible) {
        return Err(IdentifierProblem::InvisibleCharacter);
    }
    let normalized = match is_nfc_quick(value.chars()) {
        IsNormalized::Yes => true,
        IsNormalized::No => false,
        IsNormalized::Maybe => unicode_normalization::is_nfc(value),
    };
    if !normalized {
        return Err(IdentifierProblem::NotNormalized);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(value: &str) -> Option<IdentifierProblem> {
        identifier_chars(value).err()
    }

    #[test]
    fn plain_identifiers_pass() {
        for ok in [
            "alice",
            "alice bob",
            "ana.lópez@example.com",
            "用户-42",
            "Ünïcödé",
            "a",
            "emoji-🙂",
        ] {
            assert_eq!(problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn surrounding_whitespace_is_refused() {
        for bad in [
            "alice ",
            " alice",
            "\talice",
            "alice\n",
            "alice\u{00A0}",
            "\u{3000}alice",
        ] {
            assert_eq!(
                problem(bad),
                Some(IdentifierProblem::SurroundingWhitespace),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bidi_zero_width_format_and_control_characters_are_refused() {
        let classes: &[(&str, &[char])] = &[
            (
                "bidi embeddings and overrides",
                &['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}'],
            ),
            (
                "bidi isolates",
                &['\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}'],
            ),
            ("bidi marks", &['\u{200E}', '\u{200F}', '\u{061C}']),
            (
                "zero-width",
                &['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}'],
            ),
            ("soft hyphen", &['\u{00AD}']),
            (
                "other format",
                &['\u{2061}', '\u{180E}', '\u{FFF9}', '\u{E0041}', '\u{0600}'],
            ),
            (
                "control",
                &['\0', '\u{7}', '\u{1B}', '\u{7F}', '\u{85}', '\u{9F}'],
            ),
            (
                "separators and odd spaces",
                &['\u{2028}', '\u{2029}', '\u{00A0}', '\u{2003}', '\u{202F}'],
            ),
            (
                "renders as nothing",
                &[
                    '\u{3164}', '\u{115F}', '\u{FFA0}', '\u{2800}', '\u{034F}', '\u{FE0F}',
                ],
            ),
            (
                "private use, unassigned, noncharacter",
                &['\u{E000}', '\u{FDD0}', '\u{FFFF}', '\u{10FFFF}'],
            ),
        ];
        for (class, chars) in classes {
            for c in *chars {
                let bad = format!("ali{c}ce");
                assert_eq!(
                    problem(&bad),
                    Some(IdentifierProblem::InvisibleCharacter),
                    "{class}: U+{:04X}",
                    u32::from(*c)
                );
            }
        }
    }

    #[test]
    fn decomposed_text_is_refused() {
        assert_eq!(
            problem("jose\u{301}"),
            Some(IdentifierProblem::NotNormalized)
        );
        assert_eq!(problem("jos\u{e9}"), None);
    }

    #[test]
    fn identifier_names_the_field_and_the_reason() {
        let mut v = FieldViolations::new();
        assert_eq!(identifier(&mut v, "user_id", "alice "), None);
        assert_eq!(identifier(&mut v, "customer_id", "al\u{200B}ice"), None);
        assert_eq!(identifier(&mut v, "user_id", "   "), None);
        assert_eq!(
            identifier(&mut v, "user_id", "alice").as_deref(),
            Some("alice")
        );
        assert_eq!(v.fields(), ["user_id", "customer_id", "user_id"]);
        assert_eq!(optional_identifier(&mut v, "request_id", ""), None);
        assert_eq!(
            v.fields().len(),
            3,
            "empty optional identifiers are absent, not bad"
        );
    }
}
