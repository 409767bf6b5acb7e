//! memory-service and booking-service together, in-process, on one fresh
//! database: real gRPC over loopback, real PostgreSQL, the real apalis queue.

mod stack;

mod bad_input;
mod bookings;
mod follow_ups;
mod garbage;
mod operations;
mod overbooking;
mod pipeline;
mod resilience;
