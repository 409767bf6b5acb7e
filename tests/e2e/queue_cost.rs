//! Issue 12: the queue's fetch and acknowledgement, and the depth gauge,
//! cost what the work at hand costs, whatever the retained history holds.
//! Fetch and ack are the patched apalis-postgres statements
//! (patches/apalis-postgres/PATCHES.md); all are planned the way the driver
//! runs them: as generic plans of prepared statements.

// The statements below are built from the test's own constants only.
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::stack::spawn_stack_with;

/// The statements apalis-postgres runs here (the patched copy's files).
const ACK: &str = include_str!("../../patches/apalis-postgres/queries/task/handle_result.sql");
const FETCH: &str = include_str!("../../patches/apalis-postgres/queries/task/fetch_next.sql");

const QUEUE: &str = "maitre.followup.plan";
const WORKER: &str = "worker-now";

/// A history of 40,000 finished jobs: half locked by 50 workers long gone,
/// then (after ANALYZE, so the statistics do not know them) half locked by
/// the current worker, which also holds 8 jobs; 100 jobs wait.
async fn fill(conn: &mut PgConnection) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"
INSERT INTO apalis.workers (id, worker_type, storage_name)
SELECT 'worker-' || g, '{QUEUE}', 'PostgresStorage' FROM generate_series(1, 50) AS g
UNION ALL SELECT '{WORKER}', '{QUEUE}', 'PostgresStorage';
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, lock_at, lock_by, done_at, last_result)
SELECT 'old-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Done', 1, 3, now() - interval '1 hour', now() - interval '1 hour',
       'worker-' || (1 + g % 50), now() - interval '1 hour', '{{"Ok": null}}'::jsonb
FROM generate_series(1, 20000) AS g;
ANALYZE apalis.jobs;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, lock_at, lock_by, done_at, last_result)
SELECT 'done-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Done', 1, 3, now() - interval '1 hour', now() - interval '1 hour',
       '{WORKER}', now() - interval '1 hour', '{{"Ok": null}}'::jsonb
FROM generate_series(1, 20000) AS g;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, lock_at, lock_by)
SELECT 'held-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Queued', 0, 3, now(), now(), '{WORKER}'
FROM generate_series(1, 8) AS g;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
SELECT 'waiting-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Pending', 0, 3, now() - interval '1 second'
FROM generate_series(1, 100) AS g;
"#
    )))
    .execute(&mut *conn)
    .await
    .expect("history");
}

/// The plan of `statement` run with `args`, as a generic plan, executed
/// (EXPLAIN ANALYZE) inside a transaction that is rolled back.
async fn analyzed_plan(
    conn: &mut PgConnection,
    statement: &str,
    types: &str,
    args: &str,
) -> String {
    sqlx::raw_sql("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; DEALLOCATE ALL;")
        .execute(&mut *conn)
        .await
        .expect("begin");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "PREPARE measured({types}) AS {statement}"
    )))
    .execute(&mut *conn)
    .await
    .expect("prepare");
    let rows = sqlx::raw_sql(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE measured({args})"
    )))
    .fetch_all(&mut *conn)
    .await
    .expect("explain");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut *conn)
        .await
        .expect("rollback");
    rows.iter()
        .map(|row| row.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The largest `rows=` any scan of apalis.jobs in `plan` returned.
fn largest_scan(plan: &str) -> u64 {
    let mut largest = 0;
    for line in plan.lines() {
        if line.contains("Scan") && line.contains(" on jobs") {
            let rows = line
                .split("rows=")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            largest = largest.max(rows);
        }
    }
    largest
}

/// The most buffers (pages) any scan of apalis.jobs in `plan` read (each
/// scan line's own `Buffers:` line; the update's index upkeep is not a scan).
fn pages_scanned(plan: &str) -> u64 {
    let lines: Vec<&str> = plan.lines().collect();
    let mut largest = 0;
    for (i, line) in lines.iter().enumerate() {
        if !(line.contains("Scan") && line.contains(" on jobs")) {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let buffers = lines[i + 1..]
            .iter()
            .take_while(|l| l.len() - l.trim_start().len() > indent)
            .find(|l| l.trim_start().starts_with("Buffers:"));
        let pages: u64 = buffers
            .map(|l| {
                ["hit=", "read="]
                    .iter()
                    .filter_map(|key| {
                        l.split(key)
                            .nth(1)
                            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                            .and_then(|n| n.parse::<u64>().ok())
                    })
                    .sum()
            })
            .unwrap_or(0);
        largest = largest.max(pages);
    }
    largest
}

/// Every booking ahead has its follow-up job waiting until the event ends:
/// 40,000 of them, 3 due. A fetch asks for 16, finds 3 — as every idle poll
/// does — and must not read the 40,000 to learn that (apalis's own fetch
/// index, dropped by our migration, did: ~290 pages here, 15 ms with
/// 200,000 ahead).
#[tokio::test]
async fn a_fetch_reads_the_due_jobs_not_the_bookings_ahead() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let mut conn = stack.db.acquire().await.expect("connection");
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"
INSERT INTO apalis.workers (id, worker_type, storage_name) VALUES ('{WORKER}', '{QUEUE}', 'PostgresStorage');
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
SELECT 'ahead-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Pending', 0, 3, now() + g * interval '1 minute'
FROM generate_series(1, 40000) AS g;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
SELECT 'due-' || g, '{QUEUE}', '\x7b7d'::bytea, 'Pending', 0, 3, now() - interval '1 second'
FROM generate_series(1, 3) AS g;
"#
    )))
    .execute(&mut *conn)
    .await
    .expect("jobs ahead");
    for analyzed in [false, true] {
        if analyzed {
            sqlx::query("ANALYZE apalis.jobs")
                .execute(&mut *conn)
                .await
                .expect("analyze");
        }
        let fetch = analyzed_plan(
            &mut conn,
            FETCH,
            "text, text, integer",
            &format!("'{WORKER}', '{QUEUE}', 16"),
        )
        .await;
        assert!(fetch.contains("rows=3"), "the 3 due jobs fetched: {fetch}");
        assert!(
            pages_scanned(&fetch) < 40,
            "analyzed={analyzed}: {} pages: {fetch}",
            pages_scanned(&fetch)
        );
    }
    drop(conn);
    stack.shutdown().await;
}

