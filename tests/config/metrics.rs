//! Every metric the Grafana dashboard in deploy/grafana, or an alert rule
//! anywhere in deploy/, queries is one the services register: a renamed
//! metric would otherwise leave an empty panel or an alert that never fires.
//! Both services name their metrics `maitre_*` (the runtime's registry
//! prefix), which is how queries' metric names are told from functions and
//! labels.

use std::collections::BTreeSet;

use booking_service::metrics::BookingMetrics;
use maitre_runtime::metrics::Metrics;

use serde::Deserialize;

use crate::{files_under, read};

const PREFIX: &str = "maitre_";

/// Every suffix OpenMetrics puts after a metric's name in its samples.
const SUFFIXES: [&str; 7] = [
    "", "_total", "_created", "_bucket", "_count", "_sum", "_info",
];

/// The sample names a metric of `kind` (its `# TYPE`) is exposed under.
fn sample_names(name: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    };
    suffixes
        .iter()
        .map(|suffix| format!("{name}{suffix}"))
        .collect()
}

/// The names registered in `metrics`, read from its registry's `Debug`
/// form (prometheus-client offers no other view of what is registered).
fn descriptor_names(metrics: &Metrics) -> Vec<String> {
    const DESCRIPTOR: &str = "Descriptor { name: \"";
    format!("{metrics:?}")
        .split(DESCRIPTOR)
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|name| format!("{PREFIX}{name}"))
        .collect()
}

/// Every sample name the services' registries expose. The text exposition
/// leaves out a family with no sample yet (`rpc_requests` before the first
/// call), and so says nothing of its type: such a metric may be queried
/// with any suffix; the others with exactly those of their type.
fn registered() -> BTreeSet<String> {
    // Rendering reads the pool's gauges; a lazy pool never connects.
    let pool = sqlx::PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("pool");
    let memory = Metrics::new("memory-service");
    let mut booking = Metrics::new("booking-service");
    BookingMetrics::register(booking.registry_mut());
    let mut names = BTreeSet::new();
    for metrics in [&memory, &booking] {
        let mut rendered = BTreeSet::new();
        for line in metrics.render(&pool).lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let mut words = declaration.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    rendered.insert(name.to_owned());
                    names.extend(sample_names(name, kind));
                }
            }
        }
        let descriptors = descriptor_names(metrics);
        assert!(
            descriptors.len() >= rendered.len() && !descriptors.is_empty(),
            "the registry's Debug form changed: {descriptors:?}"
        );
        for name in descriptors.iter().filter(|name| !rendered.contains(*name)) {
            names.extend(SUFFIXES.iter().map(|suffix| format!("{name}{suffix}")));
        }
    }
    names
}

/// The `maitre_*` names in a query.
fn metric_names(query: &str) -> impl Iterator<Item = &str> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with(PREFIX))
}

/// The queries of a JSON dashboard: targets' `expr`, variables' `query`
/// and `definition`.
fn dashboard_queries(value: &serde_json::Value, queries: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(query)
                        if ["expr", "query", "definition"].contains(&key.as_str()) =>
                    {
                        queries.push(query.clone());
                    }
                    _ => dashboard_queries(value, queries),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, queries);
            }
        }
        _ => {}
    }
}

/// The `expr` of alerting and recording rules in deploy/'s YAML (a
/// PrometheusRule or a plain rules file).
fn rule_queries(value: &serde_norway::Value, queries: &mut Vec<String>) {
    match value {
        serde_norway::Value::Mapping(map) => {
            for (key, value) in map {
                match (key.as_str(), value.as_str()) {
                    (Some("expr"), Some(query)) => queries.push(query.to_owned()),
                    _ => rule_queries(value, queries),
                }
            }
        }
        serde_norway::Value::Sequence(items) => {
            for item in items {
                rule_queries(item, queries);
            }
        }
        _ => {}
    }
}

/// (file, query) for every query in deploy/'s dashboards and rules.
fn deploy_queries() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for file in files_under("deploy", &["json"]) {
        let json: serde_json::Value =
            serde_json::from_str(&read(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut queries = Vec::new();
        dashboard_queries(&json, &mut queries);
        found.extend(queries.into_iter().map(|q| (file.clone(), q)));
    }
    for file in files_under("deploy", &["yaml", "yml"]) {
        let text = read(&file);
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let mut queries = Vec::new();
            rule_queries(&value, &mut queries);
            found.extend(queries.into_iter().map(|q| (file.clone(), q)));
        }
    }
    found
}

fn unregistered(queries: &[(String, String)], registered: &BTreeSet<String>) -> Vec<String> {
    queries
        .iter()
        .flat_map(|(file, query)| {
            metric_names(query)
                .filter(|name| !registered.contains(*name))
                .map(move |name| format!("{file} queries {name}, which no service registers"))
        })
        .collect()
}

#[tokio::test]
async fn dashboards_and_alerts_query_only_registered_metrics() {
    let queries = deploy_queries();
    assert!(
        queries
            .iter()
            .any(|(file, q)| file.ends_with(".json") && q.contains(PREFIX)),
        "found no maitre_* query in deploy/grafana"
    );
    let problems = unregistered(&queries, &registered());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn a_query_of_a_renamed_metric_is_caught() {
    let queries = [(
        "dashboard.json".to_owned(),
        "sum(rate(maitre_rpc_requests_total[5m])) / sum(rate(maitre_rpc_calls_total[5m]))"
            .to_owned(),
    )];
    let problems = unregistered(&queries, &registered());
    assert_eq!(
        problems,
        ["dashboard.json queries maitre_rpc_calls_total, which no service registers"]
    );
}
