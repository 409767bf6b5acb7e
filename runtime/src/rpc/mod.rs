//! The one layer every RPC passes through, at the HTTP level below tonic's
//! routing, in this order:
//!
//! 1. identity: request id (`x-request-id`, echoed back) and W3C trace
//!    context (`traceparent`), in a span and a task-local for the call;
//! 2. authentication and authorization: the caller's name from its bearer
//!    token or client certificate, and the grants for the method
//!    (UNAUTHENTICATED / PERMISSION_DENIED), unless AUTH_MODE is `none`;
//! 3. the request message is read in full, within `REQUEST_READ_TIMEOUT`,
//!    a size cap and a byte budget shared by all calls
//!    (`MAX_PENDING_REQUEST_BYTES`), *before* any permit is taken: a stream
//!    that sends HEADERS and then nothing holds no slot, and a crowd of
//!    half-sent bodies cannot grow the process without bound (every method
//!    of ours takes one request message; reflection, a bidirectional
//!    stream, is exempt);
//! 4. load shedding: past the global concurrency limit a call fails at once
//!    with RESOURCE_EXHAUSTED instead of queueing without bound;
//! 5. the deadline: the client's `grpc-timeout` capped at `MAX_RPC_TIMEOUT`,
//!    or the server default, answered with DEADLINE_EXCEEDED;
//! 6. metrics and one log line with method, caller, code and duration.
//!
//! Health checks skip 2, 4 and 5 (the kubelet must always get an answer);
//! Health/Watch streams are bounded by their own limit instead. Reflection
//! skips 3 and 5 (it is a long-lived stream). Request content is never
//! logged. Codes are read from response headers: tonic sends errors
//! "trailers-only" (code in the headers); a response without `grpc-status`
//! there is a successful answer whose OK follows in the trailers.

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

use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};

pub use self::{
    auth::{Grants, TokenSet},
    context::CallContext,
};
use crate::metrics::{DeniedLabels, Metrics, RpcLabels};

/// How much earlier than tonic's own grpc-timeout timer ours fires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(3);

/// Who may call what. `None` in [`RpcPolicy::access`] is AUTH_MODE=none.
#[derive(Debug, Default)]
pub struct Access {
    /// Bearer tokens, each naming its caller.
    pub tokens: TokenSet,
    /// Whether client certificates (checked by TLS against the client CA)
    /// name callers too.
    pub client_certificates: bool,
    pub grants: Grants,
}

/// What the layer enforces and where it reports.
#[derive(Clone)]
pub struct RpcPolicy {
    pub metrics: Arc<Metrics>,
    /// The gRPC service this port serves (beside health and reflection).
    pub service_name: &'static str,
    /// Paths this port serves, labelled as themselves in metrics; any other
    /// path is `unknown` and answered UNIMPLEMENTED here.
    pub known_methods: Arc<HashSet<String>>,
    /// Permits for calls in progress, shared by all connections.
    pub limiter: Arc<Semaphore>,
    /// Permits for open Health/Watch streams.
    pub health_watchers: Arc<Semaphore>,
    /// Deadline of calls that bring none.
    pub default_deadline: Duration,
    /// The longest deadline a client may ask for.
    pub max_deadline: Duration,
    /// How long a client has to send its request message.
    pub request_read_timeout: Duration,
    /// Largest request body read (the decoder's own limit is lower).
    pub max_request_bytes: usize,
    /// Bytes of request bodies held at once, all calls together: each
    /// data frame is reserved as it arrives, and the reservation lasts as
    /// long as the call.
    pub request_buffers: Arc<Semaphore>,
    /// `None` leaves the server open (AUTH_MODE=none).
    pub access: Option<Arc<Access>>,
    /// Sampling and span export for the calls of this server.
    pub tracer: crate::otel::Tracer,
}

/// The limits of [`RpcPolicy`], from the server's flags.
#[derive(Debug, Clone)]
pub struct RpcLimits {
    pub max_concurrent: usize,
    pub max_health_watchers: usize,
    pub default_deadline: Duration,
    pub max_deadline: Duration,
    pub request_read_timeout: Duration,
    pub max_request_bytes: usize,
    pub max_pending_request_bytes: usize,
}

