//! Fault drills: memory-service and booking-service run as real, separate
//! processes (the binaries cargo built next to this test), and the drills
//! break them — `kill -9` in the middle of load, two workers on one queue, a
//! database outage, SIGTERM — then prove from the database that nothing was
//! lost and nothing was done twice: every booking a client saw confirmed
//! exists, has exactly one follow-up, delivered exactly once as one
//! assistant message in memory-service, and seats match the bookings.
//!
//! Run: `cargo nextest run -p booking-service --test drills` (needs
//! memory-service's binary too: `cargo build -p memory-service`, which a
//! `cargo nextest run --workspace` builds anyway). Each drill prints a
//! `DRILL ...` summary line (use `--no-capture` to see it); with `TEST_LOG`
//! set the services log at `info` to the test's output, otherwise at `warn`
//! to files under the temp directory whose tails are printed on failure.

mod attack_kit;
mod checks;
mod client;
mod harness;

mod attacks;
mod crash_mid_load;
mod database_outage;
mod graceful_shutdown;
mod memory_crash;
mod replicas;
mod slow_memory;
mod two_workers;
