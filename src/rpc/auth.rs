//! Bearer-token authentication: a set of accepted tokens, compared in
//! constant time so response timing tells nothing about a token's prefix.

use subtle::ConstantTimeEq;

/// The accepted tokens. Never logged.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

/// Shortest token accepted in configuration: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

impl TokenSet {
    /// Tokens from a comma- or newline-separated list; blanks and `#`
    /// comment lines ignored. Refuses tokens shorter than [`MIN_TOKEN_LEN`].
    pub fn parse(list: &str) -> Result<Self, String> {
        let tokens: Vec<Vec<u8>> = list
            .split([',', '\n'])
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.starts_with('#'))
            .map(|t| t.as_bytes().to_vec())
            .collect();
        if let Some(short) = tokens.iter().position(|t| t.len() < MIN_TOKEN_LEN) {
            return Err(format!(
                "token #{} is shorter than {MIN_TOKEN_LEN} characters",
                short + 1
            ));
        }
        Ok(Self { tokens })
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// True when `authorization` is `Bearer <an accepted token>`. Every
    /// token is compared, matched or not.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        let presented = presented.trim().as_bytes();
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented)
            })
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_listed_bearer_tokens() {
        let set = TokenSet::parse("first-token-0123456789,\n# comment\nsecond-token-0123456789\n")
            .unwrap();
        assert!(set.accepts(Some("Bearer first-token-0123456789")));
        assert!(set.accepts(Some("Bearer second-token-0123456789")));
        assert!(!set.accepts(Some("Bearer first-token-012345678")));
        assert!(!set.accepts(Some("first-token-0123456789")));
        assert!(!set.accepts(Some("Basic first-token-0123456789")));
        assert!(!set.accepts(None));
    }

    #[test]
    fn refuses_short_tokens() {
        assert!(TokenSet::parse("short").is_err());
        assert!(TokenSet::parse("").unwrap().is_empty());
    }
}
