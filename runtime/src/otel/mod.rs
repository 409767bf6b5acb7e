//! Traces that leave the process: OpenTelemetry spans over OTLP/gRPC.
//!
//! Our own trace context (`rpc::context::TraceParent`, carried in the
//! call's task-local, in job payloads and to memory-service) stays the one
//! source of trace and span ids; a span is exported with exactly the ids
//! that were propagated, built by hand at the few places that matter
//! instead of bridged from `tracing` spans (whose ids are the subscriber's,
//! not ours). The places: the RPC layer (a server span per call), the job
//! runner (a consumer span per run), booking's memory client (a client
//! span per attempt) and the stores' hot statements ([`sql`]).
//!
//! [`Tracer`] is per server: its sampler decides new traces, and, when
//! OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, its [`export::Pipeline`]
//! queues finished spans. With export off, a span site costs a check of
//! an `Option` and a flag: nothing is timed, built or allocated.

pub mod export;
pub mod sampler;

use std::{
    borrow::Cow,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use opentelemetry::{
    InstrumentationScope,
    trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter, SpanLinks},
};
use prometheus_client::registry::Registry;

// Re-exported so the services record spans without a dependency of their own.
pub use opentelemetry::{
    KeyValue,
    trace::{SpanKind, Status},
};

pub use self::{
    export::{BatchSettings, ExportMetrics},
    sampler::{Sampler, SamplerName},
};
use crate::rpc::context::{CallContext, TraceParent};

/// The standard OpenTelemetry variables we read (the `OTEL_BSP_*` ones
/// size the export queue as the SDK's batch processor would).
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector for all signals, e.g. `http://otel-collector:4317`; unset (and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset): no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// OTLP/gRPC collector for traces; overrides OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", global = true)]
    pub otel_exporter_otlp_traces_endpoint: Option<String>,

    /// Which traces are recorded: always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = SamplerName::ParentBasedAlwaysOn, global = true)]
    pub otel_traces_sampler: SamplerName,

    /// The ratio of the *traceidratio samplers, 0 to 1 (unset: 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", global = true)]
    pub otel_traces_sampler_arg: Option<f64>,

    /// `service.name` of exported spans (unset: the binary's name).
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    pub otel_service_name: Option<String>,

    /// More resource attributes, `key=value,key=value` (e.g. deployment.environment=prod).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", global = true)]
    pub otel_resource_attributes: Option<String>,

    /// Finished spans waiting for export; when full, spans are dropped and counted (maitre_otel_spans_dropped_total).
    #[arg(
        long,
        env = "OTEL_BSP_MAX_QUEUE_SIZE",
        default_value_t = 2048,
        global = true
    )]
    pub otel_bsp_max_queue_size: usize,

    /// Most spans per export.
    #[arg(
        long,
        env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        default_value_t = 512,
        global = true
    )]
    pub otel_bsp_max_export_batch_size: usize,

    /// Milliseconds a span waits at most before its batch is exported.
    #[arg(
        long,
        env = "OTEL_BSP_SCHEDULE_DELAY",
        default_value_t = 5000,
        global = true
    )]
    pub otel_bsp_schedule_delay: u64,

    /// Milliseconds one export may take before its spans count as failed.
    #[arg(
        long,
        env = "OTEL_BSP_EXPORT_TIMEOUT",
        default_value_t = 30000,
        global = true
    )]
    pub otel_bsp_export_timeout: u64,
}

impl TraceArgs {
    /// The collector, if export is on: the traces endpoint before the
    /// general one, as the OpenTelemetry specification orders them.
    pub fn endpoint(&self) -> Option<&str> {
        [
            &self.otel_exporter_otlp_traces_endpoint,
            &self.otel_exporter_otlp_endpoint,
        ]
        .into_iter()
        .flatten()
        .map(|endpoint| endpoint.trim())
        .find(|endpoint| !endpoint.is_empty())
    }

