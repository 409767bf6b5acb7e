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
    fn refuses_garbage() {
        assert_eq!(decode::<i64>("q", "%%%"), Err(PageTokenError::Malformed));
        assert_eq!(
            decode::<i64>("q", "aGVsbG8"),
            Err(PageTokenError::Malformed)
        );
    }
}
