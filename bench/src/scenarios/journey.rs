//! journey: what an assistant does for one customer: the customer's
//! message (with its emotion), the assistant's reply, the customer's
//! answer, then the booking tied to that conversation. Measured as one
//! operation, from the first call to the booking's confirmation.

use anyhow::Result;
use maitre_api::{
    booking::v1::booking_service_client::BookingServiceClient,
    memory::v1::{self as memory, memory_service_client::MemoryServiceClient},
};
use tonic::{Status, transport::Channel};

use super::{Endpoints, Seats, booking_client, booking_request, memory_client, message};

pub struct JourneyClient {
    memory: MemoryServiceClient<Channel>,
    booking: BookingServiceClient<Channel>,
    customer_prefix: String,
    journeys: u64,
    seats: Seats,
}

impl JourneyClient {
    pub async fn new(endpoints: &Endpoints, run: u64, index: usize) -> Result<Self> {
        Ok(Self {
            memory: memory_client(endpoints).await?,
            booking: booking_client(endpoints).await?,
            customer_prefix: format!("bench-{run}-{index}"),
            journeys: 0,
            seats: Seats::default(),
        })
    }

    pub async fn prepare(&mut self) -> Result<(), Status> {
        self.seats.ensure(&mut self.booking).await
    }

    pub async fn op(&mut self) -> Result<(), Status> {
        self.journeys += 1;
        let customer = format!("{}-{}", self.customer_prefix, self.journeys);
        // No conversation id: memory-service starts one and returns its id.
        let first = self
            .memory
            .store_message(message("", &customer, memory::Role::User, true))
            .await?
            .into_inner();
        let conversation = first
            .message
            .map(|m| m.conversation_id)
            .ok_or_else(|| Status::internal("StoreMessage answered without a message"))?;
        self.memory
            .store_message(message(
                &conversation,
                &customer,
                memory::Role::Assistant,
                false,
            ))
            .await?;
        self.memory
            .store_message(message(&conversation, &customer, memory::Role::User, true))
            .await?;
        let request = booking_request(self.seats.take(), &customer, &conversation);
        self.booking.create_booking(request).await?;
        Ok(())
    }
}
