//! Drill 2: memory-service is `kill -9`ed three times while bookings are
//! made and their follow-ups are planned and delivered; it is restarted on
//! the same port at once. Deliveries retry with the follow-up's id as the
//! request id, so none is stored twice.

use std::time::{Duration, Instant};

use crate::{
    checks,
    client::{Load, SlotPlan, run_load},
    harness::{Options, Stack},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_killed_during_deliveries() {
    let drill_started = Instant::now();
    let mut stack = Stack::start("memory_crash", Options::default()).await;
    let client = stack.client(0);
    // A slot every 3 s, so each gathers ~3 s of bookings whose follow-ups
    // all come due together when it ends: a burst of deliveries.
    let slots = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(1),
            every: Duration::from_secs(3),
            count: 5,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    // Kill memory-service in the middle of a burst (40, 90 and 140 ms after
    // slots 1, 2 and 3 end; workers poll every 100 ms), so deliveries are in
    // flight or due while it is away.
    let kill_marks: Vec<Instant> = [(1, 40), (2, 90), (3, 140)]
        .iter()
        .map(|&(i, offset): &(usize, u64)| {
            let due = slots[i].starts_at + chrono::Duration::seconds(1) - chrono::Utc::now();
            Instant::now()
                + due.to_std().expect("slot ends in the future")
                + Duration::from_millis(offset)
        })
        .collect();
    let load = run_load(
        "memory",
        vec![client.clone()],
        slots,
        Load {
            tasks: 3,
            pause: Duration::from_millis(20),
            run_for: Duration::from_secs(12),
            margin: Duration::from_millis(800),
            limit: None,
        },
    );

    let mut kills = 0;
    let mut down_for = Vec::new();
    for mark in kill_marks {
        tokio::time::sleep_until(mark.into()).await;
        let killed_at = Instant::now();
        stack.memory.kill().expect("SIGKILL memory-service");
        kills += 1;
        stack
            .memory
            .restart()
            .await
            .expect("memory-service restarted");
        down_for.push(format!("{}ms", killed_at.elapsed().as_millis()));
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
    checks::report(
        "memory_killed_during_deliveries",
        &totals,
        &format!(
            "kills={kills} down-for={down_for:?} failed-attempts={} refused={} jobs=[{}] waited-for-delivery={:.1}s runtime={:.1}s",
            failures.len(),
            ledger.refused.len(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
