//! One bench run from start to finish: fresh database, migrations, both
//! services started, every scenario (service run, then its floor, at each
//! client count), the single-write reference, the follow-up pipeline, then
//! the services stopped and the report written.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use sqlx::PgPool;

use crate::{
    cli::Plan,
    db,
    floor::{FloorRun, Pgbench, scripts},
    load,
    procfs::{self, Probe},
    report::{
        self, FloorPoint, Machine, PerThousand, Point, Ratio, Results, Rss, RunSettings,
        ScenarioResult, ServicePeak,
    },
    scenarios::{
        Client, Endpoints, Scenario, create_booking::BookClient, follow_ups,
        journey::JourneyClient, store_message::StoreClient,
    },
    services::{Launch, Stack},
    stats::Measurement,
};

/// Longest wait for the follow-up workers to catch up after a run.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Exit code when any operation failed (and --allow-errors is not given).
pub const EXIT_ERRORS: u8 = 2;

/// What the scenarios share while the services run.
struct Bench<'a> {
    plan: &'a Plan,
    pool: PgPool,
    probe: Probe,
    endpoints: Endpoints,
    pgbench: Pgbench,
    /// Distinguishes the customers, conversations and slots of each run.
    next_run: u64,
}

pub async fn run(plan: Plan) -> Result<u8> {
    let logs = plan.out.join("logs");
    tokio::fs::create_dir_all(&logs)
        .await
        .with_context(|| format!("creating {}", logs.display()))?;
    let pgbench_version = match plan.floor {
        true => Some(Pgbench::check().await?),
        false => None,
    };
    eprintln!("maitre-bench: fresh database {}", plan.database);
    db::recreate(&plan.admin_url, &plan.database).await?;
    let database_url = maitre::testkit::with_database(&plan.admin_url, &plan.database);
    let launch = Launch {
        bin_dir: plan.bin_dir.clone(),
        database_url: database_url.clone(),
        log_dir: logs,
    };
    launch.migrate("memory-service").await?;
    launch.migrate("booking-service").await?;
    let pool = db::connect(&database_url).await?;
    db::setup(&pool).await?;
    let machine = describe(&pool, pgbench_version).await?;

    eprintln!(
        "maitre-bench: starting the services from {}",
        plan.bin_dir.display()
    );
    let mut stack = launch.start().await?;
    let mut bench = Bench {
        plan: &plan,
        probe: Probe {
            memory_pid: stack.memory.pid,
            booking_pid: stack.booking.pid,
            postmaster: db::postmaster_pid(&pool).await,
            ticks_per_second: procfs::clock_ticks(),
        },
        endpoints: Endpoints {
            memory: stack.memory.url(),
            booking: stack.booking.url(),
        },
        pgbench: Pgbench {
            database_url,
            dir: plan.out.join("pgbench"),
        },
        pool,
        next_run: 1,
    };
    tokio::fs::create_dir_all(&bench.pgbench.dir).await?;
    let mut results = Results {
        started_at: chrono::Utc::now(),
        quick: plan.quick,
        machine,
        settings: RunSettings {
            clients: plan.clients.clone(),
            warmup_s: plan.warmup.as_secs_f64(),
            duration_s: plan.duration.as_secs_f64(),
            follow_up_bookings: plan.followups,
            plan_start_samples: plan.plan_samples,
            floor: plan.floor,
            service_settings: vec![
                "defaults, plus: FOLLOWUP_DELAY=0s WORKER_POLL_INTERVAL=100ms RUST_LOG=warn".into(),
                "booking-service follow-up workers ON in every scenario".into(),
            ],
        },
        scenarios: Vec::new(),
        single_write: Vec::new(),
        follow_ups: None,
        services: Vec::new(),
        targets: Vec::new(),
        errors: 0,
    };
    let outcome = bench.all(&mut stack, &mut results).await;
    // Read the peaks before the processes go away.
    for (name, pid) in [
        ("memory-service", stack.memory.pid),
        ("booking-service", stack.booking.pid),
    ] {
        if let Ok((peak, _)) = procfs::memory_kib(pid) {
            results.services.push(ServicePeak {
                name: name.into(),
                peak_rss_mib: mib(peak),
            });
        }
    }
    let stopped = stop(stack).await;
    outcome?;
    for line in stopped? {
        eprintln!("maitre-bench: {line}");
    }

    results.targets = report::targets(&results);
    results.errors = count_errors(&results);
    write_outputs(&plan, &results).await?;
    Ok(if results.errors > 0 && !plan.allow_errors {
        eprintln!(
            "maitre-bench: {} operations failed (see ERRORS above); exiting {EXIT_ERRORS}",
            results.errors
        );
        EXIT_ERRORS
    } else {
        0
    })
}