    /// The sampler these settings name (a bad ratio is a startup error).
    pub fn sampler(&self) -> anyhow::Result<Sampler> {
        Sampler::new(self.otel_traces_sampler, self.otel_traces_sampler_arg)
            .map_err(anyhow::Error::msg)
    }

    /// The resource every exported span names: OTEL_RESOURCE_ATTRIBUTES,
    /// then `service.name` (OTEL_SERVICE_NAME, else `default_service`),
    /// which wins over a `service.name` among the attributes, as specified.
    pub fn resource(&self, default_service: &str) -> anyhow::Result<Resource> {
        let mut attributes = Vec::new();
        let mut service = None;
        for pair in self
            .otel_resource_attributes
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"))?;
            let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
            if key == "service.name" {
                service = Some(value);
            } else {
                attributes.push(KeyValue::new(key, value));
            }
        }
        let service = self
            .otel_service_name
            .clone()
            .filter(|name| !name.is_empty())
            .or(service)
            .unwrap_or_else(|| default_service.to_owned());
        Ok(Resource::builder_empty()
            .with_attributes(attributes)
            .with_service_name(service)
            .build())
    }

    /// Checks what [`Self::tracer`] would refuse (sampler ratio, resource
    /// attributes), without starting anything: for start-up, before any
    /// port is bound.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.sampler()?;
        self.resource("check")?;
        Ok(())
    }

    /// The server's tracer: always its sampler; an export pipeline (a
    /// spawned task, so call within the tokio runtime) only when an
    /// endpoint is set. Its counters go into `registry` either way.
    pub fn tracer(&self, default_service: &str, registry: &mut Registry) -> anyhow::Result<Tracer> {
        let sampler = self.sampler()?;
        let metrics = ExportMetrics::register(registry);
        let Some(endpoint) = self.endpoint() else {
            return Ok(Tracer {
                sampler,
                export: None,
            });
        };
        let timeout = Duration::from_millis(self.otel_bsp_export_timeout);
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()
            .with_context(|| format!("OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT {endpoint:?}"))?;
        exporter.set_resource(&self.resource(default_service)?);
        let settings = BatchSettings {
            max_queue: self.otel_bsp_max_queue_size,
            max_batch: self.otel_bsp_max_export_batch_size,
            schedule_delay: Duration::from_millis(self.otel_bsp_schedule_delay.max(1)),
            export_timeout: timeout,
        };
        tracing::info!(endpoint, sampler = ?self.otel_traces_sampler, "exporting traces over OTLP/gRPC");
        Ok(Tracer {
            sampler,
            export: Some(Arc::new(Exporting {
                pipeline: export::Pipeline::start(exporter, settings, metrics),
                scope: InstrumentationScope::builder("maitre")
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            })),
        })
    }
}

/// What an exporting tracer holds.
#[derive(Debug)]
struct Exporting {
    pipeline: export::Pipeline,
    scope: InstrumentationScope,
}

/// A server's sampling decision and, if export is on, where spans go.
/// Cloning is a reference count at most; the default samples like
/// `parentbased_always_on` and exports nothing.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    sampler: Sampler,
    export: Option<Arc<Exporting>>,
}

