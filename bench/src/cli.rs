//! Command line: what to run, for how long, and where to write.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

use crate::scenarios::Scenario;

/// maitre-bench: drives memory-service and booking-service (release builds,
/// started here as child processes on a fresh database) over gRPC, runs the
/// same SQL through pgbench as the floor, and reports throughput, latency
/// percentiles, service/floor ratios, CPU per 1,000 calls and peak RSS as a
/// table, results.json and chart.svg.
#[derive(Debug, Parser)]
#[command(name = "maitre-bench", version)]
pub struct Cli {
    /// A short run for smoke tests (under a minute): clients 1,16, 0.5 s
    /// warm-up + 1.5 s per run, 200 follow-ups, 20 plan-start samples,
    /// GetContext on the 100,000-message conversation only.
    #[arg(long)]
    pub quick: bool,

    /// Scenarios to run, comma-separated [default: all of them; quick: all
    /// but get-context-10 and get-context-1k, which differ from
    /// get-context-100k only by the conversation's length].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Option<Vec<Scenario>>,

    /// Client counts of the concurrency sweep [default: 1,4,16,64; quick: 1,16].
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,

    /// Measured time of each run [default: 10s; quick: 1.5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Unmeasured warm-up before each run [default: 2s; quick: 0.5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,

    /// Service and floor alternate this many times per client count (each
    /// for duration / rounds after its own warm-up), so that both see the
    /// same background load; the rounds are merged [default: 2; quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,

    /// Bookings of the follow-up throughput test [default: 2000; quick: 200].
    #[arg(long)]
    pub followups: Option<usize>,

    /// Single bookings timed for the plan-start latency [default: 50; quick: 20].
    #[arg(long)]
    pub plan_samples: Option<usize>,

    /// Finished jobs to leave in the queue table, locked by the running
    /// workers, for a second follow-up throughput test (the cost of fetch
    /// and ack must not grow with retained history); 0 skips it
    /// [default: 1000000; quick: 10000].
    #[arg(long)]
    pub retained_jobs: Option<u64>,

    /// Output directory (results.json, chart.svg, report.txt, pgbench
    /// scripts and logs, service logs).
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,

    /// Admin URL of the PostgreSQL server; the bench drops and recreates
    /// its own database there (see --database).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,

    /// Name of the bench's database (dropped and recreated).
    #[arg(long, default_value = "maitre_bench")]
    pub database: String,

    /// Directory of the service binaries [default: $CARGO_TARGET_DIR/release, else target/release].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,

    /// Skip pgbench (no floor, no ratios).
    #[arg(long)]
    pub no_floor: bool,

    /// Also copy results.json and chart.svg to bench/results/ (what
    /// BENCHMARKS.md shows).
    #[arg(long)]
    pub record: bool,

    /// Run the closed-loop scenarios with booking-service's follow-up
    /// workers off (BOOKING_DISABLE_WORKERS), to see the hot path alone;
    /// the follow-ups scenario always runs them.
    #[arg(long)]
    pub workers_off: bool,

    /// Exit 0 even when calls failed (by default any error exits 2).
    #[arg(long)]
    pub allow_errors: bool,

    /// host:port of a transaction-mode pooler (PgBouncer) in front of the
    /// same server: the services reach the database through it
    /// (DB_POOLER=transaction, DATABASE_DIRECT_URL straight to the server
    /// for migrations and LISTEN); the bench's own connections and pgbench
    /// stay direct. scripts/pooler-check.sh uses it.
    #[arg(long)]
    pub pooler: Option<String>,

    /// Open this many WatchMessages streams on memory-service during every
    /// run, each reading its opening heartbeat and then nothing (stalled
    /// change-feed consumers): writers must not notice them.
    #[arg(long, default_value_t = 0)]
    pub stalled_watchers: usize,
}

