//! The gRPC surface: thin handlers that parse, call the store, convert back.

pub mod convert;
mod lifecycle;
pub mod redrive;

use maitre_api::booking::v1::{self as pb, booking_service_server::BookingService};
use maitre_runtime::{pagination, rpc::CallContext, status::reply};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{
        booking::{self, BookingPage, FollowUpPage, LifecycleTimes, NewBooking},
        erasure,
        slot::{AvailabilityQuery, NewSlot, SlotCursor},
    },
    error::Error,
    jobs::{DELIVER_QUEUE, PLAN_QUEUE, wakeups::Wakeups},
    memory_client::MemoryClient,
    store::{
        self,
        bookings::{CancelOutcome, CreateOutcome},
        slots,
    },
};

/// Implements `maitre.booking.v1.BookingService`.
#[derive(Debug, Clone)]
pub struct BookingApi {
    pool: PgPool,
    /// Largest page any listing returns.
    max_page_size: u32,
    /// memory-service, for EraseCustomer's second part.
    memory: MemoryClient,
    /// Wakes the workers after a commit that made work due.
    wakeups: Wakeups,
    /// When follow-ups and reminders come due, how long holds last.
    times: LifecycleTimes,
}

impl BookingApi {
    pub fn new(
        pool: PgPool,
        max_page_size: u32,
        memory: MemoryClient,
        wakeups: Wakeups,
        times: LifecycleTimes,
    ) -> Self {
        Self {
            pool,
            max_page_size,
            memory,
            wakeups,
            times,
        }
    }

    /// Books (CreateBooking, ConfirmHold) and, for a new booking, wakes the
    /// workers when its jobs come due: the follow-up at the event's end +
    /// delay, the reminder (if any) its lead before the start (polling
    /// covers restarts and events further ahead).
    async fn book(&self, booking: &NewBooking) -> Result<CreateOutcome, Error> {
        // The jobs continue this call's trace.
        let trace = CallContext::current().map(|c| c.trace.header_value());
        let now = maitre_runtime::db::now();
        let outcome = store::bookings::create(
            &self.pool,
            Uuid::now_v7(),
            Uuid::now_v7(),
            booking,
            now,
            &self.times,
            trace,
        )
        .await?;
        if let CreateOutcome::Created(row) = &outcome {
            let due = row.slot_ends_at + to_chrono(self.times.followup_delay);
            self.wake_planners_at(due);
            self.wake_reminder(row.slot_starts_at.to_utc(), now);
        }
        Ok(outcome)
    }

    /// Wakes every replica's deliverers when the reminder of an event
    /// starting at `starts_at`, booked or moved `now`, comes due (the
    /// statement wrote one on the same rule).
    fn wake_reminder(
        &self,
        starts_at: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        if self.times.reminder_lead.is_zero() {
            return;
        }
        let due = starts_at.checked_sub_signed(to_chrono(self.times.reminder_lead));
        if let Some(due) = due.filter(|due| *due > now) {
            self.wakeups.poke_at(DELIVER_QUEUE, due);
        }
    }

