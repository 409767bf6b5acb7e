//! Issue 12: workers are woken after the commit, not by a NOTIFY inside the
//! booking's transaction (PostgreSQL serialises the commits of transactions
//! that notify); a booking taken by one replica wakes the workers of
//! another when its follow-up job comes due (the event's end), and work due
//! later wakes them when it comes due.

use std::time::Duration;

use booking_service::jobs::{PLAN_QUEUE, wakeups::CHANNEL};
use maitre_api::booking::v1::FollowUpState;
use maitre_runtime::testkit::wait_for;
use sqlx::postgres::PgListener;

use crate::stack::{Stack, quick, spawn_stack_with};

/// apalis-postgres's own wake-up channel (its per-row trigger, dropped).
const APALIS_CHANNEL: &str = "apalis::job::insert";

/// Books an event that ends in 2 s: its follow-up job comes due then
/// (`quick`: no delay after the event).
async fn book_one(stack: &Stack, customer: &str) -> String {
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 10)
        .await;
    stack
        .book(Stack::booking_request(&slot, customer, "", 1))
        .await
        .expect("booking")
        .booking_id
}

#[tokio::test]
async fn a_booking_commits_without_a_notify_and_wakes_the_workers_after() {
    let stack = spawn_stack_with(quick).await;
    let mut listener = PgListener::connect(&stack.database_url)
        .await
        .expect("listener");
    listener
        .listen_all([APALIS_CHANNEL, CHANNEL])
        .await
        .expect("LISTEN");

    // apalis's per-row NOTIFY trigger is gone (our migration): no trigger
    // of any kind runs in the booking's transaction on the queue table.
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'apalis.jobs'::regclass AND NOT tgisinternal",
    )
    .fetch_all(&stack.db)
    .await
    .expect("triggers");
    assert_eq!(triggers, Vec::<String>::new());

    book_one(&stack, "wake-1").await;

    // A NOTIFY sent by the booking's own transaction would arrive first; the
    // wake-up comes when its follow-up job is due, 2 s later.
    let first = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a wake-up within 10 s")
        .expect("notification");
    assert_eq!(first.channel(), CHANNEL, "payload {}", first.payload());
    let (queue, sender) = first
        .payload()
        .split_once(' ')
        .expect("payload '<queue> <instance>'");
    assert_eq!(queue, PLAN_QUEUE);
    assert!(!sender.is_empty());
    stack.shutdown().await;
}

#[tokio::test]
async fn a_booking_taken_by_an_api_only_replica_wakes_another_replicas_workers() {
    // Replica A serves the API only; replica B runs the workers and would
    // poll only every 10 minutes: the booking can only reach B's plan worker
    // through A's wake-up.
    let mut stack = spawn_stack_with(|s| {
        quick(s);
        s.disable_workers = true;
    })
    .await;
    // B's heartbeat (whose completion also makes apalis fetch) is a minute
    // away too.
    stack
        .add_booking_service(|s| {
            s.worker_poll_interval = Duration::from_secs(600);
            s.worker_heartbeat_interval = Duration::from_secs(60);
        })
        .await;
    wait_for(
        "replica B to listen for wake-ups",
        Duration::from_secs(30),
        || async {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND query LIKE $1",
            )
            .bind(format!("%{CHANNEL}%"))
            .fetch_one(&stack.db)
            .await
            .ok()?;
            (listening > 0).then_some(())
        },
    )
    .await;
    // B's first poll (at start) is over by now; the next is 10 minutes away.
    // A, which took the booking, wakes B when its follow-up job comes due.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let booking_id = book_one(&stack, "wake-2").await;
    let planned = wait_for(
        "the booking planned by replica B",
        Duration::from_secs(10),
        || async { stack.follow_ups(&booking_id).await.into_iter().next() },
    )
    .await;
    assert_eq!(planned.booking_id, booking_id);
    let (due, created) = (
        planned.scheduled_time.expect("due"),
        planned.create_time.expect("planned"),
    );
    let late_ms =
        (created.seconds - due.seconds) * 1000 + i64::from(created.nanos - due.nanos) / 1_000_000;
    assert!(
        (0..1500).contains(&late_ms),
        "planned {late_ms} ms after it came due: A's wake-up did not reach B"
    );
    stack.shutdown().await;
}

/// A worker process reads the due times of the next ten minutes from the
/// queue table and wakes its workers then, whoever enqueued the jobs (here
/// an API-only replica, before this process existed); work further ahead
/// is left to later reads.
#[tokio::test]
async fn a_worker_process_wakes_for_jobs_it_did_not_enqueue() {
    let stack = spawn_stack_with(|s| {
        quick(s);
        s.disable_workers = true;
    })
    .await;
    book_one(&stack, "wake-4").await;
    let later = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    stack
        .book(Stack::booking_request(&later, "wake-5", "", 1))
        .await
        .expect("booking an hour ahead");
    let due: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(run_at) FROM apalis.jobs WHERE job_type = $1")
            .bind(PLAN_QUEUE)
            .fetch_one(&stack.db)
            .await
            .expect("due time");

    let wakeups = booking_service::jobs::wakeups::Wakeups::new();
    let mut plan = wakeups.stream(PLAN_QUEUE);
    assert_eq!(
        wakeups
            .arm_upcoming(&stack.db)
            .await
            .expect("due times read"),
        1,
        "the job due in 2 s, not the one an hour ahead"
    );
    let woke = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut plan))
        .await
        .expect("woken within 10 s");
    assert_eq!(woke, Some(()));
    assert!(
        chrono::Utc::now() > due,
        "woken at the due time, not before"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn a_follow_up_due_later_is_delivered_when_due_even_with_rare_polling() {
    // The workers would poll only every 10 minutes, and their heartbeat
    // (whose completion also makes apalis fetch) comes every minute: the
    // follow-up job, due at the event's end 3 s from now, can only start on
    // time through the wake-up set for its due time.
    let stack = spawn_stack_with(|s| {
        quick(s);
        s.worker_poll_interval = Duration::from_secs(600);
        s.worker_heartbeat_interval = Duration::from_secs(60);
    })
    .await;
    let conversation = stack.conversation("wake-3", &[(0.8, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_secs(1), 10)
        .await;
    let booking_id = stack
        .book(Stack::booking_request(&slot, "wake-3", &conversation, 1))
        .await
        .expect("booking")
        .booking_id;
    let sent = wait_for(
        "the follow-up SENT within 10 s of its due time",
        Duration::from_secs(13),
        || async {
            stack
                .follow_ups(&booking_id)
                .await
                .into_iter()
                .find(|f| f.state == FollowUpState::Sent as i32)
        },
    )
    .await;
    assert_eq!(sent.booking_id, booking_id);
    stack.shutdown().await;
}