/// The run, every default resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub scenarios: Vec<Scenario>,
    pub clients: Vec<usize>,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub followups: usize,
    pub plan_samples: usize,
    pub retained_jobs: u64,
    pub out: PathBuf,
    pub admin_url: String,
    pub database: String,
    pub bin_dir: PathBuf,
    pub floor: bool,
    pub record: bool,
    pub workers_during_load: bool,
    pub allow_errors: bool,
    /// host:port of the pooler the services go through, if any.
    pub pooler: Option<String>,
    /// WatchMessages streams held open, unread, during every run.
    pub stalled_watchers: usize,
}

impl Cli {
    pub fn plan(self) -> Result<Plan> {
        let quick = self.quick;
        let pick = |given: Option<Duration>, full: f64, short: f64| {
            given.unwrap_or(Duration::from_secs_f64(if quick { short } else { full }))
        };
        let clients = self.clients.unwrap_or(if quick {
            vec![1, 16]
        } else {
            vec![1, 4, 16, 64]
        });
        if clients.is_empty() || clients.contains(&0) {
            bail!("--clients: give positive client counts, e.g. 1,4,16,64");
        }
        let duration = pick(self.duration, 10.0, 1.5);
        if duration.is_zero() {
            bail!("--duration must be more than zero");
        }
        let mut scenarios = self.scenarios.unwrap_or_else(|| {
            Scenario::value_variants()
                .iter()
                .copied()
                .filter(|s| {
                    !(quick && matches!(s, Scenario::GetContext10 | Scenario::GetContext1k))
                })
                .collect()
        });
        scenarios.sort();
        scenarios.dedup();
        let bin_dir = self.bin_dir.unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target"))
                .join("release")
        });
        Ok(Plan {
            quick,
            scenarios,
            clients,
            duration,
            warmup: pick(self.warmup, 2.0, 0.5),
            rounds: self.rounds.unwrap_or(if quick { 1 } else { 2 }).max(1),
            followups: self
                .followups
                .unwrap_or(if quick { 200 } else { 2000 })
                .max(1),
            plan_samples: self.plan_samples.unwrap_or(if quick { 20 } else { 50 }),
            retained_jobs: self
                .retained_jobs
                .unwrap_or(if quick { 10_000 } else { 1_000_000 }),
            out: self.out,
            admin_url: self.database_url,
            database: self.database,
            bin_dir,
            floor: !self.no_floor,
            record: self.record,
            workers_during_load: !self.workers_off,
            allow_errors: self.allow_errors,
            pooler: self.pooler,
            stalled_watchers: self.stalled_watchers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_full_defaults() {
        let full = Cli::parse_from(["maitre-bench"]).plan().unwrap();
        assert_eq!(full.clients, [1, 4, 16, 64]);
        assert_eq!(full.duration, Duration::from_secs(10));
        assert_eq!(full.scenarios.len(), 7);
        let quick = Cli::parse_from(["maitre-bench", "--quick", "--clients", "2,8"])
            .plan()
            .unwrap();
        assert_eq!(quick.clients, [2, 8]);
        assert_eq!(
            quick.scenarios,
            [
                Scenario::StoreMessage,
                Scenario::CreateBooking,
                Scenario::Journey,
                Scenario::GetContext100k,
                Scenario::FollowUps
            ]
        );
        assert_eq!(quick.warmup, Duration::from_millis(500));
        let some = Cli::parse_from(["maitre-bench", "--scenarios", "journey,store-message"])
            .plan()
            .unwrap();
        assert_eq!(some.scenarios, [Scenario::StoreMessage, Scenario::Journey]);
        let lengths = Cli::parse_from([
            "maitre-bench",
            "--quick",
            "--scenarios",
            "get-context-100k,get-context-10,get-context-1k",
        ])
        .plan()
        .unwrap();
        assert_eq!(
            lengths.scenarios,
            [
                Scenario::GetContext10,
                Scenario::GetContext1k,
                Scenario::GetContext100k
            ]
        );
        assert!(
            Cli::parse_from(["maitre-bench", "--clients", "0"])
                .plan()
                .is_err()
        );
    }
}
