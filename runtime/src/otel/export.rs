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
