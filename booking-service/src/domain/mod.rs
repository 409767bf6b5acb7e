//! Validated inputs and the rules of booking-service, free of SQL and gRPC.

pub mod backoff;
pub mod booking;
pub mod erasure;
pub mod idempotency;
pub mod redrive;
pub mod slot;
pub mod template;

/// The `trigger` of the follow-up every booking gets after its event.
pub const POST_EVENT_TRIGGER: &str = "post_event";
