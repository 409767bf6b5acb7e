//! Drill 3: two booking-service processes on one database share the queue:
//! 60 bookings spread over both; every follow-up is planned and delivered
//! exactly once, and both processes' workers took jobs.

use std::time::{Duration, Instant};

use booking_service::jobs::{DELIVER_QUEUE, PLAN_QUEUE};

use crate::{
    checks,
    client::{Journal, Load, SlotPlan, run_load},
    harness::{Options, Stack},
};

const BOOKINGS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_queue() {
    let drill_started = Instant::now();
    let stack = Stack::start(
        "two_workers",
        Options {
            booking_processes: 2,
            // A worker fetches up to its concurrency of due jobs at once:
            // with the default 128, the first replica to poll takes all 60
            // (README, "Scaling out"). 16 makes both take part.
            booking_env: vec![("BOOKING_WORKER_CONCURRENCY", "16".into())],
            ..Options::default()
        },
    )
    .await;
    let journal = Journal::default();
    let clients = vec![
        stack.client(0).with_journal(&journal),
        stack.client(1).with_journal(&journal),
    ];
    let slots = clients[0]
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(3),
            every: Duration::from_secs(1),
            count: 3,
            lasts: Duration::from_secs(1),
            capacity: 1_000,
        })
        .await;
    let ledger = run_load(
        "two",
        clients,
        slots,
        Load {
            tasks: 6,
            pause: Duration::ZERO,
            run_for: Duration::from_secs(20),
            margin: Duration::ZERO,
            limit: Some(BOOKINGS),
        },
    )
    .await
    .expect("load");
    assert_eq!(
        ledger.confirmed.len(),
        BOOKINGS,
        "refused: {:?}",
        ledger.refused
    );

    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;

    // Which process ran each job: worker names are `<queue>@<host>-<random>#<restart>`.
    let by_instance: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT job_type, split_part(split_part(lock_by, '@', 2), '#', 1), count(*) \
         FROM apalis.jobs WHERE job_type = ANY($1) AND status = 'Done' AND lock_by IS NOT NULL \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(vec![PLAN_QUEUE, DELIVER_QUEUE])
    .fetch_all(&stack.db)
    .await
    .expect("jobs per worker");
    let instances: std::collections::HashSet<&str> =
        by_instance.iter().map(|(_, i, _)| i.as_str()).collect();
    assert!(
        instances.len() > 1,
        "only one process ran jobs: {by_instance:?}"
    );
    checks::report(
        "two_workers_one_queue",
        &totals,
        &format!(
            "processes=2 jobs-per-instance={:?} jobs=[{}] waited-for-delivery={:.1}s runtime={:.1}s",
            by_instance
                .iter()
                .map(|(q, i, n)| format!("{}@{i}={n}", q.rsplit('.').next().unwrap_or(q)))
                .collect::<Vec<_>>(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