async fn stop(stack: Stack) -> Result<Vec<String>> {
    // booking-service first: it calls memory-service while draining.
    let booking = stack.booking.stop().await;
    let memory = stack.memory.stop().await;
    Ok(vec![booking?, memory?])
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Bench<'_> {
    async fn all(&mut self, stack: &mut Stack, results: &mut Results) -> Result<()> {
        let closed_loop: Vec<Scenario> = self
            .plan
            .scenarios
            .iter()
            .copied()
            .filter(|s| *s != Scenario::FollowUps)
            .collect();
        for &scenario in &closed_loop {
            let script = match scenario {
                Scenario::StoreMessage => scripts::store_message_script()?,
                Scenario::CreateBooking => scripts::create_booking_script()?,
                _ => scripts::journey_script()?,
            };
            let mut points = Vec::new();
            for &clients in &self.plan.clients {
                points.push(self.point(stack, scenario, clients, &script).await?);
            }
            results.scenarios.push(ScenarioResult {
                name: scenario.name().into(),
                unit: scenario.unit().into(),
                points,
            });
        }
        if self.plan.floor && !closed_loop.is_empty() {
            let script = scripts::single_write_script();
            for &clients in &self.plan.clients {
                let (floor, cpu) = self.floor("single-write", &script, clients).await?;
                eprintln!("  single-write c={clients}: {}", summary(&floor));
                results.single_write.push(FloorPoint {
                    clients,
                    floor,
                    cpu,
                });
            }
        }
        if self.plan.scenarios.contains(&Scenario::FollowUps) {
            db::drain(&self.pool, DRAIN_LIMIT).await?;
            eprintln!("maitre-bench: follow-ups");
            let run = self.take_run();
            let settings = follow_ups::Settings {
                bookings: self.plan.followups,
                plan_samples: self.plan.plan_samples,
            };
            let result =
                follow_ups::run(&self.endpoints, &self.pool, &self.probe, settings, run).await?;
            stack.memory.ensure_running()?;
            stack.booking.ensure_running()?;
            eprintln!(
                "  {:.0} delivered/s, plan start p50 {:.1} ms",
                result.throughput.delivered_per_second, result.plan_start.from_created_ms.p50_ms
            );
            results.follow_ups = Some(result);
        }
        Ok(())
    }

    fn take_run(&mut self) -> u64 {
        self.next_run += 1;
        self.next_run
    }

    async fn clients(&mut self, scenario: Scenario, count: usize) -> Result<Vec<Client>> {
        let run = self.take_run();
        let e = &self.endpoints;
        let made = futures::future::try_join_all((0..count).map(|i| async move {
            Ok::<_, anyhow::Error>(match scenario {
                Scenario::StoreMessage => Client::Store(StoreClient::new(e, run, i).await?),
                Scenario::CreateBooking => Client::Book(BookClient::new(e, run, i).await?),
                _ => Client::Journey(JourneyClient::new(e, run, i).await?),
            })
        }))
        .await?;
        Ok(made)
    }

    async fn point(
        &mut self,
        stack: &mut Stack,
        scenario: Scenario,
        clients: usize,
        script: &str,
    ) -> Result<Point> {
        db::checkpoint(&self.pool).await?;
        let load_clients = self.clients(scenario, clients).await?;
        let before = self.probe.snapshot()?;
        let service = load::closed_loop(load_clients, self.plan.warmup, self.plan.duration).await?;
        let after = self.probe.snapshot()?;
        stack.memory.ensure_running()?;
        stack.booking.ensure_running()?;
        let service_cpu = self.probe.between(&before, &after);
        let backlog_after_run = db::queue_backlog(&self.pool).await?;
        let (drained, _) = db::drain(&self.pool, DRAIN_LIMIT).await?;
        let (memory_peak, memory_now) = procfs::memory_kib(stack.memory.pid)?;
        let (booking_peak, booking_now) = procfs::memory_kib(stack.booking.pid)?;
        eprintln!(
            "  {} c={clients}: service {}",
            scenario.name(),
            summary(&service)
        );

        let floor = match self.plan.floor {
            true => {
                let (m, cpu) = self.floor(scenario.name(), script, clients).await?;
                eprintln!("  {} c={clients}: floor   {}", scenario.name(), summary(&m));
                Some((m, cpu))
            }
            false => None,
        };
        Ok(Point {
            clients,
            ratio: floor.as_ref().and_then(|(m, _)| Ratio::of(&service, m)),
            per_1k: PerThousand::new(&service, &service_cpu, floor.as_ref().map(|(m, c)| (m, c))),
            service,
            service_cpu,
            floor_cpu: floor.as_ref().map(|f| f.1),
            floor: floor.map(|f| f.0),
            rss: Rss {
                memory_service_peak_mib: mib(memory_peak),
                booking_service_peak_mib: mib(booking_peak),
                memory_service_now_mib: mib(memory_now),
                booking_service_now_mib: mib(booking_now),
            },
            backlog_after_run,
            drain_seconds: drained.as_secs_f64(),
        })
    }

    async fn floor(
        &mut self,
        name: &str,
        script: &str,
        clients: usize,
    ) -> Result<(Measurement, procfs::CpuUse)> {
        let run = self.take_run();
        if name != "single-write" && name != "store-message" {
            db::floor_slots(&self.pool, run, clients).await?;
        }
        db::checkpoint(&self.pool).await?;
        let before = self.probe.snapshot()?;
        let measurement = self
            .pgbench
            .run(&FloorRun {
                name,
                script,
                clients,
                warmup: self.plan.warmup,
                duration: self.plan.duration,
                run,
            })
            .await?;
        let after = self.probe.snapshot()?;
        db::clear_floor_jobs(&self.pool).await?;
        Ok((measurement, self.probe.between(&before, &after)))
    }
}

