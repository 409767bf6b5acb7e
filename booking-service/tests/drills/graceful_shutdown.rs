//! Drill 5: SIGTERM to booking-service under a steady stream of bookings
//! while follow-ups are being planned and delivered. It exits 0 within its
//! grace period; calls either succeed or fail fast with UNAVAILABLE (or a
//! transport error) once the signal is in, none hangs; no job is left
//! locked by the stopped process; and after a restart every follow-up is
//! delivered exactly once.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::{
    checks,
    client::{Failure, Load, SlotPlan, run_load},
    harness::{Options, Stack},
};

/// SHUTDOWN_TIMEOUT as the harness sets it.
const GRACE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown() {
    let drill_started = Instant::now();
    let mut stack = Stack::start("graceful_shutdown", Options::default()).await;
    let client = stack.client(0);
    let slots = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(2),
            every: Duration::from_secs(1),
            count: 14,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    let load_started = Instant::now();
    let load = run_load(
        "term",
        vec![client.clone()],
        slots,
        Load {
            tasks: 6,
            pause: Duration::from_millis(5),
            run_for: Duration::from_secs(9),
            margin: Duration::from_millis(1500),
            limit: None,
        },
    );

    tokio::time::sleep_until((load_started + Duration::from_secs(4)).into()).await;
    let booking = &mut stack.booking[0];
    let stopped = booking
        .term(GRACE + Duration::from_secs(5))
        .await
        .expect("booking-service stopped after SIGTERM");
    assert_eq!(
        stopped.status.code(),
        Some(0),
        "booking-service's exit after SIGTERM: {}\n{}",
        stopped.status,
        booking.tail()
    );
    assert!(stopped.took < GRACE, "drained in {:?}", stopped.took);
    // Running jobs finished, fetched ones went back: nothing is left locked
    // by the stopped process's workers (else only the heartbeat timeout
    // would free it).
    let locked: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT job_type, status, lock_by FROM apalis.jobs WHERE status IN ('Queued', 'Running')",
    )
    .fetch_all(&stack.db)
    .await
    .expect("locked jobs");
    let restart_started = Instant::now();
    booking.restart().await.expect("booking-service restarted");
    let restarted_at = Instant::now();
    let ledger = load.await.expect("load");

    let attempts = client.journal.attempts();
    let signal = stopped.signalled_at;
    let hung: Vec<_> = attempts
        .iter()
        .filter(|a| a.outcome.as_ref().is_err_and(|f| f.hung))
        .collect();
    assert!(hung.is_empty(), "calls hung: {hung:#?}");
    // A transport-level failure: the connection refused or cut, no answer
    // from the service itself.
    let transport = |f: &Failure| {
        f.reason.is_empty()
            && matches!(
                f.code,
                Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
            )
    };
    let unexpected: Vec<_> = attempts
        .iter()
        .filter(|a| match &a.outcome {
            Ok(()) => false,
            // Answers: a retry that outlived its slot's start, or the shared
            // database too busy to lend a connection in time (retried).
            Err(f) if f.reason == "SLOT_STARTED" || f.reason == "DATABASE_UNAVAILABLE" => false,
            // Only the shutdown may cut calls: after the signal, before the restart.
            Err(f) => !(transport(f) && a.ended() >= signal && a.started <= restarted_at),
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "failures other than UNAVAILABLE/transport errors between SIGTERM and the restart: {unexpected:#?}"
    );
    // Calls under way when the signal came were drained, not cut.
    let in_flight: Vec<_> = attempts
        .iter()
        .filter(|a| a.started < signal && a.ended() > signal)
        .collect();
    let in_flight_ok = in_flight.iter().filter(|a| a.outcome.is_ok()).count();
    let cut: Vec<_> = attempts
        .iter()
        .filter(|a| a.started < signal && a.outcome.as_ref().is_err_and(transport))
        .collect();
    assert!(
        cut.is_empty(),
        "calls started before SIGTERM were cut: {cut:#?}"
    );
    let busy = attempts
        .iter()
        .filter(|a| {
            a.outcome
                .as_ref()
                .is_err_and(|f| f.reason == "DATABASE_UNAVAILABLE")
        })
        .count();
    let failed = attempts.iter().filter(|a| a.outcome.is_err()).count();

    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;
    checks::assert_only_late_refusals(&ledger);
    assert!(
        locked.is_empty(),
        "jobs left locked by the stopped process: {locked:#?}"
    );
    checks::report(
        "graceful_shutdown",
        &totals,
        &format!(
            "exit={} drained-in={:.2}s in-flight-at-signal={} (succeeded {in_flight_ok}) failed-attempts={failed} (database-busy {busy}) \
             restart-took={:.2}s refused={} jobs=[{}] waited-for-delivery={:.1}s runtime={:.1}s",
            stopped.status,
            stopped.took.as_secs_f64(),
            in_flight.len(),
            (restarted_at - restart_started).as_secs_f64(),
            ledger.refused.len(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
