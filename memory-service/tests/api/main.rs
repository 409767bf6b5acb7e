//! memory-service end to end: real gRPC over loopback, real PostgreSQL, one
//! fresh database per test.

mod support;

mod access;
mod connection_age;
mod context;
mod conversations;
mod erasure;
mod fuzz;
mod group_commit;
mod health_and_reflection;
mod identifiers;
mod limits;
mod operations;
mod reads;
mod request_keys;
mod state;
mod store_message;
mod trace_export;
mod validation;
mod watch;
