//! booking-service's client of memory-service: emotion history for planning,
//! StoreMessage for delivery, DeleteUserData for EraseCustomer. Every call
//! has its own deadline and carries the caller's trace (`traceparent`), request id and, when configured, a
//! bearer token; the channel may use TLS with a client certificate. A call
//! that fails UNAVAILABLE (connection refused, server draining) is retried
//! once after a short pause, since nothing reached the server; other
//! failures go back to the job, which retries with backoff.

use std::time::{Duration, Instant};

use maitre_api::memory::v1::{self as pb, memory_service_client::MemoryServiceClient};
use maitre_runtime::{
    otel,
    rpc::{CallContext, context::TraceParent},
};
use tonic::{
    Code, Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, ClientTlsConfig},
};
use uuid::Uuid;

use crate::memory_endpoints::{self, Dial, Discovery};

/// The ErrorInfo reason memory-service gives a StoreMessage into a
/// conversation that was erased (FAILED_PRECONDITION).
pub const CONVERSATION_ERASED: &str = "CONVERSATION_ERASED";

// The methods called, as client spans name them (`package.Service/Method`).
const GET_EMOTION_HISTORY: &str = "maitre.memory.v1.MemoryService/GetEmotionHistory";
const STORE_MESSAGE: &str = "maitre.memory.v1.MemoryService/StoreMessage";
const DELETE_USER_DATA: &str = "maitre.memory.v1.MemoryService/DeleteUserData";

/// A failed memory-service call, as the jobs see it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The conversation does not exist (not worth retrying).
    #[error("conversation not found in memory-service")]
    NotFound,
    /// Anything else: unreachable, deadline, refused. `reason` is the
    /// ErrorInfo reason when memory-service gave one.
    #[error("memory-service call failed: {code:?}{}: {message}", if reason.is_empty() { String::new() } else { format!(" {reason}") })]
    Failed {
        code: Code,
        reason: String,
        message: String,
    },
}

impl From<tonic::Status> for MemoryError {
    fn from(status: tonic::Status) -> Self {
        use tonic_types::StatusExt;
        match status.code() {
            Code::NotFound => MemoryError::NotFound,
            code => MemoryError::Failed {
                code,
                reason: status
                    .get_details_error_info()
                    .map(|info| info.reason)
                    .unwrap_or_default(),
                message: status.message().to_owned(),
            },
        }
    }
}

/// What a failed delivery attempt means for the follow-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth retrying with backoff: unreachable, slow, overloaded, draining.
    Transient,
    /// Our credentials or set-up are refused (UNAUTHENTICATED,
    /// PERMISSION_DENIED, UNIMPLEMENTED): an operator's problem, fixed by a
    /// token rotation or a deploy, not by the follow-up. Retried on the same
    /// long schedule, logged at ERROR, counted.
    Config,
    /// The request itself is refused (INVALID_ARGUMENT, FAILED_PRECONDITION):
    /// a retry cannot change the answer. FAILED at once.
    Permanent,
    /// The conversation was erased: the follow-up must never be stored.
    /// CANCELLED, never retried.
    Erased,
}

impl MemoryError {
    pub fn kind(&self) -> FailureKind {
        match self {
            MemoryError::NotFound => FailureKind::Transient,
            MemoryError::Failed { code, reason, .. } => match code {
                Code::FailedPrecondition if reason == CONVERSATION_ERASED => FailureKind::Erased,
                Code::InvalidArgument | Code::FailedPrecondition => FailureKind::Permanent,
                Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => {
                    FailureKind::Config
                }
                _ => FailureKind::Transient,
            },
        }
    }

    /// memory-service's ErrorInfo reason; empty when the failure did not
    /// come from memory-service itself (the transport, a proxy).
    pub fn reason(&self) -> &str {
        match self {
            MemoryError::NotFound => "",
            MemoryError::Failed { reason, .. } => reason,
        }
    }