    /// Wakes every replica's planners at `due` (now, if it has passed).
    fn wake_planners_at(&self, due: chrono::DateTime<chrono::Utc>) {
        if due <= maitre_runtime::db::now() {
            self.wakeups.poke(PLAN_QUEUE);
        } else {
            self.wakeups.poke_at(PLAN_QUEUE, due);
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// A configured duration (bounded by the configuration) as chrono's.
fn to_chrono(duration: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or_default()
}

/// The handlers proper: each takes the decoded request message and answers
/// with the service's own [`Error`], which `?` converts into through `From`.
/// The [`BookingService`] impl below only unwraps the request and turns the
/// error into a status, once, in `reply`.
impl BookingApi {
    async fn create_slot(
        &self,
        request: pb::CreateSlotRequest,
    ) -> Result<pb::CreateSlotResponse, Error> {
        let now = maitre_runtime::db::now();
        let slot = NewSlot::parse(request, now)?;
        // Keys are the caller's own: another caller's same key is another slot.
        let caller = CallContext::current_caller().unwrap_or_default();
        let outcome = slots::create(&self.pool, Uuid::now_v7(), &slot, &caller, now).await?;
        let (row, replayed) = match outcome {
            slots::CreateOutcome::Created(row) => (row, false),
            slots::CreateOutcome::Replayed(row) => (row, true),
            slots::CreateOutcome::RequestIdReused => return Err(Error::RequestIdReused),
        };
        Ok(pb::CreateSlotResponse {
            slot: Some(convert::slot(row)),
            replayed,
        })
    }

    async fn list_availability(
        &self,
        request: pb::ListAvailabilityRequest,
    ) -> Result<pb::ListAvailabilityResponse, Error> {
        let query = AvailabilityQuery::parse(request, self.max_page_size)?;
        let mut rows = store::slots::availability(&self.pool, &query).await?;
        let next_page_token = pagination::next_page(&mut rows, query.page_size, |last| {
            pagination::encode(
                &AvailabilityQuery::token_query(query.from, query.until, query.min_seats),
                &SlotCursor {
                    starts_at: last.starts_at,
                    id: last.id,
                },
            )
        });
        Ok(pb::ListAvailabilityResponse {
            slots: rows.into_iter().map(convert::slot).collect(),
            next_page_token,
        })
    }

    async fn create_booking(
        &self,
        request: pb::CreateBookingRequest,
    ) -> Result<pb::CreateBookingResponse, Error> {
        let booking = NewBooking::parse(request)?;
        let (row, replayed) = match self.book(&booking).await? {
            CreateOutcome::Created(row) => {
                tracing::info!(booking_id = %row.id, slot_id = %row.slot_id, "booking confirmed");
                (row, false)
            }
            CreateOutcome::Replayed(row) => (row, true),
            CreateOutcome::RequestIdReused => return Err(Error::RequestIdReused),
            CreateOutcome::ConversationOfAnotherCustomer => {
                // A booking with an owned conversation always names it.
                let conversation = booking.conversation_id.unwrap_or_default();
                return Err(Error::ConversationOfAnotherCustomer(conversation));
            }
            CreateOutcome::SlotNotFound => return Err(Error::SlotNotFound(booking.slot_id)),
            CreateOutcome::SlotStarted => return Err(Error::SlotStarted(booking.slot_id)),
            CreateOutcome::SlotFull { available } => {
                return Err(Error::SlotFull {
                    slot_id: booking.slot_id,
                    available,
                    requested: booking.party_size,
                });
            }
            // Only a booking that confirms a hold can lose it.
            CreateOutcome::HoldLost => {
                return Err(Error::Database(sqlx::Error::Decode(
                    "CreateBooking reported a lost hold".into(),
                )));
            }
        };
        Ok(pb::CreateBookingResponse {
            booking: Some(convert::booking(row)),
            replayed,
        })
    }

    async fn get_booking(
        &self,
        request: pb::GetBookingRequest,
    ) -> Result<pb::GetBookingResponse, Error> {
        let id = booking::booking_id(&request.booking_id)?;
        let row = store::bookings::get(&self.pool, id)
            .await?
            .ok_or(Error::BookingNotFound(id))?;
        Ok(pb::GetBookingResponse {
            booking: Some(convert::booking(row)),
        })
    }

    async fn list_bookings(
        &self,
        request: pb::ListBookingsRequest,
    ) -> Result<pb::ListBookingsResponse, Error> {
        let page = BookingPage::parse(request, self.max_page_size)?;
        let mut rows = store::bookings::list_for_customer(&self.pool, &page).await?;
        let next_page_token = pagination::next_page(&mut rows, page.page_size, |last| {
            pagination::encode(&BookingPage::token_query(&page.customer_id), &last.id)
        });
        Ok(pb::ListBookingsResponse {
            bookings: rows.into_iter().map(convert::booking).collect(),
            next_page_token,
        })
    }

    async fn cancel_booking(
        &self,
        request: pb::CancelBookingRequest,
    ) -> Result<pb::CancelBookingResponse, Error> {
        let (id, reason) = booking::parse_cancel(request)?;
        let follow_ups_cancelled =
            match store::bookings::cancel(&self.pool, id, &reason, maitre_runtime::db::now())
                .await?
            {
                CancelOutcome::NotFound => return Err(Error::BookingNotFound(id)),
                CancelOutcome::SlotStarted { slot_id } => {
                    return Err(Error::SlotStarted(slot_id));
                }
                CancelOutcome::Cancelled {
                    follow_ups_cancelled,
                } => follow_ups_cancelled,
            };
        let row = store::bookings::get(&self.pool, id)
            .await?
            .ok_or(Error::BookingNotFound(id))?;
        tracing::info!(booking_id = %id, follow_ups_cancelled, "booking cancelled");
        Ok(pb::CancelBookingResponse {
            booking: Some(convert::booking(row)),
            follow_ups_cancelled,
        })
    }

    async fn list_follow_ups(
        &self,
        request: pb::ListFollowUpsRequest,
    ) -> Result<pb::ListFollowUpsResponse, Error> {
        let page = FollowUpPage::parse(request, self.max_page_size)?;
        let mut rows = store::followups::list(&self.pool, &page).await?;
        let next_page_token =
            pagination::next_page(&mut rows, page.page_size, |last| page.next_token(last.id));
        Ok(pb::ListFollowUpsResponse {
            follow_ups: rows.into_iter().map(convert::follow_up).collect(),
            next_page_token,
        })
    }

    /// booking-service's part in one transaction, then memory-service's.
    /// Both parts are idempotent, so a retry after memory-service was away
    /// finishes the job. Deliveries already on their way are counted before
    /// DeleteUserData runs: a message one of them stores after it is erased
    /// by the next call, so until none is left the answer is incomplete.
    /// The customer id is never logged.
    async fn erase_customer(
        &self,
        request: pb::EraseCustomerRequest,
    ) -> Result<pb::EraseCustomerResponse, Error> {
        let customer_id = erasure::parse(request)?;
        let erased =
            store::erasure::erase(&self.pool, &customer_id, maitre_runtime::db::now()).await?;
        let in_flight = store::erasure::deliveries_in_flight(&self.pool, &erased.pseudonym).await?;
        tracing::info!(
            bookings = erased.bookings,
            follow_ups_cancelled = erased.follow_ups_cancelled,
            follow_ups_cleared = erased.follow_ups_cleared,
            deliveries_in_flight = in_flight,
            "customer erased from booking-service"
        );
        let memory = match self.memory.delete_user_data(&customer_id).await {
            Ok(memory) => memory,
            Err(error) => {
                tracing::warn!(%error, "erasure: memory-service part failed; the caller retries");
                return Err(Error::from(error));
            }
        };
        tracing::info!(
            conversations_deleted = memory.conversations_deleted,
            messages_deleted = memory.messages_deleted,
            messages_remaining = memory.messages_remaining,
            complete = memory.complete,
            "customer erased from memory-service"
        );
        Ok(pb::EraseCustomerResponse {
            bookings_pseudonymised: erased.bookings,
            follow_ups_cancelled: erased.follow_ups_cancelled,
            follow_ups_cleared: erased.follow_ups_cleared,
            conversations_deleted: memory.conversations_deleted,
            messages_deleted: memory.messages_deleted,
            messages_remaining: memory.messages_remaining,
            deliveries_in_flight: in_flight,
            complete: memory.complete && in_flight == 0,
        })
    }
}

#[tonic::async_trait]
impl BookingService for BookingApi {
    async fn create_slot(
        &self,
        request: Request<pb::CreateSlotRequest>,
    ) -> Reply<pb::CreateSlotResponse> {
        reply(BookingApi::create_slot(self, request.into_inner()).await)
    }

    async fn list_availability(
        &self,
        request: Request<pb::ListAvailabilityRequest>,
    ) -> Reply<pb::ListAvailabilityResponse> {
        reply(BookingApi::list_availability(self, request.into_inner()).await)
    }

    async fn create_booking(
        &self,
        request: Request<pb::CreateBookingRequest>,
    ) -> Reply<pb::CreateBookingResponse> {
        reply(BookingApi::create_booking(self, request.into_inner()).await)
    }

    async fn get_booking(
        &self,
        request: Request<pb::GetBookingRequest>,
    ) -> Reply<pb::GetBookingResponse> {
        reply(BookingApi::get_booking(self, request.into_inner()).await)
    }

    async fn list_bookings(
        &self,
        request: Request<pb::ListBookingsRequest>,
    ) -> Reply<pb::ListBookingsResponse> {
        reply(BookingApi::list_bookings(self, request.into_inner()).await)
    }

    async fn cancel_booking(
        &self,
        request: Request<pb::CancelBookingRequest>,
    ) -> Reply<pb::CancelBookingResponse> {
        reply(BookingApi::cancel_booking(self, request.into_inner()).await)
    }

    async fn list_follow_ups(
        &self,
        request: Request<pb::ListFollowUpsRequest>,
    ) -> Reply<pb::ListFollowUpsResponse> {
        reply(BookingApi::list_follow_ups(self, request.into_inner()).await)
    }

    async fn erase_customer(
        &self,
        request: Request<pb::EraseCustomerRequest>,
    ) -> Reply<pb::EraseCustomerResponse> {
        reply(BookingApi::erase_customer(self, request.into_inner()).await)
    }

    async fn retry_follow_up(
        &self,
        request: Request<pb::RetryFollowUpRequest>,
    ) -> Reply<pb::RetryFollowUpResponse> {
        reply(redrive::retry_follow_up(&self.pool, &self.wakeups, request.into_inner()).await)
    }

    async fn retry_follow_ups(
        &self,
        request: Request<pb::RetryFollowUpsRequest>,
    ) -> Reply<pb::RetryFollowUpsResponse> {
        reply(redrive::retry_follow_ups(&self.pool, &self.wakeups, request.into_inner()).await)
    }

    async fn hold_seats(
        &self,
        request: Request<pb::HoldSeatsRequest>,
    ) -> Reply<pb::HoldSeatsResponse> {
        reply(BookingApi::hold_seats(self, request.into_inner()).await)
    }

    async fn confirm_hold(
        &self,
        request: Request<pb::ConfirmHoldRequest>,
    ) -> Reply<pb::ConfirmHoldResponse> {
        reply(BookingApi::confirm_hold(self, request.into_inner()).await)
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Reply<pb::ReleaseHoldResponse> {
        reply(BookingApi::release_hold(self, request.into_inner()).await)
    }

    async fn move_booking(
        &self,
        request: Request<pb::MoveBookingRequest>,
    ) -> Reply<pb::MoveBookingResponse> {
        reply(BookingApi::move_booking(self, request.into_inner()).await)
    }

    async fn record_payment(
        &self,
        request: Request<pb::RecordPaymentRequest>,
    ) -> Reply<pb::RecordPaymentResponse> {
        reply(BookingApi::record_payment(self, request.into_inner()).await)
    }
}
