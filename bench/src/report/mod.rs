//! What a bench run found: the JSON model, the targets it is judged
//! against, and the two renderings (terminal table, SVG chart).

pub mod chart;
pub mod output;
pub mod table;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{
    db::ServerInfo, pg_cost::PgCost, resources::CpuUse, scenarios::follow_ups::FollowUpResult,
    stats::Measurement,
};

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub started_at: DateTime<Utc>,
    pub quick: bool,
    pub machine: Machine,
    pub settings: RunSettings,
    /// The closed-loop scenarios, service beside floor.
    pub scenarios: Vec<ScenarioResult>,
    /// The reference floor: one durable single-row INSERT per transaction.
    pub single_write: Vec<FloorPoint>,
    pub follow_ups: Option<FollowUpResult>,
    /// follow-ups again, with a large history of finished jobs in the queue.
    pub follow_ups_retained: Option<RetainedHistory>,
    /// Each service's peak RSS over the whole run.
    pub services: Vec<ServicePeak>,
    pub targets: Vec<Target>,
    /// Failed operations over the whole run (service and floor).
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// Share of the cores busy during 2 s before the run, with nothing of
    /// the bench running: other work on the machine.
    pub background_busy_pct: f64,
    pub postgres: ServerInfo,
    pub pgbench: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub clients: Vec<usize>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub follow_up_bookings: usize,
    pub plan_start_samples: usize,
    pub floor: bool,
    /// Service and floor alternate this many times per client count, each
    /// time for duration / rounds after a warm-up; the rounds are merged.
    pub rounds: usize,
    /// How the services were started, beyond their defaults.
    pub service_settings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    /// What one operation is ("call", "journey").
    pub unit: String,
    pub points: Vec<Point>,
}

/// One client count of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub clients: usize,
    pub service: Measurement,
    pub service_cpu: CpuUse,
    pub floor: Option<Measurement>,
    pub floor_cpu: Option<CpuUse>,
    /// service / floor.
    pub ratio: Option<Ratio>,
    pub per_1k: PerThousand,
    pub rss: Rss,
    /// Follow-up jobs still due after the service run, and the time the
    /// workers took to finish them before the next run started.
    pub backlog_after_run: i64,
    pub drain_seconds: f64,
    /// PostgreSQL time per operation, by statement (when
    /// pg_stat_statements is loaded).
    pub pg_cost: Option<PgCost>,
}

/// The follow-up throughput test run with `jobs` finished jobs retained.
#[derive(Debug, Clone, Serialize)]
pub struct RetainedHistory {
    pub jobs: u64,
    pub result: FollowUpResult,
}

/// service / floor: above 1 the service is slower (latency) or faster
/// (throughput).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub throughput: f64,
}

impl Ratio {
    pub fn of(service: &Measurement, floor: &Measurement) -> Option<Self> {
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        (floor.ops > 0).then(|| Self {
            p50: r(service.latency.p50_ms, floor.latency.p50_ms),
            p95: r(service.latency.p95_ms, floor.latency.p95_ms),
            p99: r(service.latency.p99_ms, floor.latency.p99_ms),
            max: r(service.latency.max_ms, floor.latency.max_ms),
            throughput: r(service.per_second, floor.per_second),
        })
    }
}

/// CPU seconds per 1,000 operations (all operations of the run, warm-up
/// included, since CPU is counted over the whole run).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PerThousand {
    pub memory_service_cpu_s: f64,
    pub booking_service_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub postgres_cpu_s: Option<f64>,
    pub floor_postgres_cpu_s: Option<f64>,
    pub floor_pgbench_cpu_s: Option<f64>,
    /// Milliseconds per operation the services' and the bench's threads
    /// spent runnable but waiting for a CPU (a CPU-starved machine).
    pub run_queue_wait_ms: RunQueue,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RunQueue {
    pub memory_service: f64,
    pub booking_service: f64,
    pub bench: f64,
}

impl PerThousand {
    pub fn new(
        service: &Measurement,
        cpu: &CpuUse,
        floor: Option<(&Measurement, &CpuUse)>,
    ) -> Self {
        let per = |seconds: f64, ops: u64| {
            if ops == 0 {
                0.0
            } else {
                seconds * 1000.0 / ops as f64
            }
        };
        let ops = service.total_ops;
        Self {
            memory_service_cpu_s: per(cpu.memory_service_s, ops),
            booking_service_cpu_s: per(cpu.booking_service_s, ops),
            bench_cpu_s: per(cpu.bench_s, ops),
            postgres_cpu_s: cpu.postgres_s.map(|s| per(s, ops)),
            floor_postgres_cpu_s: floor
                .and_then(|(m, c)| c.postgres_s.map(|s| per(s, m.total_ops))),
            floor_pgbench_cpu_s: floor.map(|(m, c)| per(c.pgbench_s, m.total_ops)),
            run_queue_wait_ms: RunQueue {
                memory_service: per(cpu.run_queue_wait_s[0], ops),
                booking_service: per(cpu.run_queue_wait_s[1], ops),
                bench: per(cpu.run_queue_wait_s[2], ops),
            },
        }
    }
}

/// Resident memory of the services after a run, MiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rss {
    pub memory_service_peak_mib: f64,
    pub booking_service_peak_mib: f64,
    pub memory_service_now_mib: f64,
    pub booking_service_now_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloorPoint {
    pub clients: usize,
    pub floor: Measurement,
    pub cpu: CpuUse,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePeak {
    pub name: String,
    pub peak_rss_mib: f64,
}

/// One target of the issue, and whether this run met it (None: not
/// measured in this run).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn target(
    name: String,
    goal: &str,
    measured: Option<f64>,
    unit: &str,
    ok: impl Fn(f64) -> bool,
) -> Target {
    Target {
        name,
        goal: goal.to_owned(),
        measured: measured.map_or("not measured".into(), |v| format!("{v:.2}{unit}")),
        met: measured.map(ok),
    }
}

