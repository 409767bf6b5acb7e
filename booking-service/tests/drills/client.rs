//! The drills' client: booking-service and memory-service over real gRPC,
//! retrying a failed call with the SAME request id (so a retry can never
//! book or store twice), and a journal of every attempt with its timing, so
//! drills can assert how calls failed.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use maitre_api::{
    booking::v1::{self as booking, booking_service_client::BookingServiceClient},
    memory::v1::{self as memory, memory_service_client::MemoryServiceClient},
};
use tonic::{Code, Request, Status, transport::Channel};
use uuid::Uuid;

/// Deadline sent with every call (`grpc-timeout`).
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// An attempt still unanswered this long after its deadline has hung.
const HUNG_AFTER: Duration = Duration::from_secs(7);
/// Attempts per call before giving up, and the pause between them: about
/// 30 s of retrying, longer than any outage a drill causes.
const MAX_ATTEMPTS: u32 = 300;
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How one attempt failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: Code,
    /// The ErrorInfo reason, when the server answered with one.
    pub reason: String,
    pub message: String,
    /// No answer within [`HUNG_AFTER`].
    pub hung: bool,
}

/// One attempt of one call.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub rpc: &'static str,
    pub started: Instant,
    pub took: Duration,
    pub outcome: Result<(), Failure>,
}

impl Attempt {
    pub fn ended(&self) -> Instant {
        self.started + self.took
    }
}

/// Every attempt made by the clients sharing it.
#[derive(Debug, Default, Clone)]
pub struct Journal(Arc<Mutex<Vec<Attempt>>>);

impl Journal {
    fn record(&self, attempt: Attempt) {
        self.0.lock().expect("journal").push(attempt);
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.0.lock().expect("journal").clone()
    }

    pub fn failures(&self) -> Vec<Attempt> {
        self.attempts()
            .into_iter()
            .filter(|a| a.outcome.is_err())
            .collect()
    }
}

/// What a retried call came to.
#[derive(Debug)]
pub enum Answer<T> {
    Ok(T),
    /// The server answered with an error that a retry cannot change.
    Refused(Status),
    /// Still failing after [`MAX_ATTEMPTS`].
    GaveUp(String),
}

/// The ErrorInfo reason of a status ("" when the status came from the
/// transport rather than from a service).
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Worth retrying with the same request id: the server was away, draining,
/// shedding or out of time, or the connection broke mid-call (which the
/// transport reports as UNKNOWN/INTERNAL without a service's reason).
pub fn retryable(status: &Status) -> bool {
    retryable_code(status.code(), &reason(status))
}

/// [`retryable`], from a status's code and ErrorInfo reason.
pub fn retryable_code(code: Code, reason: &str) -> bool {
    match code {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted => true,
        Code::Unknown | Code::Internal => reason.is_empty(),
        _ => false,
    }
}

/// A slot the drill created.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub id: String,
    pub starts_at: DateTime<Utc>,
}

/// Slots starting `first_in` from now, one every `every`, each lasting `lasts`.
#[derive(Debug, Clone, Copy)]
pub struct SlotPlan {
    pub first_in: Duration,
    pub every: Duration,
    pub count: u32,
    pub lasts: Duration,
    pub capacity: i32,
}

/// A booking the client saw confirmed.
#[derive(Debug, Clone)]
pub struct Confirmed {
    pub booking_id: Uuid,
    pub slot_id: Uuid,
    pub party_size: i32,
    /// Answered by a retry that found the first call's booking.
    pub replayed: bool,
}

/// What the client did, booking by booking.
#[derive(Debug, Default)]
pub struct Ledger {
    pub confirmed: Vec<Confirmed>,
    /// Bookings refused for good (slot started, say): `customer: status`.
    pub refused: Vec<String>,
    /// Calls still failing after every retry.
    pub gave_up: Vec<String>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.confirmed.extend(other.confirmed);
        self.refused.extend(other.refused);
        self.gave_up.extend(other.gave_up);
    }

    pub fn replayed(&self) -> usize {
        self.confirmed.iter().filter(|c| c.replayed).count()
    }
}

/// Clients of one booking-service process and of memory-service.
#[derive(Clone)]
pub struct Client {
    booking: BookingServiceClient<Channel>,
    memory: MemoryServiceClient<Channel>,
    pub journal: Journal,
}

fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("service URL")
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        // Lazy: reconnects by itself after the server comes back.
        .connect_lazy()
}

fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_DEADLINE);
    request
}

impl Client {
    pub fn new(booking_port: u16, memory_port: u16) -> Self {
        Self {
            booking: BookingServiceClient::new(channel(booking_port)),
            memory: MemoryServiceClient::new(channel(memory_port)),
            journal: Journal::default(),
        }
    }

