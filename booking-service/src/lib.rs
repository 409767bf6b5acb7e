//! maitre booking-service.
//!
//! Layout:
//! - [`config`]: flags and environment, `--help`.
//! - [`startup`]: [`startup::Application`] binds, migrates, serves, runs workers.
//! - [`grpc`]: thin handlers; [`grpc::convert`] turns rows into protos.
//! - [`domain`]: validated requests, template choice, retry backoff, the
//!   follow-up jobs' payloads and queue names.
//! - [`store`]: every SQL statement, including the job enqueue.
//! - [`jobs`]: the apalis workers that plan and deliver follow-ups, and the
//!   refresh of the gauges read from the database.
//! - [`memory_client`]: the gRPC client of memory-service.
//! - [`error`]: the one error type and its one mapping to gRPC status.
//! - [`metrics`]: booking-service's own metrics; set, never read from the
//!   database here.
//!
//! Imports point one way: [`grpc`] and [`jobs`] → [`domain`] and [`store`];
//! [`store`] → [`domain`]; nothing back up (the `layering` test checks it).
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod memory_client;
pub mod memory_endpoints;
pub mod metrics;
pub mod startup;
pub mod store;

#[cfg(test)]
mod layering;
