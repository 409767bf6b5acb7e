//! The export pipeline: a bounded queue that a call never waits on, and one
//! background task that batches spans to the OTLP exporter.
//!
//! The SDK's BatchSpanProcessor would do the batching, but it reports a full
//! queue only through its internal log; operators need to see lost spans in
//! Prometheus. So: `try_send` into a bounded channel (a full queue drops
//! the span and counts it), a batch leaves when it is full or every
//! `schedule_delay`, each export under a timeout, and exported / failed
//! spans are counted too. A collector that is down or slow costs requests
//! nothing: the exporting task waits, the queue fills, spans are dropped.

use std::{sync::Mutex, time::Duration};

use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// The counters of the pipeline, registered as `maitre_otel_spans_*_total`.
#[derive(Debug, Clone, Default)]
pub struct ExportMetrics {
    /// Spans lost because the queue was full (collector down or slow).
    pub dropped: Counter,
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans in batches the exporter failed to deliver (error or timeout).
    pub failed: Counter,
}

impl ExportMetrics {
    /// Registered whether or not export is on, so a dashboard reads 0
    /// instead of "no data" and an alert on drops needs no special case.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "otel_spans_dropped",
            "Spans dropped because the export queue was full (collector down or slow)",
            metrics.dropped.clone(),
        );
        registry.register(
            "otel_spans_exported",
            "Spans the OTLP collector accepted",
            metrics.exported.clone(),
        );
        registry.register(
            "otel_spans_failed",
            "Spans in export batches that failed or timed out",
            metrics.failed.clone(),
        );
        metrics
    }
}

/// How the queue drains.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Spans the queue holds; more are dropped.
    pub max_queue: usize,
    /// Largest batch one export sends.
    pub max_batch: usize,
    /// Longest a span waits for its batch to fill.
    pub schedule_delay: Duration,
    /// Longest one export may take.
    pub export_timeout: Duration,
}

/// The sending side, shared by every call of a server.
#[derive(Debug)]
pub struct Pipeline {
    queue: mpsc::Sender<SpanData>,
    metrics: ExportMetrics,
    stop: watch::Sender<bool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Pipeline {
    /// Spawns the exporting task (on the current tokio runtime).
    pub fn start<E>(exporter: E, settings: BatchSettings, metrics: ExportMetrics) -> Self
    where
        E: SpanExporter + 'static,
    {
        let (queue, spans) = mpsc::channel(settings.max_queue.max(1));
        let (stop, stopping) = watch::channel(false);
        let worker = tokio::spawn(run(exporter, spans, stopping, settings, metrics.clone()));
        Self {
            queue,
            metrics,
            stop,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Queues `span`, or drops and counts it when the queue is full: never waits.
    pub fn send(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Exports what is queued and stops the task, waiting at most `within`
    /// (a collector that is down must not hold up the process's exit).
    pub async fn shutdown(&self, within: Duration) {
        let _ = self.stop.send(true);
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(worker) = worker
            && tokio::time::timeout(within, worker).await.is_err()
        {
            tracing::warn!(
                ?within,
                "trace export did not finish in time; spans left unsent"
            );
        }
    }
}

async fn run<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut stopping: watch::Receiver<bool>,
    settings: BatchSettings,
    metrics: ExportMetrics,
) {
    let max_batch = settings.max_batch.max(1);
    let mut tick = tokio::time::interval(settings.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let room = max_batch - batch.len();
        tokio::select! {
            // Sent once, at shutdown (or the sender is gone).
            _ = stopping.changed() => break,
            received = spans.recv_many(&mut batch, room) => {
                if received == 0 {
                    break;
                }
                if batch.len() >= max_batch {
                    export(&exporter, &mut batch, &settings, &metrics).await;
                }
            }
            _ = tick.tick() => {
                if !batch.is_empty() {
                    export(&exporter, &mut batch, &settings, &metrics).await;
                }
            }
        }
    }
    // Stopping: what is queued now goes out, batch by batch.
    loop {
        while batch.len() < max_batch {
            match spans.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        export(&exporter, &mut batch, &settings, &metrics).await;
    }
    let _ = exporter.shutdown_with_timeout(settings.export_timeout);
}

async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    settings: &BatchSettings,
    metrics: &ExportMetrics,
) {
    let spans = std::mem::replace(batch, Vec::with_capacity(settings.max_batch));
    let count = spans.len() as u64;
    match tokio::time::timeout(settings.export_timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            metrics.exported.inc_by(count);
        }
        Ok(Err(error)) => {
            metrics.failed.inc_by(count);
            tracing::debug!(%error, spans = count, "trace export failed");
        }
        Err(_) => {
            metrics.failed.inc_by(count);
            tracing::debug!(spans = count, "trace export timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::SystemTime,
    };

    use opentelemetry::{
        InstrumentationScope,
        trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        trace::{SpanEvents, SpanLinks},
    };

    use super::*;

    fn span(n: u64) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(n) + 1),
                SpanId::from(n + 1),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "test".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::default(),
        }
    }

    /// Never answers, like a collector that accepted the connection and hung.
    #[derive(Debug)]
    struct Stuck;

    impl SpanExporter for Stuck {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            std::future::pending().await
        }
    }

    /// Accepts everything, counting spans.
    #[derive(Debug, Default)]
    struct Counting(Arc<AtomicUsize>);

    impl SpanExporter for Counting {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    fn settings(max_queue: usize, max_batch: usize) -> BatchSettings {
        BatchSettings {
            max_queue,
            max_batch,
            schedule_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = ExportMetrics::default();
        let pipeline = Pipeline::start(Stuck, settings(2, 1), metrics.clone());
        for n in 0..10 {
            pipeline.send(span(n)); // returns at once even with the exporter stuck
        }
        tokio::task::yield_now().await;
        // The queue holds 2, the stuck batch at most 1: the rest are counted.
        let dropped = metrics.dropped.get();
        assert!((7..=8).contains(&dropped), "dropped {dropped}");
        // Shutdown gives up on the stuck export after its bound.
        tokio::time::timeout(
            Duration::from_secs(30),
            pipeline.shutdown(Duration::from_millis(50)),
        )
        .await
        .expect("bounded shutdown");
    }

    #[tokio::test]
    async fn shutdown_exports_what_is_queued() {
        let metrics = ExportMetrics::default();
        let received = Arc::new(AtomicUsize::new(0));
        let pipeline = Pipeline::start(
            Counting(received.clone()),
            settings(100, 4),
            metrics.clone(),
        );
        for n in 0..10 {
            pipeline.send(span(n));
        }
        pipeline.shutdown(Duration::from_secs(30)).await;
        assert_eq!(received.load(Ordering::SeqCst), 10);
        assert_eq!(metrics.exported.get(), 10);
        assert_eq!(metrics.dropped.get(), 0);
        assert_eq!(metrics.failed.get(), 0);
    }
}