    /// The status code, for metrics.
    pub fn code(&self) -> Code {
        match self {
            MemoryError::NotFound => Code::NotFound,
            MemoryError::Failed { code, .. } => *code,
        }
    }

    /// Failures that say nothing about the request, only that memory-service
    /// could not answer now: a later retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MemoryError::Failed {
                code: Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled,
                ..
            }
        )
    }
}

/// How booking-service reaches memory-service.
#[derive(Clone, Default)]
pub struct MemoryClientSettings {
    pub url: String,
    /// Deadline of every call (sent as `grpc-timeout`).
    pub timeout: Duration,
    /// Bearer token presented to memory-service.
    pub token: Option<String>,
    /// TLS: the CA memory-service's certificate chains to, and optionally
    /// this service's client certificate, for mTLS.
    pub tls: Option<ClientTlsConfig>,
    /// How often the endpoints' names are resolved again and their
    /// addresses probed (zero: [`memory_endpoints::DEFAULT_RESOLVE_INTERVAL`]).
    pub resolve_interval: Duration,
}

/// Cheap to clone: one balanced channel (an HTTP/2 connection per
/// memory-service replica) shared by all jobs.
#[derive(Debug, Clone)]
pub struct MemoryClient {
    client: MemoryServiceClient<Channel>,
    discovery: Discovery,
    timeout: Duration,
    /// `Bearer <token>`, ready to send.
    authorization: Option<MetadataValue<Ascii>>,
}

/// Exports the client span of one attempt of a call to memory-service.
fn record_attempt<R>(
    call: &CallContext,
    hop: &TraceParent,
    method: &'static str,
    result: &Result<R, tonic::Status>,
    elapsed: Duration,
) {
    let code = match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    let (start, end) = otel::started_before(elapsed);
    let mut attributes = otel::rpc_attributes(method, code);
    attributes.push(otel::KeyValue::new(
        "maitre.request_id",
        call.request_id.clone(),
    ));
    call.tracer.record(otel::FinishedSpan {
        trace: hop,
        parent_span_id: Some(&call.trace.span_id),
        parent_is_remote: false,
        kind: otel::SpanKind::Client,
        name: method.into(),
        start,
        end,
        attributes,
        status: match code {
            Code::Ok => otel::Status::Unset,
            other => otel::Status::error(format!("{other:?}")),
        },
    });
}

/// Pause before the one retry of an UNAVAILABLE call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Beyond a call's deadline, how long it may wait for the balancer before
/// it fails: the endpoint's own timer normally ends it first.
const QUEUE_MARGIN: Duration = Duration::from_millis(500);
/// Longest wait for the replicas to be probed before the retry of a call
/// the transport failed.
const SUSPECT_WAIT: Duration = Duration::from_secs(1);

