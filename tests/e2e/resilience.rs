use std::time::Duration;

use booking_service::jobs::PLAN_QUEUE;
use maitre_api::booking::v1::FollowUpState;
use maitre_runtime::testkit::wait_for;

use crate::stack::{Stack, WITHIN, spawn_stack_with};

#[tokio::test]
async fn memory_service_down_during_planning_and_delivery_then_up_delivers_once() {
    let stack = spawn_stack_with(|s| s.followup_deliver_max_attempts = 50).await;
    let conversation = stack
        .conversation("hal", &[(-0.7, "anger"), (-0.9, "anger")])
        .await;
    let slot = stack
        .slot(Duration::from_secs(4), Duration::from_secs(2), 10)
        .await;

    // memory-service unreachable from booking-service: the booking is still confirmed at once.
    stack.memory_link.take_down();
    let started = std::time::Instant::now();
    let confirmed = stack
        .book(Stack::booking_request(&slot, "hal", &conversation, 2))
        .await
        .expect("booked");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Planned ahead of the event (the path of a job run early), so that
    // planning and delivery meet memory-service at different times.
    stack.plan_early(&confirmed.booking_id).await;

    // Planning fails and is re-scheduled (a second plan job appears).
    wait_for("a planning retry", WITHIN, || async {
        (stack.jobs(PLAN_QUEUE, "Pending").await + stack.jobs(PLAN_QUEUE, "Done").await >= 2)
            .then_some(())
    })
    .await;
    stack.memory_link.bring_up();
    let planned = stack
        .wait_follow_up(&confirmed.booking_id, "the follow-up to be planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;
    assert_eq!(
        planned.template_key, "service_recovery",
        "planned from the real history once memory answered"
    );

    // Down again when delivery comes due: attempts are counted with the error.
    stack.memory_link.take_down();
    let failing = stack
        .wait_follow_up(&confirmed.booking_id, "a failed delivery attempt", |f| {
            f.attempts >= 1
        })
        .await;
    assert_eq!(failing.state, FollowUpState::Pending as i32);
    assert!(!failing.last_error.is_empty());
    stack.memory_link.bring_up();

    let sent = stack
        .wait_follow_up(&confirmed.booking_id, "the follow-up to be SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    assert!(sent.attempts >= 2, "attempts counted: {}", sent.attempts);
    let delivered = stack.assistant_messages(&conversation).await;
    assert_eq!(delivered.len(), 1, "delivered exactly once");
    assert_eq!(delivered[0].message_id, sent.message_id);
    let plan_attempts: i32 =
        sqlx::query_scalar("SELECT plan_attempts FROM booking.scheduled_followups")
            .fetch_one(&stack.db)
            .await
            .expect("plan attempts");
    assert!(
        plan_attempts >= 2,
        "planning attempts counted: {plan_attempts}"
    );
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_follow_up_that_always_fails_ends_failed_and_stops_retrying() {
    let stack = spawn_stack_with(|s| {
        s.followup_plan_max_attempts = 2;
        s.followup_deliver_max_attempts = 3;
    })
    .await;
    stack.memory_link.take_down();
    let conversation = uuid::Uuid::now_v7().to_string();
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 10)
        .await;
    let confirmed = stack
        .book(Stack::booking_request(&slot, "ivo", &conversation, 1))
        .await
        .expect("booked");

    let failed = stack
        .wait_follow_up(&confirmed.booking_id, "the follow-up to be FAILED", |f| {
            f.state == FollowUpState::Failed as i32
        })
        .await;
    assert_eq!(failed.attempts, 3);
    assert!(
        failed.last_error.contains("memory-service"),
        "{}",
        failed.last_error
    );
    assert_eq!(
        failed.template_key, "thank_you",
        "planning fell back to the neutral template"
    );
    assert!(failed.message_id.is_empty());

    // Nothing left to retry.
    let deliver = booking_service::jobs::DELIVER_QUEUE;
    assert_eq!(stack.jobs(deliver, "Pending").await, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = stack.follow_ups(&confirmed.booking_id).await;
    assert_eq!(again[0].attempts, 3, "no retry after the last attempt");
    // The first attempt ran in the follow-up job, the other two in deliver jobs.
    assert_eq!(stack.jobs(deliver, "Done").await, 2);
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

/// Kills every job of `queue` for good, as apalis does after a handler
/// failed on unexpected errors too many times in a row.
async fn kill_jobs(stack: &Stack, queue: &str) {
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Failed', attempts = max_attempts WHERE job_type = $1",
    )
    .bind(queue)
    .execute(&stack.db)
    .await
    .expect("kill jobs");
}

#[tokio::test]
async fn a_plan_job_that_died_is_swept_up_and_the_follow_up_still_arrives() {
    let mut stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let conversation = stack.conversation("oli", &[(0.1, "calm")]).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 5)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "oli", &conversation, 1))
        .await
        .expect("booked");
    kill_jobs(&stack, PLAN_QUEUE).await;

    stack
        .add_booking_service(|s| {
            s.followup_sweep_grace = Duration::ZERO;
            s.job_prune_interval = Duration::from_millis(200);
        })
        .await;

    let sent = stack
        .wait_follow_up(
            &booked.booking_id,
            "the swept-up follow-up to be SENT",
            |f| f.state == FollowUpState::Sent as i32,
        )
        .await;
    assert_eq!(stack.assistant_messages(&conversation).await.len(), 1);
    assert_eq!(sent.attempts, 1);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_deliver_job_that_died_is_swept_up_and_delivered_once() {
    let stack = spawn_stack_with(|s| {
        s.followup_sweep_grace = Duration::ZERO;
        s.job_prune_interval = Duration::from_millis(200);
    })
    .await;
    let conversation = stack.conversation("pam", &[(0.9, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_secs(2), 5)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "pam", &conversation, 1))
        .await
        .expect("booked");
    // Planned ahead, with a deliver job for the event's end (the path of a
    // job run early): that deliver job dies.
    stack.plan_early(&booked.booking_id).await;
    stack
        .wait_follow_up(&booked.booking_id, "planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;
    kill_jobs(&stack, booking_service::jobs::DELIVER_QUEUE).await;

    let sent = stack
        .wait_follow_up(
            &booked.booking_id,
            "the swept-up follow-up to be SENT",
            |f| f.state == FollowUpState::Sent as i32,
        )
        .await;
    assert_eq!(sent.template_key, "review_request");
    // Give the sweep a few more rounds: nothing is sent twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(stack.assistant_messages(&conversation).await.len(), 1);
    stack.shutdown().await;
}

#[tokio::test]
async fn jobs_a_stopped_worker_fetched_but_never_started_go_back_to_the_queue() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    // What a fetch cut by the stop leaves: rows Queued under the stopped
    // worker's name; beside them a started one, another worker's and
    // another queue's, which stay as they are.
    // Built from the test's constants only.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO apalis.workers (id, worker_type, storage_name) VALUES \
         ('stopped', '{PLAN_QUEUE}', 'PostgresStorage'), ('alive', '{PLAN_QUEUE}', 'PostgresStorage'); \
         INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, lock_at, lock_by) VALUES \
         ('fetched-1', '{PLAN_QUEUE}', '\\x7b7d'::bytea, 'Queued', 0, 3, now(), now(), 'stopped'), \
         ('fetched-2', '{PLAN_QUEUE}', '\\x7b7d'::bytea, 'Queued', 0, 3, now(), now(), 'stopped'), \
         ('started', '{PLAN_QUEUE}', '\\x7b7d'::bytea, 'Running', 1, 3, now(), now(), 'stopped'), \
         ('other-worker', '{PLAN_QUEUE}', '\\x7b7d'::bytea, 'Queued', 0, 3, now(), now(), 'alive'), \
         ('other-queue', 'maitre.followup.deliver', '\\x7b7d'::bytea, 'Queued', 0, 3, now(), now(), 'stopped')"
    )))
    .execute(&stack.db)
    .await
    .expect("jobs");
    let released =
        booking_service::store::jobs::release_unstarted(&stack.db, PLAN_QUEUE, "stopped")
            .await
            .expect("released");
    assert_eq!(released, 2);
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, lock_by FROM apalis.jobs ORDER BY id")
            .fetch_all(&stack.db)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        [
            ("fetched-1".into(), "Pending".into(), None),
            ("fetched-2".into(), "Pending".into(), None),
            (
                "other-queue".into(),
                "Queued".into(),
                Some("stopped".into())
            ),
            ("other-worker".into(), "Queued".into(), Some("alive".into())),
            ("started".into(), "Running".into(), Some("stopped".into())),
        ]
    );
}

