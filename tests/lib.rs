//! maitre's end-to-end tests live in `e2e/` (`cargo nextest run -p maitre-e2e`):
//! both services in-process on one fresh database, over real gRPC.
#![forbid(unsafe_code)]
