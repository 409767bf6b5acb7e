//! EraseCustomer end to end: booking-service's part (pending follow-ups
//! cancelled, texts cleared, bookings pseudonymised), memory-service's part
//! (DeleteUserData), idempotency, memory-service away, and follow-up jobs
//! still queued for the erased customer.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use booking_service::jobs::{DELIVER_QUEUE, PLAN_QUEUE};
use maitre_api::{
    booking::v1::{self as booking, FollowUpState},
    memory::v1 as memory,
};
use maitre_runtime::{server::AuthMode, testkit::wait_for};
use tonic::Code;

use crate::stack::{
    Stack, WITHIN, planned_follow_up, reason, spawn_stack_with, spawn_stack_with_memory,
};

/// Log lines written while a test runs on this thread (the services run
/// in-process on the test's single-threaded runtime, so their events land
/// here), at INFO and above, memory-service's own lines left out (they are
/// memory-service's business).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::{filter::Targets, layer::SubscriberExt};
        let logs = Logs::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(logs.clone())
            .with_ansi(false);
        let filter = Targets::new()
            .with_default(tracing::Level::INFO)
            .with_target("memory_service", tracing::level_filters::LevelFilter::OFF);
        let subscriber = tracing_subscriber::registry().with(layer).with(filter);
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

