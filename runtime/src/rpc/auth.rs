//! Who is calling, and what they may call.
//!
//! A caller has a name, proven by a bearer token (`name:token` in the token
//! list, compared in constant time so response timing tells nothing about a
//! token) or by a client certificate (its first DNS SubjectAltName, else its
//! Common Name, once TLS has checked that it chains to the client CA). The
//! grants say which methods each name may call; anything not granted is
//! PERMISSION_DENIED. Configuration mistakes that would quietly open a
//! server (an empty token list, a placeholder secret, a grant naming a
//! method that does not exist) are startup errors.

use std::collections::{HashMap, HashSet};

use subtle::ConstantTimeEq;

/// Shortest token accepted in configuration: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Fragments that mark a secret nobody replaced (as in deploy/'s examples).
const PLACEHOLDER_MARKS: [&str; 7] = [
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "placeholder",
    "example",
    "xxxxxxxx",
];

/// True when `token` still looks like an example value.
pub fn is_placeholder(token: &str) -> bool {
    let lower = token.to_ascii_lowercase();
    PLACEHOLDER_MARKS.iter().any(|mark| lower.contains(mark))
}

/// A caller's name: letters, digits, `.`, `-`, `_` (as in a DNS name or a
/// Kubernetes service account), so that it is safe in logs and labels.
fn valid_caller_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// The accepted tokens, each with its caller's name. Never logged.
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.entries.len())
    }
}