/// Runs `call`, and once more after [`RETRY_PAUSE`] when it fails
/// UNAVAILABLE (refused or draining: nothing reached the server), after
/// asking `discovery` to probe the replicas again so that the retry does not
/// go to a dead one.
async fn once_more_if_unavailable<T, F, Fut>(
    discovery: &Discovery,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    match call().await {
        Err(status) if status.code() == Code::Unavailable => {
            if MemoryError::from(status).reason().is_empty() {
                // The transport failed (memory-service's own refusals carry a
                // reason): have the replicas probed before the retry, so it
                // does not go to one that just died.
                discovery.suspect(SUSPECT_WAIT).await;
            } else {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            call().await
        }
        other => other,
    }
}

impl MemoryClient {
    /// Connects lazily: booking-service starts while memory-service is down.
    /// Balances over every replica `settings.url` names ([`memory_endpoints`]);
    /// needs a Tokio runtime.
    pub fn new(settings: &MemoryClientSettings) -> anyhow::Result<Self> {
        let targets = memory_endpoints::parse_targets(&settings.url)
            .map_err(|e| anyhow::anyhow!("BOOKING_MEMORY_URL {:?}: {e}", settings.url))?;
        let (channel, discovery) = memory_endpoints::balanced_channel(
            targets,
            Dial {
                timeout: settings.timeout,
                tls: settings.tls.clone(),
                resolve_interval: settings.resolve_interval,
            },
        )?;
        let authorization = match &settings.token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                anyhow::anyhow!("the memory-service token has characters a header cannot carry")
            })?),
            None => None,
        };
        Ok(Self {
            client: MemoryServiceClient::new(channel),
            discovery,
            timeout: settings.timeout,
            authorization,
        })
    }

    /// A request with the deadline, credentials, trace and request id;
    /// `call` is the current call or job and `hop` the span of this attempt
    /// (a child of the call's), which the request carries as `traceparent`.
    fn request<T>(
        &self,
        message: T,
        call: Option<&CallContext>,
        hop: Option<&TraceParent>,
    ) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        let metadata = request.metadata_mut();
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        if let Some(hop) = hop
            && let Ok(value) = hop.header_value().parse()
        {
            metadata.insert("traceparent", value);
        }
        if let Some(call) = call
            && let Ok(value) = call.request_id.parse()
        {
            metadata.insert("x-request-id", value);
        }
        request
    }

    /// Calls `rpc` (`method`: its name, for the client span) with `message`
    /// as a full request ([`Self::request`]), once more if it fails
    /// UNAVAILABLE; answers the response's message. Each attempt is a hop of
    /// its own in the trace, and an exported client span when recorded.
    async fn call<M, R, F, Fut>(
        &self,
        method: &'static str,
        message: M,
        rpc: F,
    ) -> Result<R, tonic::Status>
    where
        M: Clone,
        F: Fn(MemoryServiceClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let call = CallContext::current();
        let discovery = &self.discovery;
        once_more_if_unavailable(discovery, || async {
            if !discovery.has_replicas(self.timeout).await {
                return Err(tonic::Status::unavailable(
                    "no memory-service replica known: BOOKING_MEMORY_URL resolves to no address",
                ));
            }
            let hop = call.as_ref().map(|call| call.trace.child());
            let request = self.request(message.clone(), call.as_ref(), hop.as_ref());
            let started = Instant::now();
            // The endpoint enforces the deadline once a call reaches one; this
            // bounds the wait for one (the balancer queues calls while it
            // knows no replica, e.g. when the name never resolved).
            let result = tokio::time::timeout(
                self.timeout + QUEUE_MARGIN,
                rpc(self.client.clone(), request),
            )
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "no memory-service replica took the call within its deadline",
                ))
            });
            if let (Some(call), Some(hop)) = (&call, &hop)
                && call.tracer.is_recording(hop)
            {
                record_attempt(call, hop, method, &result, started.elapsed());
            }
            result
        })
        .await
        .map(tonic::Response::into_inner)
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
        let response = self
            .call(
                GET_EMOTION_HISTORY,
                message,
                |mut client, request| async move { client.get_emotion_history(request).await },
            )
            .await?;
        Ok(response.points.into_iter().map(|p| p.score).collect())
    }

    /// Stores a follow-up as an assistant message. `request_id` makes a retry
    /// return the first stored message instead of storing it twice.
    pub async fn store_follow_up(
        &self,
        message: pb::StoreMessageRequest,
    ) -> Result<Uuid, MemoryError> {
        let response = self
            .call(STORE_MESSAGE, message, |mut client, request| async move {
                client.store_message(request).await
            })
            .await?;
        let id = response.message.map(|m| m.message_id).unwrap_or_default();
        Uuid::try_parse(&id).map_err(|_| MemoryError::Failed {
            code: Code::Internal,
            reason: String::new(),
            message: format!("memory-service returned a bad message id {id:?}"),
        })
    }

    /// Erases everything memory-service stores for `user_id`. Idempotent on
    /// memory-service's side, so the one retry of an UNAVAILABLE call is
    /// safe even if the first call did reach it.
    pub async fn delete_user_data(
        &self,
        user_id: &str,
    ) -> Result<pb::DeleteUserDataResponse, MemoryError> {
        let message = pb::DeleteUserDataRequest {
            user_id: user_id.to_owned(),
        };
        self.call(
            DELETE_USER_DATA,
            message,
            |mut client, request| async move { client.delete_user_data(request).await },
        )
        .await
        .map_err(MemoryError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_reason(code: Code, reason: &str) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        tonic::Status::with_error_details(
            code,
            "refused",
            ErrorDetails::with_error_info(
                reason,
                "memory.maitre",
                std::collections::HashMap::<String, String>::new(),
            ),
        )
    }

    #[test]
    fn failures_are_classified_by_code_and_reason() {
        let kind = |status: tonic::Status| MemoryError::from(status).kind();
        assert_eq!(
            kind(with_reason(Code::FailedPrecondition, CONVERSATION_ERASED)),
            FailureKind::Erased
        );
        assert_eq!(
            kind(with_reason(
                Code::FailedPrecondition,
                "CONVERSATION_USER_MISMATCH"
            )),
            FailureKind::Permanent
        );
        assert_eq!(
            kind(tonic::Status::invalid_argument("x")),
            FailureKind::Permanent
        );
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert_eq!(kind(tonic::Status::new(code, "x")), FailureKind::Config);
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::Aborted,
            Code::Cancelled,
        ] {
            assert_eq!(kind(tonic::Status::new(code, "x")), FailureKind::Transient);
        }
        // The reason shows in the error the follow-up records.
        let erased = MemoryError::from(with_reason(Code::FailedPrecondition, CONVERSATION_ERASED));
        assert!(erased.to_string().contains(CONVERSATION_ERASED), "{erased}");
    }

    #[tokio::test]
    async fn a_name_that_never_resolves_fails_the_call_unavailable_instead_of_hanging() {
        let client = MemoryClient::new(&MemoryClientSettings {
            url: "http://memory-replica.invalid:50051".into(),
            timeout: Duration::from_secs(3),
            token: None,
            tls: None,
            resolve_interval: Duration::from_secs(60),
        })
        .unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            client.emotion_scores(Uuid::now_v7(), 5),
        )
        .await
        .expect("the call hung with no replica known");
        let error = answer.expect_err("no replica, yet an answer");
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert_eq!(error.kind(), FailureKind::Transient);
    }

    #[tokio::test]
    async fn unusable_tls_material_stops_the_start() {
        // A client certificate whose key is not a key.
        let garbage = tonic::transport::Identity::from_pem("not a certificate", "not a key");
        let settings = MemoryClientSettings {
            url: "https://memory-a:50051,https://memory-b:50051".into(),
            timeout: Duration::from_secs(1),
            token: None,
            tls: Some(ClientTlsConfig::new().identity(garbage)),
            resolve_interval: Duration::ZERO,
        };
        assert!(MemoryClient::new(&settings).is_err());
    }

    #[tokio::test]
    async fn calls_carry_the_trace_request_id_and_token() {
        let client = MemoryClient::new(&MemoryClientSettings {
            url: "http://127.0.0.1:1".into(),
            timeout: Duration::from_secs(1),
            token: Some("secret-token-for-memory-01".into()),
            tls: None,
            resolve_interval: Duration::ZERO,
        })
        .unwrap();
        let call = CallContext::continuing(
            "plan-42".into(),
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            &Default::default(),
        );
        let hop = call.trace.child();
        let request = client.request((), Some(&call), Some(&hop));
        let metadata = request.metadata();
        let traceparent = metadata.get("traceparent").unwrap().to_str().unwrap();
        let next_hop = TraceParent::parse(traceparent).unwrap();
        assert_eq!(
            next_hop.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
            "same trace"
        );
        assert_ne!(
            next_hop.span_id, call.trace.span_id,
            "a new span for the hop"
        );
        assert_eq!(next_hop, hop);
        assert_eq!(metadata.get("x-request-id").unwrap(), "plan-42");
        assert_eq!(
            metadata.get("authorization").unwrap(),
            "Bearer secret-token-for-memory-01"
        );
    }
}
