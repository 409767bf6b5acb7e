//! booking-service's one error type, and its one mapping to gRPC status.
//! Internal causes are logged with their chain, never shown to the caller.

use std::collections::HashMap;

use maitre::status::{FieldViolations, database_status, with_reason};
use tonic::{Code, Status};
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
            Error::Database(cause) => database_status(DOMAIN, &cause),
        }
    }
}