async fn erase(
    stack: &Stack,
    customer: &str,
) -> Result<booking::EraseCustomerResponse, tonic::Status> {
    stack
        .booking
        .clone()
        .erase_customer(booking::EraseCustomerRequest {
            customer_id: customer.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Erases, then repeats the (idempotent) call until memory-service reports
/// the erasure complete (it may finish in the background); the first answer.
async fn erase_completely(stack: &Stack, customer: &str) -> booking::EraseCustomerResponse {
    let first = erase(stack, customer).await.expect("erased");
    if !first.complete {
        wait_for("the erasure to complete", WITHIN, || async {
            erase(stack, customer)
                .await
                .expect("erased again")
                .complete
                .then_some(())
        })
        .await;
    }
    first
}

async fn get_booking(stack: &Stack, id: &str) -> booking::Booking {
    stack
        .booking
        .clone()
        .get_booking(booking::GetBookingRequest {
            booking_id: id.into(),
        })
        .await
        .expect("booking")
        .into_inner()
        .booking
        .expect("booking")
}

/// memory-service holds nothing of `customer` and nothing in `conversation`.
async fn assert_memory_holds_nothing(stack: &Stack, customer: &str, conversation: &str) {
    let conversations = stack
        .memory
        .clone()
        .list_conversations(memory::ListConversationsRequest {
            user_id: customer.into(),
            ..Default::default()
        })
        .await
        .expect("conversations")
        .into_inner()
        .conversations;
    assert!(conversations.is_empty(), "{conversations:?}");
    let found = stack
        .memory
        .clone()
        .get_conversation(memory::GetConversationRequest {
            conversation_id: conversation.into(),
        })
        .await;
    assert!(found.is_err(), "the conversation is still there: {found:?}");
    assert!(stack.messages(conversation).await.is_empty());
}

/// Rows of booking-service's tables and of the job queue whose text
/// contains `needle` (row as text; job payloads as bytes).
async fn rows_mentioning(stack: &Stack, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    // Every table of booking-service's schema (new ones included), and the queue.
    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables \
         WHERE table_schema = 'booking' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&stack.db)
    .await
    .expect("tables");
    assert!(tables.len() >= 8, "{tables:?}");
    tables.push("apalis.jobs".into());
    for table in tables {
        let sql = format!(
            "SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0{}",
            if table.as_str() == "apalis.jobs" {
                " OR position(convert_to($1, 'UTF8') IN t.job) > 0"
            } else {
                ""
            }
        );
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(needle)
            .fetch_one(&stack.db)
            .await
            .expect("scan");
        if count > 0 {
            found.push(format!("{table}: {count}"));
        }
    }
    found
}

async fn booked_seats(stack: &Stack, slot_id: &str) -> i32 {
    sqlx::query_scalar("SELECT booked FROM booking.slots WHERE id = $1::uuid")
        .bind(slot_id)
        .fetch_one(&stack.db)
        .await
        .expect("seats")
}

#[tokio::test]
async fn an_erased_customer_gets_no_follow_up_and_leaves_only_pseudonymised_accounting() {
    let (logs, _guard) = Logs::capture();
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(1)).await;
    let customer = unique("zelda");
    let name = "Zelda Erasable";
    let reason_text = "Zelda's knee surgery";
    let conversation = stack
        .conversation(&customer, &[(-0.6, "anger"), (-0.7, "frustration")])
        .await;

    // A booking whose slot ends in ~2.5 s: its follow-up is due ~1 s later.
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_millis(500), 10)
        .await;
    let mut request = Stack::booking_request(&slot, &customer, &conversation, 3);
    request.customer_name = name.into();
    let request_id = request.request_id.clone();
    let booked = stack.book(request).await.expect("booked");
    // And a booking cancelled with a reason, on a later slot.
    let later = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 5)
        .await;
    let mut request = Stack::booking_request(&later, &customer, &conversation, 2);
    request.customer_name = name.into();
    let cancelled = stack.book(request).await.expect("booked");
    // Cancelled once planned, so the counts below do not depend on timing: a
    // plan racing the cancel may leave no row, a CANCELLED one, or (its
    // transaction committing after the cancel's) a PENDING one that the
    // erasure cancels too.
    stack.plan_early(&cancelled.booking_id).await;
    stack
        .wait_follow_up(&cancelled.booking_id, "the later booking planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: cancelled.booking_id.clone(),
            reason: reason_text.into(),
        })
        .await
        .expect("cancelled");

    stack.plan_early(&booked.booking_id).await;
    let planned = stack
        .wait_follow_up(&booked.booking_id, "the follow-up planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;
    assert!(
        planned.rendered_text.contains(name),
        "{}",
        planned.rendered_text
    );
    let due = planned.scheduled_time.expect("scheduled");
    assert!(
        due.seconds > chrono::Utc::now().timestamp(),
        "too slow: the follow-up came due before the erasure"
    );

    let erased = erase_completely(&stack, &customer).await;
    assert_eq!(erased.bookings_pseudonymised, 2);
    // The pending one cancelled; both cleared (the cancelled booking's too).
    assert_eq!(erased.follow_ups_cancelled, 1);
    assert_eq!(erased.follow_ups_cleared, 2);
    assert_eq!(erased.conversations_deleted, 1);
    // No count of messages here: the call counts only those it purged
    // itself, and memory-service's background purger may take them between
    // the tombstone and the call's own batches. That none is left is
    // asserted below, through memory-service's API.

    // Past the due time, the deliver job has run and found it cancelled.
    wait_for("the deliver job to run", WITHIN, || async {
        (stack.jobs(DELIVER_QUEUE, "Done").await >= 1).then_some(())
    })
    .await;
    let follow_ups = stack.follow_ups(&booked.booking_id).await;
    assert_eq!(follow_ups.len(), 1);
    let follow_up = &follow_ups[0];
    assert_eq!(follow_up.state, FollowUpState::Cancelled as i32, "not SENT");
    assert_eq!(follow_up.rendered_text, "");
    assert_eq!(follow_up.conversation_id, "");
    assert_eq!(follow_up.last_error, "customer erased");
    assert_memory_holds_nothing(&stack, &customer, &conversation).await;
    // And nothing comes back later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_memory_holds_nothing(&stack, &customer, &conversation).await;
    assert_eq!(stack.follow_ups(&booked.booking_id).await, follow_ups);

    // Accounting keeps the booking, pseudonymised.
    let kept = get_booking(&stack, &booked.booking_id).await;
    assert!(
        kept.customer_id.starts_with("erased:"),
        "{}",
        kept.customer_id
    );
    assert_eq!(kept.customer_id.len(), "erased:".len() + 64);
    assert_eq!(kept.customer_name, "");
    assert_eq!(kept.conversation_id, "");
    assert_eq!(kept.request_id, kept.booking_id);
    assert_eq!(
        (kept.slot_id.as_str(), kept.party_size, kept.state),
        (
            booked.slot_id.as_str(),
            3,
            booking::BookingState::Confirmed as i32
        )
    );
    assert_eq!(kept.deposit, booked.deposit, "the deposit and its state");
    assert_eq!(
        (kept.create_time, kept.slot_start_time),
        (booked.create_time, booked.slot_start_time)
    );
    let kept_cancelled = get_booking(&stack, &cancelled.booking_id).await;
    assert_eq!(
        kept_cancelled.customer_id, kept.customer_id,
        "one pseudonym"
    );
    assert_eq!(
        kept_cancelled.state,
        booking::BookingState::Cancelled as i32
    );
    assert_eq!(
        kept_cancelled.deposit.expect("deposit").state,
        booking::PaymentState::Voided as i32
    );
    assert!(kept_cancelled.cancel_time.is_some());
    assert_eq!(
        booked_seats(&stack, &slot.slot_id).await,
        3,
        "seats untouched"
    );
    assert_eq!(booked_seats(&stack, &later.slot_id).await, 0);

    // Nothing in clear anywhere in booking-service or the queue.
    for needle in [customer.as_str(), name, reason_text, request_id.as_str()] {
        assert_eq!(
            rows_mentioning(&stack, needle).await,
            Vec::<String>::new(),
            "{needle}"
        );
    }
    let by_id = stack
        .booking
        .clone()
        .list_bookings(booking::ListBookingsRequest {
            customer_id: customer.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(by_id.bookings.is_empty());

    // Nor in booking-service's logs.
    let text = logs.text();
    assert!(
        text.contains("customer erased from booking-service"),
        "the capture works"
    );
    assert!(!text.contains(&customer), "the customer id was logged");
    assert!(!text.contains(name), "the customer name was logged");
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn erasing_twice_is_idempotent_and_an_unknown_customer_counts_zero() {
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(3600)).await;
    let customer = unique("yusuf");
    let conversation = stack.conversation(&customer, &[(0.5, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let mut ids = Vec::new();
    for party in [1, 2] {
        let booked = stack
            .book(Stack::booking_request(
                &slot,
                &customer,
                &conversation,
                party,
            ))
            .await
            .expect("booked");
        stack.plan_early(&booked.booking_id).await;
        stack
            .wait_follow_up(&booked.booking_id, "planned", |f| {
                f.state == FollowUpState::Pending as i32
            })
            .await;
        ids.push(booked.booking_id);
    }

    let first = erase_completely(&stack, &customer).await;
    assert_eq!(
        (
            first.bookings_pseudonymised,
            first.follow_ups_cancelled,
            first.follow_ups_cleared,
            first.conversations_deleted
        ),
        (2, 2, 2, 1)
    );
    let again = erase(&stack, &customer).await.expect("erased again");
    assert_eq!(
        again,
        booking::EraseCustomerResponse {
            complete: true,
            ..Default::default()
        },
        "nothing left to erase"
    );
    let pseudonym = get_booking(&stack, &ids[0]).await.customer_id;
    assert_eq!(get_booking(&stack, &ids[1]).await.customer_id, pseudonym);
    assert_eq!(booked_seats(&stack, &slot.slot_id).await, 3);

    // The customer comes back, books, and is erased again: the same pseudonym.
    let back = stack
        .book(Stack::booking_request(&slot, &customer, "", 1))
        .await
        .expect("booked again");
    assert_eq!(back.customer_id, customer);
    let second = erase_completely(&stack, &customer).await;
    assert_eq!(second.bookings_pseudonymised, 1);
    assert_eq!(
        get_booking(&stack, &back.booking_id).await.customer_id,
        pseudonym
    );

    let unknown = erase(&stack, &unique("nobody")).await.expect("unknown");
    assert_eq!(
        unknown,
        booking::EraseCustomerResponse {
            complete: true,
            ..Default::default()
        }
    );
    // A pseudonym cannot be booked under, nor erased.
    let status = stack
        .book(Stack::booking_request(&slot, &pseudonym, "", 1))
        .await
        .expect_err("a pseudonym as customer id");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = erase(&stack, &pseudonym)
        .await
        .expect_err("erase a pseudonym");
    assert_eq!(status.code(), Code::InvalidArgument);
    stack.shutdown().await;
}

#[tokio::test]
async fn with_memory_service_down_erasure_is_unavailable_then_finishes_on_retry() {
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(3600)).await;
    let customer = unique("xena");
    let conversation = stack.conversation(&customer, &[(-0.2, "sadness")]).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, &customer, &conversation, 2))
        .await
        .expect("booked");
    stack.plan_early(&booked.booking_id).await;
    stack
        .wait_follow_up(&booked.booking_id, "planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;

    stack.memory_link.take_down();
    let status = erase(&stack, &customer)
        .await
        .expect_err("memory-service away");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "MEMORY_SERVICE_UNAVAILABLE");
    assert!(
        status.message().contains("call EraseCustomer again"),
        "{status:?}"
    );
    assert!(!status.message().contains(&customer));
    // booking-service's part is done already.
    let kept = get_booking(&stack, &booked.booking_id).await;
    assert!(kept.customer_id.starts_with("erased:"));
    assert_eq!(
        stack.follow_ups(&booked.booking_id).await[0].state,
        FollowUpState::Cancelled as i32
    );
    // memory-service's is not.
    assert_eq!(stack.messages(&conversation).await.len(), 1);

    stack.memory_link.bring_up();
    let retried = wait_for("memory-service back", WITHIN, || async {
        erase(&stack, &customer).await.ok()
    })
    .await;
    assert_eq!(retried.bookings_pseudonymised, 0, "done the first time");
    assert_eq!(retried.conversations_deleted, 1);
    if !retried.complete {
        erase_completely(&stack, &customer).await;
    }
    assert_memory_holds_nothing(&stack, &customer, &conversation).await;
    assert_eq!(booked_seats(&stack, &slot.slot_id).await, 2);
    stack.shutdown().await;
}

/// The plan job is still queued when its customer is erased (workers off),
/// then a worker runs it: the follow-up it plans is born cancelled and
/// empty, and its deliver job stores nothing.
#[tokio::test]
async fn a_plan_job_queued_when_its_customer_is_erased_delivers_nothing() {
    let mut stack = spawn_stack_with(|s| {
        s.disable_workers = true;
        s.followup_delay = Duration::ZERO;
    })
    .await;
    let customer = unique("walt");
    let name = "Walt Queued";
    let conversation = stack.conversation(&customer, &[(0.6, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_millis(200), 4)
        .await;
    let mut request = Stack::booking_request(&slot, &customer, &conversation, 1);
    request.customer_name = name.into();
    let booked = stack.book(request).await.expect("booked");
    assert_eq!(stack.jobs(PLAN_QUEUE, "Pending").await, 1);

    // The queued job names the booking only: nothing to erase there.
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT job FROM apalis.jobs")
        .fetch_all(&stack.db)
        .await
        .expect("jobs");
    let job: booking_service::jobs::PlanFollowUp =
        serde_json::from_slice(&payloads[0]).expect("plan job");
    assert_eq!(job.booking_id.to_string(), booked.booking_id);

    let erased = erase_completely(&stack, &customer).await;
    assert_eq!(
        (erased.bookings_pseudonymised, erased.follow_ups_cleared),
        (1, 0)
    );

    stack.add_booking_service(|_| {}).await;
    wait_for("the follow-up job to run", WITHIN, || async {
        (stack.jobs(PLAN_QUEUE, "Done").await == 1).then_some(())
    })
    .await;
    let deliver_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
            .bind(DELIVER_QUEUE)
            .fetch_one(&stack.db)
            .await
            .expect("deliver jobs");
    assert_eq!(
        deliver_jobs, 0,
        "a follow-up born cancelled is never sent for delivery"
    );
    let follow_ups = stack.follow_ups(&booked.booking_id).await;
    assert_eq!(follow_ups.len(), 1, "{follow_ups:?}");
    assert_eq!(follow_ups[0].state, FollowUpState::Cancelled as i32);
    assert_eq!(follow_ups[0].rendered_text, "");
    assert_eq!(follow_ups[0].last_error, "customer erased");
    assert_memory_holds_nothing(&stack, &customer, &conversation).await;
    for needle in [customer.as_str(), name] {
        assert_eq!(
            rows_mentioning(&stack, needle).await,
            Vec::<String>::new(),
            "{needle}"
        );
    }
    // The sweep finds nothing stranded: the booking has its (cancelled) follow-up.
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_delivered_follow_up_loses_its_text_and_its_message() {
    let stack = spawn_stack_with(|_| {}).await;
    let customer = unique("vera");
    let conversation = stack.conversation(&customer, &[(0.1, "calm")]).await;
    let slot = stack
        .slot(Duration::from_millis(500), Duration::from_millis(500), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, &customer, &conversation, 1))
        .await
        .expect("booked");
    let sent = stack
        .wait_follow_up(&booked.booking_id, "SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    assert_eq!(stack.assistant_messages(&conversation).await.len(), 1);

    let erased = erase_completely(&stack, &customer).await;
    assert_eq!(
        (erased.follow_ups_cancelled, erased.follow_ups_cleared),
        (0, 1)
    );
    // No count of messages here: the call counts only those it purged
    // itself, and memory-service's background purger may take them between
    // the tombstone and the call's own batches. That none is left is
    // asserted below, through memory-service's API.
    let after = &stack.follow_ups(&booked.booking_id).await[0];
    assert_eq!(
        after.state,
        FollowUpState::Sent as i32,
        "what happened stays"
    );
    assert_eq!(after.message_id, sent.message_id);
    assert_eq!(
        (after.rendered_text.as_str(), after.conversation_id.as_str()),
        ("", "")
    );
    assert_memory_holds_nothing(&stack, &customer, &conversation).await;
    stack.shutdown().await;
}

#[tokio::test]
async fn only_admin_may_erase_by_default() {
    const ASSISTANT: &str = "assistant-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789abc";
    let stack = spawn_stack_with_memory(
        |_| {},
        |booking| {
            booking.server.auth_mode = AuthMode::Required;
            booking.server.auth_tokens = Some(format!("assistant:{ASSISTANT},admin:{ADMIN}"));
        },
        None,
        Some(ADMIN),
    )
    .await;
    let request = booking::EraseCustomerRequest {
        customer_id: "ada".into(),
    };
    let denied = stack
        .booking_with_token(ASSISTANT)
        .erase_customer(request.clone())
        .await
        .expect_err("assistant");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied), "METHOD_NOT_GRANTED");
    let anonymous = stack
        .booking_without_token()
        .erase_customer(request.clone())
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    stack
        .booking_with_token(ADMIN)
        .erase_customer(request)
        .await
        .expect("admin");
    stack.shutdown().await;
}

async fn follow_up_row(stack: &Stack, id: uuid::Uuid) -> (i16, String, String, Option<String>) {
    sqlx::query_as(
        "SELECT state, customer_id, rendered_text, last_error \
         FROM booking.scheduled_followups WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&stack.db)
    .await
    .expect("follow-up row")
}

/// A plan job inserting its follow-up while the customer is erased, the
/// insert first: the erasure waits for it to commit and then clears it.
/// (The planning statement locks the booking row, which the erasure waits
/// for; the trigger's own wait is what the next test, erasure first, checks.)
#[tokio::test]
async fn an_erasure_waits_for_a_follow_up_being_planned_and_clears_it() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let customer = unique("uma");
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, &customer, "", 1))
        .await
        .expect("booked");
    let follow_up = planned_follow_up(&booked, "Uma");
    let mut plan = stack.db.begin().await.expect("begin");
    assert_eq!(
        booking_service::store::followups::insert_planned(
            &mut plan,
            &follow_up,
            chrono::Utc::now(),
            None
        )
        .await
        .expect("planned"),
        Some(FollowUpState::Pending as i16)
    );

    let mut client = stack.booking.clone();
    let erasing = tokio::spawn({
        let customer = customer.clone();
        async move {
            client
                .erase_customer(booking::EraseCustomerRequest {
                    customer_id: customer,
                })
                .await
                .map(|r| r.into_inner())
        }
    });
    stack.blocked_on_locks(1).await;
    plan.commit().await.expect("commit the plan");
    let erased = erasing.await.expect("join").expect("erased");
    assert_eq!(
        (erased.follow_ups_cancelled, erased.follow_ups_cleared),
        (1, 1)
    );
    let (state, customer_id, text, last_error) = follow_up_row(&stack, follow_up.id).await;
    assert_eq!(state, FollowUpState::Cancelled as i16);
    assert!(customer_id.starts_with("erased:"));
    assert_eq!(text, "");
    assert_eq!(last_error.as_deref(), Some("customer erased"));
    stack.shutdown().await;
}

/// The same race the other way round: the erasure holds the customer's
/// bookings (paused before it reads the salt), a plan job's insert waits
/// for it, and its follow-up is born cancelled and empty.
#[tokio::test]
async fn a_follow_up_planned_during_an_erasure_is_born_cancelled() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let customer = unique("tom");
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, &customer, "", 1))
        .await
        .expect("booked");

    // Pause erasures after they lock the bookings: they read the salt next.
    let mut pause = stack.db.begin().await.expect("begin");
    sqlx::query("LOCK TABLE booking.erasure_salt IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *pause)
        .await
        .expect("lock the salt");
    let mut client = stack.booking.clone();
    let erasing = tokio::spawn({
        let customer = customer.clone();
        async move {
            client
                .erase_customer(booking::EraseCustomerRequest {
                    customer_id: customer,
                })
                .await
                .map(|r| r.into_inner())
        }
    });
    stack.blocked_on_locks(1).await;

    let follow_up = planned_follow_up(&booked, "Tom");
    let planning = tokio::spawn({
        let (pool, follow_up) = (stack.db.clone(), follow_up.clone());
        async move {
            let mut plan = pool.begin().await.expect("begin");
            // Claimed for delivery by the planning run, as a job due now does.
            let claim = Some((uuid::Uuid::now_v7(), Duration::from_secs(60)));
            let inserted = booking_service::store::followups::insert_planned(
                &mut plan,
                &follow_up,
                chrono::Utc::now(),
                claim,
            )
            .await
            .expect("planned");
            plan.commit().await.expect("commit");
            inserted
        }
    });
    stack.blocked_on_locks(2).await;
    pause.commit().await.expect("resume the erasure");

    let erased = erasing.await.expect("join").expect("erased");
    assert_eq!(
        (erased.bookings_pseudonymised, erased.follow_ups_cleared),
        (1, 0)
    );
    assert_eq!(
        planning.await.expect("join"),
        Some(FollowUpState::Cancelled as i16),
        "inserted, born cancelled: the planning run must not deliver it"
    );
    let (state, customer_id, text, last_error) = follow_up_row(&stack, follow_up.id).await;
    assert_eq!(state, FollowUpState::Cancelled as i16);
    let claimed: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT claimed_until FROM booking.scheduled_followups WHERE id = $1")
            .bind(follow_up.id)
            .fetch_one(&stack.db)
            .await
            .expect("claim");
    assert_eq!(claimed, None, "no claim on a follow-up born cancelled");
    assert!(customer_id.starts_with("erased:"), "{customer_id}");
    assert_eq!(text, "");
    assert_eq!(last_error.as_deref(), Some("customer erased"));
    assert_eq!(
        rows_mentioning(&stack, &customer).await,
        Vec::<String>::new()
    );
    stack.shutdown().await;
}

