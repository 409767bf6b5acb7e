//! Refusing the environment variables of the old naming scheme. A service
//! that silently ignored an operator's `BOOKING_GRPC_ADDR` would listen where
//! nobody expects it: fail-open. So a service that finds an old name set
//! refuses to start and says which name replaced it.

use std::ffi::OsStr;

/// The shared settings each service used to read under its own prefix
/// (`MEMORY_GRPC_ADDR`, `BOOKING_GRPC_ADDR`), now unprefixed.
const FORMERLY_PREFIXED: [&str; 9] = [
    "GRPC_ADDR",
    "ADMIN_ADDR",
    "DB_MAX_CONNECTIONS",
    "DB_ACQUIRE_TIMEOUT",
    "DB_STATEMENT_TIMEOUT",
    "SKIP_MIGRATIONS",
    "HEALTH_INTERVAL",
    "SHUTDOWN_TIMEOUT",
    "MAX_PAGE_SIZE",
];

/// The variables one service no longer reads, and what replaced them.
#[derive(Debug, Clone, Copy)]
pub struct RenamedVariables {
    /// The prefix the service read the shared settings under
    /// (`MEMORY_`, `BOOKING_`).
    pub shared_prefix: &'static str,
    /// The service's own renamed variables, as (old name, new name).
    pub own: &'static [(&'static str, &'static str)],
}

/// Old names found set, each with its replacement, sorted by old name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "environment variables of the old naming scheme are set and no longer read: {}; \
     rename them (README.md, Configuration)",
    describe(.0)
)]
pub struct RenamedVariablesSet(pub Vec<(String, String)>);

fn describe(found: &[(String, String)]) -> String {
    found
        .iter()
        .map(|(old, new)| format!("{old} is now {new}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl RenamedVariables {
    /// The name that replaced `old`, if `old` is a name this service no
    /// longer reads.
    pub fn replacement(&self, old: &str) -> Option<String> {
        if let Some(shared) = old.strip_prefix(self.shared_prefix)
            && FORMERLY_PREFIXED.contains(&shared)
        {
            return Some(shared.to_owned());
        }
        self.own
            .iter()
            .find(|(own_old, _)| *own_old == old)
            .map(|(_, new)| (*new).to_owned())
    }

    /// Fails naming every old variable among `variables` (name, value pairs,
    /// as `std::env::vars_os()` yields them), so an operator can rename them
    /// all at once. A variable set to the empty string counts as set.
    pub fn refuse<N: AsRef<OsStr>, V>(
        &self,
        variables: impl IntoIterator<Item = (N, V)>,
    ) -> Result<(), RenamedVariablesSet> {
        let mut found: Vec<(String, String)> = variables
            .into_iter()
            .filter_map(|(name, _)| {
                let name = name.as_ref().to_str()?;
                Some((name.to_owned(), self.replacement(name)?))
            })
            .collect();
        if found.is_empty() {
            return Ok(());
        }
        found.sort();
        Err(RenamedVariablesSet(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKING: RenamedVariables = RenamedVariables {
        shared_prefix: "BOOKING_",
        own: &[("MEMORY_SERVICE_URL", "BOOKING_MEMORY_URL")],
    };

    fn refused(variables: &[(&str, &str)]) -> Vec<(String, String)> {
        match BOOKING.refuse(variables.iter().copied()) {
            Ok(()) => Vec::new(),
            Err(RenamedVariablesSet(found)) => found,
        }
    }

    #[test]
    fn current_names_and_unrelated_variables_pass() {
        let variables = [
            ("GRPC_ADDR", "0.0.0.0:1"),
            ("BOOKING_MEMORY_URL", "http://m"),
            ("BOOKING_WORKER_DB_MAX_CONNECTIONS", "3"),
            ("MEMORY_GRPC_ADDR", "memory-service's old name, not ours"),
            ("PATH", "/bin"),
        ];
        assert_eq!(refused(&variables), Vec::new());
    }

    #[test]
    fn every_old_name_set_is_named_with_its_replacement() {
        let variables = [
            ("MEMORY_SERVICE_URL", "http://m"),
            ("BOOKING_GRPC_ADDR", ""),
            ("BOOKING_MAX_PAGE_SIZE", "10"),
        ];
        assert_eq!(
            refused(&variables),
            [
                ("BOOKING_GRPC_ADDR", "GRPC_ADDR"),
                ("BOOKING_MAX_PAGE_SIZE", "MAX_PAGE_SIZE"),
                ("MEMORY_SERVICE_URL", "BOOKING_MEMORY_URL"),
            ]
            .map(|(old, new)| (old.to_owned(), new.to_owned()))
        );
    }

    #[test]
    fn the_message_names_old_and_new() {
        let error = BOOKING
            .refuse([("MEMORY_SERVICE_URL", "x")])
            .expect_err("an old name is refused");
        assert!(
            error
                .to_string()
                .contains("MEMORY_SERVICE_URL is now BOOKING_MEMORY_URL"),
            "{error}"
        );
    }
}