impl PartialEq for Tracer {
    fn eq(&self, other: &Self) -> bool {
        self.sampler == other.sampler
            && match (&self.export, &other.export) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for Tracer {}

impl Tracer {
    /// A tracer that samples with `sampler` and exports nothing.
    pub fn with_sampler(sampler: Sampler) -> Self {
        Self {
            sampler,
            export: None,
        }
    }

    /// Whether spans are exported at all (a pipeline task exists).
    pub fn is_exporting(&self) -> bool {
        self.export.is_some()
    }

    /// Whether a span of `trace` is to be recorded: export on and the trace sampled.
    pub fn is_recording(&self, trace: &TraceParent) -> bool {
        trace.sampled && self.export.is_some()
    }

    /// A new trace, decided by the sampler.
    pub fn new_root(&self) -> TraceParent {
        let mut trace = TraceParent::new_root();
        trace.sampled = self.sampler.root(&trace.trace_id);
        trace
    }

    /// The next hop of a caller's trace (`parent`: what it sent), decided
    /// by the sampler: a parent-based one follows the caller's flag.
    pub fn continue_remote(&self, parent: &TraceParent) -> TraceParent {
        let mut trace = parent.child();
        trace.sampled = self.sampler.child(&trace.trace_id, parent.sampled);
        trace
    }

    /// Exports `span` if this tracer records its trace.
    pub fn record(&self, span: FinishedSpan<'_>) {
        let Some(export) = &self.export else { return };
        if !span.trace.sampled {
            return;
        }
        let parse = |hex: &str| SpanId::from_hex(hex).ok();
        let (Ok(trace_id), Some(span_id)) = (
            TraceId::from_hex(&span.trace.trace_id),
            parse(&span.trace.span_id),
        ) else {
            // Our ids are generated or validated hex: cannot happen.
            return;
        };
        let parent_span_id = span
            .parent_span_id
            .and_then(parse)
            .unwrap_or(SpanId::INVALID);
        export.pipeline.send(SpanData {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id,
            parent_span_is_remote: span.parent_is_remote,
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span.status,
            instrumentation_scope: export.scope.clone(),
        });
    }

    /// Sends what is queued and stops exporting, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        if let Some(export) = &self.export {
            export.pipeline.shutdown(within).await;
        }
    }
}

/// A span that has ended, with the ids it was propagated under.
#[derive(Debug)]
pub struct FinishedSpan<'a> {
    /// Its trace and its own span id (`trace.span_id`).
    pub trace: &'a TraceParent,
    /// The span it belongs under; `None` for a trace's root.
    pub parent_span_id: Option<&'a str>,
    /// Whether the parent is in another process (an incoming call or a job payload).
    pub parent_is_remote: bool,
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub status: Status,
}

/// When something that took `elapsed` until now started, on the wall
/// clock: sites time with `Instant` and convert only when recording.
pub fn started_before(elapsed: Duration) -> (SystemTime, SystemTime) {
    let end = SystemTime::now();
    (end.checked_sub(elapsed).unwrap_or(end), end)
}

/// Runs `statement` (one SQL statement of a store function, named after
/// its query) and, if the current call or job is recorded, exports a
/// client span for it under the call's span. Outside a recorded call this
/// is one task-local lookup.
pub async fn sql<T, E, F>(name: &'static str, statement: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let Some(recorder) = Recorder::current() else {
        return statement.await;
    };
    let start = SystemTime::now();
    let result = statement.await;
    recorder.sql_span(name, start, &result, None);
    result
}

/// [`sql`] for one statement that does the work of many calls (a group
/// commit): each recorded call among them gets a client span for it, with
/// `db.operation.batch.size` saying how many calls it served.
pub async fn sql_batch<T, E, F>(
    recorders: &[Recorder],
    name: &'static str,
    batch_size: usize,
    statement: F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    if recorders.is_empty() {
        return statement.await;
    }
    let start = SystemTime::now();
    let result = statement.await;
    for recorder in recorders {
        recorder.sql_span(name, start, &result, Some(batch_size));
    }
    result
}

/// A recorded call's tracer and span, taken out of the call's task so that
/// work done for it elsewhere (a group commit's writer) can record spans
/// under it.
#[derive(Debug, Clone)]
pub struct Recorder {
    tracer: Tracer,
    parent: TraceParent,
}

impl Recorder {
    /// The current call's, if it is recorded (nothing is cloned otherwise).
    pub fn current() -> Option<Self> {
        CallContext::recording().map(|(tracer, parent)| Self { tracer, parent })
    }

    /// `context`'s, if it is recorded.
    pub fn of(context: &CallContext) -> Option<Self> {
        context.tracer.is_recording(&context.trace).then(|| Self {
            tracer: context.tracer.clone(),
            parent: context.trace.clone(),
        })
    }

