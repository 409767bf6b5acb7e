//! The floor: pgbench running the services' own SQL on the same database,
//! over TCP with prepared statements and the same client counts.
//!
//! pgbench has no warm-up and takes whole seconds, so it runs for
//! `ceil(warm-up + duration)` with a per-transaction log (`-l`), and the
//! log is cut to the same window as a service run: transactions that
//! started between `warm-up` and `warm-up + duration` after the first one.
//! Their latencies go into the same HDR histogram as the services'.

pub mod scripts;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::stats::{self, Errors, Sample};

/// Where pgbench writes and what it connects to.
pub struct Pgbench {
    /// Connection URI of the bench database (libpq accepts it as dbname).
    pub database_url: String,
    /// Scripts, logs and pgbench's output go here.
    pub dir: PathBuf,
}

/// One pgbench run.
pub struct FloorRun<'a> {
    pub name: &'a str,
    pub script: &'a str,
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// `-D run=`: keeps this run's conversations, customers and slots apart.
    pub run: u64,
    /// Which round of the point (file names only).
    pub round: usize,
}

impl Pgbench {
    /// Checks that pgbench can be started at all.
    pub async fn check() -> Result<String> {
        let out = tokio::process::Command::new("pgbench")
            .arg("--version")
            .output()
            .await
            .context("running `pgbench --version`: pgbench must be on PATH (Debian: the postgresql package; or use --no-floor)")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub async fn run(&self, run: &FloorRun<'_>) -> Result<Sample> {
        let stem = format!("{}-c{}-r{}", run.name, run.clients, run.round);
        let script_path = self.dir.join(format!("{stem}.sql"));
        tokio::fs::write(&script_path, run.script)
            .await
            .with_context(|| format!("writing {}", script_path.display()))?;
        let log_dir = self.dir.join("logs");
        tokio::fs::create_dir_all(&log_dir).await?;
        remove_logs(&log_dir, &stem).await?;
        let seconds = (run.warmup + run.duration).as_secs_f64().ceil().max(1.0) as u64;
        let threads = run.clients.clamp(1, 2);
        let output = tokio::process::Command::new("pgbench")
            .args(["-n", "-M", "prepared"])
            .args(["-c", &run.clients.to_string(), "-j", &threads.to_string()])
            .args(["-T", &seconds.to_string()])
            .args(["-D", &format!("run={}", run.run), "-D", "n=0", "-D", "j=0"])
            .arg("-l")
            .arg(format!("--log-prefix={}", log_dir.join(&stem).display()))
            .arg("-f")
            .arg(&script_path)
            .arg(&self.database_url)
            .stdin(Stdio::null())
            .output()
            .await
            .context("starting pgbench")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        tokio::fs::write(
            self.dir.join(format!("{stem}.out")),
            format!("{stdout}\n--- stderr ---\n{stderr}"),
        )
        .await?;

        let mut errors = Errors::new();
        if !output.status.success() {
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            stats::count_error(
                &mut errors,
                format!("pgbench exit {}", output.status.code().unwrap_or(-1)),
                last.to_owned(),
            );
        }
        for line in stderr.lines().filter(|l| l.contains("aborted")) {
            stats::count_error(&mut errors, "pgbench client aborted", line.to_owned());
        }
        let mut log = String::new();
        for path in log_files(&log_dir, &stem).await? {
            log.push_str(
                &tokio::fs::read_to_string(&path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
        let window = parse_log(&log, run.warmup, run.duration);
        stats::merge_errors(&mut errors, window.errors);
        if window.total == 0 {
            stats::count_error(
                &mut errors,
                "pgbench: no transaction",
                stderr.lines().last().unwrap_or("no output").to_owned(),
            );
        }
        Ok(Sample {
            histogram: window.histogram,
            window: window.span,
            total_ops: window.total,
            errors,
        })
    }
}

async fn log_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!("{stem}.");
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            files.push(entry.path());
        }
    }
    Ok(files)
}

async fn remove_logs(dir: &Path, stem: &str) -> Result<()> {
    for path in log_files(dir, stem).await? {
        tokio::fs::remove_file(&path)
            .await
            .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// A pgbench log cut to the measured window.
pub struct Window {
    /// Latencies of transactions that started inside the window.
    pub histogram: Histogram<u64>,
    /// The window actually covered (shorter if pgbench stopped early).
    pub span: Duration,
    /// Every logged transaction, warm-up included.
    pub total: u64,
    pub errors: Errors,
}

/// Reads pgbench's per-transaction log (`client tx latency_us script
/// epoch_s epoch_us [...]`, one line per transaction, end time and latency)
/// and keeps the transactions that started in `[t0 + warmup, t0 + warmup +
/// duration)`, t0 being the first start.
pub fn parse_log(log: &str, warmup: Duration, duration: Duration) -> Window {
    let mut errors = Errors::new();
    // (start, end, latency) in microseconds since the epoch.
    let mut done: Vec<(i64, i64, u64)> = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = (|| {
            let epoch: i64 = fields.get(4)?.parse().ok()?;
            let micros: i64 = fields.get(5)?.parse().ok()?;
            Some((fields.get(2)?, epoch * 1_000_000 + micros))
        })();
        match parsed {
            Some((latency, end)) => match latency.parse::<u64>() {
                Ok(latency) => done.push((end - i64::try_from(latency).unwrap_or(0), end, latency)),
                // "failed" / "skipped" in place of the latency.
                Err(_) => stats::count_error(&mut errors, format!("pgbench {latency}"), line),
            },
            None => stats::count_error(&mut errors, "pgbench log line unreadable", line),
        }
    }
    let mut histogram = stats::histogram();
    let total = done.len() as u64 + errors.values().map(|t| t.count).sum::<u64>();
    let Some(t0) = done.iter().map(|d| d.0).min() else {
        return Window {
            histogram,
            span: Duration::ZERO,
            total,
            errors,
        };
    };
    let from = t0 + i64::try_from(warmup.as_micros()).unwrap_or(i64::MAX);
    let until = from + i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
    let last_end = done.iter().map(|d| d.1).max().unwrap_or(until);
    for &(start, _, latency) in &done {
        if (from..until).contains(&start) {
            stats::record(&mut histogram, Duration::from_micros(latency));
        }
    }
    let span = (until.min(last_end) - from).max(0);
    Window {
        histogram,
        span: Duration::from_micros(u64::try_from(span).unwrap_or(0)),
        total,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten transactions a second for 3 s, latency growing 1 ms per
    /// transaction; the window is seconds 1 to 2.
    #[test]
    fn log_is_cut_to_the_window_and_summarised() {
        let start = 1_700_000_000_i64 * 1_000_000;
        let mut log = String::new();
        for i in 0..30_i64 {
            let latency = (i + 1) * 1000;
            let end = start + i * 100_000 + latency;
            log.push_str(&format!(
                "0 {i} {latency} 0 {} {}\n",
                end / 1_000_000,
                end % 1_000_000
            ));
        }
        log.push_str("1 30 failed 0 1700000001 0\n");
        let w = parse_log(&log, Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(w.total, 31);
        assert_eq!(w.errors["pgbench failed"].count, 1);
        // Transactions 10..=19 started in the window: latencies 11..=20 ms.
        let l = crate::stats::Latency::from_histogram(&w.histogram);
        assert_eq!(l.samples, 10);
        assert!((l.p50_ms - 15.0).abs() < 0.05, "{l:?}");
        assert!((l.p99_ms - 20.0).abs() < 0.05, "{l:?}");
        assert!((l.max_ms - 20.0).abs() < 0.05, "{l:?}");
        assert_eq!(w.span, Duration::from_secs(1));
    }

    #[test]
    fn an_empty_log_is_an_empty_window() {
        let w = parse_log("", Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!((w.total, w.histogram.len()), (0, 0));
    }
}
