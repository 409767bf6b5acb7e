//! Drill: many replicas on one database. Two memory-service and two
//! booking-service processes; each booking-service is given both memory
//! URLs and balances its calls over them. Under a steady stream of
//! bookings (through both booking replicas) and their follow-ups, one
//! memory replica is `kill -9`ed and later restarted, then one booking
//! replica. Proven: while both memory replicas are up each serves a fair
//! share of booking-service's calls (35-65 %, counted from each replica's
//! own `/metrics`); once one is down no call goes to it (the other serves
//! them all); the restarted one is picked up again without restarting
//! booking-service; clients only see failures they retry with the same
//! request id; every follow-up is delivered exactly once, none lost.
//!
//! The phases end on counts of calls, not on the clock, so a slow machine
//! makes the drill longer, not flaky.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgPool;

use crate::{
    attack_kit::scrape,
    checks,
    client::{Journal, Load, SlotPlan, retryable_code, run_load_until},
    harness::{Options, Stack},
};

/// booking-service calls GetEmotionHistory only when it plans a follow-up,
/// and the drill's clients never do: its count on a replica is exactly the
/// internal hop's calls that replica served.
const PLAN_CALL: &str = "maitre.memory.v1.MemoryService/GetEmotionHistory";
/// Planning calls a fair-share phase lasts (at 35-65 % the bound is more
/// than 4 standard deviations from an even split).
const PHASE_CALLS: f64 = 200.0;
/// Longest a phase may take on a slow machine.
const PHASE_WITHIN: Duration = Duration::from_secs(90);

/// Planning calls each memory replica (all up) has answered so far.
async fn plan_calls(admin: &[SocketAddr]) -> Vec<f64> {
    let mut counts = Vec::new();
    for &addr in admin {
        counts.push(scrape(addr).await.rpcs(PLAN_CALL, "OK"));
    }
    counts
}

