//! create-booking: each client books one seat after another on slots of its
//! own (no conversation, so planning its follow-up asks memory-service
//! nothing). booking-service's follow-up workers stay on, as in production:
//! each booking's plan job runs while the load goes on.

use anyhow::Result;
use maitre_api::booking::v1::booking_service_client::BookingServiceClient;
use tonic::{Status, transport::Channel};

use super::{Endpoints, Seats, booking_client, booking_request};

pub struct BookClient {
    booking: BookingServiceClient<Channel>,
    customer: String,
    seats: Seats,
}

impl BookClient {
    pub async fn new(endpoints: &Endpoints, run: u64, index: usize) -> Result<Self> {
        Ok(Self {
            booking: booking_client(endpoints).await?,
            customer: format!("bench-{run}-{index}"),
            seats: Seats::default(),
        })
    }

    pub async fn prepare(&mut self) -> Result<(), Status> {
        self.seats.ensure(&mut self.booking).await
    }

    pub async fn op(&mut self) -> Result<(), Status> {
        let request = booking_request(self.seats.take(), &self.customer, "");
        self.booking.create_booking(request).await?;
        Ok(())
    }
}
