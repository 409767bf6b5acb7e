//! One client calling GetContext back to back on a running memory-service
//! for a few seconds: its latency (p50, p90) and the CPU that memory-service
//! and every PostgreSQL process spent per call; then as long of
//! `grpc.health.v1.Health/Check` (no database): the gRPC round trip alone. `bench/ab-one-client.sh`
//! alternates it between two builds; the full bench is `maitre-bench`.
//!
//! Usage: one_client <grpc-url> <conversation-id> <memory-service-pid> [seconds]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// CPU ticks (user + system) of `pid` and of every process named `postgres`.
fn ticks(pid: i32) -> Result<u64> {
    let mut total = 0;
    for process in procfs::process::all_processes()?.flatten() {
        let Ok(stat) = process.stat() else { continue };
        if stat.pid == pid || stat.comm == "postgres" {
            total += stat.utime + stat.stime;
        }
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, conversation, pid, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: one_client <grpc-url> <conversation-id> <memory-service-pid> [seconds]"
        );
    };
    let pid: i32 = pid.parse().context("pid")?;
    let seconds: u64 = rest.first().map_or(Ok(5), |s| s.parse())?;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .connect()
        .await?;
    let mut client = MemoryServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let request = memory::GetContextRequest {
        conversation_id: conversation.clone(),
        token_budget: 1000,
        ..Default::default()
    };
    // Warm-up: connections opened, statement prepared.
    for _ in 0..200 {
        client.get_context(request.clone()).await?;
    }
    let before = ticks(pid)?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let call = Instant::now();
        client.get_context(request.clone()).await?;
        latencies.push(call.elapsed());
    }
    let cpu = (ticks(pid)? - before) as f64 / procfs::ticks_per_second() as f64;
    let calls = latencies.len();
    let context = percentiles(latencies);

    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let call = Instant::now();
        health.check(HealthCheckRequest::default()).await?;
        latencies.push(call.elapsed());
    }
    let transport = percentiles(latencies);
    println!(
        "calls {calls:>6}  p50 {:.3} ms  p90 {:.3} ms  cpu (memory-service + postgres) {:.3} ms/call  \
         | Health/Check p50 {:.3} ms  p90 {:.3} ms",
        context.0,
        context.1,
        cpu * 1e3 / calls as f64,
        transport.0,
        transport.1
    );
    Ok(())
}

/// Median and p90 in ms.
fn percentiles(mut latencies: Vec<Duration>) -> (f64, f64) {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().saturating_sub(1)) as f64 * q) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.9))
}
