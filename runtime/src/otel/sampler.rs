//! The sampling decision, made once per trace hop on our own trace context
//! (`rpc::context::TraceParent`), so the flag we propagate downstream and
//! what we export always agree. The names and the ratio rule are the
//! OpenTelemetry SDK's (`OTEL_TRACES_SAMPLER`, `TraceIdRatioBased`), so a
//! trace sampled by another SDK at the same ratio is sampled here too.

/// `OTEL_TRACES_SAMPLER`'s values we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplerName {
    /// Every trace.
    #[value(name = "always_on")]
    AlwaysOn,
    /// No trace.
    #[value(name = "always_off")]
    AlwaysOff,
    /// A share of traces (OTEL_TRACES_SAMPLER_ARG), by trace id, whatever the caller decided.
    #[value(name = "traceidratio")]
    TraceIdRatio,
    /// Follow the caller's sampled flag; new traces: every one.
    #[default]
    #[value(name = "parentbased_always_on")]
    ParentBasedAlwaysOn,
    /// Follow the caller's sampled flag; new traces: none.
    #[value(name = "parentbased_always_off")]
    ParentBasedAlwaysOff,
    /// Follow the caller's sampled flag; new traces: a share (OTEL_TRACES_SAMPLER_ARG).
    #[value(name = "parentbased_traceidratio")]
    ParentBasedTraceIdRatio,
}

/// How a trace that starts here is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Always,
    Never,
    /// Sampled when the trace id's low 63 bits fall below this bound.
    Below(u64),
}

/// A sampler: cheap to copy, no allocation per decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampler {
    /// Whether a caller's sampled flag is followed.
    parent_based: bool,
    root: Root,
}

impl Default for Sampler {
    /// `parentbased_always_on`, the OpenTelemetry default and what
    /// maitre did before sampling was configurable.
    fn default() -> Self {
        Self {
            parent_based: true,
            root: Root::Always,
        }
    }
}

impl Sampler {
    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (a ratio in
    /// [0, 1], default 1.0; ignored by the samplers without a ratio).
    pub fn new(name: SamplerName, arg: Option<f64>) -> Result<Self, String> {
        let ratio = arg.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&ratio) {
            return Err(format!(
                "OTEL_TRACES_SAMPLER_ARG {ratio} is not a ratio between 0 and 1"
            ));
        }
        // The SDK's TraceIdRatioBased bound: ratio × 2^63, compared with the
        // trace id's low 8 bytes shifted right once.
        let below = Root::Below((ratio * (1u64 << 63) as f64) as u64);
        let (parent_based, root) = match name {
            SamplerName::AlwaysOn => (false, Root::Always),
            SamplerName::AlwaysOff => (false, Root::Never),
            SamplerName::TraceIdRatio => (false, below),
            SamplerName::ParentBasedAlwaysOn => (true, Root::Always),
            SamplerName::ParentBasedAlwaysOff => (true, Root::Never),
            SamplerName::ParentBasedTraceIdRatio => (true, below),
        };
        Ok(Self { parent_based, root })
    }

    /// The decision for a trace that starts here (`trace_id`: 32 hex digits).
    pub fn root(&self, trace_id: &str) -> bool {
        match self.root {
            Root::Always => true,
            Root::Never => false,
            Root::Below(bound) => {
                let low = trace_id
                    .get(16..32)
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .unwrap_or(u64::MAX);
                (low >> 1) < bound
            }
        }
    }

    /// The decision for a hop whose caller sent `parent_sampled`.
    pub fn child(&self, trace_id: &str, parent_sampled: bool) -> bool {
        if self.parent_based {
            parent_sampled
        } else {
            self.root(trace_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: &str = "4bf92f3577b34da60000000000000001";
    const HIGH: &str = "4bf92f3577b34da6ffffffffffffffff";

    #[test]
    fn ratio_decides_by_the_trace_ids_low_bits() {
        let half = Sampler::new(SamplerName::TraceIdRatio, Some(0.5)).unwrap();
        assert!(half.root(LOW));
        assert!(!half.root(HIGH));
        let none = Sampler::new(SamplerName::TraceIdRatio, Some(0.0)).unwrap();
        assert!(!none.root(LOW));
        let all = Sampler::new(SamplerName::TraceIdRatio, Some(1.0)).unwrap();
        assert!(all.root(LOW));
        assert!(Sampler::new(SamplerName::TraceIdRatio, Some(1.5)).is_err());
    }

    #[test]
    fn parent_based_samplers_follow_the_caller() {
        let sampler = Sampler::new(SamplerName::ParentBasedTraceIdRatio, Some(0.5)).unwrap();
        assert!(sampler.child(HIGH, true));
        assert!(!sampler.child(LOW, false));
        let off = Sampler::new(SamplerName::ParentBasedAlwaysOff, None).unwrap();
        assert!(!off.root(LOW));
        assert!(off.child(LOW, true));
        // Not parent based: the caller's flag is overruled.
        let always = Sampler::new(SamplerName::AlwaysOff, None).unwrap();
        assert!(!always.child(LOW, true));
    }
}