#[tokio::test]
async fn fetch_and_ack_read_only_the_jobs_at_hand_whatever_the_history() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let mut conn = stack.db.acquire().await.expect("connection");
    fill(&mut conn).await;
    let payload: String = serde_json::to_string(
        &(1..=8)
            .map(|i| serde_json::json!({"task_id": format!("held-{i}"), "attempt": 1, "result": {"Ok": null}, "status": "Done"}))
            .collect::<Vec<_>>(),
    )
    .expect("payload");

    // With statistics that do not know the current worker's 20,000 jobs
    // (unless autovacuum got there first), then with fresh ones.
    for analyzed in [false, true] {
        if analyzed {
            sqlx::query("ANALYZE apalis.jobs")
                .execute(&mut *conn)
                .await
                .expect("analyze");
        }
        let ack = analyzed_plan(
            &mut conn,
            ACK,
            "jsonb, text",
            &format!("'{payload}', '{WORKER}'"),
        )
        .await;
        assert!(ack.contains("jobs_pkey"), "analyzed={analyzed}: {ack}");
        assert!(
            !ack.contains("idx_apalis_jobs_lock_by"),
            "analyzed={analyzed}: {ack}"
        );
        assert!(
            ack.contains("rows=8"),
            "the 8 held jobs acknowledged: {ack}"
        );
        assert!(largest_scan(&ack) <= 8, "analyzed={analyzed}: {ack}");

        let fetch = analyzed_plan(
            &mut conn,
            FETCH,
            "text, text, integer",
            &format!("'{WORKER}', '{QUEUE}', 16"),
        )
        .await;
        // The first 16 of the 100 due jobs, in due order, and none of the
        // history.
        assert!(
            fetch.contains("maitre_jobs_due_idx"),
            "analyzed={analyzed}: {fetch}"
        );
        assert!(largest_scan(&fetch) <= 16, "analyzed={analyzed}: {fetch}");
    }
    drop(conn);
    stack.shutdown().await;
}

#[tokio::test]
async fn the_queue_depth_gauge_reads_the_live_jobs_not_the_history() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let mut conn = stack.db.acquire().await.expect("connection");
    fill(&mut conn).await;
    sqlx::query("ANALYZE apalis.jobs")
        .execute(&mut *conn)
        .await
        .expect("analyze");
    let depth = analyzed_plan(
        &mut conn,
        booking_service::store::jobs::DEPTH,
        "text[]",
        &format!("ARRAY['{QUEUE}']"),
    )
    .await;
    assert!(depth.contains("maitre_jobs_type_status_idx"), "{depth}");
    // 8 held and 100 waiting, never the 40,000 finished ones.
    assert!(largest_scan(&depth) <= 108, "{depth}");
    let counts = booking_service::store::jobs::depth(&stack.db)
        .await
        .expect("depth");
    let count = |state: &str| {
        counts
            .iter()
            .find(|(queue, s, _)| queue == QUEUE && s == state)
            .map(|(_, _, n)| *n)
    };
    assert_eq!(
        (count("Queued"), count("Pending"), count("Done")),
        (Some(8), Some(100), None)
    );
    drop(conn);
    stack.shutdown().await;
}

#[test]
fn the_scan_size_is_read_from_the_plan() {
    let plan = "Update on jobs (actual rows=0 loops=1)\n  ->  Index Scan using idx_apalis_jobs_lock_by on jobs jobs_1 (actual rows=20000 loops=1)\n  ->  Index Scan using jobs_pkey on jobs (actual rows=1 loops=8)";
    assert_eq!(largest_scan(plan), 20000);
}
