//! Holds: seats reserved for a short time while the customer pays, then
//! confirmed into a booking, released, or left to expire.

use chrono::{DateTime, Utc};
use maitre_api::booking::v1 as pb;
use maitre_runtime::{fields, status::FieldViolations};
use uuid::Uuid;

use super::{
    booking::{self, NewBooking},
    idempotency,
};

/// A validated HoldSeats request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewHold {
    pub customer_id: String,
    pub slot_id: Uuid,
    pub party_size: i32,
    pub request_id: String,
    /// The request's fingerprint, stored with `request_id`.
    pub fingerprint: Vec<u8>,
}

impl NewHold {
    pub fn parse(request: pb::HoldSeatsRequest) -> Result<Self, FieldViolations> {
        let fingerprint = idempotency::fingerprint(&request, |r| r.request_id.clear());
        let pb::HoldSeatsRequest {
            customer_id,
            slot_id,
            party_size,
            request_id,
        } = request;
        let mut v = FieldViolations::new();
        let customer_id = booking::customer(&mut v, &customer_id);
        let slot_id = fields::uuid(&mut v, "slot_id", &slot_id);
        booking::party(&mut v, party_size);
        let request_id = fields::identifier(&mut v, "request_id", &request_id);
        v.into_result()?;
        match (customer_id, slot_id, request_id) {
            (Some(customer_id), Some(slot_id), Some(request_id)) => Ok(Self {
                customer_id,
                slot_id,
                party_size,
                request_id,
                fingerprint,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// A validated ConfirmHold request: what the booking needs besides the
/// hold's slot and seats.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldConfirmation {
    pub hold_id: Uuid,
    pub customer_id: String,
    pub customer_name: String,
    pub conversation_id: Option<Uuid>,
    pub deposit_currency: String,
    pub deposit_minor: i64,
    pub fingerprint: Vec<u8>,
}

impl HoldConfirmation {
    pub fn parse(request: pb::ConfirmHoldRequest) -> Result<Self, FieldViolations> {
        let fingerprint = idempotency::fingerprint(&request, |_| ());
        let pb::ConfirmHoldRequest {
            hold_id,
            customer_id,
            customer_name,
            conversation_id,
            deposit,
        } = request;
        let mut v = FieldViolations::new();
        let hold_id = fields::uuid(&mut v, "hold_id", &hold_id);
        let customer_id = booking::customer(&mut v, &customer_id);
        let name = booking::name(&mut v, &customer_name);
        let conversation_id = booking::conversation(&mut v, &conversation_id);
        let (currency, amount) = booking::deposit_money(&mut v, "deposit", deposit);
        v.into_result()?;
        match (hold_id, customer_id) {
            (Some(hold_id), Some(customer_id)) => Ok(Self {
                hold_id,
                customer_id,
                customer_name: name,
                conversation_id,
                deposit_currency: currency,
                deposit_minor: amount,
                fingerprint,
            }),
            _ => Err(FieldViolations::new()),
        }
    }

    /// The booking this confirmation makes of a hold of `party_size` seats
    /// in `slot_id`. Its key is derived from the hold, so confirming one
    /// hold twice can only ever make one booking.
    pub fn booking(&self, slot_id: Uuid, party_size: i32) -> NewBooking {
        NewBooking {
            customer_id: self.customer_id.clone(),
            customer_name: self.customer_name.clone(),
            conversation_id: self.conversation_id,
            slot_id,
            party_size,
            deposit_currency: self.deposit_currency.clone(),
            deposit_minor: self.deposit_minor,
            request_id: booking_request_id(self.hold_id),
            fingerprint: self.fingerprint.clone(),
            hold_id: Some(self.hold_id),
        }
    }
}

/// The prefix of the `request_id` of a booking a hold became; reserved:
/// CreateBooking refuses keys that start with it.
pub const BOOKING_KEY_PREFIX: &str = "hold:";

/// The `request_id` of the booking a hold became.
pub fn booking_request_id(hold_id: Uuid) -> String {
    format!("{BOOKING_KEY_PREFIX}{hold_id}")
}

/// A validated ReleaseHold request: the hold and its customer.
pub fn parse_release(request: pb::ReleaseHoldRequest) -> Result<(Uuid, String), FieldViolations> {
    let pb::ReleaseHoldRequest {
        hold_id,
        customer_id,
    } = request;
    let mut v = FieldViolations::new();
    let hold_id = fields::uuid(&mut v, "hold_id", &hold_id);
    let customer_id = booking::customer(&mut v, &customer_id);
    v.into_result()?;
    match (hold_id, customer_id) {
        (Some(hold_id), Some(customer_id)) => Ok((hold_id, customer_id)),
        _ => Err(FieldViolations::new()),
    }
}

/// A hold's state, from its columns and the database's clock.
pub fn state(
    booking_id: Option<Uuid>,
    released_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> pb::HoldState {
    if booking_id.is_some() {
        pb::HoldState::Confirmed
    } else if released_at.is_some() {
        pb::HoldState::Released
    } else if expires_at <= now {
        pb::HoldState::Expired
    } else {
        pb::HoldState::Held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm() -> pb::ConfirmHoldRequest {
        pb::ConfirmHoldRequest {
            hold_id: "0193a5b0-7e1c-7000-8000-000000000001".into(),
            customer_id: "ana".into(),
            customer_name: "Ana".into(),
            conversation_id: String::new(),
            deposit: Some(pb::Money {
                currency_code: "EUR".into(),
                amount_minor: 500,
            }),
        }
    }

    #[test]
    fn a_confirmation_books_under_a_key_derived_from_the_hold() {
        let parsed = HoldConfirmation::parse(confirm()).expect("valid");
        let slot = Uuid::now_v7();
        let booking = parsed.booking(slot, 3);
        assert_eq!(
            booking.request_id,
            "hold:0193a5b0-7e1c-7000-8000-000000000001"
        );
        assert_eq!((booking.slot_id, booking.party_size), (slot, 3));
        assert_eq!(booking.hold_id, Some(parsed.hold_id));
        // Another payload for the same hold has another fingerprint.
        let mut other = confirm();
        other.customer_name = "Bea".into();
        let other = HoldConfirmation::parse(other).expect("valid");
        assert_ne!(other.fingerprint, parsed.fingerprint);
    }

    #[test]
    fn hold_requests_name_every_bad_field() {
        let bad = NewHold::parse(pb::HoldSeatsRequest {
            customer_id: "erased:".to_owned() + &"ab".repeat(32),
            slot_id: "nope".into(),
            party_size: 21,
            request_id: String::new(),
        })
        .expect_err("invalid");
        assert_eq!(
            bad.fields(),
            ["customer_id", "slot_id", "party_size", "request_id"]
        );
    }

    #[test]
    fn states_follow_the_columns_and_the_clock() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        let earlier = now - chrono::Duration::seconds(60);
        assert_eq!(state(None, None, later, now), pb::HoldState::Held);
        assert_eq!(state(None, None, now, now), pb::HoldState::Expired);
        assert_eq!(
            state(None, Some(earlier), later, now),
            pb::HoldState::Released
        );
        assert_eq!(
            state(Some(Uuid::nil()), None, earlier, now),
            pb::HoldState::Confirmed
        );
    }
}
