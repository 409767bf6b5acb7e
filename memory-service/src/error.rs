//! memory-service's one error type, and its one mapping to gRPC status.
//!
//! Use [`Error`] from the store and the handlers alike; `anyhow` only in
//! `main.rs` and start-up. Internal causes are logged with their full chain
//! and never shown to the caller.

use std::collections::HashMap;

use maitre_runtime::status::{FieldViolations, database_status, with_reason};
use tonic::{Code, Status};
use uuid::Uuid;

/// The `ErrorInfo.domain` of every error this service returns.
pub const DOMAIN: &str = "memory.maitre";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] FieldViolations),
    #[error("conversation {0} not found")]
    ConversationNotFound(Uuid),
    #[error("conversation {0} belongs to another user")]
    ConversationOfAnotherUser(Uuid),
    /// A StoreMessage `request_id` already stored with another request.
    #[error("request_id reused with another request")]
    RequestIdReused,
    /// StoreMessage into a conversation that DeleteUserData erased.
    #[error("conversation {0} was erased")]
    ConversationErased(Uuid),
    /// UpdateConversationState lost the test-and-set.
    #[error("state version {current} is not the expected {expected}")]
    StateVersionMismatch { expected: i64, current: i64 },
    /// The state an UpdateConversationState would store is not valid.
    #[error("{message}")]
    InvalidState {
        field: &'static str,
        reason: &'static str,
        message: String,
    },
    /// WatchMessages past the stream limits.
    #[error("too many WatchMessages streams (limit {limit})")]
    TooManyWatchers { limit: usize, per_caller: bool },
    /// WatchMessages from a cursor whose successors retention dropped.
    #[error("cursor {cursor} expired")]
    CursorExpired { cursor: i64, oldest: i64 },
    /// WatchMessages from a cursor past the feed's end.
    #[error("cursor {cursor} is ahead of the feed")]
    CursorAhead { cursor: i64, last: i64 },
    /// A WatchMessages stream whose client did not keep up.
    #[error("watcher too slow")]
    WatcherTooSlow {
        cursor: i64,
        stalled_for: std::time::Duration,
    },
    /// A WatchMessages stream ended by the server's shutdown.
    #[error("server stopping")]
    ServerStopping { cursor: i64 },
    /// A WatchMessages stream at the deadline its client set.
    #[error("deadline exceeded")]
    StreamDeadline { cursor: i64 },
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(violations) => violations.into_status(DOMAIN),
            Error::ConversationNotFound(id) => with_reason(
                Code::NotFound,
                DOMAIN,
                "CONVERSATION_NOT_FOUND",
                format!("conversation {id} not found"),
                HashMap::from([("conversation_id".into(), id.to_string())]),
            ),
            Error::ConversationOfAnotherUser(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "CONVERSATION_USER_MISMATCH",
                format!("conversation {id} belongs to another user"),
                HashMap::from([("conversation_id".into(), id.to_string())]),
            ),
            Error::RequestIdReused => {
                let mut violations = FieldViolations::new();
                violations.add(
                    "request_id",
                    "REQUEST_ID_REUSED",
                    "already used for another request by this caller for this user; \
                     a retry must repeat the request unchanged, a new request needs a new id",
                );
                violations.into_status_with_reason(DOMAIN, "REQUEST_ID_REUSED")
            }
            Error::ConversationErased(id) => with_reason(
                Code::FailedPrecondition,
                DOMAIN,
                "CONVERSATION_ERASED",
                format!("conversation {id} was erased and takes no more messages"),
                HashMap::from([("conversation_id".into(), id.to_string())]),
            ),
            Error::StateVersionMismatch { expected, current } => with_reason(
                Code::Aborted,
                DOMAIN,
                "STATE_VERSION_MISMATCH",
                format!(
                    "the state is at version {current}, not {expected}: another writer came first; \
                     read it again, redo the change and retry"
                ),
                HashMap::from([
                    ("current_version".into(), current.to_string()),
                    ("expected_version".into(), expected.to_string()),
                ]),
            ),
            Error::InvalidState {
                field,
                reason,
                message,
            } => {
                let mut violations = FieldViolations::new();
                violations.add(field, reason, message);
                violations.into_status(DOMAIN)
            }
            Error::TooManyWatchers { limit, per_caller } => with_reason(
                Code::ResourceExhausted,
                DOMAIN,
                "TOO_MANY_WATCHERS",
                if per_caller {
                    format!("this caller already has {limit} WatchMessages streams open; close one")
                } else {
                    format!("{limit} WatchMessages streams are open on this server; retry later")
                },
                HashMap::from([("limit".into(), limit.to_string())]),
            ),
            Error::CursorExpired { cursor, oldest } => with_reason(
                Code::OutOfRange,
                DOMAIN,
                "CURSOR_EXPIRED",
                format!(
                    "messages after cursor {cursor} are no longer in the feed (kept for \
                     MEMORY_FEED_RETENTION); read the conversations with ListMessages, then \
                     watch from now"
                ),
                HashMap::from([
                    ("cursor".into(), cursor.to_string()),
                    ("oldest_cursor".into(), oldest.to_string()),
                ]),
            ),
            Error::CursorAhead { cursor, last } => with_reason(
                Code::OutOfRange,
                DOMAIN,
                "CURSOR_AHEAD",
                format!(
                    "cursor {cursor} is past the feed's end ({last}): this feed never issued it"
                ),
                HashMap::from([
                    ("cursor".into(), cursor.to_string()),
                    ("last_cursor".into(), last.to_string()),
                ]),
            ),
            // No cursor in these: the watcher's own may be past what the
            // client read (its buffer is dropped); the client resumes from
            // the last cursor it handled.
            Error::WatcherTooSlow { stalled_for, .. } => with_reason(
                Code::Unavailable,
                DOMAIN,
                "WATCHER_TOO_SLOW",
                format!(
                    "the stream was not read for {stalled_for:?} with its buffer full; \
                     reconnect with the last cursor you received"
                ),
                HashMap::new(),
            ),
            Error::ServerStopping { .. } => with_reason(
                Code::Unavailable,
                DOMAIN,
                "SERVER_STOPPING",
                "the server is shutting down; reconnect with the last cursor you received",
                HashMap::new(),
            ),
            Error::StreamDeadline { .. } => with_reason(
                Code::DeadlineExceeded,
                DOMAIN,
                "DEADLINE_EXCEEDED",
                "the deadline of the call passed; reconnect with the last cursor you received",
                HashMap::new(),
            ),
            Error::Database(cause) => database_status(DOMAIN, &cause),
        }
    }
}
