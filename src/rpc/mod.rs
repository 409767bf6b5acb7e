//! The one layer every RPC passes through, at the HTTP level below tonic's
//! routing, in this order:
//!
//! 1. identity: request id (`x-request-id`, echoed back) and W3C trace
//!    context (`traceparent`), in a span and a task-local for the call;
//! 2. authentication (bearer tokens), unless the server is open;
//! 3. load shedding: past the global concurrency limit a call fails at once
//!    with RESOURCE_EXHAUSTED instead of queueing without bound;
//! 4. the deadline: the client's `grpc-timeout`, or the server default,
//!    answered with DEADLINE_EXCEEDED;
//! 5. metrics and one log line with method, code and duration.
//!
//! Health checks skip 2-4: the kubelet must always get an answer. Reflection
//! skips 4 (it is a long-lived stream). Request content is never logged.
//! Codes are read from response headers: tonic sends errors "trailers-only"
//! (code in the headers); a response without `grpc-status` there is a
//! successful answer whose OK follows in the trailers.

pub mod auth;
pub mod context;
pub mod deadline;
pub mod methods;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use tonic::{Code, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};

pub use self::{auth::TokenSet, context::CallContext};
use crate::metrics::{Metrics, RpcLabels};

/// How much earlier than tonic's own grpc-timeout timer ours fires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(3);

/// What the layer enforces and where it reports.
#[derive(Clone)]
pub struct RpcPolicy {
    pub metrics: Arc<Metrics>,
    /// Paths labelled as themselves in metrics; others are `unknown`.
    pub known_methods: Arc<HashSet<String>>,
    /// Permits for calls in progress, shared by all connections.
    pub limiter: Arc<Semaphore>,
    /// Deadline of calls that bring none.
    pub default_deadline: Duration,
    /// Accepted bearer tokens; `None` leaves the server open.
    pub tokens: Option<Arc<TokenSet>>,
}

impl RpcPolicy {
    pub fn new(
        metrics: Arc<Metrics>,
        max_concurrent: usize,
        default_deadline: Duration,
        tokens: Option<TokenSet>,
    ) -> Self {
        Self {
            metrics,
            known_methods: Arc::new(methods::known_methods(&[
                crate::api::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ])),
            limiter: Arc::new(Semaphore::new(max_concurrent.max(1))),
            default_deadline,
            tokens: tokens.filter(|t| !t.is_empty()).map(Arc::new),
        }
    }
}

/// Adds [`Rpc`] to a service stack.
#[derive(Clone)]
pub struct RpcLayer {
    policy: RpcPolicy,
}

impl RpcLayer {
    pub fn new(policy: RpcPolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rpc {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Rpc<S> {
    inner: S,
    policy: RpcPolicy,
}

/// The upper-snake name Prometheus labels and logs use.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Decrements the in-flight gauge however the call ends (a client that
/// hangs up drops the future).
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn refusal<B: Default>(code: Code, reason: &str, message: &str) -> http::Response<B> {
    crate::status::with_reason(code, "maitre", reason, message, HashMap::new()).into_http()
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Rpc<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().trim_start_matches('/');
        let method = if self.policy.known_methods.contains(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let health = method.starts_with("grpc.health.v1.Health/");
        let streaming = health || method.starts_with("grpc.reflection.");
        let context = CallContext::from_headers(request.headers());
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            request_id = %context.request_id,
            trace_id = %context.trace.trace_id,
            code = Empty,
            duration_ms = Empty,
        );
        let outcome = Outcome {
            metrics: self.policy.metrics.clone(),
            method,
            request_id: context.request_id.clone(),
            started,
            span: span.clone(),
        };
        let policy = &self.policy;

        // Refusals are answered here, before any work or database access.
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !health
            && policy
                .tokens
                .as_ref()
                .is_some_and(|tokens| !tokens.accepts(authorization))
        {
            let response = refusal(
                Code::Unauthenticated,
                "UNAUTHENTICATED",
                "missing or invalid bearer token",
            );
            return Box::pin(std::future::ready(Ok(outcome.finish(response))));
        }
        let permit = if health {
            None
        } else {
            match policy.limiter.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let response = refusal(
                        Code::ResourceExhausted,
                        "OVERLOADED",
                        "server overloaded; retry with backoff",
                    );
                    return Box::pin(std::future::ready(Ok(outcome.finish(response))));
                }
            }
        };

        // tonic's own timer for a client's grpc-timeout answers CANCELLED;
        // ours fires a hair earlier so the caller gets DEADLINE_EXCEEDED.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(deadline::parse)
            .map(|d| {
                d.saturating_sub(DEADLINE_MARGIN)
                    .max(Duration::from_millis(1))
            })
            .unwrap_or(policy.default_deadline);
        let future = span.in_scope(|| self.inner.call(request));
        policy.metrics.rpc.in_flight.inc();
        let in_flight = InFlight(policy.metrics.rpc.in_flight.clone());
        Box::pin(
            async move {
                let call = context.scope(future);
                let result = if streaming {
                    call.await
                } else {
                    match tokio::time::timeout(deadline, call).await {
                        Ok(result) => result,
                        Err(_) => Ok(refusal(
                            Code::DeadlineExceeded,
                            "DEADLINE_EXCEEDED",
                            "deadline exceeded",
                        )),
                    }
                };
                drop(permit);
                drop(in_flight);
                Ok(outcome.finish(result?))
            }
            .instrument(span),
        )
    }
}