    /// The same client writing to `journal`.
    pub fn with_journal(mut self, journal: &Journal) -> Self {
        self.journal = journal.clone();
        self
    }

    /// Calls `call` until it answers, retrying transport-level failures.
    pub async fn retrying<T, F, Fut>(&self, rpc: &'static str, mut call: F) -> Answer<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let started = Instant::now();
            let result = tokio::time::timeout(HUNG_AFTER, call()).await;
            let took = started.elapsed();
            let failure = match result {
                Ok(Ok(value)) => {
                    self.journal.record(Attempt {
                        rpc,
                        started,
                        took,
                        outcome: Ok(()),
                    });
                    return Answer::Ok(value);
                }
                Ok(Err(status)) => {
                    let failure = Failure {
                        code: status.code(),
                        reason: reason(&status),
                        message: status.message().to_owned(),
                        hung: false,
                    };
                    if !retryable(&status) {
                        self.journal.record(Attempt {
                            rpc,
                            started,
                            took,
                            outcome: Err(failure),
                        });
                        return Answer::Refused(status);
                    }
                    failure
                }
                Err(_) => Failure {
                    code: Code::DeadlineExceeded,
                    reason: String::new(),
                    message: format!("no answer within {HUNG_AFTER:?}"),
                    hung: true,
                },
            };
            last = format!("{:?}: {}", failure.code, failure.message);
            self.journal.record(Attempt {
                rpc,
                started,
                took,
                outcome: Err(failure),
            });
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Answer::GaveUp(format!("{rpc} failed {MAX_ATTEMPTS} times; last: {last}"))
    }

    /// Creates the slots of `plan` (each with its own request id, so a
    /// retried creation is not doubled).
    pub async fn create_slots(&self, plan: SlotPlan) -> Vec<SlotInfo> {
        let now = Utc::now();
        let mut slots = Vec::new();
        for i in 0..plan.count {
            let starts_at =
                now + chrono::Duration::from_std(plan.first_in + plan.every * i).expect("duration");
            let ends_at = starts_at + chrono::Duration::from_std(plan.lasts).expect("duration");
            let message = booking::CreateSlotRequest {
                start_time: Some(maitre_runtime::fields::to_timestamp(starts_at)),
                end_time: Some(maitre_runtime::fields::to_timestamp(ends_at)),
                capacity: plan.capacity,
                label: format!("Drill slot {i}"),
                request_id: Uuid::now_v7().to_string(),
                time_zone: String::new(),
            };
            let answer = self
                .retrying("CreateSlot", || {
                    let mut client = self.booking.clone();
                    let message = message.clone();
                    async move { client.create_slot(request(message)).await }
                })
                .await;
            let Answer::Ok(response) = answer else {
                panic!("creating slot {i}: {answer:?}");
            };
            let slot = response.into_inner().slot.expect("slot");
            slots.push(SlotInfo {
                id: slot.slot_id,
                starts_at,
            });
        }
        slots
    }

    /// Stores one scored user message in a new conversation of `customer`
    /// (with a request id, so retries store it once); returns the conversation id.
    pub async fn conversation(&self, customer: &str) -> Answer<String> {
        let conversation_id = Uuid::now_v7().to_string();
        let message = memory::StoreMessageRequest {
            conversation_id: conversation_id.clone(),
            user_id: customer.to_owned(),
            channel: "web".into(),
            role: memory::Role::User as i32,
            content: "Looking forward to it!".into(),
            emotion: Some(memory::Emotion {
                score: 0.6,
                label: "joy".into(),
                scores: Default::default(),
            }),
            request_id: Uuid::now_v7().to_string(),
            ..Default::default()
        };
        match self
            .retrying("StoreMessage", || {
                let mut client = self.memory.clone();
                let message = message.clone();
                async move { client.store_message(request(message)).await }
            })
            .await
        {
            Answer::Ok(_) => Answer::Ok(conversation_id),
            Answer::Refused(status) => Answer::Refused(status),
            Answer::GaveUp(why) => Answer::GaveUp(why),
        }
    }

    /// A new customer: their conversation, then a booking of `slot` for
    /// `party_size`, both retried with their request ids; recorded in `ledger`.
    pub async fn book_new_customer(
        &self,
        customer: &str,
        slot: &SlotInfo,
        party_size: i32,
        ledger: &mut Ledger,
    ) {
        match self.conversation(customer).await {
            Answer::Ok(conversation) => {
                self.book(customer, conversation, slot, party_size, ledger)
                    .await
            }
            Answer::Refused(status) => ledger
                .gave_up
                .push(format!("{customer}: StoreMessage refused: {status:?}")),
            Answer::GaveUp(why) => ledger.gave_up.push(format!("{customer}: {why}")),
        }
    }