/// The targets, evaluated on `results`.
pub fn targets(results: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for name in ["store-message", "create-booking"] {
        let Some(scenario) = results.scenarios.iter().find(|s| s.name == name) else {
            continue;
        };
        let at = |clients: usize| {
            scenario
                .points
                .iter()
                .find(|p| p.clients == clients)
                .and_then(|p| p.ratio)
        };
        out.push(target(
            format!("{name}, 1 client: median vs floor"),
            "<= 1.5x",
            at(1).map(|r| r.p50),
            "x",
            |v| v <= 1.5,
        ));
        for clients in [16, 64] {
            out.push(target(
                format!("{name}, {clients} clients: throughput vs floor"),
                ">= 0.75x",
                at(clients).map(|r| r.throughput),
                "x",
                |v| v >= 0.75,
            ));
            out.push(target(
                format!("{name}, {clients} clients: p99 vs floor"),
                "<= 3x",
                at(clients).map(|r| r.p99),
                "x",
                |v| v <= 3.0,
            ));
        }
    }
    for name in ["create-booking", "journey"] {
        let Some(scenario) = results.scenarios.iter().find(|s| s.name == name) else {
            continue;
        };
        let one = scenario.points.iter().find(|p| p.clients == 1);
        if name == "journey" {
            out.push(target(
                "journey, 1 client: median vs floor".into(),
                "<= 1.5x",
                one.and_then(|p| p.ratio).map(|r| r.p50),
                "x",
                |v| v <= 1.5,
            ));
            continue;
        }
        for point in &scenario.points {
            out.push(target(
                format!(
                    "{name}, {} clients: PostgreSQL time of everything else / the booking statement",
                    point.clients
                ),
                "<= 1x",
                point.pg_cost.as_ref().and_then(|c| c.others_over_own),
                "x",
                |v| v <= 1.0,
            ));
        }
    }
    out.extend(context_targets(results));
    let follow_ups = results.follow_ups.as_ref();
    out.push(target(
        "follow-ups planned and delivered per second".into(),
        ">= 1500/s",
        follow_ups.map(|f| f.throughput.delivered_per_second),
        "/s",
        |v| v >= 1500.0,
    ));
    out.push(target(
        "follow-ups: PostgreSQL time of the pipeline / the booking statement".into(),
        "<= 1x",
        follow_ups
            .and_then(|f| f.pg_cost.as_ref())
            .and_then(|c| c.others_over_own),
        "x",
        |v| v <= 1.0,
    ));
    let pipeline_ms = |f: &FollowUpResult| f.pg_cost.as_ref().map(|c| c.others_ms_per_operation);
    if let Some(retained) = &results.follow_ups_retained {
        out.push(target(
            format!(
                "follow-ups with {} finished jobs retained: pipeline PostgreSQL time per booking vs none retained",
                retained.jobs
            ),
            "<= 1.2x",
            pipeline_ms(&retained.result)
                .zip(follow_ups.and_then(pipeline_ms))
                .map(|(with, without)| with / without),
            "x",
            |v| v <= 1.2,
        ));
    }
    out.push(target(
        "follow-up job start after due on an idle queue, median".into(),
        "<= 50 ms",
        follow_ups
            .filter(|f| f.plan_start.from_due_ms.samples > 0)
            .map(|f| f.plan_start.from_due_ms.p50_ms),
        " ms",
        |v| v <= 50.0,
    ));
    for service in &results.services {
        out.push(target(
            format!("{} peak RSS under load", service.name),
            "< 64 MiB",
            Some(service.peak_rss_mib),
            " MiB",
            |v| v < 64.0,
        ));
    }
    out
}

/// GetContext against its floor at each conversation length, and the
/// cost against the conversation's length: 100,000 messages vs 1,000, both
/// answering the same 40-message window (the 10-message conversation
/// answers only 10, a smaller window, so it is no measure of growth).
fn context_targets(results: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let scenario = |name: &str| results.scenarios.iter().find(|s| s.name == name);
    let point =
        |name: &str, clients: usize| scenario(name)?.points.iter().find(|p| p.clients == clients);
    for name in ["get-context-10", "get-context-1k", "get-context-100k"] {
        if scenario(name).is_none() {
            continue;
        }
        out.push(target(
            format!("{name}, 1 client: median vs floor"),
            "<= 1.3x",
            point(name, 1).and_then(|p| p.ratio).map(|r| r.p50),
            "x",
            |v| v <= 1.3,
        ));
        for clients in [16, 64] {
            out.push(target(
                format!("{name}, {clients} clients: throughput vs floor"),
                ">= 0.8x",
                point(name, clients)
                    .and_then(|p| p.ratio)
                    .map(|r| r.throughput),
                "x",
                |v| v >= 0.8,
            ));
        }
    }
    let (long, short) = ("get-context-100k", "get-context-1k");
    if scenario(long).is_some() && scenario(short).is_some() {
        let p50 = |name: &str, floor: bool| {
            let p = point(name, 1)?;
            let m = if floor { p.floor.as_ref()? } else { &p.service };
            Some(m.latency.p50_ms).filter(|&v| v > 0.0)
        };
        for (side, floor) in [("floor (pgbench)", true), ("service", false)] {
            out.push(target(
                format!("get-context, 1 client, {side}: median at 100,000 messages vs 1,000"),
                "<= 1.2x",
                p50(long, floor)
                    .zip(p50(short, floor))
                    .map(|(long, short)| long / short),
                "x",
                |v| v <= 1.2,
            ));
        }
    }
    out
}

#[cfg(test)]
pub mod sample;