/// Waits until the replicas at `admin` have answered `calls` planning calls
/// more than `before` in all; answers the counts then.
async fn after_calls(admin: &[SocketAddr], before: &[f64], calls: f64, phase: &str) -> Vec<f64> {
    let deadline = Instant::now() + PHASE_WITHIN;
    loop {
        let now = plan_calls(admin).await;
        let made: f64 = now.iter().zip(before).map(|(n, b)| n - b).sum();
        if made >= calls {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{phase}: only {made} planning calls in {PHASE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each replica's share of the calls made between two counts.
fn shares(before: &[f64], after: &[f64]) -> Vec<f64> {
    let served: Vec<f64> = before.iter().zip(after).map(|(b, a)| a - b).collect();
    let total: f64 = served.iter().sum();
    served.iter().map(|s| s / total).collect()
}

fn assert_fair(phase: &str, shares: &[f64]) {
    for (i, share) in shares.iter().enumerate() {
        assert!(
            (0.35..=0.65).contains(share),
            "{phase}: memory replica {} served {:.0} % of the calls, not a fair share: {shares:?}",
            i + 1,
            share * 100.0
        );
    }
}

/// Follow-ups whose planning or delivery has needed more than one attempt.
async fn follow_ups_retried(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM booking.scheduled_followups WHERE attempts > 1 OR plan_attempts > 1",
    )
    .fetch_one(db)
    .await
    .expect("follow-ups tried more than once")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_and_survive_kills() {
    let drill_started = Instant::now();
    let mut stack = Stack::start(
        "replicas",
        Options {
            booking_processes: 2,
            memory_processes: 2,
            // Fair shares are counted over 200 planning calls. With the
            // default 128 jobs in flight per replica, a burst of calls can
            // land on the live replica before the balancer's next probe
            // round picks a restarted one up, and the window counts it; 16
            // keeps the drill measuring the steady split.
            booking_env: vec![("BOOKING_WORKER_CONCURRENCY", "16".into())],
            ..Options::default()
        },
    )
    .await;
    let admin = stack.memory_admin.clone();
    let journal = Journal::default();
    // Both clients send their own messages to the first memory replica (the
    // one never killed), so the second one only ever serves booking-service.
    let clients = vec![
        stack.client(0).with_journal(&journal),
        stack.client(1).with_journal(&journal),
    ];
    let slots = clients[0]
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(2),
            every: Duration::from_secs(2),
            count: 200,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = run_load_until(
        "replicas",
        clients,
        slots,
        Load {
            tasks: 4,
            pause: Duration::from_millis(20),
            run_for: Duration::from_secs(360),
            margin: Duration::from_millis(500),
            limit: None,
        },
        stop.clone(),
    );

    // Both memory replicas up.
    let before = plan_calls(&admin).await;
    let after = after_calls(&admin, &before, PHASE_CALLS, "both up").await;
    let both_up = shares(&before, &after);

    // The second memory replica killed. Calls in flight at that moment fail
    // and are retried; once the next round has dropped it (a failed call
    // triggers one), nothing more may fail because of it.
    let killed_at = Instant::now();
    stack.more_memory[0]
        .kill()
        .expect("SIGKILL memory-service-2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retried_before = follow_ups_retried(&stack.db).await;
    let before_alone = plan_calls(&admin[..1]).await;
    let alone = after_calls(&admin[..1], &before_alone, PHASE_CALLS / 2.0, "one down").await;
    let retried_while_down = follow_ups_retried(&stack.db).await - retried_before;
    stack.more_memory[0]
        .restart()
        .await
        .expect("memory-service-2 restarted");
    let memory_down_for = killed_at.elapsed();

    // Restarted on the same address: booking-service picks it up again by
    // itself (the drills re-resolve every 500 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = plan_calls(&admin).await;
    let after = after_calls(&admin, &before, PHASE_CALLS, "after the restart").await;
    let rejoined = shares(&before, &after);

    // A booking replica killed and restarted: its clients retry.
    stack.booking[1].kill().expect("SIGKILL booking-service-2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.booking[1]
        .restart()
        .await
        .expect("booking-service-2 restarted");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let ledger = load.await.expect("load");
    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;
    assert!(ledger.gave_up.is_empty(), "gave up: {:?}", ledger.gave_up);
    checks::assert_only_late_refusals(&ledger);

    assert_fair("both memory replicas up", &both_up);
    assert!(
        retried_while_down <= 2,
        "{retried_while_down} follow-ups needed another attempt while a memory replica was \
         known dead: calls kept going to it"
    );
    assert_fair("after the killed memory replica restarted", &rejoined);

    // What clients saw: only failures they retried (same request id), none
    // they had to give up on. A booking whose retries ran into its slot's
    // start is refused SLOT_STARTED: an answer, not a failure.
    let failures = journal.failures();
    let not_retried: Vec<_> = failures
        .iter()
        .filter(|f| {
            f.outcome
                .as_ref()
                .is_err_and(|e| !retryable_code(e.code, &e.reason) && e.reason != "SLOT_STARTED")
        })
        .collect();
    assert!(
        not_retried.is_empty(),
        "clients saw failures they cannot retry: {not_retried:#?}"
    );
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for failure in &failures {
        if let Err(e) = &failure.outcome {
            *by_code.entry(format!("{:?}", e.code)).or_default() += 1;
        }
    }

    let percent = |shares: &[f64]| {
        shares
            .iter()
            .map(|s| format!("{:.0}%", s * 100.0))
            .collect::<Vec<_>>()
            .join("/")
    };
    checks::report(
        "replicas_share_the_load_and_survive_kills",
        &totals,
        &format!(
            "memory-replicas=2 booking-replicas=2 plan-call-share-both-up={} \
             plan-calls-one-down={} memory-down-for={:.1}s retried-while-one-known-down={retried_while_down} \
             plan-call-share-after-restart={} client-retried-failures={by_code:?} replayed={} jobs=[{}] \
             waited-for-delivery={:.1}s runtime={:.1}s",
            percent(&both_up),
            alone[0] - before_alone[0],
            memory_down_for.as_secs_f64(),
            percent(&rejoined),
            ledger.replayed(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
