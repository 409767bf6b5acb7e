//! Trace export never costs a call: with the collector down or silent,
//! calls answer as usual and the lost spans are counted on /metrics; with
//! no endpoint there is no exporter at all. (scripts/trace-check.sh checks
//! what a live collector receives, across both services.)

use std::time::Duration;

use maitre_runtime::testkit::{http_get, sample, wait_for};
use tokio::net::TcpListener;

use crate::support::{TestApp, spawn_app_with};

/// Generous: only a call that waited on the exporter would take this long.
const PROMPT: Duration = Duration::from_secs(5);

/// Stores `count` messages, each of which must answer within [`PROMPT`].
async fn store_promptly(app: &TestApp, count: usize) {
    let conversation = uuid::Uuid::now_v7().to_string();
    for i in 0..count {
        let message = TestApp::message(&conversation, "tracer", &format!("m{i}"), None);
        tokio::time::timeout(PROMPT, app.store(message))
            .await
            .unwrap_or_else(|_| panic!("call {i} waited on the trace exporter"))
            .expect("stored");
    }
}

async fn counter(app: &TestApp, metric: &str) -> f64 {
    let (_, body) = http_get(app.admin_addr.expect("admin port"), "/metrics").await;
    sample(&body, metric, &[("service", "memory-service")])
        .unwrap_or_else(|| panic!("{metric} missing from /metrics:\n{body}"))
}

#[tokio::test]
async fn a_silent_collector_costs_calls_nothing_and_dropped_spans_are_counted() {
    // Accepts connections and never answers: each export hangs until its
    // timeout (a minute), so the small queue fills behind it.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let app = spawn_app_with(|s| {
        let trace = &mut s.common.trace;
        trace.otel_exporter_otlp_endpoint = Some(endpoint);
        trace.otel_bsp_max_queue_size = 8;
        trace.otel_bsp_max_export_batch_size = 4;
        trace.otel_bsp_schedule_delay = 10;
        trace.otel_bsp_export_timeout = 60_000;
    })
    .await;

    // At least one server span and one SQL span per call: far more than
    // the queue and the stuck batch hold.
    store_promptly(&app, 40).await;

    let dropped = wait_for("dropped spans counted", Duration::from_secs(30), || async {
        let dropped = counter(&app, "maitre_otel_spans_dropped_total").await;
        (dropped > 0.0).then_some(dropped)
    })
    .await;
    assert!(
        dropped >= 40.0,
        "80+ spans, at most 8 + 4 + 4 held: {dropped}"
    );
    assert_eq!(counter(&app, "maitre_otel_spans_exported_total").await, 0.0);
    // Shutting down waits for the stuck export only so long.
    tokio::time::timeout(Duration::from_secs(30), app.shutdown())
        .await
        .expect("shutdown bounded despite the silent collector")
        .expect("clean exit");
    held.abort();
}

#[tokio::test]
async fn a_collector_that_is_down_fails_exports_without_failing_calls() {
    // A port nothing listens on: every export is refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let app = spawn_app_with(|s| {
        let trace = &mut s.common.trace;
        trace.otel_exporter_otlp_endpoint = Some(format!("http://{closed}"));
        trace.otel_bsp_schedule_delay = 10;
        trace.otel_bsp_export_timeout = 2_000;
    })
    .await;

    store_promptly(&app, 5).await;

    wait_for(
        "failed exports counted",
        Duration::from_secs(60),
        || async { (counter(&app, "maitre_otel_spans_failed_total").await > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(counter(&app, "maitre_otel_spans_exported_total").await, 0.0);
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_no_exporter_runs() {
    let app = spawn_app_with(|s| {
        let trace = &mut s.common.trace;
        trace.otel_exporter_otlp_endpoint = None;
        trace.otel_exporter_otlp_traces_endpoint = None;
        // A tiny queue would overflow at once if anything were queued.
        trace.otel_bsp_max_queue_size = 1;
    })
    .await;

    store_promptly(&app, 5).await;

    for metric in [
        "maitre_otel_spans_dropped_total",
        "maitre_otel_spans_exported_total",
        "maitre_otel_spans_failed_total",
    ] {
        assert_eq!(counter(&app, metric).await, 0.0, "{metric}");
    }
    // The same settings build a tracer without an export pipeline (task).
    let mut settings = memory_service::config::Settings::for_database(&app.database_url);
    settings.common.trace.otel_exporter_otlp_endpoint = None;
    settings.common.trace.otel_exporter_otlp_traces_endpoint = None;
    assert_eq!(settings.common.trace.endpoint(), None);
    let mut metrics = maitre_runtime::metrics::Metrics::new("memory-service");
    let tracer = settings
        .common
        .trace
        .tracer("memory-service", metrics.registry_mut())
        .expect("tracer");
    assert!(!tracer.is_exporting());
}
