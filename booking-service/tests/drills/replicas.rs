//! Drill: many replicas on one database. Two memory-service and two
//! booking-service processes; each booking-service is given both memory
//! URLs and balances its calls over them. Under a steady stream of
//! bookings (through both booking replicas) and their follow-ups, one
//! memory replica is `kill -9`ed and later restarted, then one booking
//! replica. Proven: while both memory replicas are up each serves a fair
//! share of booking-service's calls (35-65 %, counted from each replica's
//! own `/metrics`); while one is down the other serves them all; the
//! restarted one is picked up again without restarting booking-service;
//! clients only see failures they retry with the same request id; every
//! follow-up is delivered exactly once, none lost.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    attack_kit::scrape,
    checks,
    client::{Journal, Load, SlotPlan, retryable_code, run_load},
    harness::{Options, Stack},
};

/// booking-service calls GetEmotionHistory only when it plans a follow-up,
/// and the drill's clients never do: its count on a replica is exactly the
/// internal hop's calls that replica served.
const PLAN_CALL: &str = "maitre.memory.v1.MemoryService/GetEmotionHistory";

/// Planning calls each memory replica (all up) has answered so far.
async fn plan_calls(admin: &[SocketAddr]) -> Vec<f64> {
    let mut counts = Vec::new();
    for &addr in admin {
        counts.push(scrape(addr).await.rpcs(PLAN_CALL, "OK"));
    }
    counts
}

/// Each replica's share of the calls made between two counts.
fn shares(before: &[f64], after: &[f64]) -> (Vec<f64>, f64) {
    let served: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b).max(0.0))
        .collect();
    let total: f64 = served.iter().sum();
    let shares = served
        .iter()
        .map(|s| if total > 0.0 { s / total } else { 0.0 })
        .collect();
    (shares, total)
}

fn assert_fair(phase: &str, shares: &[f64], total: f64) {
    assert!(total >= 50.0, "{phase}: only {total} planning calls");
    for (i, share) in shares.iter().enumerate() {
        assert!(
            (0.35..=0.65).contains(share),
            "{phase}: memory replica {} served {:.0} % of {total} calls, not a fair share: {shares:?}",
            i + 1,
            share * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_and_survive_kills() {
    let drill_started = Instant::now();
    let mut stack = Stack::start(
        "replicas",
        Options {
            booking_processes: 2,
            memory_processes: 2,
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
            count: 12,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    let started = Instant::now();
    let at = |secs: f64| started + Duration::from_secs_f64(secs);
    let load = run_load(
        "replicas",
        clients,
        slots,
        Load {
            tasks: 4,
            pause: Duration::from_millis(20),
            run_for: Duration::from_secs(20),
            margin: Duration::from_millis(500),
            limit: None,
        },
    );

    // Both memory replicas up.
    tokio::time::sleep_until(at(1.0).into()).await;
    let before = plan_calls(&admin).await;
    tokio::time::sleep_until(at(5.5).into()).await;
    let after = plan_calls(&admin).await;
    let (both_up, both_up_calls) = shares(&before, &after);

    // The second memory replica killed (between two slots' ends, away from
    // a burst of deliveries): the first serves everything.
    tokio::time::sleep_until(at(5.9).into()).await;
    let killed_at = Instant::now();
    stack.more_memory[0]
        .kill()
        .expect("SIGKILL memory-service-2");
    tokio::time::sleep_until(at(6.5).into()).await;
    let before_alone = plan_calls(&admin[..1]).await;
    tokio::time::sleep_until(at(9.0).into()).await;
    let alone = plan_calls(&admin[..1]).await[0] - before_alone[0];
    stack.more_memory[0]
        .restart()
        .await
        .expect("memory-service-2 restarted");
    let memory_down_for = killed_at.elapsed();

    // Restarted on the same address: booking-service picks it up again by itself.
    let rejoined_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = plan_calls(&admin).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = plan_calls(&admin).await;
    let (rejoined, rejoined_calls) = shares(&before, &after);
    let measured_rejoined_for = rejoined_at.elapsed();

    // Follow-ups whose planning or delivery had to be tried again because of
    // the memory replica's death: only calls in flight at the kill may fail;
    // the rest are steered away from the dead replica (without the probe,
    // ~25 here).
    let (jobs_rerun,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM booking.scheduled_followups WHERE attempts > 1 OR plan_attempts > 1",
    )
    .fetch_one(&stack.db)
    .await
    .expect("follow-ups planned or delivered more than once");

    // A booking replica killed and restarted: its clients retry.
    stack.booking[1].kill().expect("SIGKILL booking-service-2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.booking[1]
        .restart()
        .await
        .expect("booking-service-2 restarted");

    let ledger = load.await.expect("load");
    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;
    assert!(ledger.gave_up.is_empty(), "gave up: {:?}", ledger.gave_up);
    checks::assert_only_late_refusals(&ledger);

    assert_fair("both memory replicas up", &both_up, both_up_calls);
    assert!(
        alone >= 20.0,
        "the surviving memory replica served only {alone} planning calls while the other was down"
    );
    assert!(
        jobs_rerun <= 8,
        "{jobs_rerun} follow-ups needed another attempt while a memory replica was down: calls kept going to the dead replica"
    );
    assert_fair(
        "after the killed memory replica restarted",
        &rejoined,
        rejoined_calls,
    );

    // What clients saw: only failures they retried (same request id), none
    // they had to give up on.
    let failures = journal.failures();
    let not_retried: Vec<_> = failures
        .iter()
        .filter(|f| {
            f.outcome
                .as_ref()
                .is_err_and(|e| !retryable_code(e.code, &e.reason))
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
            "memory-replicas=2 booking-replicas=2 plan-calls-both-up={both_up_calls} share={} \
             plan-calls-one-down={alone} memory-down-for={:.1}s follow-ups-retried-by-memory-kill={jobs_rerun} plan-calls-after-restart={rejoined_calls} share={} (over {:.1}s) \
             client-retried-failures={by_code:?} replayed={} jobs=[{}] waited-for-delivery={:.1}s runtime={:.1}s",
            percent(&both_up),
            memory_down_for.as_secs_f64(),
            percent(&rejoined),
            measured_rejoined_for.as_secs_f64(),
            ledger.replayed(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
