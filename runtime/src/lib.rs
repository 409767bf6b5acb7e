//! maitre's server runtime: what both services run the same way, so each
//! service's own crate holds only its domain, storage and handlers.
//!
//! - [`config`]: the settings both services read alike (one clap struct
//!   each flattens), and the refusal of renamed environment variables.
//! - [`launch`]: each `main`'s body, binding the ports and the database,
//!   running migrations.
//! - [`telemetry`]: tracing set-up.
//! - [`otel`]: OpenTelemetry spans (RPCs, jobs, SQL) exported over
//!   OTLP/gRPC, with our own trace context's ids and sampling decision.
//! - [`rpc`]: the tower layer every call passes: request id and trace
//!   context, authentication and grants, load shedding, deadlines, metrics,
//!   one log line.
//! - [`metrics`] and [`admin`]: Prometheus metrics on the admin HTTP port.
//! - [`status`]: building rich `tonic::Status` values (field violations,
//!   stable reasons) the same way everywhere.
//! - [`db`]: pool construction and the classification of database errors
//!   (unavailable vs. timeout vs. bug).
//! - [`health`]: the `grpc.health.v1` reporter whose readiness follows the
//!   database, plus a liveness name that never does.
//! - [`reflection`]: server reflection listing only this port's services.
//! - [`fields`]: parsers for request fields both services validate alike.
//! - [`pagination`]: opaque, query-bound keyset page tokens.
//! - [`listener`]: accepting connections within limits (count, handshake
//!   deadline, keepalive, hard end after the maximum age).
//! - [`server`]: assembling and running a service's gRPC + admin servers.
//! - [`shutdown`]: the SIGTERM/SIGINT future.
//! - `testkit` (feature `test-util`): helpers for tests (fresh databases, a
//!   TCP proxy to cut a dependency off, waiting with a deadline).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod db;
pub mod fields;
pub mod health;
pub mod launch;
pub mod listener;
pub mod metrics;
pub mod otel;
pub mod pagination;
pub mod reflection;
pub mod rpc;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testkit;