/// What is known of a call until its final status code: recorded once, in
/// metrics and one log line, when the code is known (response headers for
/// trailers-only answers, else the trailers).
struct Outcome {
    metrics: Arc<crate::metrics::Metrics>,
    method: String,
    request_id: String,
    started: Instant,
    span: tracing::Span,
}

impl Outcome {
    /// Tags the response with the request id, and records the code now or
    /// once the body's trailers carry it.
    fn finish(self, mut response: http::Response<Body>) -> http::Response<Body> {
        if let Ok(value) = http::HeaderValue::from_str(&self.request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        if response.headers().contains_key("grpc-status") {
            let code = normalize_decode_errors(response.headers_mut());
            self.record(code);
            response
        } else {
            response.map(|inner| {
                Body::new(Watched {
                    inner,
                    outcome: Some(self),
                })
            })
        }
    }

    fn record(self, code: Code) {
        let elapsed = self.started.elapsed();
        let labels = RpcLabels {
            method: self.method.clone(),
            code: code_name(code).to_owned(),
        };
        self.metrics.rpc.requests.get_or_create(&labels).inc();
        self.metrics
            .rpc
            .duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let _entered = self.span.enter();
        self.span.record("code", code_name(code));
        self.span
            .record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        let quiet =
            self.method.starts_with("grpc.health.") || self.method.starts_with("grpc.reflection.");
        match code {
            Code::Ok if quiet => tracing::debug!("rpc done"),
            Code::Ok => tracing::info!("rpc done"),
            // Server-side trouble: worth a look at 3 a.m.
            Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::Unavailable
            | Code::ResourceExhausted => {
                tracing::warn!("rpc failed")
            }
            _ => tracing::info!("rpc refused"),
        }
    }
}

/// A response body watched for its trailers (where a streamed answer's
/// status code travels).
struct Watched {
    inner: Body,
    outcome: Option<Outcome>,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut()
                    && let Some(outcome) = this.outcome.take()
                {
                    outcome.record(normalize_decode_errors(trailers));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(outcome) = this.outcome.take() {
                    outcome.record(Code::Unknown);
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    /// A body dropped before its trailers: the client went away.
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.take() {
            outcome.record(Code::Cancelled);
        }
    }
}

/// The final code in `headers` (a trailers-only response's headers, or a
/// stream's trailers), after one correction: tonic answers a request it
/// cannot decode with INTERNAL and one over the size limit with OUT_OF_RANGE.
/// Both are the caller's doing: reported as gRPC means (INVALID_ARGUMENT;
/// RESOURCE_EXHAUSTED, as grpc-go does), INTERNAL stays for our own bugs.
fn normalize_decode_errors(headers: &mut http::HeaderMap) -> Code {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Unknown);
    // grpc-message is percent-encoded; spaces are all we need back.
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .replace("%20", " ");
    let corrected = match code {
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Code::InvalidArgument
        }
        Code::OutOfRange if message.contains("message length too large") => Code::ResourceExhausted,
        other => return other,
    };
    headers.insert("grpc-status", http::HeaderValue::from(corrected as i32));
    corrected
}
