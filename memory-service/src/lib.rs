//! maitre memory-service.
//!
//! Layout:
//! - [`config`]: flags and environment, `--help`.
//! - [`startup`]: [`startup::Application`] binds, migrates and serves.
//! - [`grpc`]: thin handlers; [`grpc::convert`] turns rows into protos.
//! - [`domain`]: validated requests and the emotion rules (no SQL, no gRPC).
//! - [`store`]: every SQL statement, next to the migrations' schema.
//! - [`erasure`]: DeleteUserData's batched purge and the background purger.
//! - [`error`]: the one error type and its one mapping to gRPC status.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod erasure;
pub mod error;
pub mod grpc;
pub mod startup;
pub mod store;
