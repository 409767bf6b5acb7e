//! booking-service's one error type, and its one mapping to gRPC status.
//! Internal causes are logged with their chain, never shown to the caller.
//! No message or metadata carries a customer id: statuses end up in logs.

use std::collections::HashMap;

use maitre_runtime::status::{FieldViolations, database_status, with_reason};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
use uuid::Uuid;

/// The `ErrorInfo.domain` of every error this service returns.
pub const DOMAIN: &str = "booking.maitre";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] FieldViolations),
    #[error("slot {0} not found")]
    SlotNotFound(Uuid),
    #[error("slot {slot_id} has {available} free seats, {requested} requested")]
    SlotFull {
        slot_id: Uuid,
        available: i32,
        requested: i32,
    },
    #[error("slot {0} has already started")]
    SlotStarted(Uuid),
    #[error("booking {0} not found")]
    BookingNotFound(Uuid),
    #[error(
        "request_id was already used for a different request; use a new request_id for a new request"
    )]
    RequestIdReused,
    #[error("conversation {0} belongs to another customer")]
    ConversationOfAnotherCustomer(Uuid),
    #[error(
        "booking-service erased its part, but memory-service could not be reached to erase \
         the conversations: call EraseCustomer again to finish"
    )]
    MemoryUnavailable,
    #[error(
        "booking-service erased its part, but memory-service refused to erase the \
         conversations ({code:?}: {message}): call EraseCustomer again once that is fixed"
    )]
    MemoryRefused { code: Code, message: String },
    #[error("follow-up {0} not found")]
    FollowUpNotFound(Uuid),
    #[error("follow-up {0} is CANCELLED: a cancelled follow-up is never revived")]
    FollowUpCancelled(Uuid),
    #[error(
        "the booking of follow-up {0} was cancelled: the follow-up is now CANCELLED, not re-driven"
    )]
    FollowUpBookingCancelled(Uuid),
    #[error("follow-up {id} is {state}, not FAILED: only FAILED follow-ups can be re-driven")]
    FollowUpNotFailed { id: Uuid, state: &'static str },
    #[error("booking {0} is cancelled")]
    BookingCancelled(Uuid),
    #[error("booking {booking_id} is in slot {slot_id} already")]
    AlreadyInSlot { booking_id: Uuid, slot_id: Uuid },
    #[error("hold {0} not found")]
    HoldNotFound(Uuid),
    #[error("hold {0} has expired: its seats are free again; hold them anew")]
    HoldExpired(Uuid),
    #[error("hold {0} was released: its seats are free again; hold them anew")]
    HoldReleased(Uuid),
    #[error("hold {hold_id} is confirmed already, as booking {booking_id}")]
    HoldAlreadyConfirmed { hold_id: Uuid, booking_id: Uuid },
    #[error(
        "the deposit of booking {booking_id} is {amount_minor} {currency} (minor units); \
         the payment must be that amount"
    )]
    PaymentAmountMismatch {
        booking_id: Uuid,
        currency: String,
        amount_minor: i64,
    },
    #[error("the deposit of booking {0} was already recorded under another provider reference")]
    PaymentAlreadyRecorded(Uuid),
    #[error("this provider reference was already recorded for another booking")]
    ProviderReferenceUsed,
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(violations) => violations.into_status(DOMAIN),
            Error::SlotNotFound(id) => with_reason(
                Code::NotFound,
                DOMAIN,
                "SLOT_NOT_FOUND",
                message,
                HashMap::from([("slot_id".into(), id.to_string())]),
            ),
            Error::SlotFull {
                slot_id,
                available,
                requested,
            } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "SLOT_FULL",
                message,
                HashMap::from([
                    ("slot_id".into(), slot_id.to_string()),
                    ("available_seats".into(), available.to_string()),
                    ("requested_seats".into(), requested.to_string()),
                ]),
            ),
            Error::SlotStarted(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "SLOT_STARTED",
                message,
                HashMap::from([("slot_id".into(), id.to_string())]),
            ),
            Error::BookingNotFound(id) => with_reason(
                Code::NotFound,
                DOMAIN,
                "BOOKING_NOT_FOUND",
                message,
                HashMap::from([("booking_id".into(), id.to_string())]),
            ),
            Error::RequestIdReused => {
                let mut violation =
                    FieldViolation::new("request_id", "was already used for a different request");
                violation.reason = "REQUEST_ID_REUSED".into();
                let mut details = ErrorDetails::with_bad_request(vec![violation]);
                details.set_error_info("REQUEST_ID_REUSED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::ConversationOfAnotherCustomer(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "CONVERSATION_BELONGS_TO_ANOTHER_CUSTOMER",
                message,
                HashMap::from([("conversation_id".into(), id.to_string())]),
            ),
            Error::MemoryUnavailable => with_reason(
                Code::Unavailable,
                DOMAIN,
                "MEMORY_SERVICE_UNAVAILABLE",
                message,
                HashMap::from([("booking_part".into(), "done".into())]),
            ),
            Error::MemoryRefused { code, .. } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "MEMORY_SERVICE_REFUSED",
                message,
                HashMap::from([
                    ("booking_part".into(), "done".into()),
                    ("memory_code".into(), format!("{code:?}")),
                ]),
            ),
            Error::FollowUpNotFound(id) => with_reason(
                Code::NotFound,
                DOMAIN,
                "FOLLOW_UP_NOT_FOUND",
                message,
                HashMap::from([("follow_up_id".into(), id.to_string())]),
            ),
            Error::FollowUpCancelled(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "FOLLOW_UP_CANCELLED",
                message,
                HashMap::from([("follow_up_id".into(), id.to_string())]),
            ),
            Error::FollowUpBookingCancelled(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "BOOKING_CANCELLED",
                message,
                HashMap::from([("follow_up_id".into(), id.to_string())]),
            ),
            Error::FollowUpNotFailed { id, state } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "FOLLOW_UP_NOT_FAILED",
                message,
                HashMap::from([
                    ("follow_up_id".into(), id.to_string()),
                    ("state".into(), state.to_owned()),
                ]),
            ),
            Error::BookingCancelled(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "BOOKING_CANCELLED",
                message,
                HashMap::from([("booking_id".into(), id.to_string())]),
            ),
            Error::AlreadyInSlot {
                booking_id,
                slot_id,
            } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "BOOKING_ALREADY_IN_SLOT",
                message,
                HashMap::from([
                    ("booking_id".into(), booking_id.to_string()),
                    ("slot_id".into(), slot_id.to_string()),
                ]),
            ),
            Error::HoldNotFound(id) => with_reason(
                Code::NotFound,
                DOMAIN,
                "HOLD_NOT_FOUND",
                message,
                HashMap::from([("hold_id".into(), id.to_string())]),
            ),
            Error::HoldExpired(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "HOLD_EXPIRED",
                message,
                HashMap::from([("hold_id".into(), id.to_string())]),
            ),
            Error::HoldReleased(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "HOLD_RELEASED",
                message,
                HashMap::from([("hold_id".into(), id.to_string())]),
            ),
            Error::HoldAlreadyConfirmed {
                hold_id,
                booking_id,
            } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "HOLD_ALREADY_CONFIRMED",
                message,
                HashMap::from([
                    ("hold_id".into(), hold_id.to_string()),
                    ("booking_id".into(), booking_id.to_string()),
                ]),
            ),
            Error::PaymentAmountMismatch {
                booking_id,
                currency,
                amount_minor,
            } => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "PAYMENT_AMOUNT_MISMATCH",
                message,
                HashMap::from([
                    ("booking_id".into(), booking_id.to_string()),
                    ("expected_currency_code".into(), currency),
                    ("expected_amount_minor".into(), amount_minor.to_string()),
                ]),
            ),
            Error::PaymentAlreadyRecorded(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "PAYMENT_ALREADY_RECORDED",
                message,
                HashMap::from([("booking_id".into(), id.to_string())]),
            ),
            Error::ProviderReferenceUsed => {
                let mut violation = FieldViolation::new(
                    "provider_reference",
                    "was already recorded for another booking",
                );
                violation.reason = "PROVIDER_REFERENCE_USED".into();
                let mut details = ErrorDetails::with_bad_request(vec![violation]);
                details.set_error_info("PROVIDER_REFERENCE_USED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::AlreadyExists, message, details)
            }
            Error::Database(cause) => database_status(DOMAIN, &cause),
        }
    }
}

