//! Idempotency keys bound to the request they first answered.
//!
//! A key (`request_id`) is stored with a fingerprint of its request: a retry
//! carrying the same key and the same request gets the first answer; the
//! same key with anything else is refused (REQUEST_ID_REUSED) rather than
//! answered with a result that is not what was asked for.

use sha2::{Digest, Sha256};

/// Length of a fingerprint, in bytes.
pub const FINGERPRINT_LEN: usize = 32;

/// SHA-256 of the request's protobuf encoding, with the key itself cleared
/// by `clear_key`.
///
/// Why the encoding of the whole message rather than a list of fields: it
/// covers every field, including fields added to the request later, so a
/// new field can never be silently left out of the comparison. Why it is
/// stable: prost writes fields in field-number order and leaves proto3
/// defaults out, these requests have no maps (whose order would vary), and
/// unknown fields are dropped when the request is decoded, so two requests
/// that mean the same encode to the same bytes. It compares the request as
/// sent, before any trimming: a retry resends the same bytes.
pub fn fingerprint<M: prost::Message + Clone>(
    request: &M,
    clear_key: impl FnOnce(&mut M),
) -> Vec<u8> {
    let mut keyless = request.clone();
    clear_key(&mut keyless);
    Sha256::digest(keyless.encode_to_vec()).to_vec()
}

/// Whether a stored key's fingerprint allows replaying it for a request
/// with fingerprint `new`. Keys stored before fingerprints existed have
/// none and replay as they always did.
pub fn same_request(stored: Option<&[u8]>, new: &[u8]) -> bool {
    stored.is_none_or(|stored| stored == new)
}

#[cfg(test)]
mod tests {
    use maitre_api::booking::v1 as pb;

    use super::*;

    fn request() -> pb::CreateBookingRequest {
        pb::CreateBookingRequest {
            customer_id: "ana".into(),
            customer_name: "Ana".into(),
            conversation_id: String::new(),
            slot_id: "0193a5b0-7e1c-7000-8000-000000000001".into(),
            party_size: 2,
            deposit: Some(pb::Money {
                currency_code: "EUR".into(),
                amount_minor: 2500,
            }),
            request_id: "r-1".into(),
        }
    }

    fn of(request: &pb::CreateBookingRequest) -> Vec<u8> {
        fingerprint(request, |r| r.request_id.clear())
    }

    #[test]
    fn the_key_itself_is_not_part_of_the_fingerprint() {
        let mut other_key = request();
        other_key.request_id = "r-2".into();
        assert_eq!(of(&request()), of(&other_key));
        assert_eq!(of(&request()).len(), FINGERPRINT_LEN);
    }

    #[test]
    fn every_field_changes_it() {
        let base = of(&request());
        let changes: Vec<fn(&mut pb::CreateBookingRequest)> = vec![
            |r| r.customer_id = "bob".into(),
            |r| r.customer_name = "Ana ".into(),
            |r| r.conversation_id = "0193a5b0-7e1c-7000-8000-000000000002".into(),
            |r| r.slot_id = "0193a5b0-7e1c-7000-8000-000000000003".into(),
            |r| r.party_size = 3,
            |r| r.deposit = None,
            |r| r.deposit.as_mut().unwrap().amount_minor = 2501,
            |r| r.deposit.as_mut().unwrap().currency_code = "USD".into(),
        ];
        for (i, change) in changes.into_iter().enumerate() {
            let mut changed = request();
            change(&mut changed);
            assert_ne!(of(&changed), base, "change {i} went unnoticed");
        }
    }

    #[test]
    fn legacy_keys_without_a_fingerprint_replay() {
        let new = of(&request());
        assert!(same_request(None, &new));
        assert!(same_request(Some(&new), &new));
        assert!(!same_request(Some(&[0; FINGERPRINT_LEN]), &new));
    }
}
