//! Bookings: what a customer asks for, validated.

use maitre_api::booking::v1 as pb;
use maitre_runtime::{fields, pagination, status::FieldViolations};
use uuid::Uuid;

use super::{erasure, idempotency};

/// Most seats one booking takes.
pub const MAX_PARTY_SIZE: i32 = 20;
/// Longest customer name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Largest deposit, in minor units.
pub const MAX_DEPOSIT_MINOR: i64 = 100_000_000;

/// Booking states, stored as the proto enum's numbers.
pub const CONFIRMED: i16 = pb::BookingState::Confirmed as i16;
pub const CANCELLED: i16 = pb::BookingState::Cancelled as i16;
/// Payment state of a fresh booking's deposit.
pub const PAYMENT_PENDING: i16 = pb::PaymentState::Pending as i16;
/// Payment state of a collected deposit.
pub const PAYMENT_PAID: i16 = pb::PaymentState::Paid as i16;
/// Payment state of a cancelled booking's deposit.
pub const PAYMENT_VOIDED: i16 = pb::PaymentState::Voided as i16;
/// Payment state of a collected deposit of a cancelled booking.
pub const PAYMENT_REFUND_PENDING: i16 = pb::PaymentState::RefundPending as i16;

/// The times a booking's lifecycle runs on (configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LifecycleTimes {
    /// The follow-up comes due this long after the event ends.
    pub followup_delay: std::time::Duration,
    /// The reminder comes due this long before the event starts; zero: no
    /// reminders. A booking made (or moved) closer to the start gets none.
    pub reminder_lead: std::time::Duration,
    /// How long HoldSeats keeps seats.
    pub hold_ttl: std::time::Duration,
}

/// A validated CreateBooking request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBooking {
    pub customer_id: String,
    pub customer_name: String,
    pub conversation_id: Option<Uuid>,
    pub slot_id: Uuid,
    pub party_size: i32,
    pub deposit_currency: String,
    pub deposit_minor: i64,
    pub request_id: String,
    /// The request's fingerprint, stored with `request_id`.
    pub fingerprint: Vec<u8>,
    /// The hold this booking confirms (ConfirmHold): its seats are taken
    /// already, so none are counted again.
    pub hold_id: Option<Uuid>,
}

