//! One bench run from start to finish: fresh database, migrations, both
//! services started, every scenario (service run, then its floor, at each
//! client count), the single-write reference, the follow-up pipeline, then
//! the services stopped and the report written.

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;

use crate::{
    cli::Plan,
    db,
    floor::{FloorRun, Pgbench, scripts},
    load, pg_cost,
    report::{
        self, FloorPoint, Machine, PerThousand, Point, Ratio, Results, RetainedHistory, Rss,
        RunSettings, ScenarioResult, ServicePeak, output,
    },
    resources::{self, CpuUse, Probe},
    scenarios::{
        Client, Endpoints, Scenario, create_booking::BookClient, follow_ups, get_context,
        journey::JourneyClient, stalled_watchers::StalledWatchers, store_message::StoreClient,
    },
    services::{Launch, Stack},
    stats::{Measurement, Sample},
};

/// Longest wait for the follow-up workers to catch up after a run.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Exit code when any operation failed (and --allow-errors is not given).
pub const EXIT_ERRORS: u8 = 2;

/// What the scenarios share.
struct Bench<'a> {
    plan: &'a Plan,
    pool: PgPool,
    launch: Launch,
    /// The running services' pids (updated at every start).
    probe: Probe,
    /// Where the running services listen (updated at every start).
    endpoints: Endpoints,
    pgbench: Pgbench,
    /// Distinguishes the customers, conversations and slots of each run.
    next_run: u64,
    /// Highest VmHWM of memory-service and booking-service over all their
    /// processes, KiB.
    peaks_kib: [u64; 2],
    /// The services, while they run.
    stack: Option<Stack>,
    /// pg_stat_statements can be read (per-statement costs).
    pg_stats: bool,
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
    let machine = output::describe_machine(pgbench_version).await?;
    eprintln!("maitre-bench: fresh database {}", plan.database);
    db::recreate(&plan.admin_url, &plan.database).await?;
    let database_url = maitre_runtime::testkit::with_database(&plan.admin_url, &plan.database);
    let launch = Launch {
        bin_dir: plan.bin_dir.clone(),
        database_url: database_url.clone(),
        log_dir: logs,
        pooler: plan.pooler.clone(),
    };
    launch.migrate("memory-service")?;
    launch.migrate("booking-service")?;
    let pool = db::connect(&database_url).await?;
    db::setup(&pool).await?;
    let pg_stats = pg_cost::enable(&pool).await;
    let machine = Machine {
        postgres: db::server_info(&pool).await?,
        ..machine
    };
    let pgbench = Pgbench {
        database_url,
        dir: plan.out.join("pgbench"),
    };
    tokio::fs::create_dir_all(&pgbench.dir).await?;
    let mut bench = Bench {
        plan: &plan,
        probe: Probe {
            memory_pid: 0,
            booking_pid: 0,
            postmaster: db::postmaster_pid(&pool).await,
            ticks_per_second: resources::clock_ticks(),
        },
        endpoints: Endpoints {
            memory: String::new(),
            booking: String::new(),
        },
        launch,
        pgbench,
        pool,
        next_run: 1,
        peaks_kib: [0, 0],
        stack: None,
        pg_stats,
    };
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
            rounds: plan.rounds,
            service_settings: vec![
                "defaults, plus BOOKING_FOLLOWUP_DELAY=0s BOOKING_WORKER_POLL_INTERVAL=100ms RUST_LOG=warn".into(),
                format!(
                    "booking-service follow-up workers {} during the closed-loop scenarios (always on for follow-ups)",
                    if plan.workers_during_load { "ON" } else { "OFF" }
                ),
                "services restarted for every round and stopped while pgbench runs (PostgreSQL's connection limit)".into(),
            ],
        },
        scenarios: Vec::new(),
        single_write: Vec::new(),
        follow_ups: None,
        follow_ups_retained: None,
        services: Vec::new(),
        targets: Vec::new(),
        errors: 0,
    };
    let outcome = bench.all(&mut results).await;
    let stopped = bench.stop().await;
    outcome?;
    stopped?;
    results.services = vec![
        ServicePeak {
            name: "memory-service".into(),
            peak_rss_mib: mib(bench.peaks_kib[0]),
        },
        ServicePeak {
            name: "booking-service".into(),
            peak_rss_mib: mib(bench.peaks_kib[1]),
        },
    ];
    results.targets = report::targets(&results);
    results.errors = output::count_errors(&results);
    output::write_outputs(&plan, &results).await?;
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

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Bench<'_> {
    /// Starts the services and points the probe and the clients at them.
    async fn start(&mut self, workers: bool) -> Result<()> {
        let stack = self.launch.start(workers).await?;
        self.probe.memory_pid = stack.memory.pid();
        self.probe.booking_pid = stack.booking.pid();
        self.endpoints = Endpoints {
            memory: stack.memory.url(),
            booking: stack.booking.url(),
        };
        self.stack = Some(stack);
        Ok(())
    }

    /// Notes the services' peak RSS, then stops them (SIGTERM).
    async fn stop(&mut self) -> Result<()> {
        let Some(stack) = self.stack.take() else {
            return Ok(());
        };
        for (i, pid) in [stack.memory.pid(), stack.booking.pid()]
            .into_iter()
            .enumerate()
        {
            if let Ok((peak, _)) = resources::memory_kib(pid) {
                self.peaks_kib[i] = self.peaks_kib[i].max(peak);
            }
        }
        self.probe.memory_pid = 0;
        self.probe.booking_pid = 0;
        stack.stop().await
    }

    /// Fails if a service died; returns their current (peak, now) RSS in KiB.
    fn check_services(&mut self) -> Result<[(u64, u64); 2]> {
        let stack = self
            .stack
            .as_mut()
            .context("the services are not running")?;
        stack.memory.ensure_running()?;
        stack.booking.ensure_running()?;
        Ok([
            resources::memory_kib(stack.memory.pid())?,
            resources::memory_kib(stack.booking.pid())?,
        ])
    }

    async fn all(&mut self, results: &mut Results) -> Result<()> {
        let closed_loop: Vec<Scenario> = self
            .plan
            .scenarios
            .iter()
            .copied()
            .filter(|s| *s != Scenario::FollowUps)
            .collect();
        // Every script first: a statement the floor cannot mirror stops the
        // run before anything is measured.
        let mut floor_scripts = Vec::new();
        for &scenario in &closed_loop {
            floor_scripts.push(match scenario {
                Scenario::StoreMessage => scripts::store_message_script()?,
                Scenario::CreateBooking => scripts::create_booking_script()?,
                Scenario::Journey => scripts::journey_script()?,
                s => {
                    let length = s.context_length().context("not a closed-loop scenario")?;
                    scripts::get_context_script(get_context::conversation_id(length))?
                }
            });
        }
        for (&scenario, script) in closed_loop.iter().zip(floor_scripts) {
            if let Some(length) = scenario.context_length() {
                let seconds = get_context::set_up(&self.pool, length).await?;
                eprintln!(
                    "maitre-bench: {}: conversation of {length} messages made in {seconds:.1} s",
                    scenario.name()
                );
            }
            let mut points = Vec::new();
            for &clients in &self.plan.clients {
                points.push(self.point(scenario, clients, &script).await?);
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
                let (sample, cpu) = self
                    .floor("single-write", &script, clients, 0, self.plan.duration)
                    .await?;
                let floor = sample.measurement();
                eprintln!("  single-write c={clients}: {}", summary(&floor));
                results.single_write.push(FloorPoint {
                    clients,
                    floor,
                    cpu,
                });
            }
        }
        if self.plan.scenarios.contains(&Scenario::FollowUps) {
            eprintln!("maitre-bench: follow-ups");
            self.start(true).await?;
            let run = self.take_run();
            let settings = follow_ups::Settings {
                bookings: self.plan.followups,
                plan_samples: self.plan.plan_samples,
                pg_stats: self.pg_stats,
            };
            let result =
                follow_ups::run(&self.endpoints, &self.pool, &self.probe, settings, run).await?;
            self.check_services()?;
            self.stop().await?;
            eprintln!(
                "  {:.0} delivered/s, plan start p50 {:.1} ms",
                result.throughput.delivered_per_second, result.plan_start.from_due_ms.p50_ms
            );
            results.follow_ups = Some(result);
            if self.plan.retained_jobs > 0 {
                self.start(true).await?;
                let jobs = self.plan.retained_jobs;
                let workers = db::retain_finished_jobs(&self.pool, jobs).await?;
                eprintln!(
                    "maitre-bench: follow-ups again, {jobs} finished jobs retained by {workers} workers"
                );
                let run = self.take_run();
                let result = follow_ups::run(
                    &self.endpoints,
                    &self.pool,
                    &self.probe,
                    follow_ups::Settings {
                        plan_samples: 0,
                        ..settings
                    },
                    run,
                )
                .await?;
                self.check_services()?;
                self.stop().await?;
                eprintln!(
                    "  {:.0} delivered/s",
                    result.throughput.delivered_per_second
                );
                results.follow_ups_retained = Some(RetainedHistory { jobs, result });
            }
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
                Scenario::Journey => Client::Journey(JourneyClient::new(e, run, i).await?),
                s => {
                    let length = s.context_length().context("not a closed-loop scenario")?;
                    Client::Context(get_context::ContextClient::new(e, length).await?)
                }
            })
        }))
        .await?;
        Ok(made)
    }

    /// One client count: `rounds` alternations of a service segment and a
    /// floor segment (so that both see the same background noise), merged.
    async fn point(&mut self, scenario: Scenario, clients: usize, script: &str) -> Result<Point> {
        let rounds = self.plan.rounds;
        let segment = self.plan.duration / u32::try_from(rounds)?;
        let mut service = Sample::empty();
        let mut service_cpu = CpuUse::default();
        let mut floor = self
            .plan
            .floor
            .then(|| (Sample::empty(), CpuUse::default()));
        let (mut backlog_after_run, mut drain_seconds) = (0, 0.0);
        let mut rss = [(0, 0); 2];
        let mut statements = pg_cost::Tally::default();
        for round in 0..rounds {
            self.start(self.plan.workers_during_load).await?;
            db::checkpoint(&self.pool).await?;
            let load_clients = self.clients(scenario, clients).await?;
            let stalled =
                StalledWatchers::open(&self.endpoints, self.plan.stalled_watchers).await?;
            if self.pg_stats {
                pg_cost::reset(&self.pool).await?;
            }
            let before = self.probe.snapshot()?;
            let sample = load::closed_loop(load_clients, self.plan.warmup, segment).await?;
            let after = self.probe.snapshot()?;
            drop(stalled);
            self.check_services()?;
            service.merge(sample)?;
            service_cpu.add(&self.probe.between(&before, &after));
            backlog_after_run = backlog_after_run.max(db::queue_backlog(&self.pool).await?);
            if self.plan.workers_during_load {
                drain_seconds += db::drain(&self.pool, DRAIN_LIMIT).await?.0.as_secs_f64();
            } else {
                // Nobody will plan these; keep them out of the follow-ups scenario.
                db::discard_plan_jobs(&self.pool).await?;
            }
            if self.pg_stats {
                statements.add_reading(&self.pool).await?;
            }
            for (kept, seen) in rss.iter_mut().zip(self.check_services()?) {
                *kept = (kept.0.max(seen.0), seen.1);
            }
            self.stop().await?;
            if let Some((floor_sample, floor_cpu)) = floor.as_mut() {
                let (sample, cpu) = self
                    .floor(scenario.name(), script, clients, round, segment)
                    .await?;
                floor_sample.merge(sample)?;
                floor_cpu.add(&cpu);
            }
        }
        let [(memory_peak, memory_now), (booking_peak, booking_now)] = rss;
        let service = service.measurement();
        let floor = floor.map(|(sample, cpu)| (sample.measurement(), cpu));
        eprintln!(
            "  {} c={clients}: service {}",
            scenario.name(),
            summary(&service)
        );
        if let Some((m, _)) = &floor {
            eprintln!("  {} c={clients}: floor   {}", scenario.name(), summary(m));
        }
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
            drain_seconds,
            pg_cost: statements.cost(&scenario.own_statements()),
        })
    }

    async fn floor(
        &mut self,
        name: &str,
        script: &str,
        clients: usize,
        round: usize,
        duration: Duration,
    ) -> Result<(Sample, CpuUse)> {
        let run = self.take_run();
        // Only the booking scripts book seats.
        if matches!(name, "create-booking" | "journey") {
            db::floor_slots(&self.pool, run, clients).await?;
        }
        let room = db::wait_for_connections(&self.pool, clients, Duration::from_secs(60)).await?;
        if room <= i64::try_from(clients)? {
            eprintln!(
                "  warning: PostgreSQL has room for {room} more connections, pgbench needs {clients}"
            );
        }
        db::checkpoint(&self.pool).await?;
        let before = self.probe.snapshot()?;
        let sample = self
            .pgbench
            .run(&FloorRun {
                name,
                script,
                clients,
                warmup: self.plan.warmup,
                duration,
                run,
                round,
            })
            .await?;
        let after = self.probe.snapshot()?;
        db::clear_floor_jobs(&self.pool).await?;
        Ok((sample, self.probe.between(&before, &after)))
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
