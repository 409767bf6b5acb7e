//! Building `tonic::Status` values with rich details, the same way in both
//! services. Every error carries an `ErrorInfo` with a stable, machine-readable
//! `reason` (SCREAMING_SNAKE_CASE) in the service's `domain`; bad input also
//! carries a `BadRequest` with one violation per bad field.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Collects field violations while a request is validated, so that a caller
/// learns about every bad field at once.
#[derive(Debug, Default, Clone)]
pub struct FieldViolations(Vec<FieldViolation>);

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is bad, with a stable `reason` and a description.
    pub fn add(&mut self, field: &str, reason: &str, description: impl Into<String>) {
        let mut violation = FieldViolation::new(field, description);
        violation.reason = reason.to_owned();
        self.0.push(violation);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields named so far, in order (for logs and tests).
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|v| v.field.as_str()).collect()
    }

    /// `Ok(())` when nothing was recorded, else the violations as an error.
    pub fn into_result(self) -> Result<(), FieldViolations> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// INVALID_ARGUMENT with a `BadRequest` listing every violation.
    pub fn into_status(self, domain: &str) -> Status {
        self.into_status_with_reason(domain, "INVALID_ARGUMENT")
    }

    /// As [`Self::into_status`], with an `ErrorInfo` reason more precise than
    /// `INVALID_ARGUMENT` (e.g. `REQUEST_ID_REUSED`).
    pub fn into_status_with_reason(self, domain: &str, reason: &str) -> Status {
        let summary = self
            .0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::with_bad_request(self.0);
        details.set_error_info(reason, domain, HashMap::new());
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            details,
        )
    }
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid fields: {}", self.fields().join(", "))
    }
}

impl std::error::Error for FieldViolations {}

/// A status with an `ErrorInfo` detail carrying `reason` and `metadata`.
pub fn with_reason(
    code: Code,
    domain: &str,
    reason: &str,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, domain, metadata),
    )
}

/// The status for a database error, by what the caller can do about it:
/// UNAVAILABLE (retry later), DEADLINE_EXCEEDED (statement timeout), or
/// INTERNAL with a generic message — the cause goes to the log, never to the
/// caller.
pub fn database_status(domain: &str, cause: &sqlx::Error) -> Status {
    use crate::db::{DbFailure, classify};
    let (code, reason, message) = match classify(cause) {
        DbFailure::Unavailable => {
            tracing::warn!(error = %cause, "database unavailable");
            (
                Code::Unavailable,
                "DATABASE_UNAVAILABLE",
                "the database is unavailable; retry later",
            )
        }
        DbFailure::Timeout => {
            tracing::warn!(error = %cause, "statement timed out");
            (
                Code::DeadlineExceeded,
                "DATABASE_TIMEOUT",
                "the database did not answer in time",
            )
        }
        DbFailure::Conflict => {
            tracing::warn!(error = %cause, "transaction lost to a concurrent one");
            (
                Code::Aborted,
                "DATABASE_CONFLICT",
                "a concurrent change got in the way; nothing was written, retry",
            )
        }
        DbFailure::UniqueViolation(_) | DbFailure::Other => {
            tracing::error!(error = ?cause, "unexpected database error");
            (Code::Internal, "INTERNAL", "internal error")
        }
    };
    with_reason(code, domain, reason, message, HashMap::new())
}

/// A handler's answer as tonic wants it: the message in a response, the
/// service's error converted to its status (each service maps its errors
/// once, in its `error.rs`).
pub fn reply<T, E: Into<Status>>(result: Result<T, E>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(Into::into)
}