/// The follow-up job planned (its row born claimed for delivery) and its
/// process died before the call: the job runs again (apalis re-enqueues the
/// jobs of a dead worker), finds the booking planned, waits the dead run's
/// claim out, and delivers once.
#[tokio::test]
async fn a_follow_up_job_that_died_after_planning_delivers_once_when_it_runs_again() {
    let mut stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let conversation = stack.conversation("quinn", &[(0.8, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_millis(500), 5)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "quinn", &conversation, 1))
        .await
        .expect("booked");
    let booking_id: uuid::Uuid = booked.booking_id.parse().expect("uuid");
    let end = slot.end_time.expect("end");
    let due = chrono::DateTime::from_timestamp(end.seconds, end.nanos as u32).expect("due");

    // What the dead run committed: the follow-up, claimed for 2 s, and the
    // booking marked planned; its job is still waiting (as apalis leaves it).
    let follow_up = booking_service::store::followups::NewFollowUp {
        id: uuid::Uuid::now_v7(),
        booking_id,
        customer_id: "quinn".into(),
        conversation_id: Some(conversation.parse().expect("uuid")),
        trigger: booking_service::domain::POST_EVENT_TRIGGER,
        template_key: "review_request".into(),
        rendered_text: "Hi quinn, it was a pleasure.".into(),
        scheduled_at: due,
        plan_attempts: 1,
    };
    let now = chrono::Utc::now();
    let mut conn = stack.db.acquire().await.expect("connection");
    let claim = Some((uuid::Uuid::now_v7(), Duration::from_secs(2)));
    let inserted =
        booking_service::store::followups::insert_planned(&mut conn, &follow_up, now, claim)
            .await
            .expect("planned");
    assert_eq!(inserted, Some(FollowUpState::Pending as i16));
    drop(conn);
    assert!(
        stack.plan_progress(&booked.booking_id).await.0,
        "the same statement marked the booking planned"
    );

    stack.add_booking_service(|_| {}).await;
    let sent = stack
        .wait_follow_up(&booked.booking_id, "SENT by the re-run", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    assert_eq!(sent.follow_up_id, follow_up.id.to_string());
    assert_eq!(sent.attempts, 1);
    let sent_at = sent.sent_time.expect("sent");
    let sent_at =
        chrono::DateTime::from_timestamp(sent_at.seconds, sent_at.nanos as u32).expect("sent time");
    // The claim's lease counts from the database's now(), a little after
    // `now`: delivered no earlier than when that lease ran out.
    assert!(
        sent_at >= now + chrono::Duration::seconds(2),
        "delivered at {sent_at} while the dead run's claim (from {now}, 2 s) held"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = stack.assistant_messages(&conversation).await;
    assert_eq!(delivered.len(), 1, "delivered once: {delivered:?}");
    assert_eq!(delivered[0].request_id, follow_up.id.to_string());
    assert_eq!(stack.jobs(PLAN_QUEUE, "Done").await, 1);
    assert_eq!(
        stack.jobs_total(booking_service::jobs::DELIVER_QUEUE).await,
        0
    );
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

/// The sweep re-enqueues a dead follow-up job only once it is due: a
/// booking ahead whose job died is planned at its event's end, from the
/// history as it is then, not at once.
#[tokio::test]
async fn a_dead_job_of_a_booking_ahead_waits_for_its_due_time() {
    let mut stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 5)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "rhea", "", 1))
        .await
        .expect("booked");
    kill_jobs(&stack, PLAN_QUEUE).await;
    stack
        .add_booking_service(|s| {
            s.followup_sweep_grace = Duration::ZERO;
            s.job_prune_interval = Duration::from_millis(200);
        })
        .await;
    // Several sweeps go by (the first runs at start).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let plan_attempt: i32 =
        sqlx::query_scalar("SELECT plan_attempt FROM booking.bookings WHERE id = $1::uuid")
            .bind(&booked.booking_id)
            .fetch_one(&stack.db)
            .await
            .expect("plan attempt");
    assert_eq!(plan_attempt, 1, "not re-enqueued before its due time");
    assert!(stack.follow_ups(&booked.booking_id).await.is_empty());
    assert_eq!(stack.jobs(PLAN_QUEUE, "Pending").await, 0);
    stack.shutdown().await;
}