impl From<crate::memory_client::MemoryError> for Error {
    /// A failed memory-service part of EraseCustomer.
    fn from(error: crate::memory_client::MemoryError) -> Self {
        use crate::memory_client::MemoryError;
        if error.is_transient() {
            return Error::MemoryUnavailable;
        }
        match error {
            MemoryError::NotFound => Error::MemoryRefused {
                code: Code::NotFound,
                message: "not found".into(),
            },
            MemoryError::Failed { code, message, .. } => Error::MemoryRefused { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn a_reused_request_id_is_invalid_argument_naming_the_field() {
        let status = Status::from(Error::RequestIdReused);
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("REQUEST_ID_REUSED", DOMAIN)
        );
        let bad = status.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "request_id");
        assert_eq!(bad.field_violations[0].reason, "REQUEST_ID_REUSED");
    }

    #[test]
    fn memory_failures_say_the_booking_part_is_done_and_whether_to_retry() {
        let unreachable = Status::from(Error::from(crate::memory_client::MemoryError::Failed {
            code: Code::Unavailable,
            reason: String::new(),
            message: "connection refused".into(),
        }));
        assert_eq!(unreachable.code(), Code::Unavailable);
        assert!(unreachable.message().contains("call EraseCustomer again"));
        let info = unreachable.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "MEMORY_SERVICE_UNAVAILABLE");
        assert_eq!(
            info.metadata.get("booking_part").map(String::as_str),
            Some("done")
        );

        let timed_out = Status::from(Error::from(crate::memory_client::MemoryError::Failed {
            code: Code::DeadlineExceeded,
            reason: String::new(),
            message: String::new(),
        }));
        assert_eq!(timed_out.code(), Code::Unavailable);

        let denied = Status::from(Error::from(crate::memory_client::MemoryError::Failed {
            code: Code::PermissionDenied,
            reason: "METHOD_NOT_GRANTED".into(),
            message: "DeleteUserData is not granted".into(),
        }));
        assert_eq!(denied.code(), Code::FailedPrecondition);
        assert_eq!(
            denied.get_details_error_info().expect("info").reason,
            "MEMORY_SERVICE_REFUSED"
        );
    }
}
