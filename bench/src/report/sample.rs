//! A small, made-up result set for the rendering tests.

use super::*;
use crate::{
    pg_cost::StatementCost,
    resources::CpuUse,
    stats::{self, Errors, Measurement},
};

fn measurement(per_second: u64, p50_ms: u64) -> Measurement {
    let mut h = stats::histogram();
    for i in 0..per_second {
        let micros = p50_ms * 1000 + i % 3 * 500;
        h.record(micros).unwrap();
    }
    let mut errors = Errors::new();
    if p50_ms > 5 {
        stats::count_error(&mut errors, "Unavailable", "pool timed out");
    }
    Measurement::new(&h, std::time::Duration::from_secs(1), per_second, errors)
}

fn point(clients: usize) -> Point {
    let service = measurement(500 * clients as u64, 1 + clients as u64 / 8);
    let floor = measurement(700 * clients as u64, 1 + clients as u64 / 16);
    let cpu = CpuUse {
        memory_service_s: 0.5,
        postgres_s: Some(1.0),
        ..CpuUse::default()
    };
    Point {
        clients,
        ratio: Ratio::of(&service, &floor),
        per_1k: PerThousand::new(&service, &cpu, Some((&floor, &cpu))),
        service,
        service_cpu: cpu,
        floor: Some(floor),
        floor_cpu: Some(cpu),
        rss: Rss::default(),
        backlog_after_run: 0,
        drain_seconds: 0.0,
        pg_cost: Some(PgCost {
            operations: 1000,
            own_ms_per_operation: 0.4,
            others_ms_per_operation: 0.6,
            others_over_own: Some(1.5),
            statements: vec![StatementCost {
                statement: "UPDATE apalis.jobs SET status = ? WHERE id = ?".into(),
                own: false,
                calls: 2000,
                ms_per_call: 0.3,
                ms_per_operation: 0.6,
            }],
        }),
    }
}

pub fn results() -> Results {
    let clients = [1, 4, 16, 64];
    let mut r = Results {
        started_at: chrono::Utc::now(),
        quick: true,
        machine: Machine {
            cpus: 2,
            cpu_model: "Chef&Co <virtual>".into(),
            memory_gib: 24.0,
            kernel: "6.1".into(),
            background_busy_pct: 3.0,
            postgres: crate::db::ServerInfo {
                version: "PostgreSQL 15.20 on x86_64".into(),
                fsync: "on".into(),
                synchronous_commit: "on".into(),
                shared_buffers: "128MB".into(),
                max_connections: "100".into(),
            },
            pgbench: Some("pgbench (PostgreSQL) 15.20".into()),
        },
        settings: RunSettings {
            clients: clients.to_vec(),
            warmup_s: 2.0,
            duration_s: 10.0,
            follow_up_bookings: 200,
            plan_start_samples: 20,
            floor: true,
            rounds: 1,
            service_settings: vec![],
        },
        scenarios: [
            "store-message",
            "create-booking",
            "get-context-10",
            "get-context-1k",
            "get-context-100k",
        ]
        .iter()
        .map(|name| ScenarioResult {
            name: (*name).into(),
            unit: "call".into(),
            points: clients.iter().map(|&c| point(c)).collect(),
        })
        .collect(),
        single_write: clients
            .iter()
            .map(|&c| FloorPoint {
                clients: c,
                floor: measurement(900 * c as u64, 1),
                cpu: CpuUse::default(),
            })
            .collect(),
        follow_ups: None,
        follow_ups_retained: None,
        services: vec![ServicePeak {
            name: "memory-service".into(),
            peak_rss_mib: 30.0,
        }],
        targets: vec![],
        errors: 0,
    };
    r.targets = targets(&r);
    r
}

#[test]
fn targets_are_judged_from_the_ratios() {
    let r = results();
    let find = |name: &str| r.targets.iter().find(|t| t.name == name).unwrap();
    // 1 client: service p50 1 ms vs floor 1 ms.
    assert_eq!(
        find("store-message, 1 client: median vs floor").met,
        Some(true)
    );
    // 64 clients: 32000/s vs 44800/s = 0.71.
    assert_eq!(
        find("create-booking, 64 clients: throughput vs floor").met,
        Some(false)
    );
    assert_eq!(
        find("follow-ups planned and delivered per second").met,
        None
    );
    assert_eq!(find("memory-service peak RSS under load").met, Some(true));
    // Everything else 0.6 ms per booking against the booking's own 0.4 ms.
    assert_eq!(
        find(
            "create-booking, 1 clients: PostgreSQL time of everything else / the booking statement"
        )
        .met,
        Some(false)
    );
}

#[test]
fn get_context_targets_per_length_and_against_length() {
    let mut r = results();
    // The 100,000-message floor slower at one client than the 1,000's:
    // p50 2.5 ms vs 1.5 ms.
    let slow = measurement(250, 2);
    let one = r
        .scenarios
        .iter_mut()
        .find(|s| s.name == "get-context-100k")
        .and_then(|s| s.points.iter_mut().find(|p| p.clients == 1))
        .unwrap();
    one.ratio = Ratio::of(&one.service, &slow);
    one.floor = Some(slow);
    r.targets = targets(&r);
    let find = |name: &str| r.targets.iter().find(|t| t.name == name).unwrap();
    for length in ["10", "1k", "100k"] {
        // 1 client: service p50 1.5 ms vs floor 1.5 ms (100k: vs 2.5 ms).
        let median = find(&format!("get-context-{length}, 1 client: median vs floor"));
        assert_eq!((median.met, median.goal.as_str()), (Some(true), "<= 1.3x"));
        // 8000/s vs 11200/s = 0.71.
        let sixteen = find(&format!(
            "get-context-{length}, 16 clients: throughput vs floor"
        ));
        assert_eq!(
            (sixteen.met, sixteen.measured.as_str()),
            (Some(false), "0.71x")
        );
        assert!(
            r.targets
                .iter()
                .any(|t| t.name == format!("get-context-{length}, 64 clients: throughput vs floor"))
        );
    }
    let floor = find("get-context, 1 client, floor (pgbench): median at 100,000 messages vs 1,000");
    assert_eq!((floor.met, floor.measured.as_str()), (Some(false), "1.67x"));
    let service = find("get-context, 1 client, service: median at 100,000 messages vs 1,000");
    assert_eq!(service.met, Some(true));
    // No line for a length that did not run.
    r.scenarios.retain(|s| s.name != "get-context-1k");
    let without = targets(&r);
    assert!(!without.iter().any(|t| t.name.starts_with("get-context,")));
    assert!(!without.iter().any(|t| t.name.starts_with("get-context-1k")));
}

#[test]
fn table_shows_every_scenario_target_and_error() {
    let text = super::table::render(&results());
    assert!(text.contains("== store-message (per call) =="));
    assert!(text.contains("MISS"));
    assert!(text.contains("ERRORS service c=64: Unavailable"));
    assert!(text.contains(
        "create-booking c=1: 1000 operations; own 0.400 ms, everything else 0.600 ms per operation (1.50 x own)"
    ));
    assert!(text.contains("UPDATE apalis.jobs SET status = ? WHERE id = ?"));
}
