//! maitre-bench: a load generator for maitre's two services, measured
//! against a floor of pgbench running the same SQL.
//!
//! Layout:
//! - [`cli`]: flags and their quick/full defaults;
//! - [`run`]: one run end to end (database, services, scenarios, report);
//! - [`services`]: both services as child processes (maitre-runtime's
//!   `testkit::process`: spawn, health, SIGTERM);
//! - [`scenarios`]: what the load clients do, one module per scenario;
//! - [`load`]: the closed-loop driver (warm-up, duration, errors by code);
//! - [`floor`]: pgbench scripts from the services' own SQL ([`sql`]), runs
//!   and per-transaction logs;
//! - [`resources`]: CPU seconds, run-queue waits and peak RSS from /proc;
//! - [`stats`]: HDR histograms and percentiles, shared by service and floor;
//! - [`report`]: JSON model, targets, terminal table, SVG chart.
#![forbid(unsafe_code)]

mod cli;
mod db;
mod floor;
mod load;
mod pg_cost;
mod report;
mod resources;
mod run;
mod scenarios;
mod services;
mod sql;
mod stats;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let plan = match cli::Cli::parse().plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("maitre-bench: {e:#}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("maitre-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(plan)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("maitre-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
