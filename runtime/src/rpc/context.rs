//! Who a call is: its request id (from `x-request-id`, or generated), its
//! W3C trace context (from `traceparent`, or a new trace) and, once the RPC
//! layer has authenticated it, the caller's name. They ride along in a
//! task-local for the length of the call, so log lines carry them, outgoing
//! calls (booking → memory) pass the first two on, and handlers can scope
//! what a caller may see or claim (e.g. idempotency keys) by its name.

use uuid::Uuid;

use crate::otel::Tracer;

tokio::task_local! {
    static CURRENT: CallContext;
    /// When the running call's deadline passes (the client's `grpc-timeout`,
    /// capped, or the server default): apart from [`CallContext`] so that
    /// the contexts jobs build for themselves need not invent one.
    static DEADLINE: std::time::Instant;
}

/// Longest accepted `x-request-id`.
const MAX_REQUEST_ID: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    pub request_id: String,
    pub trace: TraceParent,
    /// The authenticated caller (`AUTH_GRANTS` name); `None` when the
    /// server runs with AUTH_MODE=none or outside a call.
    pub caller: Option<String>,
    /// The span this call's span belongs under (the caller's, from its
    /// `traceparent` or the job's payload); `None` when the trace starts here.
    pub parent_span_id: Option<String>,
    /// The server's sampler and span export, for the spans of this call.
    pub tracer: Tracer,
}

impl CallContext {
    /// From incoming headers; anything missing or malformed is generated.
    /// `tracer` decides whether the call is sampled.
    pub fn from_headers(headers: &http::HeaderMap, tracer: &Tracer) -> Self {
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= MAX_REQUEST_ID
                    && v.bytes().all(|b| b.is_ascii_graphic())
            })
            .map(str::to_owned)
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        Self::continuing(request_id, parent, tracer)
    }

    /// A call (or job) with `request_id` that continues `parent`'s trace,
    /// or starts one, as `tracer`'s sampler decides.
    pub fn continuing(request_id: String, parent: Option<TraceParent>, tracer: &Tracer) -> Self {
        let (trace, parent_span_id) = match parent {
            Some(parent) => (tracer.continue_remote(&parent), Some(parent.span_id)),
            None => (tracer.new_root(), None),
        };
        Self {
            request_id,
            trace,
            caller: None,
            parent_span_id,
            tracer: tracer.clone(),
        }
    }

    /// The current call's tracer and trace, only when its spans are
    /// recorded: with export off nothing is cloned.
    pub fn recording() -> Option<(Tracer, TraceParent)> {
        CURRENT
            .try_with(|c| {
                c.tracer
                    .is_recording(&c.trace)
                    .then(|| (c.tracer.clone(), c.trace.clone()))
            })
            .ok()
            .flatten()
    }

    /// The current call's authenticated caller name, if any.
    pub fn current_caller() -> Option<String> {
        CURRENT.try_with(|c| c.caller.clone()).ok().flatten()
    }

    /// When the current call's deadline passes, for handlers that stop long
    /// work in time to answer (DeleteUserData); `None` outside a call.
    pub fn current_deadline() -> Option<std::time::Instant> {
        DEADLINE.try_with(|d| *d).ok()
    }

    /// Runs `future` with this context and `deadline` as the current ones.
    pub async fn scope_with_deadline<F: std::future::Future>(
        self,
        deadline: std::time::Instant,
        future: F,
    ) -> F::Output {
        CURRENT.scope(self, DEADLINE.scope(deadline, future)).await
    }

    /// The context of the running call or job, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this context as the current one.
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }
}

/// A W3C `traceparent`: version 00, 16-byte trace id, 8-byte span id, flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits: this hop's span.
    pub span_id: String,
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace, sampled (`Tracer::new_root` applies the sampler).
    pub fn new_root() -> Self {
        Self {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            sampled: true,
        }
    }

    /// Parses `00-<trace>-<span>-<flags>`; refuses all-zero ids as the spec says.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let ok = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && hex(span_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && span_id.bytes().any(|b| b != b'0');
        ok.then(|| Self {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            sampled: u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1),
        })
    }

    /// A new span in the same trace (for the next hop).
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            sampled: self.sampled,
        }
    }

    pub fn header_value(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_continues_a_trace() {
        let parent =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parent.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parent.sampled);
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(TraceParent::parse(&child.header_value()), Some(child));
    }

    #[test]
    fn refuses_malformed_traceparents() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn request_id_is_taken_or_generated() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-request-id", "abc-123".parse().unwrap());
        let tracer = Tracer::default();
        assert_eq!(
            CallContext::from_headers(&headers, &tracer).request_id,
            "abc-123"
        );
        headers.insert("x-request-id", "has space".parse().unwrap());
        assert_ne!(
            CallContext::from_headers(&headers, &tracer).request_id,
            "has space"
        );
    }

    #[test]
    fn the_propagated_flag_is_the_samplers_decision() {
        use crate::otel::{Sampler, SamplerName};
        let tracer = |name, arg| Tracer::with_sampler(Sampler::new(name, arg).unwrap());
        let mut headers = http::HeaderMap::new();
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        headers.insert("traceparent", unsampled.parse().unwrap());
        let call =
            CallContext::from_headers(&headers, &tracer(SamplerName::ParentBasedAlwaysOn, None));
        assert!(
            !call.trace.sampled,
            "a parent-based sampler follows the caller"
        );
        assert!(call.trace.header_value().ends_with("-00"));
        assert_eq!(call.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        let call = CallContext::from_headers(&headers, &tracer(SamplerName::AlwaysOn, None));
        assert!(call.trace.sampled);
        // A new trace: decided by the ratio.
        let none = tracer(SamplerName::ParentBasedTraceIdRatio, Some(0.0));
        let call = CallContext::from_headers(&http::HeaderMap::new(), &none);
        assert!(!call.trace.sampled);
        assert!(call.trace.header_value().ends_with("-00"));
        assert_eq!(call.parent_span_id, None);
        let all = tracer(SamplerName::ParentBasedTraceIdRatio, Some(1.0));
        assert!(
            CallContext::from_headers(&http::HeaderMap::new(), &all)
                .trace
                .sampled
        );
    }
}
