//! Erasing a customer: the pseudonym that replaces their id in what
//! accounting keeps, and the request.

use hmac::{Hmac, KeyInit, Mac};
use maitre_api::booking::v1 as pb;
use maitre_runtime::{fields, status::FieldViolations};
use sha2::Sha256;

/// Every pseudonym starts with this, so an erased row is recognisable and a
/// real customer id can never be mistaken for one (CreateBooking and
/// EraseCustomer refuse ids with this prefix).
pub const PSEUDONYM_PREFIX: &str = "erased:";

/// `last_error` of a follow-up cancelled because its customer was erased.
pub const ERASED_REASON: &str = "customer erased";

/// The pseudonym of `customer_id`: the prefix and the hex HMAC-SHA-256 of
/// the id keyed with the database's salt. Deterministic (erasing the same id
/// twice gives the same pseudonym, so accounting can still group a
/// customer's bookings) and one-way without the salt (the rows alone never
/// give the id back). HMAC rather than a bare hash of salt + id: a keyed
/// construction meant for exactly this.
pub fn pseudonym(salt: &[u8], customer_id: &str) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(salt)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(customer_id.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(PSEUDONYM_PREFIX.len() + 2 * digest.len());
    out.push_str(PSEUDONYM_PREFIX);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Records a violation when `customer_id` is one of our pseudonyms.
pub fn refuse_pseudonym(v: &mut FieldViolations, field: &str, customer_id: &str) {
    if customer_id.starts_with(PSEUDONYM_PREFIX) {
        v.add(
            field,
            "RESERVED_PREFIX",
            format!("must not start with {PSEUDONYM_PREFIX:?} (erased customers' pseudonyms)"),
        );
    }
}

/// A validated EraseCustomer request: the customer id.
///
/// Deliberately looser than the rules for new customer ids
/// (`fields::identifier`, which grows stricter over time: surrounding
/// spaces, invisible characters): every id that may already be stored must
/// stay erasable, so this accepts what any version of CreateBooking
/// accepted — set, at most `MAX_ID_CHARS` characters, no control
/// characters — and refuses only pseudonyms (erasing one would re-key what
/// accounting keeps).
pub fn parse(request: pb::EraseCustomerRequest) -> Result<String, FieldViolations> {
    let pb::EraseCustomerRequest { customer_id } = request;
    let field = "customer_id";
    let mut v = FieldViolations::new();
    if customer_id.trim().is_empty() {
        v.add(field, "REQUIRED", "must be set");
    } else if customer_id.chars().count() > fields::MAX_ID_CHARS {
        v.add(
            field,
            "TOO_LONG",
            format!("must be at most {} characters", fields::MAX_ID_CHARS),
        );
    } else if customer_id.chars().any(char::is_control) {
        v.add(
            field,
            "INVALID_CHARACTERS",
            "must not contain control characters",
        );
    } else {
        refuse_pseudonym(&mut v, field, &customer_id);
    }
    v.into_result()?;
    Ok(customer_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: [u8; 32] = [7; 32];

    #[test]
    fn the_same_id_gives_the_same_pseudonym_and_ids_differ() {
        let ana = pseudonym(&SALT, "ana");
        assert_eq!(ana, pseudonym(&SALT, "ana"));
        assert_ne!(ana, pseudonym(&SALT, "ana "));
        assert_ne!(ana, pseudonym(&SALT, "bob"));
        assert!(ana.starts_with(PSEUDONYM_PREFIX));
        assert_eq!(ana.len(), PSEUDONYM_PREFIX.len() + 64);
        assert!(!ana.contains("ana"), "{ana}");
    }

    #[test]
    fn another_salt_gives_another_pseudonym() {
        assert_ne!(pseudonym(&SALT, "ana"), pseudonym(&[8; 32], "ana"));
    }

    #[test]
    fn it_is_hmac_sha256() {
        // RFC 4231, test case 2.
        let mac = pseudonym(b"Jefe", "what do ya want for nothing?");
        assert_eq!(
            mac,
            "erased:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn pseudonyms_and_blank_ids_are_refused() {
        let fields = |id: &str| {
            parse(pb::EraseCustomerRequest {
                customer_id: id.into(),
            })
            .err()
            .map(|v| v.fields().join(","))
        };
        assert_eq!(fields(&pseudonym(&SALT, "ana")), Some("customer_id".into()));
        assert_eq!(fields(""), Some("customer_id".into()));
        assert_eq!(fields("   "), Some("customer_id".into()));
        assert_eq!(fields(&"a".repeat(129)), Some("customer_id".into()));
        assert_eq!(fields("ana\0"), Some("customer_id".into()));
        assert_eq!(fields("ana"), None);
    }

    #[test]
    fn ids_stored_under_older_rules_stay_erasable() {
        for stored in [
            " ana",
            "ana ",
            "a\u{200B}na",
            "\u{202E}ana",
            &"a".repeat(128),
        ] {
            assert_eq!(
                parse(pb::EraseCustomerRequest {
                    customer_id: stored.into(),
                })
                .ok()
                .as_deref(),
                Some(stored),
                "{stored:?}"
            );
        }
    }
}
