//! The follow-up job's coalesced statements (`jobs::batches`): runs that
//! reach a statement together share it, and each still gets the outcome
//! the one-row statement would have given it, its own error included.

use std::time::Duration;

use booking_service::{
    jobs::batches::HotStatements,
    metrics::BookingMetrics,
    store::followups::{self, CANCELLED, NewFollowUp, PENDING, SENT, SENT_AFTER_CANCEL},
};
use maitre_api::booking::v1::{self as booking, FollowUpState};
use maitre_runtime::testkit::sample;
use prometheus_client::{encoding::text::encode, registry::Registry};
use uuid::Uuid;

use crate::stack::{Stack, planned_follow_up, spawn_stack_with};

const LEASE: Duration = Duration::from_secs(30);

/// Coalesced statements on the test's pool, and the registry their batch
/// sizes are reported to.
fn statements(stack: &Stack) -> (HotStatements, Registry) {
    let mut registry = Registry::default();
    let metrics = BookingMetrics::register(&mut registry);
    let statements = HotStatements::new(stack.db.clone(), LEASE, 64, metrics);
    (statements, registry)
}

fn batch_sizes(registry: &Registry, statement: &str) -> (f64, f64) {
    let mut text = String::new();
    encode(&mut text, registry).expect("encode");
    let labels = [("statement", statement)];
    (
        sample(&text, "followup_batch_size_count", &labels).unwrap_or(0.0),
        sample(&text, "followup_batch_size_sum", &labels).unwrap_or(0.0),
    )
}

/// `n` bookings of one slot an hour away, one customer each.
async fn bookings(stack: &Stack, n: usize) -> Vec<booking::Booking> {
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 100)
        .await;
    book_each(stack, &slot, n).await
}

/// `n` bookings of `slot`, one customer each.
async fn book_each(stack: &Stack, slot: &booking::Slot, n: usize) -> Vec<booking::Booking> {
    let mut booked = Vec::new();
    for i in 0..n {
        let request = Stack::booking_request(slot, &format!("guest-{i}"), "", 1);
        booked.push(stack.book(request).await.expect("booked"));
    }
    booked
}

async fn follow_up_row(stack: &Stack, id: Uuid) -> Option<(i16, Option<Uuid>, Option<String>)> {
    sqlx::query_as(
        "SELECT state, claim_token, last_error FROM booking.scheduled_followups WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&stack.db)
    .await
    .expect("follow-up row")
}

/// Two runs wait for bookings held by another transaction (their batches
/// give up on the lock, and they wait alone); three more are queued
/// together and share one statement, one of them carrying a text
/// PostgreSQL refuses. The statement fails as a whole, and each run then
/// runs alone: the two good ones are planned, born claimed by their own
/// runs, and only the bad one gets the error. Once the held bookings are
/// released, their runs are planned too.
#[tokio::test]
async fn a_row_the_database_refuses_fails_only_its_own_run() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let booked = bookings(&stack, 5).await;
    let (statements, registry) = statements(&stack);
    let rows: Vec<NewFollowUp> = booked
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut row = planned_follow_up(b, &format!("Guest {i}"));
            row.scheduled_at = chrono::Utc::now();
            if i == 3 {
                row.rendered_text = "Hi \0, thank you.".into();
            }
            row
        })
        .collect();
    let tokens: Vec<Uuid> = rows.iter().map(|_| Uuid::now_v7()).collect();

    // The gate: the first two bookings locked, as a cancel in flight would.
    let mut gate = stack.db.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM booking.bookings WHERE id = ANY($1) FOR UPDATE")
        .bind([rows[0].booking_id, rows[1].booking_id])
        .execute(&mut *gate)
        .await
        .expect("lock the gate bookings");
    let first = tokio::spawn({
        let (statements, row, token) = (statements.clone(), rows[0].clone(), tokens[0]);
        async move { statements.insert_claimed(&row, token).await }
    });
    stack.blocked_on_locks(1).await;
    let second = tokio::spawn({
        let (statements, row, token) = (statements.clone(), rows[1].clone(), tokens[1]);
        async move { statements.insert_claimed(&row, token).await }
    });
    stack.blocked_on_locks(2).await;

    // Polled once, the next three runs are queued together (the test's
    // runtime runs one task at a time: no flusher takes one before all
    // three are queued).
    let mut queued = Box::pin(futures::future::join_all(
        (2..5).map(|i| statements.insert_claimed(&rows[i], tokens[i])),
    ));
    tokio::select! {
        biased;
        _ = &mut queued => panic!("the queued runs finished before a flusher ran"),
        () = std::future::ready(()) => {}
    }
    gate.commit().await.expect("open the gate");

    let results = queued.await;
    assert_eq!(
        first.await.expect("join").expect("first run"),
        Some(PENDING)
    );
    assert_eq!(
        second.await.expect("join").expect("second run"),
        Some(PENDING)
    );
    assert_eq!(results[0].as_ref().expect("good run"), &Some(PENDING));
    assert!(
        results[1].is_err(),
        "the refused row's run gets the error: {:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().expect("good run"), &Some(PENDING));
    for i in [0, 1, 2, 4] {
        let (state, token, _) = follow_up_row(&stack, rows[i].id).await.expect("planned");
        assert_eq!(state, PENDING);
        assert_eq!(token, Some(tokens[i]), "born claimed by its own run");
        assert!(
            stack.plan_progress(&booked[i].booking_id).await.0,
            "run {i} planned"
        );
    }
    assert!(follow_up_row(&stack, rows[3].id).await.is_none());
    assert!(
        !stack.plan_progress(&booked[3].booking_id).await.0,
        "the refused run's booking is still to plan (the sweep will)"
    );
    // Three statements ran for five runs: the held two (each alone in its
    // batch, then alone) and the shared one.
    assert_eq!(batch_sizes(&registry, "insert_planned"), (3.0, 5.0));
    stack.shutdown().await;
}

