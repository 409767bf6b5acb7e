//! maitre booking-service.
//!
//! Layout:
//! - [`config`]: flags and environment, `--help`.
//! - [`startup`]: [`startup::Application`] binds, migrates, serves, runs workers.
//! - [`grpc`]: thin handlers; [`grpc::convert`] turns rows into protos.
//! - [`domain`]: validated requests, template choice, retry backoff.
//! - [`store`]: every SQL statement, including the job enqueue.
//! - [`jobs`]: the apalis workers that plan and deliver follow-ups.
//! - [`memory_client`]: the gRPC client of memory-service.
//! - [`error`]: the one error type and its one mapping to gRPC status.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod memory_client;
pub mod metrics;
pub mod startup;
pub mod store;
