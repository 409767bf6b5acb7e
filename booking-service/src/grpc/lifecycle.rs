//! The booking lifecycle's handlers: holds, moves and payments.

use maitre_api::booking::v1 as pb;
use maitre_runtime::db::now;
use uuid::Uuid;

use super::{BookingApi, convert};
use crate::{
    domain::{
        booking::{BookingMove, PaymentRecord},
        hold::{self, HoldConfirmation, NewHold},
    },
    error::Error,
    store::{
        self, bookings::CreateOutcome, holds::HoldOutcome, moves::MoveOutcome,
        payments::RecordOutcome, rows::HoldRow,
    },
};

impl BookingApi {
    pub(super) async fn hold_seats(
        &self,
        request: pb::HoldSeatsRequest,
    ) -> Result<pb::HoldSeatsResponse, Error> {
        let hold = NewHold::parse(request)?;
        let outcome = store::holds::hold(
            &self.pool,
            Uuid::now_v7(),
            &hold,
            now(),
            self.times.hold_ttl,
        )
        .await?;
        let (row, replayed) = match outcome {
            HoldOutcome::Held(row) => {
                tracing::info!(hold_id = %row.id, slot_id = %row.slot_id, "seats held");
                (row, false)
            }
            HoldOutcome::Replayed(row) => (row, true),
            HoldOutcome::RequestIdReused => return Err(Error::RequestIdReused),
            HoldOutcome::SlotNotFound => return Err(Error::SlotNotFound(hold.slot_id)),
            HoldOutcome::SlotStarted => return Err(Error::SlotStarted(hold.slot_id)),
            HoldOutcome::SlotFull { available } => {
                return Err(Error::SlotFull {
                    slot_id: hold.slot_id,
                    available,
                    requested: hold.party_size,
                });
            }
        };
        Ok(pb::HoldSeatsResponse {
            hold: Some(convert::hold(row)),
            replayed,
        })
    }

    /// The hold is read first (its slot and seats make the booking); the
    /// booking statement then re-checks that it is live, after taking the
    /// slot row, and a confirmation that lost a race is answered from what
    /// won it.
    pub(super) async fn confirm_hold(
        &self,
        request: pb::ConfirmHoldRequest,
    ) -> Result<pb::ConfirmHoldResponse, Error> {
        let confirmation = HoldConfirmation::parse(request)?;
        let hold_id = confirmation.hold_id;
        let held = self
            .customers_hold(hold_id, &confirmation.customer_id)
            .await?;
        let booking = confirmation.booking(held.slot_id, held.party_size);
        let outcome = self.book(&booking).await?;
        let (row, replayed) = match outcome {
            CreateOutcome::Created(row) => {
                tracing::info!(booking_id = %row.id, %hold_id, "hold confirmed");
                (row, false)
            }
            CreateOutcome::Replayed(row) => (row, true),
            CreateOutcome::ConversationOfAnotherCustomer => {
                let conversation = booking.conversation_id.unwrap_or_default();
                return Err(Error::ConversationOfAnotherCustomer(conversation));
            }
            // Confirmed before (maybe by a concurrent twin of this call), or
            // no seats taken: the hold as it is now says why.
            CreateOutcome::RequestIdReused
            | CreateOutcome::SlotNotFound
            | CreateOutcome::SlotFull { .. }
            | CreateOutcome::SlotStarted
            | CreateOutcome::HoldLost => {
                let now_held = self
                    .customers_hold(hold_id, &confirmation.customer_id)
                    .await?;
                match now_held.booking_id {
                    Some(booking_id) => {
                        match store::bookings::replay_if_used(&self.pool, &booking).await? {
                            Some(CreateOutcome::Replayed(row)) => (row, true),
                            // Another payload, or the key is gone (erased).
                            _ => {
                                return Err(Error::HoldAlreadyConfirmed {
                                    hold_id,
                                    booking_id,
                                });
                            }
                        }
                    }
                    None => {
                        let started = matches!(outcome, CreateOutcome::SlotStarted);
                        return Err(hold_refusal(&now_held, started));
                    }
                }
            }
        };
        Ok(pb::ConfirmHoldResponse {
            booking: Some(convert::booking(row)),
            replayed,
        })
    }

    pub(super) async fn release_hold(
        &self,
        request: pb::ReleaseHoldRequest,
    ) -> Result<pb::ReleaseHoldResponse, Error> {
        let (hold_id, customer_id) = hold::parse_release(request)?;
        let row = store::holds::release(&self.pool, hold_id, &customer_id, now())
            .await?
            .ok_or(Error::HoldNotFound(hold_id))?;
        if let Some(booking_id) = row.booking_id {
            return Err(Error::HoldAlreadyConfirmed {
                hold_id,
                booking_id,
            });
        }
        Ok(pb::ReleaseHoldResponse {
            hold: Some(convert::hold(row)),
        })
    }

