//! The gRPC surface: thin handlers that parse, call the store, convert back.

pub mod convert;
pub mod redrive;

use maitre_api::booking::v1::{self as pb, booking_service_server::BookingService};
use maitre_runtime::{pagination, rpc::CallContext};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{
        booking::{self, BookingPage, FollowUpPage, NewBooking},
        erasure,
        slot::{AvailabilityQuery, NewSlot, SlotCursor},
    },
    error::Error,
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
}

impl BookingApi {
    pub fn new(pool: PgPool, max_page_size: u32, memory: MemoryClient) -> Self {
        Self {
            pool,
            max_page_size,
            memory,
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl BookingService for BookingApi {
    async fn create_slot(
        &self,
        request: Request<pb::CreateSlotRequest>,
    ) -> Reply<pb::CreateSlotResponse> {
        let now = maitre_runtime::db::now();
        let slot = NewSlot::parse(request.into_inner(), now).map_err(Error::from)?;
        // Keys are the caller's own: another caller's same key is another slot.
        let caller = CallContext::current_caller().unwrap_or_default();
        let outcome = slots::create(&self.pool, Uuid::now_v7(), &slot, &caller, now)
            .await
            .map_err(Error::from)?;
        let (row, replayed) = match outcome {
            slots::CreateOutcome::Created(row) => (row, false),
            slots::CreateOutcome::Replayed(row) => (row, true),
            slots::CreateOutcome::RequestIdReused => return Err(Error::RequestIdReused.into()),
        };
        Ok(Response::new(pb::CreateSlotResponse {
            slot: Some(convert::slot(row)),
            replayed,
        }))
    }

    async fn list_availability(
        &self,
        request: Request<pb::ListAvailabilityRequest>,
    ) -> Reply<pb::ListAvailabilityResponse> {
        let query = AvailabilityQuery::parse(request.into_inner(), self.max_page_size)
            .map_err(Error::from)?;
        let mut rows = store::slots::availability(&self.pool, &query)
            .await
            .map_err(Error::from)?;
        let next_page_token = pagination::next_page(&mut rows, query.page_size, |last| {
            pagination::encode(
                &AvailabilityQuery::token_query(query.from, query.until, query.min_seats),
                &SlotCursor {
                    starts_at: last.starts_at,
                    id: last.id,
                },
            )
        });
        Ok(Response::new(pb::ListAvailabilityResponse {
            slots: rows.into_iter().map(convert::slot).collect(),
            next_page_token,
        }))
    }

    async fn create_booking(
        &self,
        request: Request<pb::CreateBookingRequest>,
    ) -> Reply<pb::CreateBookingResponse> {
        let booking = NewBooking::parse(request.into_inner()).map_err(Error::from)?;
        // The plan job continues this call's trace.
        let trace = CallContext::current().map(|c| c.trace.header_value());
        let outcome = store::bookings::create(
            &self.pool,
            Uuid::now_v7(),
            Uuid::now_v7(),
            &booking,
            maitre_runtime::db::now(),
            trace,
        )
        .await
        .map_err(Error::from)?;
        let (row, replayed) = match outcome {
            CreateOutcome::Created(row) => {
                tracing::info!(booking_id = %row.id, slot_id = %row.slot_id, "booking confirmed");
                (row, false)
            }
            CreateOutcome::Replayed(row) => (row, true),
            CreateOutcome::RequestIdReused => return Err(Error::RequestIdReused.into()),
            CreateOutcome::ConversationOfAnotherCustomer => {
                // A booking with an owned conversation always names it.
                let conversation = booking.conversation_id.unwrap_or_default();
                return Err(Error::ConversationOfAnotherCustomer(conversation).into());
            }
            CreateOutcome::SlotNotFound => return Err(Error::SlotNotFound(booking.slot_id).into()),
            CreateOutcome::SlotStarted => return Err(Error::SlotStarted(booking.slot_id).into()),
            CreateOutcome::SlotFull { available } => {
                return Err(Error::SlotFull {
                    slot_id: booking.slot_id,
                    available,
                    requested: booking.party_size,
                }
                .into());
            }
        };
        Ok(Response::new(pb::CreateBookingResponse {
            booking: Some(convert::booking(row)),
            replayed,
        }))
    }

    async fn get_booking(
        &self,
        request: Request<pb::GetBookingRequest>,
    ) -> Reply<pb::GetBookingResponse> {
        let id = booking::booking_id(&request.into_inner().booking_id).map_err(Error::from)?;
        let row = store::bookings::get(&self.pool, id)
            .await
            .map_err(Error::from)?
            .ok_or(Error::BookingNotFound(id))?;
        Ok(Response::new(pb::GetBookingResponse {
            booking: Some(convert::booking(row)),
        }))
    }

    async fn list_bookings(
        &self,
        request: Request<pb::ListBookingsRequest>,
    ) -> Reply<pb::ListBookingsResponse> {
        let page =
            BookingPage::parse(request.into_inner(), self.max_page_size).map_err(Error::from)?;
        let mut rows = store::bookings::list_for_customer(&self.pool, &page)
            .await
            .map_err(Error::from)?;
        let next_page_token = pagination::next_page(&mut rows, page.page_size, |last| {
            pagination::encode(&BookingPage::token_query(&page.customer_id), &last.id)
        });
        Ok(Response::new(pb::ListBookingsResponse {
            bookings: rows.into_iter().map(convert::booking).collect(),
            next_page_token,
        }))
    }

    async fn cancel_booking(
        &self,
        request: Request<pb::CancelBookingRequest>,
    ) -> Reply<pb::CancelBookingResponse> {
        let (id, reason) = booking::parse_cancel(request.into_inner()).map_err(Error::from)?;
        let follow_ups_cancelled =
            match store::bookings::cancel(&self.pool, id, &reason, maitre_runtime::db::now())
                .await
                .map_err(Error::from)?
            {
                CancelOutcome::NotFound => return Err(Error::BookingNotFound(id).into()),
                CancelOutcome::SlotStarted { slot_id } => {
                    return Err(Error::SlotStarted(slot_id).into());
                }
                CancelOutcome::Cancelled {
                    follow_ups_cancelled,
                } => follow_ups_cancelled,
            };
        let row = store::bookings::get(&self.pool, id)
            .await
            .map_err(Error::from)?
            .ok_or(Error::BookingNotFound(id))?;
        tracing::info!(booking_id = %id, follow_ups_cancelled, "booking cancelled");
        Ok(Response::new(pb::CancelBookingResponse {
            booking: Some(convert::booking(row)),
            follow_ups_cancelled,
        }))
    }

    async fn list_follow_ups(
        &self,
        request: Request<pb::ListFollowUpsRequest>,
    ) -> Reply<pb::ListFollowUpsResponse> {
        let page =
            FollowUpPage::parse(request.into_inner(), self.max_page_size).map_err(Error::from)?;
        let mut rows = store::followups::list(&self.pool, &page)
            .await
            .map_err(Error::from)?;
        let next_page_token =
            pagination::next_page(&mut rows, page.page_size, |last| page.next_token(last.id));
        Ok(Response::new(pb::ListFollowUpsResponse {
            follow_ups: rows.into_iter().map(convert::follow_up).collect(),
            next_page_token,
        }))
    }

    /// booking-service's part in one transaction, then memory-service's.
    /// Both parts are idempotent, so a retry after memory-service was away
    /// finishes the job. Deliveries already on their way are counted before
    /// DeleteUserData runs: a message one of them stores after it is erased
    /// by the next call, so until none is left the answer is incomplete.
    /// The customer id is never logged.
    async fn erase_customer(
        &self,
        request: Request<pb::EraseCustomerRequest>,
    ) -> Reply<pb::EraseCustomerResponse> {
        let customer_id = erasure::parse(request.into_inner()).map_err(Error::from)?;
        let erased = store::erasure::erase(&self.pool, &customer_id, maitre_runtime::db::now())
            .await
            .map_err(Error::from)?;
        let in_flight = store::erasure::deliveries_in_flight(&self.pool, &erased.pseudonym)
            .await
            .map_err(Error::from)?;
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
                return Err(Error::from(error).into());
            }
        };
        tracing::info!(
            conversations_deleted = memory.conversations_deleted,
            messages_deleted = memory.messages_deleted,
            messages_remaining = memory.messages_remaining,
            complete = memory.complete,
            "customer erased from memory-service"
        );
        Ok(Response::new(pb::EraseCustomerResponse {
            bookings_pseudonymised: erased.bookings,
            follow_ups_cancelled: erased.follow_ups_cancelled,
            follow_ups_cleared: erased.follow_ups_cleared,
            conversations_deleted: memory.conversations_deleted,
            messages_deleted: memory.messages_deleted,
            messages_remaining: memory.messages_remaining,
            deliveries_in_flight: in_flight,
            complete: memory.complete && in_flight == 0,
        }))
    }

    async fn retry_follow_up(
        &self,
        request: Request<pb::RetryFollowUpRequest>,
    ) -> Reply<pb::RetryFollowUpResponse> {
        Ok(Response::new(
            redrive::retry_follow_up(&self.pool, request.into_inner()).await?,
        ))
    }

    async fn retry_follow_ups(
        &self,
        request: Request<pb::RetryFollowUpsRequest>,
    ) -> Reply<pb::RetryFollowUpsResponse> {
        Ok(Response::new(
            redrive::retry_follow_ups(&self.pool, request.into_inner()).await?,
        ))
    }
}
