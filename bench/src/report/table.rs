//! The human-readable report printed at the end of a run (also written to
//! `report.txt` beside the JSON).

use std::fmt::Write;

use super::{Results, Target};
use crate::{scenarios::follow_ups::FollowUpResult, stats::Measurement};

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn measurement_cells(m: &Measurement) -> String {
    format!(
        "{:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>5}",
        m.per_second,
        m.latency.p50_ms,
        m.latency.p95_ms,
        m.latency.p99_ms,
        m.latency.max_ms,
        m.error_count()
    )
}

const EMPTY_CELLS: &str = "        -       -       -       -        -     -";

pub fn render(r: &Results) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "maitre-bench {} | {} x {} | {:.1} GiB | {} | fsync={} synchronous_commit={}",
        if r.quick { "(quick)" } else { "" },
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.postgres.version.split(" on ").next().unwrap_or_default(),
        m.postgres.fsync,
        m.postgres.synchronous_commit
    );
    let _ = writeln!(
        out,
        "warm-up {:.1} s, measured {:.1} s per point in {} round(s); latency in ms; floor = pgbench -M prepared, same SQL, same database",
        r.settings.warmup_s, r.settings.duration_s, r.settings.rounds
    );
    let _ = writeln!(
        out,
        "machine busy before the run (other work): {:.0} %; 'others' below = CPU used by processes outside the bench, the services, pgbench and PostgreSQL",
        m.background_busy_pct
    );
    for s in &r.scenarios {
        let _ = writeln!(out, "\n== {} (per {}) ==", s.name, s.unit);
        let _ = writeln!(
            out,
            "{:>7} | {:^48} | {:^48} | {:^20}",
            "clients", "service", "floor (pgbench)", "service / floor"
        );
        let head = format!(
            "{:>9} {:>7} {:>7} {:>7} {:>8} {:>5}",
            "ops/s", "p50", "p95", "p99", "max", "err"
        );
        let _ = writeln!(
            out,
            "{:>7} | {head} | {head} | {:>6} {:>6} {:>6}",
            "", "thr", "p50", "p99"
        );
        for p in &s.points {
            let floor = p
                .floor
                .as_ref()
                .map_or(EMPTY_CELLS.into(), measurement_cells);
            let _ = writeln!(
                out,
                "{:>7} | {} | {} | {:>6} {:>6} {:>6}",
                p.clients,
                measurement_cells(&p.service),
                floor,
                opt(p.ratio.map(|x| x.throughput), 2),
                opt(p.ratio.map(|x| x.p50), 2),
                opt(p.ratio.map(|x| x.p99), 2),
            );
        }
        let _ = writeln!(
            out,
            "{:>7} | CPU s per 1,000 {}s: memory-svc booking-svc bench postgres | floor: postgres pgbench | busy % (others) svc / floor | CPU wait ms/op mem book bench | RSS MiB mem/book | backlog",
            "", s.unit
        );
        for p in &s.points {
            let k = &p.per_1k;
            let _ = writeln!(
                out,
                "{:>7} | {:>10.3} {:>11.3} {:>5.3} {:>8} | {:>15} {:>7} | {:>3.0} ({:>2.0}) / {:>3} ({:>2}) | {:>5.2} {:>5.2} {:>5.2} | {:>6.1} / {:>5.1} | {} ({:.1} s)",
                p.clients,
                k.memory_service_cpu_s,
                k.booking_service_cpu_s,
                k.bench_cpu_s,
                opt(k.postgres_cpu_s, 3),
                opt(k.floor_postgres_cpu_s, 3),
                opt(k.floor_pgbench_cpu_s, 3),
                p.service_cpu.machine_busy_pct,
                p.service_cpu.others_pct,
                opt(p.floor_cpu.map(|c| c.machine_busy_pct), 0),
                opt(p.floor_cpu.map(|c| c.others_pct), 0),
                k.run_queue_wait_ms.memory_service,
                k.run_queue_wait_ms.booking_service,
                k.run_queue_wait_ms.bench,
                p.rss.memory_service_peak_mib,
                p.rss.booking_service_peak_mib,
                p.backlog_after_run,
                p.drain_seconds,
            );
        }
        print_errors(
            &mut out,
            s.points.iter().flat_map(|p| {
                let service = p
                    .service
                    .errors
                    .iter()
                    .map(move |(k, t)| (format!("service c={}", p.clients), k, t));
                let floor = p.floor.iter().flat_map(move |f| {
                    f.errors
                        .iter()
                        .map(move |(k, t)| (format!("floor c={}", p.clients), k, t))
                });
                service.chain(floor)
            }),
        );
    }
    print_pg_costs(&mut out, r);
    if !r.single_write.is_empty() {
        let _ = writeln!(
            out,
            "\n== reference floor: one durable single-row INSERT (pgbench) =="
        );
        for p in &r.single_write {
            let _ = writeln!(out, "{:>7} | {}", p.clients, measurement_cells(&p.floor));
        }
    }
    if let Some(f) = &r.follow_ups {
        print_follow_ups(&mut out, "", f);
    }
    if let Some(h) = &r.follow_ups_retained {
        print_follow_ups(
            &mut out,
            &format!(", {} finished jobs retained", h.jobs),
            &h.result,
        );
    }
    let _ = writeln!(out, "\n== targets ==");
    for t in &r.targets {
        let _ = writeln!(
            out,
            "{:<5} {:<58} {:>14}  (goal {})",
            verdict(t),
            t.name,
            t.measured,
            t.goal
        );
    }
    let _ = writeln!(out, "\nerrors over the whole run: {}", r.errors);
    out
}