/// A booking someone holds (a cancel, an erasure, a hand-held lock) holds
/// up only its own run: the batch gives up on the lock after a short wait,
/// the other runs are planned while the lock is still held, and the held
/// one waits alone and is planned once it is released.
#[tokio::test]
async fn a_held_booking_holds_up_only_its_own_run() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let booked = bookings(&stack, 3).await;
    let (statements, _registry) = statements(&stack);
    let rows: Vec<NewFollowUp> = booked
        .iter()
        .map(|b| planned_follow_up(b, "Guest"))
        .collect();
    let mut hold = stack.db.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM booking.bookings WHERE id = $1 FOR UPDATE")
        .bind(rows[0].booking_id)
        .execute(&mut *hold)
        .await
        .expect("hold the first booking");

    let mut runs = rows.iter().map(|row| {
        let (statements, row) = (statements.clone(), row.clone());
        tokio::spawn(async move { statements.insert_claimed(&row, Uuid::now_v7()).await })
    });
    let held = runs.next().expect("held run");
    let free: Vec<_> = runs.collect();
    for run in free {
        let planned = tokio::time::timeout(crate::stack::WITHIN, run)
            .await
            .expect("a free booking's run finished while the other was held")
            .expect("join")
            .expect("planned");
        assert_eq!(planned, Some(PENDING));
    }
    assert!(!held.is_finished(), "the held booking's run waits for it");
    stack.blocked_on_locks(1).await;
    hold.commit().await.expect("release");
    assert_eq!(held.await.expect("join").expect("planned"), Some(PENDING));
    for (i, row) in rows.iter().enumerate() {
        assert!(follow_up_row(&stack, row.id).await.is_some(), "booking {i}");
    }
    stack.shutdown().await;
}

/// One coalesced insert answers each booking as the one-row statement
/// would: planned (born claimed), already planned (nothing, planning over),
/// cancelled (nothing, planning over), and a cancel in flight waited for
/// (nothing: the cancel won).
#[tokio::test]
async fn a_coalesced_insert_answers_each_booking_as_alone() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let booked = bookings(&stack, 4).await;
    let rows: Vec<NewFollowUp> = booked
        .iter()
        .map(|b| planned_follow_up(b, "Guest"))
        .collect();
    // Booking 1 already has its follow-up.
    let mut conn = stack.db.acquire().await.expect("connection");
    let earlier = planned_follow_up(&booked[1], "Guest");
    followups::insert_planned(&mut conn, &earlier, chrono::Utc::now(), None)
        .await
        .expect("planned earlier");
    drop(conn);
    // Booking 2 is cancelled.
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: booked[2].booking_id.clone(),
            reason: "changed plans".into(),
        })
        .await
        .expect("cancelled");
    // Booking 3 is being cancelled (not yet committed).
    let mut cancel = stack.db.begin().await.expect("begin");
    sqlx::query("UPDATE booking.bookings SET state = 2, cancelled_at = now() WHERE id = $1")
        .bind(rows[3].booking_id)
        .execute(&mut *cancel)
        .await
        .expect("cancel in flight");

    let mut batch: Vec<(NewFollowUp, Uuid)> =
        rows.iter().map(|r| (r.clone(), Uuid::now_v7())).collect();
    batch.sort_by_key(|(r, _)| r.booking_id);
    let inserting = tokio::spawn({
        let (pool, batch) = (stack.db.clone(), batch.clone());
        async move {
            let mut conn = pool.acquire().await.expect("connection");
            followups::insert_claimed_many(&mut conn, &batch, chrono::Utc::now(), LEASE, &[]).await
        }
    });
    stack.blocked_on_locks(1).await;
    cancel.commit().await.expect("commit the cancel");
    let inserted = inserting.await.expect("join").expect("statement");

    assert_eq!(
        inserted,
        vec![(rows[0].id, PENDING)],
        "only the confirmed, unplanned booking"
    );
    let token = batch
        .iter()
        .find(|(r, _)| r.id == rows[0].id)
        .map(|(_, token)| *token);
    let (_, claimed_by, _) = follow_up_row(&stack, rows[0].id).await.expect("row");
    assert_eq!(claimed_by, token);
    for (i, b) in booked.iter().enumerate() {
        assert!(
            stack.plan_progress(&b.booking_id).await.0,
            "booking {i} planned"
        );
    }
    for (i, expected) in [(1, 1), (2, 0), (3, 0)] {
        assert_eq!(
            stack.follow_ups(&booked[i].booking_id).await.len(),
            expected,
            "booking {i}"
        );
    }
    stack.shutdown().await;
}

