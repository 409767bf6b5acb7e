//! Drill 1: booking-service is `kill -9`ed three times in the middle of a
//! steady stream of bookings (and of planning and deliveries), and restarted
//! on the same port at once; the client retries with the same request ids.

use std::time::{Duration, Instant};

use crate::{
    checks,
    client::{Load, SlotPlan, run_load},
    harness::{Options, Stack},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_load_loses_nothing() {
    let drill_started = Instant::now();
    let mut stack = Stack::start("crash_mid_load", Options::default()).await;
    let client = stack.client(0);
    // Short slots starting every 1.5 s: deliveries come due while the load
    // and the kills go on.
    let slots = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(2),
            every: Duration::from_millis(1500),
            count: 12,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    let load_started = Instant::now();
    let load = run_load(
        "crash",
        vec![client.clone()],
        slots,
        Load {
            tasks: 3,
            pause: Duration::from_millis(20),
            run_for: Duration::from_secs(12),
            margin: Duration::from_millis(1500),
            limit: None,
        },
    );

    let booking = &mut stack.booking[0];
    let mut kills = 0;
    for mark in [3, 6, 9] {
        tokio::time::sleep_until((load_started + Duration::from_secs(mark)).into()).await;
        booking.kill().expect("SIGKILL booking-service");
        kills += 1;
        booking.restart().await.expect("booking-service restarted");
    }
    let ledger = load.await.expect("load");

    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;
    checks::assert_only_late_refusals(&ledger);
    let failures = client.journal.failures();
    assert!(
        failures
            .iter()
            .all(|f| !f.outcome.as_ref().is_err_and(|e| e.hung)),
        "calls hung: {failures:#?}"
    );
    assert!(
        !failures.is_empty(),
        "no call failed: the kills never hit the load"
    );
    checks::report(
        "crash_mid_load_loses_nothing",
        &totals,
        &format!(
            "kills={kills} failed-attempts={} replayed={} refused={} jobs=[{}] waited-for-delivery={:.1}s runtime={:.1}s",
            failures.len(),
            ledger.replayed(),
            ledger.refused.len(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