impl TokenSet {
    /// Entries `name:token`, separated by commas or newlines; blanks and `#`
    /// comment lines ignored. `source` names where they came from, for the
    /// error message (which never contains a token).
    pub fn parse(list: &str, source: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        for (index, entry) in list
            .split([',', '\n'])
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.starts_with('#'))
            .enumerate()
        {
            let n = index + 1;
            let Some((name, token)) = entry.split_once(':') else {
                return Err(format!(
                    "{source}: entry #{n} is not `caller-name:token` (each token needs the name of its caller)"
                ));
            };
            let (name, token) = (name.trim(), token.trim());
            if !valid_caller_name(name) {
                return Err(format!(
                    "{source}: entry #{n}: caller name {name:?} must be letters, digits, '.', '-' or '_'"
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{source}: the token of {name:?} is shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            if is_placeholder(token) {
                return Err(format!(
                    "{source}: the token of {name:?} is a placeholder (e.g. CHANGE-ME): replace it with a real secret"
                ));
            }
            if !seen.insert(token.to_owned()) {
                return Err(format!(
                    "{source}: the token of {name:?} is listed twice: every caller needs its own"
                ));
            }
            entries.push((name.to_owned(), token.as_bytes().to_vec()));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `other`'s entries.
    pub fn extend(&mut self, other: TokenSet) {
        self.entries.extend(other.entries);
    }

    /// The caller whose token `authorization` (`Bearer <token>`) presents.
    /// Every token is compared, matched or not.
    pub fn identify(&self, authorization: &str) -> Option<&str> {
        let presented = authorization.strip_prefix("Bearer ")?.trim().as_bytes();
        let mut found = None;
        for (name, token) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// What a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Everything,
    /// Every method of `package.Service`.
    Service(String),
    /// One `package.Service/Method`.
    Method(String),
}

/// Which methods each caller may call.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    by_caller: HashMap<String, Vec<Pattern>>,
}

impl Grants {
    /// Entries `name=Pattern,Pattern` separated by `;` or newlines. A pattern
    /// is `*`, `Service/*`, `Service/Method` or a bare `Method` of
    /// `own_service`; `Service` is short (`MemoryService`) or full
    /// (`maitre.memory.v1.MemoryService`). Every pattern must name something
    /// in `served` (the `package.Service/Method` paths of this server), so a
    /// typo is a startup error rather than a silent denial.
    pub fn parse(spec: &str, own_service: &str, served: &HashSet<String>) -> Result<Self, String> {
        let services: HashSet<&str> = served
            .iter()
            .filter_map(|path| path.split_once('/').map(|(service, _)| service))
            .collect();
        let resolve_service = |name: &str| -> Option<String> {
            services
                .iter()
                .find(|full| **full == name || full.rsplit('.').next() == Some(name))
                .map(|full| (*full).to_owned())
        };
        let mut by_caller: HashMap<String, Vec<Pattern>> = HashMap::new();
        for entry in spec
            .split([';', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
        {
            let Some((name, patterns)) = entry.split_once('=') else {
                return Err(format!(
                    "AUTH_GRANTS: {entry:?} is not `caller-name=Method,Method`"
                ));
            };
            let name = name.trim();
            if !valid_caller_name(name) {
                return Err(format!(
                    "AUTH_GRANTS: caller name {name:?} must be letters, digits, '.', '-' or '_'"
                ));
            }
            let granted = by_caller.entry(name.to_owned()).or_default();
            for pattern in patterns.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let parsed = match pattern.split_once('/') {
                    None if pattern == "*" => Pattern::Everything,
                    None => Pattern::Method(format!("{own_service}/{pattern}")),
                    Some((service, "*")) => Pattern::Service(
                        resolve_service(service)
                            .ok_or_else(|| unknown(name, pattern, "service"))?,
                    ),
                    Some((service, method)) => Pattern::Method(format!(
                        "{}/{method}",
                        resolve_service(service)
                            .ok_or_else(|| unknown(name, pattern, "service"))?
                    )),
                };
                if let Pattern::Method(path) = &parsed
                    && !served.contains(path)
                {
                    return Err(unknown(name, pattern, "method"));
                }
                granted.push(parsed);
            }
        }
        Ok(Self { by_caller })
    }

    /// True when `caller` may call `method` (`package.Service/Method`).
    pub fn allows(&self, caller: &str, method: &str) -> bool {
        let service = method.split_once('/').map(|(s, _)| s).unwrap_or_default();
        self.by_caller.get(caller).is_some_and(|patterns| {
            patterns.iter().any(|pattern| match pattern {
                Pattern::Everything => true,
                Pattern::Service(s) => s == service,
                Pattern::Method(m) => m == method,
            })
        })
    }

    /// True when `caller` appears in the grants (bounds metric labels).
    pub fn knows(&self, caller: &str) -> bool {
        self.by_caller.contains_key(caller)
    }

    /// The caller names, sorted (for the startup log line).
    pub fn callers(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_caller.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

fn unknown(caller: &str, pattern: &str, what: &str) -> String {
    format!("AUTH_GRANTS: {caller}={pattern}: no such {what} on this server")
}

/// The caller name a client certificate proves: its first DNS
/// SubjectAltName, else its subject's Common Name.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        });
    let name = from_san.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    })?;
    valid_caller_name(&name).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> HashSet<String> {
        crate::rpc::methods::known_methods(&[maitre_api::FILE_DESCRIPTOR_SET])
    }

    const MEMORY: &str = "maitre.memory.v1.MemoryService";

    #[test]
    fn tokens_identify_their_caller() {
        let set = TokenSet::parse(
            "booking-service:first-token-0123456789,\n# comment\nadmin:second-token-0123456789\n",
            "AUTH_TOKENS",
        )
        .unwrap();
        assert_eq!(
            set.identify("Bearer first-token-0123456789"),
            Some("booking-service")
        );
        assert_eq!(
            set.identify("Bearer second-token-0123456789"),
            Some("admin")
        );
        assert_eq!(set.identify("Bearer first-token-012345678"), None);
        assert_eq!(set.identify("first-token-0123456789"), None);
        assert_eq!(set.identify("Basic first-token-0123456789"), None);
    }

    #[test]
    fn refuses_unnamed_short_placeholder_and_shared_tokens() {
        assert!(TokenSet::parse("a-token-without-a-name-000", "f").is_err());
        assert!(TokenSet::parse("admin:short", "f").is_err());
        assert!(TokenSet::parse("admin:CHANGE-ME-admin-token-0001", "f").is_err());
        assert!(TokenSet::parse("admin:an-example-token-value-01", "f").is_err());
        assert!(TokenSet::parse("a b:a-long-enough-token-000001", "f").is_err());
        assert!(
            TokenSet::parse("a:same-token-for-both-0001,b:same-token-for-both-0001", "f").is_err()
        );
        assert!(
            TokenSet::parse("# only a comment\n\n", "f")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn grants_resolve_short_and_full_names_and_refuse_typos() {
        let grants = Grants::parse(
            "booking-service=GetEmotionHistory,MemoryService/StoreMessage; admin=*\nops=maitre.memory.v1.MemoryService/*",
            MEMORY,
            &served(),
        )
        .unwrap();
        assert!(grants.allows("booking-service", &format!("{MEMORY}/GetEmotionHistory")));
        assert!(grants.allows("booking-service", &format!("{MEMORY}/StoreMessage")));
        assert!(!grants.allows("booking-service", &format!("{MEMORY}/DeleteUserData")));
        assert!(grants.allows("admin", &format!("{MEMORY}/DeleteUserData")));
        assert!(grants.allows("ops", &format!("{MEMORY}/ListMessages")));
        assert!(!grants.allows("ops", "maitre.booking.v1.BookingService/CreateBooking"));
        assert!(!grants.allows("stranger", &format!("{MEMORY}/StoreMessage")));
        assert!(Grants::parse("x=StoreMesage", MEMORY, &served()).is_err());
        assert!(Grants::parse("x=NoSuchService/*", MEMORY, &served()).is_err());
        assert!(Grants::parse("x StoreMessage", MEMORY, &served()).is_err());
    }

    #[test]
    fn certificates_name_their_caller_by_san_then_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let with_san = rcgen::CertificateParams::new(vec!["booking-service".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            certificate_identity(with_san.der()).as_deref(),
            Some("booking-service")
        );
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "assistant");
        let with_cn = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(with_cn.der()).as_deref(),
            Some("assistant")
        );
        assert_eq!(certificate_identity(b"not a certificate"), None);
    }
}