    /// Books `slot` for `customer` (retried with one request id); recorded in `ledger`.
    pub async fn book(
        &self,
        customer: &str,
        conversation: String,
        slot: &SlotInfo,
        party_size: i32,
        ledger: &mut Ledger,
    ) {
        let message = booking::CreateBookingRequest {
            customer_id: customer.to_owned(),
            customer_name: format!("Guest {customer}"),
            conversation_id: conversation,
            slot_id: slot.id.clone(),
            party_size,
            deposit: Some(booking::Money {
                currency_code: "EUR".into(),
                amount_minor: 2500,
            }),
            request_id: Uuid::now_v7().to_string(),
        };
        let answer = self
            .retrying("CreateBooking", || {
                let mut client = self.booking.clone();
                let message = message.clone();
                async move { client.create_booking(request(message)).await }
            })
            .await;
        match answer {
            Answer::Ok(response) => {
                let response = response.into_inner();
                let booking = response.booking.expect("booking");
                ledger.confirmed.push(Confirmed {
                    booking_id: booking.booking_id.parse().expect("booking id"),
                    slot_id: booking.slot_id.parse().expect("slot id"),
                    party_size: booking.party_size,
                    replayed: response.replayed,
                });
            }
            Answer::Refused(status) => ledger.refused.push(format!(
                "{customer}: {:?} {} {}",
                status.code(),
                reason(&status),
                status.message()
            )),
            Answer::GaveUp(why) => ledger.gave_up.push(format!("{customer}: {why}")),
        }
    }
}

impl Client {
    /// Cancels a booking (retried; cancelling twice is harmless); returns
    /// how many follow-ups the call cancelled.
    pub async fn cancel(&self, booking_id: Uuid) -> Answer<i32> {
        let message = booking::CancelBookingRequest {
            booking_id: booking_id.to_string(),
            reason: "drill".into(),
        };
        match self
            .retrying("CancelBooking", || {
                let mut client = self.booking.clone();
                let message = message.clone();
                async move { client.cancel_booking(request(message)).await }
            })
            .await
        {
            Answer::Ok(response) => Answer::Ok(response.into_inner().follow_ups_cancelled),
            Answer::Refused(status) => Answer::Refused(status),
            Answer::GaveUp(why) => Answer::GaveUp(why),
        }
    }
}

/// A steady stream of new customers booking.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent client tasks (spread over the given clients).
    pub tasks: usize,
    /// Pause after each booking, per task.
    pub pause: Duration,
    /// No new booking starts after this long.
    pub run_for: Duration,
    /// A booking takes the earliest slot starting at least this far ahead.
    pub margin: Duration,
    /// Stop after this many bookings in all (`None`: run for `run_for`).
    pub limit: Option<usize>,
}

/// Runs `load` in the background; the handle yields the merged ledger.
pub fn run_load(
    drill: &'static str,
    clients: Vec<Client>,
    slots: Vec<SlotInfo>,
    load: Load,
) -> tokio::task::JoinHandle<Ledger> {
    run_load_until(drill, clients, slots, load, Arc::default())
}

/// [`run_load`] that also ends (no new booking starts) once `stop` is set.
pub fn run_load_until(
    drill: &'static str,
    clients: Vec<Client>,
    slots: Vec<SlotInfo>,
    load: Load,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Ledger> {
    let slots = Arc::new(slots);
    let end = Instant::now() + load.run_for;
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..load.tasks)
        .map(|task| {
            let client = clients[task % clients.len()].clone();
            let (slots, counter, stop) = (slots.clone(), counter.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ledger = Ledger::default();
                while Instant::now() < end && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if load.limit.is_some_and(|limit| n >= limit) {
                        break;
                    }
                    let earliest =
                        Utc::now() + chrono::Duration::from_std(load.margin).expect("margin");
                    let Some(slot) = slots.iter().find(|s| s.starts_at > earliest) else {
                        break;
                    };
                    let party_size = rand::random_range(1..=3);
                    client
                        .book_new_customer(&format!("{drill}-{n}"), slot, party_size, &mut ledger)
                        .await;
                    if !load.pause.is_zero() {
                        tokio::time::sleep(load.pause).await;
                    }
                }
                ledger
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut ledger = Ledger::default();
        for task in tasks {
            ledger.merge(task.await.expect("client task"));
        }
        ledger
    })
}
