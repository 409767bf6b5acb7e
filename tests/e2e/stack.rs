//! Starting both services wired together, and a helper per RPC.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use booking_service::config::Settings as BookingSettings;
use maitre_api::{
    booking::v1::{self as booking, booking_service_client::BookingServiceClient},
    memory::v1::{self as memory, memory_service_client::MemoryServiceClient},
};
use maitre_runtime::testkit::{fresh_database, proxy::TcpProxy, wait_for};
use memory_service::config::Settings as MemorySettings;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const WITHIN: Duration = Duration::from_secs(30);

/// Adds `authorization: Bearer <token>` when the stack has a token.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn token(value: Option<&str>) -> Token {
    Token(value.map(|t| format!("Bearer {t}").parse().expect("token header")))
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Token>;

pub struct Stack {
    pub memory: MemoryServiceClient<Authed>,
    pub booking: BookingServiceClient<Authed>,
    booking_channel: Channel,
    pub memory_admin: Option<SocketAddr>,
    pub booking_admin: Option<SocketAddr>,
    /// booking-service reaches memory-service through this, so a test can cut it off.
    pub memory_link: TcpProxy,
    pub memory_addr: SocketAddr,
    pub booking_addr: SocketAddr,
    pub db: PgPool,
    pub database_url: String,
    stops: Vec<oneshot::Sender<()>>,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings that make the follow-up pipeline quick enough to watch: no delay
/// after the event, 100 ms polling, retries after 0.2 s growing to 1 s.
pub fn quick(settings: &mut BookingSettings) {
    settings.followup_delay = Duration::ZERO;
    settings.worker_poll_interval = Duration::from_millis(100);
    settings.followup_retry_base = Duration::from_millis(200);
    settings.followup_retry_max = Duration::from_secs(1);
    settings.worker_heartbeat_interval = Duration::from_secs(2);
    settings.common.health_interval = Duration::from_millis(200);
    settings.metrics_refresh_interval = Duration::from_millis(200);
}

pub async fn spawn_stack() -> Stack {
    spawn_stack_with(|_| {}).await
}

pub async fn spawn_stack_with(tweak: impl FnOnce(&mut BookingSettings)) -> Stack {
    spawn_stack_with_memory(|_| {}, tweak, None, None).await
}

/// Both services tweaked; the test's clients present the given tokens.
pub async fn spawn_stack_with_memory(
    tweak_memory: impl FnOnce(&mut MemorySettings),
    tweak: impl FnOnce(&mut BookingSettings),
    memory_token: Option<&str>,
    booking_token: Option<&str>,
) -> Stack {
    maitre_runtime::telemetry::init_for_tests();
    let database_url = fresh_database().await;
    let mut stops = Vec::new();
    let mut servers = Vec::new();

    let mut memory_settings = MemorySettings::for_database(&database_url);
    memory_settings.common.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    memory_settings.common.admin_addr = "127.0.0.1:0".parse().expect("addr");
    tweak_memory(&mut memory_settings);
    let memory_app = memory_service::startup::Application::build(memory_settings)
        .await
        .expect("memory-service");
    let memory_addr = memory_app.local_addr();
    let memory_admin = memory_app.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    servers.push(tokio::spawn(memory_app.run_until_stopped(async move {
        let _ = stopped.await;
    })));
    stops.push(stop);

    let memory_link = TcpProxy::start(memory_addr).await;
    let mut booking_settings =
        BookingSettings::for_database(&database_url, &format!("http://{}", memory_link.addr));
    booking_settings.common.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    booking_settings.common.admin_addr = "127.0.0.1:0".parse().expect("addr");
    quick(&mut booking_settings);
    tweak(&mut booking_settings);
    let booking_app = booking_service::startup::Application::build(booking_settings)
        .await
        .expect("booking-service");
    let booking_addr = booking_app.local_addr();
    let booking_admin = booking_app.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    servers.push(tokio::spawn(booking_app.run_until_stopped(async move {
        let _ = stopped.await;
    })));
    stops.push(stop);

    let connect = |addr: SocketAddr| async move {
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    };
    let booking_channel = connect(booking_addr).await;
    Stack {
        memory: MemoryServiceClient::with_interceptor(
            connect(memory_addr).await,
            token(memory_token),
        ),
        booking: BookingServiceClient::with_interceptor(
            booking_channel.clone(),
            token(booking_token),
        ),
        booking_channel,
        memory_admin,
        booking_admin,
        memory_link,
        memory_addr,
        booking_addr,
        db: PgPool::connect(&database_url).await.expect("test pool"),
        database_url,
        stops,
        servers,
    }
}

impl Stack {
    /// A booking-service client that presents `token`.
    pub fn booking_with_token(&self, token: &str) -> BookingServiceClient<Authed> {
        BookingServiceClient::with_interceptor(
            self.booking_channel.clone(),
            self::token(Some(token)),
        )
    }

