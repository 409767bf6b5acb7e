//! memory-service and booking-service together, in-process, on one fresh
//! database: real gRPC over loopback, real PostgreSQL, the real apalis queue.

mod stack;

mod bad_input;
mod booking_rules;
mod bookings;
mod coalesced;
mod erasure;
mod follow_ups;
mod garbage;
mod holds;
mod idempotency;
mod memory_tls;
mod moves_and_payments;
mod operations;
mod overbooking;
mod pipeline;
mod pooler;
mod queue_cost;
mod reminders;
mod resilience;
mod wakeups;