    pub(super) async fn move_booking(
        &self,
        request: pb::MoveBookingRequest,
    ) -> Result<pb::MoveBookingResponse, Error> {
        let request = BookingMove::parse(request)?;
        let at = now();
        let outcome = store::moves::move_booking(&self.pool, &request, at, &self.times).await?;
        let replayed = match outcome {
            MoveOutcome::Moved {
                followup_due_at,
                starts_at,
            } => {
                self.wake_planners_at(followup_due_at);
                self.wake_reminder(starts_at, at);
                tracing::info!(booking_id = %request.booking_id, slot_id = %request.to_slot_id, "booking moved");
                false
            }
            MoveOutcome::Replayed => true,
            MoveOutcome::RequestIdReused => return Err(Error::RequestIdReused),
            MoveOutcome::NotMoved => return Err(self.move_refusal(&request, at).await?),
        };
        let row = store::bookings::get(&self.pool, request.booking_id)
            .await?
            .ok_or(Error::BookingNotFound(request.booking_id))?;
        Ok(pb::MoveBookingResponse {
            booking: Some(convert::booking(row)),
            replayed,
        })
    }

    pub(super) async fn record_payment(
        &self,
        request: pb::RecordPaymentRequest,
    ) -> Result<pb::RecordPaymentResponse, Error> {
        let record = PaymentRecord::parse(request)?;
        let booking_id = record.booking_id;
        let replayed = match store::payments::record(&self.pool, &record, now()).await? {
            RecordOutcome::Recorded => {
                tracing::info!(%booking_id, "payment recorded");
                false
            }
            RecordOutcome::Replayed => true,
            RecordOutcome::BookingNotFound => return Err(Error::BookingNotFound(booking_id)),
            RecordOutcome::AmountMismatch {
                currency,
                amount_minor,
            } => {
                return Err(Error::PaymentAmountMismatch {
                    booking_id,
                    currency,
                    amount_minor,
                });
            }
            RecordOutcome::AlreadyRecorded => {
                return Err(Error::PaymentAlreadyRecorded(booking_id));
            }
            RecordOutcome::ReferenceUsed => return Err(Error::ProviderReferenceUsed),
        };
        let row = store::bookings::get(&self.pool, booking_id)
            .await?
            .ok_or(Error::BookingNotFound(booking_id))?;
        Ok(pb::RecordPaymentResponse {
            booking: Some(convert::booking(row)),
            replayed,
        })
    }

    /// The hold, if it is `customer_id`'s (another customer's hold is
    /// answered as missing: its id tells them nothing).
    async fn customers_hold(&self, hold_id: Uuid, customer_id: &str) -> Result<HoldRow, Error> {
        store::holds::get(&self.pool, hold_id)
            .await?
            .filter(|hold| hold.customer_id == customer_id)
            .ok_or(Error::HoldNotFound(hold_id))
    }

    /// Why a move did nothing, read after the fact.
    async fn move_refusal(
        &self,
        request: &BookingMove,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Error, Error> {
        let booking = store::bookings::get(&self.pool, request.booking_id)
            .await?
            .ok_or(Error::BookingNotFound(request.booking_id))?;
        if booking.state == crate::domain::booking::CANCELLED {
            return Ok(Error::BookingCancelled(booking.id));
        }
        if booking.slot_id == request.to_slot_id {
            return Ok(Error::AlreadyInSlot {
                booking_id: booking.id,
                slot_id: booking.slot_id,
            });
        }
        if booking.slot_starts_at.to_utc() <= at {
            return Ok(Error::SlotStarted(booking.slot_id));
        }
        Ok(
            match store::moves::slot_state(&self.pool, request.to_slot_id).await? {
                None => Error::SlotNotFound(request.to_slot_id),
                Some((_, starts_at)) if starts_at <= at => Error::SlotStarted(request.to_slot_id),
                Some((available, _)) => Error::SlotFull {
                    slot_id: request.to_slot_id,
                    available,
                    requested: booking.party_size,
                },
            },
        )
    }
}

/// Why confirming `hold` (not confirmed) booked nothing.
fn hold_refusal(hold: &HoldRow, slot_started: bool) -> Error {
    match hold::state(
        hold.booking_id,
        hold.released_at,
        hold.expires_at,
        hold.read_at,
    ) {
        pb::HoldState::Released => Error::HoldReleased(hold.id),
        _ if slot_started => Error::SlotStarted(hold.slot_id),
        // Expired, or (a read racing the clock) expiring as the booking ran.
        _ => Error::HoldExpired(hold.id),
    }
}