    /// Records the client span of a statement that ran from `start` to now.
    fn sql_span<T, E: std::fmt::Display>(
        &self,
        name: &'static str,
        start: SystemTime,
        result: &Result<T, E>,
        batch_size: Option<usize>,
    ) {
        let end = SystemTime::now();
        let span = self.parent.child();
        let status = match result {
            Ok(_) => Status::Unset,
            Err(error) => Status::error(error.to_string()),
        };
        let mut attributes = vec![
            KeyValue::new("db.system", "postgresql"),
            KeyValue::new("db.system.name", "postgresql"),
            KeyValue::new("db.operation.name", name),
        ];
        if let Some(size) = batch_size {
            attributes.push(KeyValue::new(
                "db.operation.batch.size",
                i64::try_from(size).unwrap_or(i64::MAX),
            ));
        }
        self.tracer.record(FinishedSpan {
            trace: &span,
            parent_span_id: Some(&self.parent.span_id),
            parent_is_remote: false,
            kind: SpanKind::Client,
            name: Cow::Borrowed(name),
            start,
            end,
            attributes,
            status,
        });
    }
}

/// The attributes of an RPC span: `method` is `package.Service/Method`.
pub fn rpc_attributes(method: &str, code: tonic::Code) -> Vec<KeyValue> {
    let (service, name) = method.split_once('/').unwrap_or((method, ""));
    vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", name.to_owned()),
        KeyValue::new("rpc.grpc.status_code", code as i64),
    ]
}

/// `.traced("module::QUERY")` on a store function's statement future: the
/// same as [`sql`], written where the statement is.
pub trait TracedStatement<T, E: std::fmt::Display>: Future<Output = Result<T, E>> + Sized {
    fn traced(self, name: &'static str) -> impl Future<Output = Result<T, E>> {
        sql(name, self)
    }
}

impl<F, T, E> TracedStatement<T, E> for F
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        trace: TraceArgs,
    }

    fn args(flags: &[&str]) -> TraceArgs {
        Cli::try_parse_from(std::iter::once("test").chain(flags.iter().copied()))
            .expect("flags")
            .trace
    }

    #[test]
    fn the_traces_endpoint_wins_and_none_means_off() {
        assert_eq!(args(&[]).endpoint(), None);
        let both = args(&[
            "--otel-exporter-otlp-endpoint",
            "http://all:4317",
            "--otel-exporter-otlp-traces-endpoint",
            "http://traces:4317",
        ]);
        assert_eq!(both.endpoint(), Some("http://traces:4317"));
        let blank = args(&["--otel-exporter-otlp-endpoint", " "]);
        assert_eq!(blank.endpoint(), None);
    }

    #[test]
    fn the_resource_names_the_service_and_bad_settings_are_refused() {
        let resource = args(&["--otel-resource-attributes", "service.name=x, env=prod"])
            .resource("memory-service")
            .expect("resource");
        let get = |key: &'static str| resource.get(&opentelemetry::Key::from_static_str(key));
        assert_eq!(get("service.name").map(|v| v.to_string()), Some("x".into()));
        assert_eq!(get("env").map(|v| v.to_string()), Some("prod".into()));
        let named = args(&[
            "--otel-service-name",
            "y",
            "--otel-resource-attributes",
            "service.name=x",
        ])
        .resource("memory-service")
        .expect("resource");
        assert_eq!(
            named
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .map(|v| v.to_string()),
            Some("y".into())
        );
        assert!(
            args(&["--otel-resource-attributes", "novalue"])
                .validate()
                .is_err()
        );
        assert!(
            args(&["--otel-traces-sampler-arg", "2"])
                .validate()
                .is_err()
        );
        assert!(
            args(&[
                "--otel-traces-sampler",
                "parentbased_traceidratio",
                "--otel-traces-sampler-arg",
                "0.25"
            ])
            .validate()
            .is_ok()
        );
    }
}