impl RpcPolicy {
    pub fn new(
        service_name: &'static str,
        metrics: Arc<Metrics>,
        limits: RpcLimits,
        access: Option<Access>,
        tracer: crate::otel::Tracer,
    ) -> Self {
        let own = format!("{service_name}/");
        let known_methods = methods::known_methods(&[
            maitre_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .into_iter()
        .filter(|path| path.starts_with(&own) || path.starts_with("grpc."))
        .collect();
        Self {
            metrics,
            service_name,
            known_methods: Arc::new(known_methods),
            limiter: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            health_watchers: Arc::new(Semaphore::new(limits.max_health_watchers.max(1))),
            default_deadline: limits.default_deadline.min(limits.max_deadline),
            max_deadline: limits.max_deadline,
            request_read_timeout: limits.request_read_timeout,
            max_request_bytes: limits.max_request_bytes,
            request_buffers: Arc::new(Semaphore::new(
                limits
                    .max_pending_request_bytes
                    .clamp(limits.max_request_bytes, Semaphore::MAX_PERMITS),
            )),
            access: access.map(Arc::new),
            tracer,
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

/// The caller's name, or the refusal to send instead.
fn authenticate(
    access: &Access,
    request: &http::Request<impl Sized>,
) -> Result<String, (Code, &'static str, &'static str)> {
    if let Some(authorization) = request.headers().get("authorization") {
        return authorization
            .to_str()
            .ok()
            .and_then(|value| access.tokens.identify(value))
            .map(str::to_owned)
            .ok_or((
                Code::Unauthenticated,
                "UNAUTHENTICATED",
                "invalid bearer token",
            ));
    }
    if access.client_certificates {
        let certificate = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        return certificate
            .as_deref()
            .and_then(auth::certificate_identity)
            .ok_or((
                Code::Unauthenticated,
                "UNAUTHENTICATED",
                "the client certificate names no caller (no DNS SubjectAltName or Common Name)",
            ));
    }
    Err((
        Code::Unauthenticated,
        "UNAUTHENTICATED",
        "missing bearer token (authorization: Bearer <token>)",
    ))
}

impl<S> Service<http::Request<Body>> for Rpc<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().trim_start_matches('/');
        let method = if self.policy.known_methods.contains(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let health = method.starts_with("grpc.health.v1.Health/");
        let health_watch = method == "grpc.health.v1.Health/Watch";
        let reflection = method.starts_with("grpc.reflection.");
        let mut context = CallContext::from_headers(request.headers(), &self.policy.tracer);
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            request_id = %context.request_id,
            trace_id = %context.trace.trace_id,
            caller = Empty,
            code = Empty,
            duration_ms = Empty,
        );
        // Probes and reflection would only bury the traces worth reading.
        let exported = !health && !reflection && context.tracer.is_recording(&context.trace);
        let outcome = Outcome {
            metrics: self.policy.metrics.clone(),
            method: method.clone(),
            request_id: context.request_id.clone(),
            started,
            span: span.clone(),
            exported: exported.then(|| ServerSpan {
                tracer: context.tracer.clone(),
                trace: context.trace.clone(),
                parent_span_id: context.parent_span_id.clone(),
            }),
        };
        let policy = self.policy.clone();
        let refuse = |outcome: Outcome, code, reason, message: &str| -> Self::Future {
            let response = refusal(code, reason, message);
            Box::pin(std::future::ready(Ok(outcome.finish(response))))
        };

        // Refusals are answered here, before any work or database access.
        if !health && let Some(access) = &policy.access {
            let caller = match authenticate(access, &request) {
                Ok(caller) => caller,
                Err((code, reason, message)) => return refuse(outcome, code, reason, message),
            };
            span.record("caller", caller.as_str());
            context.caller = Some(caller.clone());
            // Reflection describes the API, not data: any caller may use it.
            // Paths this server does not serve are answered below.
            let granted =
                reflection || method == "unknown" || access.grants.allows(&caller, &method);
            if !granted {
                let labels = DeniedLabels {
                    caller: if access.grants.knows(&caller) {
                        caller.clone()
                    } else {
                        "unknown".into()
                    },
                    method: method.clone(),
                };
                policy.metrics.rpc.denied.get_or_create(&labels).inc();
                let message =
                    format!("caller {caller:?} is not granted {method} (see AUTH_GRANTS)");
                return refuse(
                    outcome,
                    Code::PermissionDenied,
                    "METHOD_NOT_GRANTED",
                    &message,
                );
            }
        }

        if method == "unknown" {
            // Say what this port is, so a caller that dialled the wrong
            // service (or mistyped a method) learns it from the status.
            let message = format!(
                "{} is not served on this port; it serves {} (plus grpc.health.v1.Health \
                 and server reflection)",
                request.uri().path(),
                policy.service_name
            );
            return refuse(outcome, Code::Unimplemented, "METHOD_NOT_FOUND", &message);
        }

        // The client's deadline, capped; tonic's own timer for it answers
        // CANCELLED, so ours fires a hair earlier to say DEADLINE_EXCEEDED.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(deadline::parse)
            .map(|d| {
                d.min(policy.max_deadline)
                    .saturating_sub(DEADLINE_MARGIN)
                    .max(Duration::from_millis(1))
            })
            .unwrap_or(policy.default_deadline);
        let mut inner = self.inner.clone();
        // Tower's contract: call the instance that was polled ready.
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(
            async move {
                let (request, _buffered) = if reflection {
                    (request, None)
                } else {
                    match read_request(request, &policy, deadline, started).await {
                        Ok((request, buffered)) => (request, Some(buffered)),
                        Err((code, reason, message)) => {
                            return Ok(outcome.finish(refusal(code, reason, message)));
                        }
                    }
                };
                // Health/Watch streams have a pool of their own; a Check is
                // never shed; everything else takes a call permit.
                let pool = if health_watch {
                    Some((
                        &policy.health_watchers,
                        "TOO_MANY_WATCHERS",
                        "too many Health/Watch streams open; poll Health/Check instead",
                    ))
                } else if health {
                    None
                } else {
                    Some((
                        &policy.limiter,
                        "OVERLOADED",
                        "server overloaded; retry with backoff",
                    ))
                };
                let permit = match pool {
                    None => None,
                    Some((permits, reason, message)) => match permits.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            let response = refusal(Code::ResourceExhausted, reason, message);
                            return Ok(outcome.finish(response));
                        }
                    },
                };
                let call = context.scope_with_deadline(started + deadline, inner.call(request));
                policy.metrics.rpc.in_flight.inc();
                let in_flight = InFlight(policy.metrics.rpc.in_flight.clone());
                let result = if reflection || health_watch {
                    call.await
                } else {
                    let remaining = deadline.saturating_sub(started.elapsed());
                    match tokio::time::timeout(remaining, call).await {
                        Ok(result) => result,
                        Err(_) => Ok(refusal(
                            Code::DeadlineExceeded,
                            "DEADLINE_EXCEEDED",
                            "deadline exceeded",
                        )),
                    }
                };
                drop(in_flight);
                let response = result?;
                // A Watch stream holds its permit for as long as it is open.
                let response = if health_watch {
                    let gauge = policy.metrics.rpc.health_watchers.clone();
                    gauge.inc();
                    response.map(|inner| {
                        Body::new(Holding {
                            inner,
                            _permit: permit,
                            gauge,
                        })
                    })
                } else {
                    drop(permit);
                    response
                };
                Ok(outcome.finish(response))
            }
            .instrument(span),
        )
    }
}

type Refusal = (Code, &'static str, &'static str);

/// The request with its body read in full and the reservation of its bytes
/// in the shared request-buffer budget, or why it could not be read.
async fn read_request(
    request: http::Request<Body>,
    policy: &RpcPolicy,
    deadline: Duration,
    started: Instant,
) -> Result<(http::Request<Body>, Option<OwnedSemaphorePermit>), Refusal> {
    let (parts, mut body) = request.into_parts();
    let wait = policy
        .request_read_timeout
        .min(deadline)
        .saturating_sub(started.elapsed());
    let read = async {
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        let mut reserved: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                (
                    Code::Cancelled,
                    "REQUEST_ABORTED",
                    "the client stopped sending its request",
                )
            })?;
            let chunk = match frame.into_data() {
                Ok(chunk) => chunk,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            if data.len() + chunk.len() > policy.max_request_bytes {
                return Err((
                    Code::ResourceExhausted,
                    "REQUEST_TOO_LARGE",
                    "request message too large for this server",
                ));
            }
            // Reserve before holding: a crowd of half-sent bodies is refused
            // instead of growing the process past its memory limit.
            let size = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let permit = policy
                .request_buffers
                .clone()
                .try_acquire_many_owned(size)
                .map_err(|_| {
                    (
                        Code::ResourceExhausted,
                        "REQUEST_BUFFERS_FULL",
                        "too many request bytes in flight; retry with backoff",
                    )
                })?;
            match &mut reserved {
                Some(held) => held.merge(permit),
                None => reserved = Some(permit),
            }
            data.extend_from_slice(&chunk);
        }
        Ok((data.freeze(), trailers, reserved))
    };
    let (data, trailers, reserved) = match tokio::time::timeout(wait, read).await {
        Ok(result) => result?,
        Err(_) => {
            return Err((
                Code::DeadlineExceeded,
                "REQUEST_READ_TIMEOUT",
                "request message not received in time (REQUEST_READ_TIMEOUT)",
            ));
        }
    };
    let mut full = http_body_util::Full::new(data)
        .map_err(|never| match never {})
        .boxed_unsync();
    if let Some(trailers) = trailers {
        full = full
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed_unsync();
    }
    Ok((http::Request::from_parts(parts, Body::new(full)), reserved))
}

