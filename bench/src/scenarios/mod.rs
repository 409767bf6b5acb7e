//! What the load clients do, one module per scenario, and the requests
//! they share. Every request carries what the floor's SQL assumes (see
//! [`crate::floor::scripts`]): the same content, emotion labels, party
//! size, deposit and slot capacity.

pub mod create_booking;
pub mod follow_ups;
pub mod get_context;
pub mod journey;
pub mod stalled_watchers;
pub mod store_message;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use maitre_api::{
    booking::v1::{self as booking, booking_service_client::BookingServiceClient},
    memory::v1::{self as memory, memory_service_client::MemoryServiceClient},
};
use rand::Rng;
use serde::Serialize;
use tonic::{Status, transport::Channel};

use crate::floor::scripts::{
    CONTENT, CURRENCY, CUSTOMER_NAME, DEPOSIT_MINOR, LABELS, SLOT_CAPACITY,
};

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// StoreMessage with an emotion, each client in its own conversation.
    StoreMessage,
    /// CreateBooking, party of one, on slots with room to spare.
    CreateBooking,
    /// Three StoreMessage calls (user, assistant, user) then CreateBooking.
    Journey,
    /// GetContext with a 1,000-token budget on a conversation of 10 messages.
    #[value(name = "get-context-10")]
    #[serde(rename = "get-context-10")]
    GetContext10,
    /// The same on a conversation of 1,000 messages.
    #[value(name = "get-context-1k")]
    #[serde(rename = "get-context-1k")]
    GetContext1k,
    /// The same on a conversation of 100,000 messages.
    #[value(name = "get-context-100k")]
    #[serde(rename = "get-context-100k")]
    GetContext100k,
    /// N bookings coming due at once: time to plan and deliver every follow-up.
    FollowUps,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::StoreMessage => "store-message",
            Scenario::CreateBooking => "create-booking",
            Scenario::Journey => "journey",
            Scenario::GetContext10 => "get-context-10",
            Scenario::GetContext1k => "get-context-1k",
            Scenario::GetContext100k => "get-context-100k",
            Scenario::FollowUps => "follow-ups",
        }
    }

    /// The GetContext scenarios: the length of the conversation they read.
    pub fn context_length(self) -> Option<i64> {
        match self {
            Scenario::GetContext10 => Some(10),
            Scenario::GetContext1k => Some(1_000),
            Scenario::GetContext100k => Some(100_000),
            _ => None,
        }
    }

    /// What one measured operation is.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Journey => "journey",
            _ => "call",
        }
    }

    /// The services' statements one operation runs, the one run once per
    /// operation last (it counts the operations in pg_stat_statements).
    pub fn own_statements(self) -> Vec<&'static str> {
        use booking_service::store::bookings::CREATE;
        use memory_service::store::{context::GET_CONTEXT, messages::STORE_MESSAGE};
        match self {
            Scenario::StoreMessage => vec![STORE_MESSAGE],
            Scenario::GetContext10 | Scenario::GetContext1k | Scenario::GetContext100k => {
                vec![GET_CONTEXT]
            }
            Scenario::CreateBooking | Scenario::FollowUps => vec![CREATE],
            Scenario::Journey => vec![STORE_MESSAGE, CREATE],
        }
    }
}

/// One load client of a closed-loop scenario.
pub enum Client {
    Store(store_message::StoreClient),
    Book(create_booking::BookClient),
    Journey(journey::JourneyClient),
    Context(get_context::ContextClient),
}

impl Client {
    /// Unmeasured upkeep before an operation.
    pub async fn prepare(&mut self) -> Result<(), Status> {
        match self {
            Client::Store(_) | Client::Context(_) => Ok(()),
            Client::Book(c) => c.prepare().await,
            Client::Journey(c) => c.prepare().await,
        }
    }