impl NewBooking {
    pub fn parse(request: pb::CreateBookingRequest) -> Result<Self, FieldViolations> {
        let fingerprint = idempotency::fingerprint(&request, |r| r.request_id.clear());
        let pb::CreateBookingRequest {
            customer_id,
            customer_name,
            conversation_id,
            slot_id,
            party_size,
            deposit,
            request_id,
        } = request;
        let mut v = FieldViolations::new();
        let customer_id = customer(&mut v, &customer_id);
        let name = name(&mut v, &customer_name);
        let conversation_id = conversation(&mut v, &conversation_id);
        let slot_id = fields::uuid(&mut v, "slot_id", &slot_id);
        party(&mut v, party_size);
        let (currency, amount) = deposit_money(&mut v, "deposit", deposit);
        let request_id = fields::identifier(&mut v, "request_id", &request_id).inspect(|key| {
            if key.starts_with(super::hold::BOOKING_KEY_PREFIX) {
                v.add(
                    "request_id",
                    "RESERVED_PREFIX",
                    "must not start with \"hold:\" (the keys of bookings made by ConfirmHold)",
                );
            }
        });
        v.into_result()?;
        match (customer_id, slot_id, request_id) {
            (Some(customer_id), Some(slot_id), Some(request_id)) => Ok(Self {
                customer_id,
                customer_name: name,
                conversation_id,
                slot_id,
                party_size,
                deposit_currency: currency,
                deposit_minor: amount,
                request_id,
                fingerprint,
                hold_id: None,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// A customer id a booking or hold may be made for (not a pseudonym).
pub fn customer(v: &mut FieldViolations, customer_id: &str) -> Option<String> {
    fields::identifier(v, "customer_id", customer_id)
        .inspect(|id| erasure::refuse_pseudonym(v, "customer_id", id))
}

/// A customer's name, trimmed.
pub fn name(v: &mut FieldViolations, customer_name: &str) -> String {
    let name = customer_name.trim();
    if name.is_empty() {
        v.add("customer_name", "REQUIRED", "must be set");
    } else if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        v.add(
            "customer_name",
            "INVALID_NAME",
            format!("must be at most {MAX_NAME_CHARS} printable characters"),
        );
    }
    name.to_owned()
}

/// An optional memory-service conversation id.
pub fn conversation(v: &mut FieldViolations, conversation_id: &str) -> Option<Uuid> {
    if conversation_id.is_empty() {
        None
    } else {
        fields::uuid(v, "conversation_id", conversation_id)
    }
}

/// Seats one booking or hold takes.
pub fn party(v: &mut FieldViolations, party_size: i32) {
    if !(1..=MAX_PARTY_SIZE).contains(&party_size) {
        v.add(
            "party_size",
            "OUT_OF_RANGE",
            format!("must be between 1 and {MAX_PARTY_SIZE}"),
        );
    }
}

/// An amount of money (a deposit, a payment): currency and minor units.
pub fn deposit_money(
    v: &mut FieldViolations,
    field: &str,
    money: Option<pb::Money>,
) -> (String, i64) {
    match money {
        None => {
            v.add(field, "REQUIRED", "must be set (amount_minor may be 0)");
            (String::new(), 0)
        }
        Some(pb::Money {
            currency_code,
            amount_minor,
        }) => {
            if currency_code.len() != 3 || !currency_code.chars().all(|c| c.is_ascii_uppercase()) {
                v.add(
                    &format!("{field}.currency_code"),
                    "INVALID_CURRENCY",
                    "must be an ISO 4217 code such as EUR",
                );
            }
            if !(0..=MAX_DEPOSIT_MINOR).contains(&amount_minor) {
                v.add(
                    &format!("{field}.amount_minor"),
                    "OUT_OF_RANGE",
                    format!("must be between 0 and {MAX_DEPOSIT_MINOR}"),
                );
            }
            (currency_code, amount_minor)
        }
    }
}

/// A validated ListBookings request; `after` is the last booking id served.
#[derive(Debug, Clone, PartialEq)]
pub struct BookingPage {
    pub customer_id: String,
    pub page_size: u32,
    pub after: Option<Uuid>,
}

impl BookingPage {
    pub fn token_query(customer_id: &str) -> String {
        format!("ListBookings|{customer_id}")
    }

    pub fn parse(
        request: pb::ListBookingsRequest,
        max_page_size: u32,
    ) -> Result<Self, FieldViolations> {
        let pb::ListBookingsRequest {
            customer_id,
            page_size,
            page_token,
        } = request;
        let mut v = FieldViolations::new();
        let customer_id = fields::identifier(&mut v, "customer_id", &customer_id);
        let page_size = fields::page_size(&mut v, "page_size", page_size, 50, max_page_size);
        let after = customer_id.as_ref().and_then(|customer| {
            pagination::decode_field(
                &mut v,
                "page_token",
                &Self::token_query(customer),
                &page_token,
            )
        });
        v.into_result()?;
        let customer_id = customer_id.ok_or_else(FieldViolations::new)?;
        Ok(Self {
            customer_id,
            page_size,
            after,
        })
    }
}

/// Which follow-ups ListFollowUps returns; `after` is the last id served.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUpPage {
    pub booking_id: Option<Uuid>,
    pub conversation_id: Option<Uuid>,
    pub page_size: u32,
    pub after: Option<Uuid>,
}

impl FollowUpPage {
    fn token_query(booking_id: Option<Uuid>, conversation_id: Option<Uuid>) -> String {
        format!("ListFollowUps|{booking_id:?}|{conversation_id:?}")
    }

    pub fn next_token(&self, last: Uuid) -> String {
        pagination::encode(
            &Self::token_query(self.booking_id, self.conversation_id),
            &last,
        )
    }

    pub fn parse(
        request: pb::ListFollowUpsRequest,
        max_page_size: u32,
    ) -> Result<Self, FieldViolations> {
        use pb::list_follow_ups_request::Parent;
        let pb::ListFollowUpsRequest {
            parent,
            page_size,
            page_token,
        } = request;
        let mut v = FieldViolations::new();
        let (booking_id, conversation_id) = match parent {
            Some(Parent::BookingId(id)) => (fields::uuid(&mut v, "booking_id", &id), None),
            Some(Parent::ConversationId(id)) => {
                (None, fields::uuid(&mut v, "conversation_id", &id))
            }
            None => {
                v.add("parent", "REQUIRED", "set booking_id or conversation_id");
                (None, None)
            }
        };
        let page_size = fields::page_size(&mut v, "page_size", page_size, 50, max_page_size);
        let after = if booking_id.is_none() && conversation_id.is_none() {
            None
        } else {
            pagination::decode_field(
                &mut v,
                "page_token",
                &Self::token_query(booking_id, conversation_id),
                &page_token,
            )
        };
        v.into_result()?;
        Ok(Self {
            booking_id,
            conversation_id,
            page_size,
            after,
        })
    }
}

/// A request naming one booking.
pub fn booking_id(value: &str) -> Result<Uuid, FieldViolations> {
    let mut v = FieldViolations::new();
    let id = fields::uuid(&mut v, "booking_id", value);
    v.into_result()?;
    id.ok_or_else(FieldViolations::new)
}

/// Longest cancellation reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// A validated CancelBooking request: the booking and the reason.
pub fn parse_cancel(request: pb::CancelBookingRequest) -> Result<(Uuid, String), FieldViolations> {
    let pb::CancelBookingRequest { booking_id, reason } = request;
    let mut v = FieldViolations::new();
    let id = fields::uuid(&mut v, "booking_id", &booking_id);
    if reason.chars().count() > MAX_REASON_CHARS || reason.contains('\0') {
        v.add(
            "reason",
            "INVALID_REASON",
            format!("must be at most {MAX_REASON_CHARS} characters"),
        );
    }
    v.into_result()?;
    Ok((id.ok_or_else(FieldViolations::new)?, reason))
}

/// A validated MoveBooking request.
#[derive(Debug, Clone, PartialEq)]
pub struct BookingMove {
    pub booking_id: Uuid,
    pub to_slot_id: Uuid,
    pub request_id: String,
    /// The request's fingerprint, stored with `request_id`.
    pub fingerprint: Vec<u8>,
}

impl BookingMove {
    pub fn parse(request: pb::MoveBookingRequest) -> Result<Self, FieldViolations> {
        let fingerprint = idempotency::fingerprint(&request, |r| r.request_id.clear());
        let pb::MoveBookingRequest {
            booking_id,
            slot_id,
            request_id,
        } = request;
        let mut v = FieldViolations::new();
        let booking_id = fields::uuid(&mut v, "booking_id", &booking_id);
        let to_slot_id = fields::uuid(&mut v, "slot_id", &slot_id);
        let request_id = fields::identifier(&mut v, "request_id", &request_id);
        v.into_result()?;
        match (booking_id, to_slot_id, request_id) {
            (Some(booking_id), Some(to_slot_id), Some(request_id)) => Ok(Self {
                booking_id,
                to_slot_id,
                request_id,
                fingerprint,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// A validated RecordPayment request.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRecord {
    pub booking_id: Uuid,
    pub provider_reference: String,
    pub currency: String,
    pub amount_minor: i64,
}

impl PaymentRecord {
    pub fn parse(request: pb::RecordPaymentRequest) -> Result<Self, FieldViolations> {
        let pb::RecordPaymentRequest {
            booking_id,
            provider_reference,
            amount,
        } = request;
        let mut v = FieldViolations::new();
        let booking_id = fields::uuid(&mut v, "booking_id", &booking_id);
        let reference = fields::identifier(&mut v, "provider_reference", &provider_reference);
        let (currency, amount_minor) = deposit_money(&mut v, "amount", amount);
        v.into_result()?;
        match (booking_id, reference) {
            (Some(booking_id), Some(provider_reference)) => Ok(Self {
                booking_id,
                provider_reference,
                currency,
                amount_minor,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(customer_id: &str) -> pb::CreateBookingRequest {
        pb::CreateBookingRequest {
            customer_id: customer_id.into(),
            customer_name: "Ana".into(),
            conversation_id: String::new(),
            slot_id: "0193a5b0-7e1c-7000-8000-000000000001".into(),
            party_size: 2,
            deposit: Some(pb::Money {
                currency_code: "EUR".into(),
                amount_minor: 0,
            }),
            request_id: "r-1".into(),
        }
    }

    /// The fields a CreateBooking and a ListBookings naming `customer_id`
    /// are refused for (both go through the shared `fields::identifier`).
    fn refused(customer_id: &str) -> (Vec<String>, Vec<String>) {
        let fields = |v: FieldViolations| v.fields().into_iter().map(String::from).collect();
        let booking = NewBooking::parse(request(customer_id))
            .err()
            .map(fields)
            .unwrap_or_default();
        let listing = BookingPage::parse(
            pb::ListBookingsRequest {
                customer_id: customer_id.into(),
                ..Default::default()
            },
            50,
        )
        .err()
        .map(fields)
        .unwrap_or_default();
        (booking, listing)
    }

    #[test]
    fn plain_customer_ids_pass() {
        for id in ["ana", "customer-42", "ana@example.org", "Zoë", "客户"] {
            assert_eq!(refused(id), (vec![], vec![]), "{id:?}");
        }
    }

    #[test]
    fn erased_customers_pseudonyms_cannot_book() {
        let pseudonym = format!("erased:{}", "ab".repeat(32));
        assert_eq!(refused(&pseudonym).0, ["customer_id"]);
        // Accounting may still list what an erased customer left.
        assert!(refused(&pseudonym).1.is_empty());
    }

    /// Like memory-service's `user_id`: bidi controls, zero-width and other
    /// invisible format characters, and surrounding spaces make two ids look
    /// alike that are not (or hide text). The rule lives in the shared
    /// validator `maitre_runtime::fields::identifier`, which booking-service uses
    /// for every customer id.
    #[test]
    fn look_alike_and_invisible_customer_ids_are_refused() {
        for id in [
            " ana",
            "ana ",
            "ana\t",
            "\u{202E}ana",
            "an\u{202D}a",
            "ana\u{2066}",
            "\u{200F}ana",
            "a\u{200B}na",
            "ana\u{200D}",
            "\u{FEFF}ana",
            "an\u{2060}a",
        ] {
            let (booking, listing) = refused(id);
            assert_eq!(booking, ["customer_id"], "CreateBooking {id:?}");
            assert_eq!(listing, ["customer_id"], "ListBookings {id:?}");
        }
    }
}
