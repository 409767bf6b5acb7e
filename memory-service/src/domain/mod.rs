//! Validated inputs and the rules of memory-service. The domain parses
//! requests as decoded from the wire (the generated `pb` types) into domain
//! values; it knows nothing of tonic or the transport and runs no SQL.
//!
//! Every request is parsed into one of these types before anything touches
//! the database; parsing collects one violation per bad field.

pub mod emotion;
pub mod feed;
pub mod limits;
pub mod message;
pub mod queries;
pub mod state;

pub use emotion::{EmotionStats, Trend};
pub use limits::Limits;
pub use message::{NewMessage, Role};
