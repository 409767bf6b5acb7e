//! Latency histograms and what one measured run reports. Service runs and
//! pgbench runs go through the same histogram type and the same
//! percentile code, so their numbers compare like for like.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded, in microseconds (longer ones are clamped and
/// still show up as the max).
const MAX_MICROS: u64 = 120_000_000;

/// A histogram of latencies in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant bounds are valid")
}

/// Records one latency, clamped into the histogram's range.
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
    histogram.saturating_record(micros.clamp(1, MAX_MICROS));
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            samples: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// How often one kind of error happened, with one example message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorTally {
    pub count: u64,
    pub example: String,
}

/// Errors by kind: a gRPC status code name, or what pgbench reported.
pub type Errors = BTreeMap<String, ErrorTally>;

pub fn count_error(errors: &mut Errors, kind: impl Into<String>, message: impl Into<String>) {
    let tally = errors.entry(kind.into()).or_default();
    if tally.count == 0 {
        tally.example = message.into();
    }
    tally.count += 1;
}

pub fn merge_errors(into: &mut Errors, from: Errors) {
    for (kind, tally) in from {
        let entry = into.entry(kind).or_default();
        if entry.count == 0 {
            entry.example = tally.example;
        }
        entry.count += tally.count;
    }
}

/// The raw result of one measured segment, mergeable across rounds.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Latencies of successful operations that started in the window.
    pub histogram: Histogram<u64>,
    /// Length of the measured window.
    pub window: Duration,
    /// All operations, warm-up included.
    pub total_ops: u64,
    pub errors: Errors,
}

impl Sample {
    pub fn empty() -> Self {
        Self {
            histogram: histogram(),
            window: Duration::ZERO,
            total_ops: 0,
            errors: Errors::new(),
        }
    }

    pub fn merge(&mut self, other: Sample) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.window += other.window;
        self.total_ops += other.total_ops;
        merge_errors(&mut self.errors, other.errors);
        Ok(())
    }

    pub fn measurement(self) -> Measurement {
        Measurement::new(&self.histogram, self.window, self.total_ops, self.errors)
    }
}

/// One measured run: successful operations after the warm-up, over the
/// measured window, with their latencies; every error of the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Successful operations that started inside the measured window.
    pub ops: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// `ops / seconds`.
    pub per_second: f64,
    pub latency: Latency,
    /// All operations of the run, warm-up included (what CPU is divided by).
    pub total_ops: u64,
    /// Every failed operation, warm-up included.
    pub errors: Errors,
}

impl Measurement {
    pub fn new(
        histogram: &Histogram<u64>,
        window: Duration,
        total_ops: u64,
        errors: Errors,
    ) -> Self {
        let seconds = window.as_secs_f64();
        let ops = histogram.len();
        Self {
            ops,
            seconds,
            per_second: if seconds > 0.0 {
                ops as f64 / seconds
            } else {
                0.0
            },
            latency: Latency::from_histogram(histogram),
            total_ops,
            errors,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|t| t.count).sum()
    }
}

/// Percentiles of a plain list of values (milliseconds), for the small
/// samples of the follow-up scenario.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            // Nearest rank, as HdrHistogram does.
            let rank = (q * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Self {
            samples: sorted.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            max_ms: sorted.last().copied().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = histogram();
        for ms in 1..=100 {
            record(&mut h, Duration::from_millis(ms));
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.samples, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p95_ms - 95.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn spread_uses_nearest_rank() {
        let s = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (s.samples, s.p50_ms, s.p95_ms, s.max_ms),
            (5, 3.0, 5.0, 5.0)
        );
        assert_eq!(Spread::of(&[]).samples, 0);
    }

    #[test]
    fn errors_keep_the_first_example() {
        let mut e = Errors::new();
        count_error(&mut e, "Unavailable", "first");
        count_error(&mut e, "Unavailable", "second");
        assert_eq!(e["Unavailable"].count, 2);
        assert_eq!(e["Unavailable"].example, "first");
    }
}
