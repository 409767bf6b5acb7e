//! One source of truth for configuration: each service's clap command (its
//! flags, their environment variables, defaults and help). These tests fail
//! when what people read or deploy drifts from it:
//!
//! - README.md's Configuration tables list exactly the variables each
//!   service reads, with the defaults it really has ([`readme`]);
//! - every variable deploy/ sets is one its service reads ([`manifests`]);
//! - every metric the Grafana dashboard or an alert rule in deploy/ queries
//!   is one a service registers ([`metrics`]).

mod manifests;
mod metrics;
mod readme;

use std::{collections::BTreeMap, path::PathBuf};

use clap::CommandFactory;

/// The two binaries whose configuration deploy/ and the README describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Memory,
    Booking,
}

impl Service {
    pub const ALL: [Service; 2] = [Service::Memory, Service::Booking];

    pub fn name(self) -> &'static str {
        match self {
            Service::Memory => "memory-service",
            Service::Booking => "booking-service",
        }
    }

    /// The service a manifest object or compose service belongs to, by its
    /// name (`memory-service-config`, `booking-service-migrate`, …).
    pub fn owning(name: &str) -> Option<Service> {
        Service::ALL
            .into_iter()
            .find(|service| name.starts_with(service.name()))
    }

    fn command(self) -> clap::Command {
        let mut command = match self {
            Service::Memory => memory_service::config::Cli::command(),
            Service::Booking => booking_service::config::Cli::command(),
        };
        // Building fills in what clap derives late (`false` for flags).
        command.build();
        command
    }

    /// Every environment variable the service reads, with its default as
    /// `--help` shows it (None: unset unless given).
    pub fn variables(self) -> BTreeMap<String, Option<String>> {
        let command = self.command();
        let mut variables = BTreeMap::new();
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let env = env.to_string_lossy().into_owned();
            assert!(
                arg.get_help()
                    .is_some_and(|help| !help.to_string().is_empty()),
                "{}: {env} has no help text",
                self.name()
            );
            let defaults: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect();
            let default = (!defaults.is_empty()).then(|| defaults.join(","));
            assert!(
                variables.insert(env.clone(), default).is_none(),
                "{}: two flags read {env}",
                self.name()
            );
        }
        variables
    }
}

/// The repository's root (this crate lives in tests/).
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The files under `relative` (recursively) whose name ends in one of
/// `extensions`, as paths relative to the repository, sorted.
pub fn files_under(relative: &str, extensions: &[&str]) -> Vec<String> {
    fn walk(dir: &std::path::Path, extensions: &[&str], found: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, extensions, found);
            } else if path
                .extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x))
            {
                found.push(path);
            }
        }
    }
    let root = repository();
    let mut found = Vec::new();
    walk(&root.join(relative), extensions, &mut found);
    let mut files: Vec<String> = found
        .iter()
        .map(|path| {
            path.strip_prefix(&root)
                .unwrap_or(path)
                .display()
                .to_string()
        })
        .collect();
    files.sort();
    files
}

pub fn read(relative: &str) -> String {
    let path = repository().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

impl Service {
    fn prefix(self) -> &'static str {
        match self {
            Service::Memory => "MEMORY_",
            Service::Booking => "BOOKING_",
        }
    }
}

/// The naming rule (README, Configuration): no prefix when both services
/// read a setting, the service's own prefix when only it does.
#[test]
fn variables_follow_the_naming_rule() {
    let memory = Service::Memory.variables();
    let booking = Service::Booking.variables();
    for (service, own, other) in [
        (Service::Memory, &memory, &booking),
        (Service::Booking, &booking, &memory),
    ] {
        for name in own.keys() {
            let prefixed = Service::ALL.iter().any(|s| name.starts_with(s.prefix()));
            if other.contains_key(name) {
                assert!(!prefixed, "both services read {name}: it takes no prefix");
            } else {
                assert!(
                    name.starts_with(service.prefix()),
                    "only {} reads {name}: it takes the prefix {}",
                    service.name(),
                    service.prefix()
                );
            }
        }
    }
}
