//! One span and one log line per RPC: method, gRPC status code, duration.
//!
//! Sits at the HTTP level, below tonic's routing, so it sees every call,
//! including those refused before reaching a handler. The status code is read
//! from the response headers: tonic sends errors as "trailers-only" responses
//! (code in the headers), and a response without `grpc-status` in its headers
//! is a successful unary answer whose OK code follows in the trailers.
//! Request content is never logged.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tonic::Code;
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};

/// Adds [`RpcLog`] to a service stack.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcLog { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
}

/// The gRPC status code of a response, as far as its headers tell.
pub fn response_code<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Ok)
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let span = tracing::info_span!("rpc", method = %method, code = Empty, duration_ms = Empty);
        let future = span.in_scope(|| self.inner.call(request));
        let quiet = method.starts_with("/grpc.health.v1.Health/")
            || method.starts_with("/grpc.reflection.");
        Box::pin(
            async move {
                let started = Instant::now();
                let result = future.await;
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                let span = tracing::Span::current();
                span.record("duration_ms", elapsed_ms);
                match &result {
                    Ok(response) => {
                        let code = response_code(response);
                        span.record("code", tracing::field::debug(code));
                        log_outcome(code, quiet);
                    }
                    Err(error) => {
                        span.record("code", "TransportError");
                        tracing::warn!(%error, "rpc failed in transport");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

fn log_outcome(code: Code, quiet: bool) {
    match code {
        Code::Ok if quiet => tracing::debug!("rpc done"),
        Code::Ok => tracing::info!("rpc done"),
        // Server-side trouble: worth a look at 3 a.m.
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable => {
            tracing::warn!("rpc failed")
        }
        _ => tracing::info!("rpc refused"),
    }
}