/// The follow-up test's figures; `title` tells this run from the other.
fn print_follow_ups(out: &mut String, title: &str, f: &FollowUpResult) {
    let t = &f.throughput;
    let _ = writeln!(
        out,
        "\n== follow-ups{title} (BOOKING_FOLLOWUP_DELAY=0, BOOKING_WORKER_POLL_INTERVAL=100ms) =="
    );
    let _ = writeln!(
        out,
        "follow-up job start on an idle queue ({} samples): from its due time p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        f.plan_start.from_due_ms.samples,
        f.plan_start.from_due_ms.p50_ms,
        f.plan_start.from_due_ms.p95_ms,
        f.plan_start.from_due_ms.max_ms,
    );
    let _ = writeln!(
        out,
        "{} bookings made in {:.1} s, {} planned when due; {} sent, {} failed, {} unfinished; last sent {:.2} s after due = {:.0} delivered/s; lag p50 {:.0} ms p95 {:.0} ms",
        t.bookings,
        t.booking_seconds,
        t.planned_at_due,
        t.sent,
        t.failed,
        t.unfinished,
        t.seconds_due_to_last_sent,
        t.delivered_per_second,
        t.lag_ms.p50_ms,
        t.lag_ms.p95_ms,
    );
    let per_1k = |s: f64| {
        if t.sent > 0 {
            s * 1000.0 / t.sent as f64
        } else {
            0.0
        }
    };
    let _ = writeln!(
        out,
        "CPU s per 1,000 follow-ups: booking-svc {:.3}, memory-svc {:.3}, postgres {}; machine busy {:.0} % (others {:.0} %)",
        per_1k(t.cpu.booking_service_s),
        per_1k(t.cpu.memory_service_s),
        opt(t.cpu.postgres_s.map(per_1k), 3),
        t.cpu.machine_busy_pct,
        t.cpu.others_pct
    );
    print_errors(
        out,
        f.plan_start
            .errors
            .iter()
            .map(|(k, t)| ("plan start".to_owned(), k, t))
            .chain(
                t.errors
                    .iter()
                    .map(|(k, e)| ("throughput".to_owned(), k, e)),
            ),
    );
}

/// PostgreSQL execution time per operation, by statement, per point.
fn print_pg_costs(out: &mut String, r: &Results) {
    let points = r.scenarios.iter().flat_map(|s| {
        s.points
            .iter()
            .filter_map(move |p| Some((format!("{} c={}", s.name, p.clients), p.pg_cost.as_ref()?)))
    });
    let follow_ups = r
        .follow_ups
        .iter()
        .map(|f| ("follow-ups".to_owned(), f))
        .chain(r.follow_ups_retained.iter().map(|h| {
            (
                format!("follow-ups, {} finished jobs retained", h.jobs),
                &h.result,
            )
        }))
        .filter_map(|(name, f)| Some((name, f.pg_cost.as_ref()?)));
    let mut header = false;
    for (name, cost) in points.chain(follow_ups) {
        if !header {
            let _ = writeln!(
                out,
                "\n== PostgreSQL execution time per operation (pg_stat_statements; * = the scenario's own statement) =="
            );
            header = true;
        }
        let _ = writeln!(
            out,
            "{name}: {} operations; own {:.3} ms, everything else {:.3} ms per operation ({} x own)",
            cost.operations,
            cost.own_ms_per_operation,
            cost.others_ms_per_operation,
            opt(cost.others_over_own, 2),
        );
        for st in &cost.statements {
            let _ = writeln!(
                out,
                "  {} {:>9} calls {:>7.3} ms/call {:>7.3} ms/op  {}",
                if st.own { '*' } else { ' ' },
                st.calls,
                st.ms_per_call,
                st.ms_per_operation,
                st.statement
            );
        }
    }
}

fn verdict(t: &Target) -> &'static str {
    match t.met {
        Some(true) => "MET",
        Some(false) => "MISS",
        None => "-",
    }
}

fn print_errors<'a>(
    out: &mut String,
    errors: impl Iterator<Item = (String, &'a String, &'a crate::stats::ErrorTally)>,
) {
    for (run, kind, tally) in errors {
        let _ = writeln!(
            out,
            "  ERRORS {run}: {kind} x{} (e.g. {})",
            tally.count, tally.example
        );
    }
}