/// FAILED follow-ups are cancelled too (RetryFollowUp could revive them),
/// and a delivery already claimed keeps the erasure incomplete until its
/// claim is over: its message may land after DeleteUserData.
#[tokio::test]
async fn failed_follow_ups_are_cancelled_and_deliveries_in_flight_keep_it_incomplete() {
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(3600)).await;
    let customer = unique("sami");
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let mut follow_ups = Vec::new();
    for _ in 0..2 {
        let booked = stack
            .book(Stack::booking_request(&slot, &customer, "", 1))
            .await
            .expect("booked");
        stack.plan_early(&booked.booking_id).await;
        let planned = stack
            .wait_follow_up(&booked.booking_id, "planned", |f| {
                f.state == FollowUpState::Pending as i32
            })
            .await;
        follow_ups.push(planned.follow_up_id.parse::<uuid::Uuid>().expect("uuid"));
    }
    let (failed, delivering) = (follow_ups[0], follow_ups[1]);
    // One is the dead letter; the other is being delivered right now (its
    // claim, as the deliver job takes it).
    let token = uuid::Uuid::now_v7();
    sqlx::query(
        "UPDATE booking.scheduled_followups SET state = 4, last_error = 'memory-service refused' \
         WHERE id = $1",
    )
    .bind(failed)
    .execute(&stack.db)
    .await
    .expect("failed");
    sqlx::query(
        "UPDATE booking.scheduled_followups \
         SET claim_token = $2, claimed_until = now() + interval '30 seconds' WHERE id = $1",
    )
    .bind(delivering)
    .bind(token)
    .execute(&stack.db)
    .await
    .expect("claimed");

    let first = erase(&stack, &customer).await.expect("erased");
    assert_eq!(
        (
            first.bookings_pseudonymised,
            first.follow_ups_cancelled,
            first.follow_ups_cleared
        ),
        (2, 2, 2)
    );
    assert_eq!(first.deliveries_in_flight, 1);
    assert!(!first.complete, "a delivery may still land");

    let status = stack
        .booking
        .clone()
        .retry_follow_up(booking::RetryFollowUpRequest {
            follow_up_id: failed.to_string(),
        })
        .await
        .expect_err("an erased customer's follow-up is never re-driven");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "FOLLOW_UP_CANCELLED");

    // Still on its way: still incomplete.
    let again = erase(&stack, &customer).await.expect("erased again");
    assert_eq!((again.deliveries_in_flight, again.complete), (1, false));

    // The delivery lands and finishes as the deliver job would.
    let finished = booking_service::store::followups::finish_sent(
        &stack.db,
        delivering,
        token,
        uuid::Uuid::now_v7(),
        chrono::Utc::now(),
    )
    .await
    .expect("finished");
    assert_eq!(
        finished,
        Some(FollowUpState::Cancelled as i16),
        "the cancel wins the state"
    );
    let done = erase(&stack, &customer).await.expect("erased once more");
    assert_eq!((done.deliveries_in_flight, done.complete), (0, true));
    for id in follow_ups {
        let (state, _, text, _) = follow_up_row(&stack, id).await;
        assert_eq!(
            (state, text.as_str()),
            (FollowUpState::Cancelled as i16, "")
        );
    }
    assert_eq!(
        rows_mentioning(&stack, &customer).await,
        Vec::<String>::new()
    );
    stack.shutdown().await;
}