    /// One measured operation.
    pub async fn op(&mut self) -> Result<(), Status> {
        match self {
            Client::Store(c) => c.op().await,
            Client::Book(c) => c.op().await,
            Client::Journey(c) => c.op().await,
            Client::Context(c) => c.op().await,
        }
    }
}

/// Where the services listen.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub memory: String,
    pub booking: String,
}

/// One HTTP/2 connection per client, like pgbench's one connection per client.
pub async fn channel(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

pub async fn memory_client(e: &Endpoints) -> Result<MemoryServiceClient<Channel>> {
    Ok(MemoryServiceClient::new(channel(&e.memory).await?))
}

pub async fn booking_client(e: &Endpoints) -> Result<BookingServiceClient<Channel>> {
    Ok(BookingServiceClient::new(channel(&e.booking).await?))
}

/// A StoreMessage request; `emotion` adds a random score and label.
pub fn message(
    conversation: &str,
    user: &str,
    role: memory::Role,
    emotion: bool,
) -> memory::StoreMessageRequest {
    let mut rng = rand::rng();
    memory::StoreMessageRequest {
        conversation_id: conversation.to_owned(),
        user_id: user.to_owned(),
        channel: "web".into(),
        role: role as i32,
        content: CONTENT.into(),
        emotion: emotion.then(|| memory::Emotion {
            score: f64::from(rng.random_range(-100..=100)) / 100.0,
            label: LABELS[rng.random_range(0..LABELS.len())].into(),
            scores: Default::default(),
        }),
        request_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    }
}

/// A CreateBooking request for one seat.
pub fn booking_request(
    slot: &str,
    customer: &str,
    conversation: &str,
) -> booking::CreateBookingRequest {
    booking::CreateBookingRequest {
        customer_id: customer.to_owned(),
        customer_name: CUSTOMER_NAME.into(),
        conversation_id: conversation.to_owned(),
        slot_id: slot.to_owned(),
        party_size: 1,
        deposit: Some(booking::Money {
            currency_code: CURRENCY.into(),
            amount_minor: DEPOSIT_MINOR,
        }),
        request_id: uuid::Uuid::now_v7().to_string(),
    }
}

/// Creates a slot from `starts_in` for `lasts`; returns its id.
pub async fn create_slot(
    client: &mut BookingServiceClient<Channel>,
    starts_in: chrono::Duration,
    lasts: chrono::Duration,
    capacity: i32,
) -> Result<String, Status> {
    let start = chrono::Utc::now() + starts_in;
    create_slot_at(client, start, start + lasts, capacity).await
}

pub async fn create_slot_at(
    client: &mut BookingServiceClient<Channel>,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
    capacity: i32,
) -> Result<String, Status> {
    let slot = client
        .create_slot(booking::CreateSlotRequest {
            start_time: Some(maitre_runtime::fields::to_timestamp(start)),
            end_time: Some(maitre_runtime::fields::to_timestamp(end)),
            capacity,
            label: "Chef's table".into(),
            request_id: String::new(),
            time_zone: String::new(),
        })
        .await?
        .into_inner()
        .slot
        .ok_or_else(|| Status::internal("CreateSlot answered without a slot"))?;
    Ok(slot.slot_id)
}

/// A client's current slot and the seats it has left there: a new slot
/// (a day ahead) whenever one fills up, like the floor's per-client slots.
#[derive(Default)]
pub struct Seats {
    slot: String,
    left: i64,
}

impl Seats {
    pub async fn ensure(
        &mut self,
        client: &mut BookingServiceClient<Channel>,
    ) -> Result<(), Status> {
        if self.left <= 0 {
            self.slot = create_slot(
                client,
                chrono::Duration::days(1),
                chrono::Duration::hours(2),
                i32::try_from(SLOT_CAPACITY).unwrap_or(i32::MAX),
            )
            .await?;
            self.left = SLOT_CAPACITY;
        }
        Ok(())
    }

    /// The slot to book, counting the seat as taken.
    pub fn take(&mut self) -> &str {
        self.left -= 1;
        &self.slot
    }
}
