//! maitre memory-service.
//!
//! Layout:
//! - [`config`]: flags and environment, `--help`.
//! - [`startup`]: [`startup::Application`] binds, migrates and serves.
//! - [`grpc`]: thin handlers; [`grpc::convert`] turns rows into protos.
//! - [`domain`]: validated requests (parsed from the decoded `pb` types) and
//!   the emotion rules; no SQL, no tonic.
//! - [`store`]: every SQL statement, next to the migrations' schema.
//! - [`erasure`]: DeleteUserData's batched purge and the background purger.
//! - [`feed`]: the message feed's sequencer and the WatchMessages limits.
//! - [`error`]: the one error type and its one mapping to gRPC status.
//! - [`metrics`]: memory-service's own metrics (the group commit's).
//!
//! Imports point one way: [`grpc`], [`erasure`] and [`feed`] → [`domain`] and
//! [`store`]; [`store`] → [`domain`]; nothing back up (the `layering` test
//! checks it).
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod erasure;
pub mod error;
pub mod feed;
pub mod grpc;
pub mod metrics;
pub mod startup;
pub mod store;

// One import check for both services, kept beside booking-service's.
#[cfg(test)]
#[path = "../../booking-service/src/layering.rs"]
mod layering;
