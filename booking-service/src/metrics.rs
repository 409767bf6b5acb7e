//! Follow-up pipeline measurements. Recorded as tracing events for now;
//! `/metrics` (Prometheus) exports them once the admin server lands.

use std::time::Duration;

/// Time from a booking's commit to the start of its plan job.
pub fn plan_start_delay(waited: Duration) {
    tracing::debug!(
        waited_ms = waited.as_secs_f64() * 1000.0,
        "plan job started"
    );
}

/// A delivery attempt's outcome: sent, retried or failed.
pub fn follow_up_outcome(outcome: &'static str) {
    tracing::debug!(outcome, "delivery outcome");
}
