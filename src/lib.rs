//! maitre's shared crate: the wire contract and what both services need.
//!
//! - [`api`]: Rust code generated from `proto/` (messages, servers, clients)
//!   and the encoded descriptor set served by reflection.
//! - [`telemetry`]: tracing set-up, identical in both services.
//! - [`rpc`]: the tower layer every call passes: request id and trace
//!   context, bearer auth, load shedding, deadlines, metrics, one log line.
//! - [`metrics`] and [`admin`]: Prometheus metrics on the admin HTTP port.
//! - [`status`]: building rich `tonic::Status` values (field violations,
//!   stable reasons) the same way everywhere.
//! - [`db`]: pool construction and the classification of database errors
//!   (unavailable vs. timeout vs. bug).
//! - [`health`]: the `grpc.health.v1` reporter whose readiness follows the
//!   database, plus a liveness name that never does.
//! - [`fields`]: parsers for request fields both services validate alike.
//! - [`pagination`]: opaque, query-bound keyset page tokens.
//! - [`listener`]: accepting connections within limits (count, handshake
//!   deadline, keepalive, hard end after the maximum age).
//! - [`server`]: assembling and running a service's gRPC + admin servers.
//! - [`shutdown`]: the SIGTERM/SIGINT future.
//! - [`testkit`]: helpers for the integration tests (fresh databases, a
//!   TCP proxy to cut a dependency off, waiting with a deadline).
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod db;
pub mod fields;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod pagination;
pub mod rpc;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod testkit;