/// A response body that holds a permit (and counts itself in a gauge)
/// until the stream ends or the client goes away.
struct Holding {
    inner: Body,
    _permit: Option<OwnedSemaphorePermit>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    /// The call's server span, when it is exported.
    exported: Option<ServerSpan>,
}

/// What the exported server span of a call needs once its code is known.
struct ServerSpan {
    tracer: crate::otel::Tracer,
    trace: context::TraceParent,
    parent_span_id: Option<String>,
}

impl ServerSpan {
    fn record(self, method: &str, request_id: &str, code: Code, elapsed: Duration) {
        use opentelemetry::trace::{SpanKind, Status};
        let (start, end) = crate::otel::started_before(elapsed);
        let mut attributes = crate::otel::rpc_attributes(method, code);
        attributes.push(opentelemetry::KeyValue::new(
            "maitre.request_id",
            request_id.to_owned(),
        ));
        // Server-side failures only (OpenTelemetry's gRPC conventions): a
        // refused request is the caller's doing, not an error of ours.
        let status = match code {
            Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => Status::error(code_name(code)),
            _ => Status::Unset,
        };
        self.tracer.record(crate::otel::FinishedSpan {
            trace: &self.trace,
            parent_span_id: self.parent_span_id.as_deref(),
            parent_is_remote: true,
            kind: SpanKind::Server,
            name: method.to_owned().into(),
            start,
            end,
            attributes,
            status,
        });
    }
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

