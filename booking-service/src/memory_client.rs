//! booking-service's client of memory-service: emotion history for planning,
//! StoreMessage for delivery. Every call has its own deadline; a call that
//! fails UNAVAILABLE (connection refused, server draining) is retried once
//! at once, since nothing reached the server; other failures are returned
//! for the job to retry with backoff.

use std::time::Duration;

use maitre::api::memory::v1::{self as pb, memory_service_client::MemoryServiceClient};
use tonic::{Code, Request, transport::Channel};
use uuid::Uuid;

/// A failed memory-service call, as the jobs see it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The conversation does not exist (not worth retrying).
    #[error("conversation not found in memory-service")]
    NotFound,
    /// Anything else: unreachable, deadline, refused. Worth retrying.
    #[error("memory-service call failed: {code:?}: {message}")]
    Failed { code: Code, message: String },
}

impl From<tonic::Status> for MemoryError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::NotFound => MemoryError::NotFound,
            code => MemoryError::Failed {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

impl MemoryError {
    /// Failures a retry cannot fix: the request itself is refused.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            MemoryError::Failed {
                code: Code::InvalidArgument | Code::FailedPrecondition,
                ..
            }
        )
    }
}

/// Cheap to clone: one HTTP/2 channel shared by all jobs.
#[derive(Debug, Clone)]
pub struct MemoryClient {
    client: MemoryServiceClient<Channel>,
    /// Deadline of every call (sent as `grpc-timeout`).
    timeout: Duration,
}

impl MemoryClient {
    /// Connects lazily: booking-service starts while memory-service is down.
    pub fn new(
        url: &str,
        timeout: Duration,
    ) -> Result<Self, tonic::codegen::http::uri::InvalidUri> {
        let channel = Channel::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .timeout(timeout)
            .connect_lazy();
        Ok(Self {
            client: MemoryServiceClient::new(channel),
            timeout,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Scores of the last `limit` scored messages, oldest first.
    pub async fn emotion_scores(
        &self,
        conversation_id: Uuid,
        limit: i32,
    ) -> Result<Vec<f64>, MemoryError> {
        let message = pb::GetEmotionHistoryRequest {
            conversation_id: conversation_id.to_string(),
            limit,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .client
                .clone()
                .get_emotion_history(self.request(message.clone()))
                .await
            {
                Ok(response) => {
                    return Ok(response
                        .into_inner()
                        .points
                        .into_iter()
                        .map(|p| p.score)
                        .collect());
                }
                Err(status) if status.code() == Code::Unavailable && attempt < 2 => continue,
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Stores a follow-up as an assistant message. `request_id` makes a retry
    /// return the first stored message instead of storing it twice.
    pub async fn store_follow_up(
        &self,
        message: pb::StoreMessageRequest,
    ) -> Result<Uuid, MemoryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .client
                .clone()
                .store_message(self.request(message.clone()))
                .await
            {
                Ok(response) => {
                    let id = response
                        .into_inner()
                        .message
                        .map(|m| m.message_id)
                        .unwrap_or_default();
                    return Uuid::try_parse(&id).map_err(|_| MemoryError::Failed {
                        code: Code::Internal,
                        message: format!("memory-service returned a bad message id {id:?}"),
                    });
                }
                Err(status) if status.code() == Code::Unavailable && attempt < 2 => continue,
                Err(status) => return Err(status.into()),
            }
        }
    }
}
