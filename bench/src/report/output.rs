//! Writing a run's results (terminal table, results.json, chart.svg,
//! report.txt) and describing the machine they were measured on.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};

use super::{Machine, Results};
use crate::{cli::Plan, db, resources, stats::Measurement};

pub fn count_errors(r: &Results) -> u64 {
    let points = r.scenarios.iter().flat_map(|s| &s.points);
    let closed: u64 = points
        .map(|p| p.service.error_count() + p.floor.as_ref().map_or(0, Measurement::error_count))
        .sum();
    let single: u64 = r.single_write.iter().map(|p| p.floor.error_count()).sum();
    let follow_ups: u64 = r
        .follow_ups
        .iter()
        .chain(r.follow_ups_retained.iter().map(|h| &h.result))
        .map(|f| {
            let n = |e: &crate::stats::Errors| e.values().map(|t| t.count).sum::<u64>();
            n(&f.plan_start.errors) + n(&f.throughput.errors)
        })
        .sum();
    closed + single + follow_ups
}

/// The machine, before anything of the bench runs (PostgreSQL's settings
/// are filled in once connected).
pub async fn describe_machine(pgbench: Option<String>) -> Result<Machine> {
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
        background_busy_pct: background_busy().await?,
        postgres: db::ServerInfo::default(),
        pgbench,
    })
}

/// How busy the machine is with nothing of ours running, over 2 s.
async fn background_busy() -> Result<f64> {
    let (busy0, total0) = resources::machine_ticks()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (busy1, total1) = resources::machine_ticks()?;
    Ok(if total1 > total0 {
        100.0 * busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64
    } else {
        0.0
    })
}

pub async fn write_outputs(plan: &Plan, results: &Results) -> Result<()> {
    let table = super::table::render(results);
    println!("{table}");
    let json = serde_json::to_string_pretty(results)?;
    let svg = super::chart::render(results)?;
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