    fn record(mut self, code: Code) {
        let elapsed = self.started.elapsed();
        if let Some(span) = self.exported.take() {
            span.record(&self.method, &self.request_id, code, elapsed);
        }
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
            // Shedding comes in floods: one WARN per interval says how many
            // (metrics count every one), the rest go to debug.
            Code::ResourceExhausted => match shed_log_due() {
                Some(suppressed) => tracing::warn!(
                    suppressed_since_last_warning = suppressed,
                    "rpc failed: RESOURCE_EXHAUSTED (calls shed; see maitre_rpc_requests_total)"
                ),
                None => tracing::debug!("rpc failed"),
            },
            // Server-side trouble: worth a look at 3 a.m.
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable => {
                tracing::warn!("rpc failed")
            }
            _ => tracing::info!("rpc refused"),
        }
    }
}

/// How often a flood of RESOURCE_EXHAUSTED answers is logged at WARN.
const SHED_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// `Some(calls shed since the last WARN)` when a WARN is due now.
fn shed_log_due() -> Option<u64> {
    static LAST: std::sync::Mutex<(Option<Instant>, u64)> = std::sync::Mutex::new((None, 0));
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let due = last.0.is_none_or(|at| at.elapsed() >= SHED_WARN_INTERVAL);
    if due {
        let suppressed = last.1;
        *last = (Some(Instant::now()), 0);
        Some(suppressed)
    } else {
        last.1 += 1;
        None
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