fn summary(m: &Measurement) -> String {
    format!(
        "{:.0}/s p50 {:.2} p99 {:.2} max {:.1} ms, {} errors",
        m.per_second,
        m.latency.p50_ms,
        m.latency.p99_ms,
        m.latency.max_ms,
        m.error_count()
    )
}

fn count_errors(r: &Results) -> u64 {
    let points = r.scenarios.iter().flat_map(|s| &s.points);
    let closed: u64 = points
        .map(|p| p.service.error_count() + p.floor.as_ref().map_or(0, Measurement::error_count))
        .sum();
    let single: u64 = r.single_write.iter().map(|p| p.floor.error_count()).sum();
    let follow_ups = r.follow_ups.as_ref().map_or(0, |f| {
        let n = |e: &crate::stats::Errors| e.values().map(|t| t.count).sum::<u64>();
        n(&f.plan_start.errors) + n(&f.throughput.errors)
    });
    closed + single + follow_ups
}

async fn describe(pool: &PgPool, pgbench: Option<String>) -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let value = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let mem_kib: f64 = value(&meminfo, "MemTotal")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: value(&cpuinfo, "model name"),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        postgres: db::server_info(pool).await?,
        pgbench,
    })
}

async fn write_outputs(plan: &Plan, results: &Results) -> Result<()> {
    let table = report::table::render(results);
    println!("{table}");
    let json = serde_json::to_string_pretty(results)?;
    let svg = report::svg::render(results);
    write(&plan.out.join("results.json"), &json).await?;
    write(&plan.out.join("chart.svg"), &svg).await?;
    write(&plan.out.join("report.txt"), &table).await?;
    eprintln!(
        "maitre-bench: wrote {0}/results.json, {0}/chart.svg, {0}/report.txt",
        plan.out.display()
    );
    if plan.record {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        tokio::fs::create_dir_all(&dir).await?;
        write(&dir.join("results.json"), &json).await?;
        write(&dir.join("chart.svg"), &svg).await?;
        write(&dir.join("report.txt"), &table).await?;
        eprintln!("maitre-bench: recorded to {}", dir.display());
    }
    Ok(())
}

async fn write(path: &Path, text: &str) -> Result<()> {
    tokio::fs::write(path, text)
        .await
        .with_context(|| format!("writing {}", path.display()))
}