/// One coalesced finish answers each follow-up as the one-row statement
/// would: SENT; nothing for a claim lost to another run; CANCELLED with
/// the stored message recorded for a cancel that landed during the call.
#[tokio::test]
async fn a_coalesced_finish_answers_each_follow_up_as_alone() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let booked = bookings(&stack, 3).await;
    let mut batch: Vec<(NewFollowUp, Uuid)> = booked
        .iter()
        .map(|b| {
            let mut row = planned_follow_up(b, "Guest");
            row.scheduled_at = chrono::Utc::now();
            (row, Uuid::now_v7())
        })
        .collect();
    batch.sort_by_key(|(r, _)| r.booking_id);
    let mut conn = stack.db.acquire().await.expect("connection");
    let planned = followups::insert_claimed_many(&mut conn, &batch, chrono::Utc::now(), LEASE, &[])
        .await
        .expect("planned");
    assert_eq!(planned.len(), 3);
    let cancelled_booking = batch[2].0.booking_id.to_string();
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: cancelled_booking,
            reason: "changed plans".into(),
        })
        .await
        .expect("cancelled while the message was on its way");

    let messages: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
    let mut finish = vec![
        (batch[0].0.id, batch[0].1, messages[0]),
        (batch[1].0.id, Uuid::now_v7(), messages[1]),
        (batch[2].0.id, batch[2].1, messages[2]),
    ];
    finish.sort_by_key(|(id, _, _)| *id);
    let mut finished = followups::finish_sent_many(&mut conn, &finish, chrono::Utc::now(), &[])
        .await
        .expect("statement");
    finished.sort();
    let mut expected = vec![(batch[0].0.id, SENT), (batch[2].0.id, CANCELLED)];
    expected.sort();
    assert_eq!(
        finished, expected,
        "the run whose claim was lost gets nothing"
    );

    let (state, token, _) = follow_up_row(&stack, batch[1].0.id).await.expect("row");
    assert_eq!((state, token), (PENDING, Some(batch[1].1)), "untouched");
    let (state, _, error) = follow_up_row(&stack, batch[2].0.id).await.expect("row");
    assert_eq!(state, CANCELLED);
    assert!(
        error
            .as_deref()
            .unwrap_or_default()
            .starts_with(SENT_AFTER_CANCEL),
        "{error:?}"
    );
    let recorded: Option<Uuid> =
        sqlx::query_scalar("SELECT message_id FROM booking.scheduled_followups WHERE id = $1")
            .bind(batch[2].0.id)
            .fetch_one(&stack.db)
            .await
            .expect("row");
    assert_eq!(
        recorded,
        Some(messages[2]),
        "the stored message is accounted for"
    );
    stack.shutdown().await;
}

/// The real pipeline, coalesced (the default) and one by one
/// (`BOOKING_WORKER_BATCH_MAX=0`): a burst of follow-ups due together is
/// delivered, each exactly once.
async fn burst_delivered_once(batch_max: u16) {
    const BURST: usize = 40;
    let stack = spawn_stack_with(|s| s.worker_batch_max = batch_max).await;
    let slot = stack
        .slot(Duration::from_secs(3), Duration::from_secs(1), 100)
        .await;
    let booked = book_each(&stack, &slot, BURST).await;
    for b in &booked {
        let sent = stack
            .wait_follow_up(&b.booking_id, "the follow-up to be sent", |f| {
                f.state == FollowUpState::Sent as i32
            })
            .await;
        assert_eq!(sent.attempts, 1, "{sent:?}");
    }
    let (stored, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT request_id) FROM memory.messages WHERE metadata ? 'follow_up_id'",
    )
    .fetch_one(&stack.db)
    .await
    .expect("stored follow-ups");
    assert_eq!(
        (stored, distinct),
        (BURST as i64, BURST as i64),
        "each stored once"
    );

    let admin = stack.booking_admin.expect("admin port");
    let (_, body) = maitre_runtime::testkit::http_get(admin, "/metrics").await;
    let served = |statement| {
        sample(
            &body,
            "maitre_followup_batch_size_sum",
            &[("statement", statement)],
        )
    };
    if batch_max == 0 {
        assert_eq!(served("to_plan"), None, "nothing coalesced");
    } else {
        for statement in ["to_plan", "insert_planned", "finish_sent"] {
            assert_eq!(
                served(statement),
                Some(BURST as f64),
                "{statement}: every run"
            );
        }
    }
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_coalesced_follow_ups_is_delivered_once_each() {
    burst_delivered_once(64).await;
}

#[tokio::test]
async fn a_burst_without_coalescing_is_delivered_once_each() {
    burst_delivered_once(0).await;
}
