//! The closed-loop load driver: N clients, each doing one operation after
//! another as fast as the service answers, for warm-up + duration.
//! Operations that start during the warm-up are not measured; every error
//! is counted, warm-up included.

use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::{
    scenarios::Client,
    stats::{self, Errors, Sample},
};

/// What one client task brings back.
struct ClientTally {
    histogram: Histogram<u64>,
    total: u64,
    errors: Errors,
}

/// The gRPC status code's name, the key errors are counted under.
pub fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

pub async fn closed_loop(
    clients: Vec<Client>,
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let warm_end = Instant::now() + warmup;
    let end = warm_end + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(drive(client, warm_end, end)))
        .collect();
    let mut histogram = stats::histogram();
    let mut total = 0;
    let mut errors = Errors::new();
    for task in tasks {
        let tally = task.await.context("a load client panicked")?;
        histogram
            .add(&tally.histogram)
            .context("merging histograms")?;
        total += tally.total;
        stats::merge_errors(&mut errors, tally.errors);
    }
    Ok(Sample {
        histogram,
        window: duration,
        total_ops: total,
        errors,
    })
}

async fn drive(mut client: Client, warm_end: Instant, end: Instant) -> ClientTally {
    let mut tally = ClientTally {
        histogram: stats::histogram(),
        total: 0,
        errors: Errors::new(),
    };
    while Instant::now() < end {
        // Unmeasured upkeep (a new slot when this one is full).
        if let Err(status) = client.prepare().await {
            stats::count_error(
                &mut tally.errors,
                format!("setup {}", code_name(&status)),
                status.message(),
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let started = Instant::now();
        if started >= end {
            break;
        }
        let result = client.op().await;
        let latency = started.elapsed();
        tally.total += 1;
        match result {
            Ok(()) if started >= warm_end => stats::record(&mut tally.histogram, latency),
            Ok(()) => {}
            Err(status) => {
                stats::count_error(&mut tally.errors, code_name(&status), status.message())
            }
        }
    }
    tally
}
