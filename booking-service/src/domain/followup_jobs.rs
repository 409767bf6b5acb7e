//! The follow-up jobs as they sit in apalis's queue: the queue names and the
//! JSON payloads. A leaf that the store (which enqueues), the jobs (which
//! run them) and the metrics (which label by queue) all read, so none of
//! them has to import another.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Queue of plan jobs (explicit, never apalis's default type name).
pub const PLAN_QUEUE: &str = "maitre.followup.plan";
/// Queue of deliver jobs.
pub const DELIVER_QUEUE: &str = "maitre.followup.deliver";

fn first_attempt() -> u32 {
    1
}

/// Plan the follow-up of one booking. Payload changes must stay readable by
/// older rows: a payload apalis cannot decode stops the worker (the poison
/// guard then dead-letters the row, `jobs::poison`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFollowUp {
    pub booking_id: Uuid,
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// W3C `traceparent` of the CreateBooking call, so the trace goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

/// Deliver one planned follow-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliverFollowUp {
    pub follow_up_id: Uuid,
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// W3C `traceparent` of the planning run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_payload_without_attempt_reads_as_the_first_attempt() {
        let job: PlanFollowUp =
            serde_json::from_str(r#"{"booking_id":"00000000-0000-0000-0000-000000000001"}"#)
                .expect("old payload");
        assert_eq!(job.attempt, 1);
        assert_eq!(job.trace_parent, None);
    }
}