/// Holds and moves keep nothing of an erased customer: holds are
/// pseudonymised (their keys replaced), a live one released, and the
/// bookings' move keys deleted.
#[tokio::test]
async fn an_erased_customers_holds_and_moves_keep_no_trace() {
    use crate::holds::{confirm, confirm_request, hold};
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(3600)).await;
    let customer = unique("ana");
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let later = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(3600), 10)
        .await;
    let key = |what: &str| format!("{what}-of-{customer}");
    let live = hold(
        &stack,
        booking::HoldSeatsRequest {
            customer_id: customer.clone(),
            slot_id: slot.slot_id.clone(),
            party_size: 2,
            request_id: key("live-hold"),
        },
    )
    .await
    .expect("held");
    let confirmed = hold(
        &stack,
        booking::HoldSeatsRequest {
            customer_id: customer.clone(),
            slot_id: slot.slot_id.clone(),
            party_size: 1,
            request_id: key("confirmed-hold"),
        },
    )
    .await
    .expect("held");
    let booked = confirm(&stack, confirm_request(&confirmed, "Ana"))
        .await
        .expect("confirmed")
        .booking
        .expect("booking");
    stack
        .booking
        .clone()
        .move_booking(booking::MoveBookingRequest {
            booking_id: booked.booking_id.clone(),
            slot_id: later.slot_id.clone(),
            request_id: key("move"),
        })
        .await
        .expect("moved");

    erase_completely(&stack, &customer).await;
    assert_eq!(
        rows_mentioning(&stack, &customer).await,
        Vec::<String>::new()
    );
    let held: i32 = sqlx::query_scalar("SELECT booking.held_seats($1::uuid)")
        .bind(&slot.slot_id)
        .fetch_one(&stack.db)
        .await
        .expect("held seats");
    assert_eq!(held, 0, "the live hold was released");
    let refused = confirm(&stack, confirm_request(&live, "Ana"))
        .await
        .expect_err("erased");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    // The moved booking stays in its new slot, for accounting.
    assert_eq!(
        get_booking(&stack, &booked.booking_id).await.slot_id,
        later.slot_id
    );
    stack.shutdown().await;
}