    /// A booking-service client that presents no token.
    pub fn booking_without_token(&self) -> BookingServiceClient<Channel> {
        BookingServiceClient::new(self.booking_channel.clone())
    }

    /// Stores `scores` as user messages of a new conversation; returns its id.
    pub async fn conversation(&self, customer: &str, scores: &[(f64, &str)]) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        self.add_messages(&id, customer, scores).await;
        id
    }

    /// Stores a scored user message per `(score, label)` in the conversation.
    pub async fn add_messages(&self, conversation: &str, customer: &str, scores: &[(f64, &str)]) {
        for (i, (score, label)) in scores.iter().enumerate() {
            self.memory
                .clone()
                .store_message(memory::StoreMessageRequest {
                    conversation_id: conversation.into(),
                    user_id: customer.into(),
                    channel: "web".into(),
                    role: memory::Role::User as i32,
                    content: format!("message {i}"),
                    emotion: Some(memory::Emotion {
                        score: *score,
                        label: (*label).into(),
                        scores: Default::default(),
                    }),
                    ..Default::default()
                })
                .await
                .expect("message stored");
        }
    }

    /// Jobs of `queue`, whatever their status.
    pub async fn jobs_total(&self, queue: &str) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
            .bind(queue)
            .fetch_one(&self.db)
            .await
            .expect("job count")
    }

    /// A slot starting `starts_in` from now and lasting `lasts`.
    pub async fn slot(&self, starts_in: Duration, lasts: Duration, capacity: i32) -> booking::Slot {
        let start = chrono::Utc::now() + chrono::Duration::from_std(starts_in).expect("duration");
        let end = start + chrono::Duration::from_std(lasts).expect("duration");
        self.booking
            .clone()
            .create_slot(booking::CreateSlotRequest {
                start_time: Some(maitre_runtime::fields::to_timestamp(start)),
                end_time: Some(maitre_runtime::fields::to_timestamp(end)),
                capacity,
                label: "Chef's table".into(),
                request_id: String::new(),
                time_zone: String::new(),
            })
            .await
            .expect("slot created")
            .into_inner()
            .slot
            .expect("slot")
    }

    pub fn booking_request(
        slot: &booking::Slot,
        customer: &str,
        conversation: &str,
        party_size: i32,
    ) -> booking::CreateBookingRequest {
        booking::CreateBookingRequest {
            customer_id: customer.into(),
            customer_name: format!("Customer {customer}"),
            conversation_id: conversation.into(),
            slot_id: slot.slot_id.clone(),
            party_size,
            deposit: Some(booking::Money {
                currency_code: "EUR".into(),
                amount_minor: 2500,
            }),
            request_id: uuid::Uuid::now_v7().to_string(),
        }
    }

    pub async fn book(
        &self,
        request: booking::CreateBookingRequest,
    ) -> Result<booking::Booking, tonic::Status> {
        self.booking
            .clone()
            .create_booking(request)
            .await
            .map(|r| r.into_inner().booking.expect("booking"))
    }

    pub async fn follow_ups(&self, booking_id: &str) -> Vec<booking::FollowUp> {
        self.booking
            .clone()
            .list_follow_ups(booking::ListFollowUpsRequest {
                parent: Some(booking::list_follow_ups_request::Parent::BookingId(
                    booking_id.into(),
                )),
                ..Default::default()
            })
            .await
            .expect("follow-ups")
            .into_inner()
            .follow_ups
    }

    /// Makes the booking's follow-up job due now instead of at the event's
    /// end: it plans now and, the follow-up being due later, leaves it
    /// PENDING with its deliver job — the path of a plan job run early (the
    /// sweep re-enqueues a stranded one to run at once). For tests that need
    /// a planned follow-up to act on before the event.
    pub async fn plan_early(&self, booking_id: &str) {
        let moved = sqlx::query(
            "UPDATE apalis.jobs SET run_at = now() \
             WHERE job_type = $1 AND idempotency_key = $2 || '/1' AND status = 'Pending'",
        )
        .bind(booking_service::jobs::PLAN_QUEUE)
        .bind(booking_id)
        .execute(&self.db)
        .await
        .expect("plan job moved");
        assert_eq!(
            moved.rows_affected(),
            1,
            "one pending follow-up job for the booking"
        );
    }

    /// Waits until the booking's follow-up satisfies `done`.
    pub async fn wait_follow_up(
        &self,
        booking_id: &str,
        what: &str,
        done: impl Fn(&booking::FollowUp) -> bool,
    ) -> booking::FollowUp {
        wait_for(what, WITHIN, || async {
            self.follow_ups(booking_id)
                .await
                .into_iter()
                .find(|f| done(f))
        })
        .await
    }

    pub async fn messages(&self, conversation: &str) -> Vec<memory::Message> {
        self.memory
            .clone()
            .list_messages(memory::ListMessagesRequest {
                conversation_id: conversation.into(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().messages)
            .unwrap_or_default()
    }

    pub async fn assistant_messages(&self, conversation: &str) -> Vec<memory::Message> {
        self.messages(conversation)
            .await
            .into_iter()
            .filter(|m| m.role == memory::Role::Assistant as i32)
            .collect()
    }

    /// (planned, plan_attempt) of a booking.
    pub async fn plan_progress(&self, booking_id: &str) -> (bool, i32) {
        sqlx::query_as::<_, (bool, i32)>(
            "SELECT followup_planned_at IS NOT NULL, plan_attempt FROM booking.bookings WHERE id = $1::uuid",
        )
        .bind(booking_id)
        .fetch_one(&self.db)
        .await
        .expect("booking")
    }

    /// Waits until `n` sessions of the test database wait for a lock.
    pub async fn blocked_on_locks(&self, n: i64) {
        wait_for("sessions blocked on a lock", WITHIN, || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&self.db)
            .await
            .expect("pg_stat_activity");
            (waiting >= n).then_some(())
        })
        .await;
    }

    /// Jobs of `queue` per apalis status.
    pub async fn jobs(&self, queue: &str, status: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = $2",
        )
        .bind(queue)
        .bind(status)
        .fetch_one(&self.db)
        .await
        .expect("job count")
    }

    /// Teardown check: nothing stuck, nothing failed at the queue level.
    pub async fn assert_queues_clean(&self) {
        let stuck: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apalis.jobs WHERE status IN ('Failed', 'Killed') \
             OR (status IN ('Running', 'Queued') AND lock_at < now() - interval '30 seconds')",
        )
        .fetch_one(&self.db)
        .await
        .expect("job states");
        assert_eq!(stuck, 0, "failed or stuck jobs left in the queue");
    }

    /// Starts one more booking-service on the same database (another
    /// "process" sharing the queue), with `tweak` applied.
    pub async fn add_booking_service(&mut self, tweak: impl FnOnce(&mut BookingSettings)) {
        let mut settings = BookingSettings::for_database(
            &self.database_url,
            &format!("http://{}", self.memory_link.addr),
        );
        settings.common.grpc_addr = "127.0.0.1:0".parse().expect("addr");
        settings.common.admin_addr = "127.0.0.1:0".parse().expect("addr");
        quick(&mut settings);
        tweak(&mut settings);
        let app = booking_service::startup::Application::build(settings)
            .await
            .expect("booking-service");
        let (stop, stopped) = oneshot::channel::<()>();
        self.servers
            .push(tokio::spawn(app.run_until_stopped(async move {
                let _ = stopped.await;
            })));
        self.stops.push(stop);
    }

    pub async fn shutdown(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for server in self.servers.drain(..).rev() {
            server.await.expect("join").expect("clean exit");
        }
    }
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A follow-up as the plan job inserts it (`store::followups::insert_planned`),
/// due in an hour, for `booking`, carrying the customer's id and name.
pub fn planned_follow_up(
    booking: &booking::Booking,
    name: &str,
) -> booking_service::store::followups::NewFollowUp {
    booking_service::store::followups::NewFollowUp {
        id: uuid::Uuid::now_v7(),
        booking_id: booking.booking_id.parse().expect("uuid"),
        customer_id: booking.customer_id.clone(),
        conversation_id: booking.conversation_id.parse().ok(),
        trigger: booking_service::domain::POST_EVENT_TRIGGER,
        template_key: "thank_you".into(),
        rendered_text: format!("Hi {name}, thank you."),
        scheduled_at: chrono::Utc::now() + chrono::Duration::hours(1),
        plan_attempts: 1,
    }
}
