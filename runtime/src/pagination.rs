//! Opaque keyset page tokens.
//!
//! A token is the sort key of the last row served plus a fingerprint of the
//! query it belongs to, base64url-encoded JSON. Decoding checks the
//! fingerprint, so a token from another query (another conversation, another
//! sort order) is refused instead of silently paging through the wrong rows.
//! Tokens are not secret: forging one only moves the caller within rows it
//! may already read.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::status::FieldViolations;

/// Why a page token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error("page_token is not a token this service issued")]
    Malformed,
    #[error("page_token belongs to a different query")]
    OtherQuery,
}

#[derive(Serialize, Deserialize)]
struct Envelope<K> {
    /// Fingerprint of the query.
    q: String,
    /// The last row's sort key.
    k: K,
}

/// Encodes the key of the last row served for `query`.
pub fn encode<K: Serialize>(query: &str, key: &K) -> String {
    let envelope = Envelope {
        q: fingerprint(query),
        k: key,
    };
    // Serializing plain data to JSON cannot fail.
    let json = serde_json::to_vec(&envelope).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a token issued by [`encode`] for the same `query`.
pub fn decode<K: DeserializeOwned>(query: &str, token: &str) -> Result<K, PageTokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| PageTokenError::Malformed)?;
    let envelope: Envelope<K> =
        serde_json::from_slice(&bytes).map_err(|_| PageTokenError::Malformed)?;
    if envelope.q != fingerprint(query) {
        return Err(PageTokenError::OtherQuery);
    }
    Ok(envelope.k)
}

/// Decodes the request field `field`, a token issued for `query`: none for
/// an empty token (the first page) or for a refused one, which is recorded
/// in `violations` as INVALID_PAGE_TOKEN.
pub fn decode_field<K: DeserializeOwned>(
    violations: &mut FieldViolations,
    field: &str,
    query: &str,
    token: &str,
) -> Option<K> {
    if token.is_empty() {
        return None;
    }
    decode(query, token)
        .map_err(|e| violations.add(field, "INVALID_PAGE_TOKEN", e.to_string()))
        .ok()
}

/// Cuts `rows`, read with one row more than `page_size`, to the page, and
/// answers the next page's token: `token` of the last row kept when a row
/// followed, else empty (the last page).
pub fn next_page<T>(rows: &mut Vec<T>, page_size: u32, token: impl FnOnce(&T) -> String) -> String {
    let page_size = page_size as usize;
    if rows.len() > page_size {
        rows.truncate(page_size);
        rows.last().map(token).unwrap_or_default()
    } else {
        String::new()
    }
}

/// FNV-1a: stable across processes and Rust versions, unlike `DefaultHasher`.
fn fingerprint(query: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in query.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_for_the_same_query() {
        let token = encode("messages|c1|asc", &(42_i64, "x".to_string()));
        let key: (i64, String) = decode("messages|c1|asc", &token).unwrap();
        assert_eq!(key, (42, "x".into()));
    }

    #[test]
    fn refuses_a_token_from_another_query() {
        let token = encode("messages|c1|asc", &42_i64);
        assert_eq!(
            decode::<i64>("messages|c2|asc", &token),
            Err(PageTokenError::OtherQuery)
        );
    }

    #[test]
    fn a_page_with_a_row_more_has_a_next_token_for_its_last_row() {
        let mut rows = vec![1, 2, 3];
        assert_eq!(next_page(&mut rows, 2, |last| last.to_string()), "2");
        assert_eq!(rows, [1, 2]);
        let mut last_page = vec![1, 2];
        assert_eq!(next_page(&mut last_page, 2, |last| last.to_string()), "");
        assert_eq!(last_page, [1, 2]);
    }

    #[test]
    fn a_refused_page_token_is_a_field_violation() {
        let mut v = FieldViolations::new();
        assert_eq!(decode_field::<i64>(&mut v, "page_token", "q", ""), None);
        assert!(v.into_result().is_ok());
        let token = encode("q", &7_i64);
        let mut v = FieldViolations::new();
        assert_eq!(
            decode_field::<i64>(&mut v, "page_token", "q", &token),
            Some(7)
        );
        assert_eq!(
            decode_field::<i64>(&mut v, "page_token", "other", &token),
            None
        );
        assert!(v.into_result().is_err());
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(decode::<i64>("q", "%%%"), Err(PageTokenError::Malformed));
        assert_eq!(
            decode::<i64>("q", "aGVsbG8"),
            Err(PageTokenError::Malformed)
        );
    }
}
