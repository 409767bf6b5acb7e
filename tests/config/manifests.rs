//! Every environment variable deploy/ sets is one its service reads: a
//! misspelt or renamed key would otherwise be ignored without a word.
//! Checked: the keys of the services' ConfigMaps and the `env:` of their
//! Deployments and Jobs (and patches of them) under deploy/k8s, and the
//! `environment:` of deploy/compose.yaml's services. Whose an object is
//! follows from its name (`booking-service-config`, `memory-service-migrate`).

use serde::Deserialize;
use serde_norway::Value;

use crate::{Service, files_under, read};

/// A variable set for a service: (service, variable, where).
type Setting = (Service, String, String);

/// Every YAML document of deploy/k8s, with the file it came from.
fn k8s_documents() -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    for file in files_under("deploy/k8s", &["yaml", "yml"]) {
        let text = read(&file);
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
            if !value.is_null() {
                documents.push((file.clone(), value));
            }
        }
    }
    documents
}

fn string(value: &Value) -> Option<&str> {
    value.as_str()
}

/// The variables the k8s manifests set, per service.
fn k8s_settings(documents: &[(String, Value)]) -> Vec<Setting> {
    let mut settings = Vec::new();
    for (file, document) in documents {
        let Some(name) = string(&document["metadata"]["name"]) else {
            continue;
        };
        let Some(service) = Service::owning(name) else {
            continue;
        };
        let at = format!("{file} ({name})");
        if string(&document["kind"]) == Some("ConfigMap")
            && let Some(data) = document["data"].as_mapping()
        {
            for key in data.keys().filter_map(string) {
                settings.push((service, key.to_owned(), at.clone()));
            }
        }
        let pod = &document["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            for container in pod[list].as_sequence().into_iter().flatten() {
                for variable in container["env"].as_sequence().into_iter().flatten() {
                    if let Some(variable) = string(&variable["name"]) {
                        settings.push((service, variable.to_owned(), at.clone()));
                    }
                }
            }
        }
    }
    settings
}

/// The variables deploy/compose.yaml sets, per service.
fn compose_settings(compose: &str) -> Vec<Setting> {
    let compose: Value = serde_norway::from_str(compose).expect("compose.yaml is YAML");
    let mut settings = Vec::new();
    for (name, definition) in compose["services"].as_mapping().into_iter().flatten() {
        let Some(service) = string(name).and_then(Service::owning) else {
            continue;
        };
        let at = format!("deploy/compose.yaml ({})", string(name).unwrap_or_default());
        let environment = &definition["environment"];
        let names: Vec<String> = match environment {
            Value::Mapping(map) => map.keys().filter_map(string).map(str::to_owned).collect(),
            // The list form: `- NAME=value`.
            Value::Sequence(list) => list
                .iter()
                .filter_map(string)
                .map(|entry| entry.split('=').next().unwrap_or(entry).to_owned())
                .collect(),
            _ => Vec::new(),
        };
        settings.extend(names.into_iter().map(|n| (service, n, at.clone())));
    }
    settings
}

/// The settings no service reads, as messages.
fn unknown(settings: &[Setting]) -> Vec<String> {
    let known: Vec<_> = Service::ALL
        .map(|service| (service, service.variables()))
        .to_vec();
    settings
        .iter()
        .filter(|(service, variable, _)| {
            known
                .iter()
                .any(|(s, variables)| s == service && !variables.contains_key(variable))
        })
        .map(|(service, variable, at)| {
            format!(
                "{at} sets {variable}, which {} does not read",
                service.name()
            )
        })
        .collect()
}

#[test]
fn deploy_sets_only_variables_the_services_read() {
    let mut settings = k8s_settings(&k8s_documents());
    settings.extend(compose_settings(&read("deploy/compose.yaml")));
    // Not vacuous: both services' ConfigMaps, Deployments and compose
    // services were found.
    for service in Service::ALL {
        for source in [
            "configmaps.yaml",
            "compose.yaml",
            &format!("{}.yaml", service.name()),
        ] {
            assert!(
                settings
                    .iter()
                    .any(|(s, _, at)| *s == service && at.contains(source)),
                "found no variable of {} in {source}",
                service.name()
            );
        }
    }
    let problems = unknown(&settings);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_bogus_configmap_key_is_caught() {
    let mut documents = k8s_documents();
    let (_, configmap) = documents
        .iter_mut()
        .find(|(_, d)| string(&d["metadata"]["name"]) == Some("booking-service-config"))
        .expect("booking-service's ConfigMap");
    configmap["data"]
        .as_mapping_mut()
        .expect("data")
        .insert("MEMORY_SERVICE_URL".into(), "http://memory:50051".into());
    let problems = unknown(&k8s_settings(&documents));
    assert!(
        problems.iter().any(|p| p.contains("MEMORY_SERVICE_URL")),
        "{problems:?}"
    );
}
