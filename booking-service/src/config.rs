//! booking-service settings: flags with environment fallbacks and defaults
//! that work on a laptop. `--help` lists them all; README.md's Configuration
//! tables explain them. The settings both services share are [`CommonArgs`]
//! and [`ServerArgs`]; booking-service's own are read from `BOOKING_*`
//! variables.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;

use clap::{Args, CommandFactory, Subcommand};
use maitre_runtime::{
    config::{CommonArgs, RenamedVariables, ServiceDefaults},
    db::{NoDirectUrl, PoolSettings, Pooler},
    server::ServerArgs,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{
    domain::backoff::Backoff,
    jobs::{FollowUpPolicy, workers::WorkerSettings},
    memory_client::MemoryClientSettings,
};

/// maitre booking-service: books customers into time slots of limited
/// capacity and schedules a post-event follow-up for every booking through an
/// apalis job queue in PostgreSQL.
#[derive(Debug, Args)]
#[command(version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

/// booking-service's defaults for the settings both services share.
const DEFAULTS: ServiceDefaults = ServiceDefaults {
    grpc_addr: "0.0.0.0:50052",
    admin_addr: "0.0.0.0:9102",
    db_max_connections: "20",
    log_filter: "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_postgres=warn",
};

/// By hand rather than derived, to apply booking-service's [`DEFAULTS`] (and
/// its own wording of two shared flags): `Cli::parse()` and `--help` both
/// see them.
impl CommandFactory for Cli {
    fn command() -> clap::Command {
        own_wording(DEFAULTS.apply(Self::augment_args(clap::Command::new("booking-service"))))
    }

    fn command_for_update() -> clap::Command {
        own_wording(
            DEFAULTS.apply(Self::augment_args_for_update(clap::Command::new(
                "booking-service",
            ))),
        )
    }
}

impl clap::Parser for Cli {}

/// The shared flags whose meaning booking-service widens: two pools, and
/// running jobs that shutdown waits for.
fn own_wording(command: clap::Command) -> clap::Command {
    command
        .mut_arg("db_max_connections", |arg| {
            arg.help(
                "Most database connections the API pool opens (the follow-up workers have \
                 their own pool, BOOKING_WORKER_DB_MAX_CONNECTIONS)",
            )
        })
        .mut_arg("shutdown_timeout", |arg| {
            arg.help("Longest wait for in-flight calls and running jobs after SIGTERM")
        })
}

/// Variables booking-service read before the naming scheme of issue 11: it
/// refuses to start while one is set (see [`RenamedVariables`]).
pub const RENAMED_VARIABLES: RenamedVariables = RenamedVariables {
    shared_prefix: "BOOKING_",
    own: &[
        ("MEMORY_SERVICE_URL", "BOOKING_MEMORY_URL"),
        ("MEMORY_CALL_TIMEOUT", "BOOKING_MEMORY_CALL_TIMEOUT"),
        ("MEMORY_SERVICE_TOKEN_FILE", "BOOKING_MEMORY_TOKEN_FILE"),
        ("MEMORY_SERVICE_CA_FILE", "BOOKING_MEMORY_CA_FILE"),
        (
            "MEMORY_SERVICE_CLIENT_CERT_FILE",
            "BOOKING_MEMORY_CLIENT_CERT_FILE",
        ),
        (
            "MEMORY_SERVICE_CLIENT_KEY_FILE",
            "BOOKING_MEMORY_CLIENT_KEY_FILE",
        ),
        (
            "WORKER_DB_MAX_CONNECTIONS",
            "BOOKING_WORKER_DB_MAX_CONNECTIONS",
        ),
        ("FOLLOWUP_DELAY", "BOOKING_FOLLOWUP_DELAY"),
        ("FOLLOWUP_HISTORY_LEN", "BOOKING_FOLLOWUP_HISTORY_LEN"),
        (
            "FOLLOWUP_PLAN_MAX_ATTEMPTS",
            "BOOKING_FOLLOWUP_PLAN_MAX_ATTEMPTS",
        ),
        (
            "FOLLOWUP_DELIVER_MAX_ATTEMPTS",
            "BOOKING_FOLLOWUP_DELIVER_MAX_ATTEMPTS",
        ),
        ("FOLLOWUP_RETRY_BASE", "BOOKING_FOLLOWUP_RETRY_BASE"),
        ("FOLLOWUP_RETRY_MAX", "BOOKING_FOLLOWUP_RETRY_MAX"),
        ("FOLLOWUP_SWEEP_GRACE", "BOOKING_FOLLOWUP_SWEEP_GRACE"),
        ("WORKER_CONCURRENCY", "BOOKING_WORKER_CONCURRENCY"),
        ("WORKER_POLL_INTERVAL", "BOOKING_WORKER_POLL_INTERVAL"),
        (
            "WORKER_HEARTBEAT_INTERVAL",
            "BOOKING_WORKER_HEARTBEAT_INTERVAL",
        ),
        (
            "WORKER_MISSED_HEARTBEATS",
            "BOOKING_WORKER_MISSED_HEARTBEATS",
        ),
        ("JOB_RETENTION", "BOOKING_JOB_RETENTION"),
        ("JOB_PRUNE_INTERVAL", "BOOKING_JOB_PRUNE_INTERVAL"),
        (
            "METRICS_REFRESH_INTERVAL",
            "BOOKING_METRICS_REFRESH_INTERVAL",
        ),
    ],
};

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Apply pending migrations (unless skipped), serve gRPC and run the follow-up workers until SIGTERM (the default).
    Serve,
    /// Create the database if missing, apply apalis's and booking-service's migrations, and exit.
    Migrate,
}

/// Retry defaults, chosen for a retry horizon longer than a night (see
/// `BOOKING_FOLLOWUP_DELIVER_MAX_ATTEMPTS`'s help; a test keeps the figures true).
const DEFAULT_RETRY_BASE: &str = "5s";
const DEFAULT_RETRY_MAX: &str = "30m";
const DEFAULT_DELIVER_MAX_ATTEMPTS: u32 = 60;

fn duration(value: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(value)
}

/// Shortest and longest hold: long enough to pay, short enough that
/// abandoned holds do not keep a slot looking full for long.
pub const HOLD_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(10)..=Duration::from_secs(3600);

/// Longest reminder lead: reminders are for the days before an event.
pub const MAX_REMINDER_LEAD: Duration = Duration::from_secs(30 * 86_400);

fn reminder_lead(value: &str) -> Result<Duration, String> {
    let lead = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if lead <= MAX_REMINDER_LEAD {
        Ok(lead)
    } else {
        Err("must be at most 30 days (0 turns reminders off)".into())
    }
}

fn hold_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if HOLD_TTL_RANGE.contains(&ttl) {
        Ok(ttl)
    } else {
        Err("must be between 10s and 1h".into())
    }
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where memory-service answers gRPC: one URL or several, comma-separated. Every name is resolved again each BOOKING_MEMORY_RESOLVE_INTERVAL and calls are spread over all its reachable addresses (a Kubernetes headless Service gives one per ready pod).
    #[arg(
        long,
        env = "BOOKING_MEMORY_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub memory_service_url: String,

    /// How often BOOKING_MEMORY_URL's names are resolved again and their addresses probed; replicas that appear join, those that vanish or stop answering leave (a failed call also triggers a round).
    #[arg(long, env = "BOOKING_MEMORY_RESOLVE_INTERVAL", default_value = "5s", value_parser = duration, global = true)]
    pub memory_resolve_interval: Duration,

    /// File holding the bearer token booking-service presents to memory-service.
    #[arg(long, env = "BOOKING_MEMORY_TOKEN_FILE", global = true)]
    pub memory_service_token_file: Option<PathBuf>,

    /// CA (PEM) of memory-service's certificate: turns TLS to memory-service on (use an https:// URL).
    #[arg(long, env = "BOOKING_MEMORY_CA_FILE", global = true)]
    pub memory_service_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) presented to memory-service, for mTLS.
    #[arg(
        long,
        env = "BOOKING_MEMORY_CLIENT_CERT_FILE",
        requires = "memory_service_client_key_file",
        global = true
    )]
    pub memory_service_client_cert_file: Option<PathBuf>,

    /// Client private key (PEM) for mTLS to memory-service.
    #[arg(
        long,
        env = "BOOKING_MEMORY_CLIENT_KEY_FILE",
        requires = "memory_service_client_cert_file",
        global = true
    )]
    pub memory_service_client_key_file: Option<PathBuf>,

    /// Deadline of each call to memory-service.
    #[arg(long, env = "BOOKING_MEMORY_CALL_TIMEOUT", default_value = "2s", value_parser = duration, global = true)]
    pub memory_call_timeout: Duration,

    /// Connections of the follow-up workers' own pool (one of them listens for job wake-ups).
    #[arg(
        long,
        env = "BOOKING_WORKER_DB_MAX_CONNECTIONS",
        default_value_t = 12,
        global = true
    )]
    pub worker_db_max_connections: u32,

    /// When a follow-up is delivered: this long after the event ends.
    #[arg(long, env = "BOOKING_FOLLOWUP_DELAY", default_value = "24h", value_parser = duration, global = true)]
    pub followup_delay: Duration,

    /// How long before the event its reminder is sent; bookings made (or moved) closer to the start get none. 0 turns reminders off.
    #[arg(long, env = "BOOKING_REMINDER_LEAD", default_value = "24h", value_parser = reminder_lead, global = true)]
    pub reminder_lead: Duration,

    /// How long HoldSeats keeps seats for a customer who pays (never past the slot's start): 10s-1h.
    #[arg(long, env = "BOOKING_HOLD_TTL", default_value = "10m", value_parser = hold_ttl, global = true)]
    pub hold_ttl: Duration,

    /// How many recent scored messages choose the follow-up's template.
    #[arg(
        long,
        env = "BOOKING_FOLLOWUP_HISTORY_LEN",
        default_value_t = 10,
        global = true
    )]
    pub followup_history_len: i32,

    /// Planning attempts while memory-service is unreachable; then the neutral template is used.
    #[arg(
        long,
        env = "BOOKING_FOLLOWUP_PLAN_MAX_ATTEMPTS",
        default_value_t = 8,
        global = true
    )]
    pub followup_plan_max_attempts: u32,

    /// Delivery attempts before a follow-up is FAILED (the dead letter; RetryFollowUp re-drives it). With the default retry delays, 60 attempts keep a follow-up retrying for 12.9 h to 25.7 h (the retry horizon, by jitter): a night's outage of memory-service loses nothing. The horizon in force is logged at start-up.
    #[arg(
        long,
        env = "BOOKING_FOLLOWUP_DELIVER_MAX_ATTEMPTS",
        default_value_t = DEFAULT_DELIVER_MAX_ATTEMPTS,
        global = true
    )]
    pub followup_deliver_max_attempts: u32,

    /// First retry delay; doubles each attempt, with jitter (each delay is random in [d/2, d]).
    #[arg(long, env = "BOOKING_FOLLOWUP_RETRY_BASE", default_value = DEFAULT_RETRY_BASE, value_parser = duration, global = true)]
    pub followup_retry_base: Duration,

    /// Longest retry delay: after an outage, a follow-up is retried within this long.
    #[arg(long, env = "BOOKING_FOLLOWUP_RETRY_MAX", default_value = DEFAULT_RETRY_MAX, value_parser = duration, global = true)]
    pub followup_retry_max: Duration,

    /// Jobs run at once, per queue (plan, deliver). A run mostly waits (on memory-service, on its statements), so many at once cost little, and the more run together, the more share each coalesced statement (BOOKING_WORKER_BATCH_MAX).
    #[arg(
        long,
        env = "BOOKING_WORKER_CONCURRENCY",
        default_value_t = 128,
        global = true
    )]
    pub worker_concurrency: usize,

    /// Most follow-up job runs one coalesced statement serves (the planning read, the follow-up insert, the finish after delivery): the runs that reach a statement together share one round trip and one commit. 0 turns coalescing off (each run its own statements).
    #[arg(
        long,
        env = "BOOKING_WORKER_BATCH_MAX",
        default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(0..=1000),
        global = true
    )]
    pub worker_batch_max: u16,

    /// How often workers poll besides the wake-ups after commits (which miss jobs scheduled for later).
    #[arg(long, env = "BOOKING_WORKER_POLL_INTERVAL", default_value = "1s", value_parser = duration, global = true)]
    pub worker_poll_interval: Duration,

    /// Worker heartbeat; a worker missing `missed-heartbeats` of them is dead and its jobs are re-enqueued.
    #[arg(long, env = "BOOKING_WORKER_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = duration, global = true)]
    pub worker_heartbeat_interval: Duration,

    /// Missed heartbeats before a worker counts as dead (10s x 3 = jobs recovered within ~30-40 s).
    #[arg(
        long,
        env = "BOOKING_WORKER_MISSED_HEARTBEATS",
        default_value_t = 3,
        global = true
    )]
    pub worker_missed_heartbeats: usize,

    /// Dead job rows (Done, Killed — poison rows included — and Failed with no attempt left) and worker registrations are deleted after this long.
    #[arg(long, env = "BOOKING_JOB_RETENTION", default_value = "7d", value_parser = duration, global = true)]
    pub job_retention: Duration,

    /// How often dead job rows are pruned and stranded plannings and deliveries swept (each sweep goes on, in short batches, until none is left).
    #[arg(long, env = "BOOKING_JOB_PRUNE_INTERVAL", default_value = "10m", value_parser = duration, global = true)]
    pub job_prune_interval: Duration,

    /// A planning or delivery overdue by this much with no live job (it died) is enqueued again, whatever its age.
    #[arg(long, env = "BOOKING_FOLLOWUP_SWEEP_GRACE", default_value = "5m", value_parser = duration, global = true)]
    pub followup_sweep_grace: Duration,

    /// How often queue-depth and follow-up gauges are re-read for /metrics.
    #[arg(long, env = "BOOKING_METRICS_REFRESH_INTERVAL", default_value = "15s", value_parser = duration, global = true)]
    pub metrics_refresh_interval: Duration,

    /// Serve gRPC only, without follow-up workers (another deployment runs them).
    #[arg(long, env = "BOOKING_DISABLE_WORKERS", global = true)]
    pub disable_workers: bool,

    #[command(flatten)]
    pub server: ServerArgs,
}

impl Settings {
    /// Defaults for everything, with the given database and memory-service (tests).
    pub fn for_database(database_url: &str, memory_service_url: &str) -> Self {
        let mut settings = <Cli as clap::Parser>::parse_from(["booking-service"]).settings;
        settings.common.database_url = database_url.to_owned();
        settings.memory_service_url = memory_service_url.to_owned();
        // Tests bind loopback and opt into authentication where they test it.
        settings.server.auth_mode = maitre_runtime::server::AuthMode::None;
        settings
    }

    pub fn pool(&self) -> PoolSettings {
        self.common.pool("booking-service")
    }

    /// The follow-up workers' own pool. Its commits do not wait for the WAL
    /// flush: everything the workers write is redone after a crash (jobs run
    /// at least once; planning inserts ON CONFLICT DO NOTHING; delivery
    /// replays through memory-service's request_id), and PostgreSQL flushes
    /// WAL in order, so a lost commit can only be one of the last few hundred
    /// milliseconds, never one that a later durable commit depends on. It
    /// saves two fsyncs per booking that would otherwise queue behind the
    /// bookings themselves. Bookings and cancellations stay durable.
    pub fn worker_pool(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.worker_db_max_connections,
            application_name: "booking-service-workers".into(),
            asynchronous_commit: true,
            ..self.pool()
        }
    }

    /// The workers' LISTEN for job wake-ups, when it cannot take a worker
    /// pool connection: DATABASE_URL goes through a pooler (a
    /// transaction-mode one would hand the LISTEN's session to other
    /// clients) or DATABASE_DIRECT_URL names another server. Then one
    /// connection of its own, straight to PostgreSQL; `None`: a connection
    /// of the worker pool, as without a pooler.
    pub fn listener_pool(&self) -> Result<Option<PoolSettings>, NoDirectUrl> {
        let workers = self.worker_pool();
        if workers.pooler == Pooler::None && !workers.has_separate_direct_url() {
            return Ok(None);
        }
        Ok(Some(PoolSettings {
            max_connections: 1,
            application_name: "booking-service-listener".into(),
            asynchronous_commit: false,
            ..workers.direct()?
        }))
    }

    pub fn lifecycle_times(&self) -> crate::domain::booking::LifecycleTimes {
        crate::domain::booking::LifecycleTimes {
            followup_delay: self.followup_delay,
            reminder_lead: self.reminder_lead,
            hold_ttl: self.hold_ttl,
        }
    }

    pub fn policy(&self) -> FollowUpPolicy {
        let retry = |max_attempts| Backoff {
            base: self.followup_retry_base,
            max: self.followup_retry_max,
            max_attempts,
        };
        FollowUpPolicy {
            delay_after_event: self.followup_delay,
            history_len: self.followup_history_len.clamp(1, 200),
            plan_retry: retry(self.followup_plan_max_attempts.max(1)),
            deliver_retry: retry(self.followup_deliver_max_attempts.max(1)),
            // The call can take its deadline twice (one UNAVAILABLE retry);
            // the margin covers a slow database around it.
            claim_lease: self.memory_call_timeout * 2 + CLAIM_LEASE_MARGIN,
        }
    }

    /// How to reach memory-service, with the credentials read from their
    /// files. Refuses set-ups that would leak or silently drop a credential:
    /// TLS material with a plaintext `http://` URL (the token would travel
    /// in clear), a client certificate without the CA to check the server
    /// by, an empty or placeholder token.
    pub fn memory_client(&self) -> anyhow::Result<MemoryClientSettings> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
        };
        let targets =
            crate::memory_endpoints::parse_targets(&self.memory_service_url).map_err(|e| {
                anyhow::anyhow!("BOOKING_MEMORY_URL {:?}: {e}", self.memory_service_url)
            })?;
        let plaintext = targets.iter().all(|target| !target.tls);
        let client_certificate = self.memory_service_client_cert_file.is_some();
        if plaintext && (self.memory_service_ca_file.is_some() || client_certificate) {
            anyhow::bail!(
                "BOOKING_MEMORY_URL {:?} is plaintext http:// but TLS is configured \
                 (BOOKING_MEMORY_CA_FILE or a client certificate): use https://",
                self.memory_service_url
            );
        }
        if client_certificate && self.memory_service_ca_file.is_none() {
            anyhow::bail!(
                "BOOKING_MEMORY_CLIENT_CERT_FILE needs BOOKING_MEMORY_CA_FILE (the CA that \
                 memory-service's certificate chains to): without it the certificate would be ignored"
            );
        }
        if !plaintext && self.memory_service_ca_file.is_none() {
            anyhow::bail!(
                "BOOKING_MEMORY_URL {:?} asks for TLS: set BOOKING_MEMORY_CA_FILE to the CA \
                 that memory-service's certificate chains to",
                self.memory_service_url
            );
        }
        let token = match &self.memory_service_token_file {
            Some(path) => {
                let token = String::from_utf8_lossy(&read(path, "BOOKING_MEMORY_TOKEN_FILE")?)
                    .trim()
                    .to_owned();
                if token.is_empty() {
                    anyhow::bail!("BOOKING_MEMORY_TOKEN_FILE {} is empty", path.display());
                }
                if maitre_runtime::rpc::auth::is_placeholder(&token) {
                    anyhow::bail!(
                        "BOOKING_MEMORY_TOKEN_FILE {} holds a placeholder (e.g. CHANGE-ME): \
                         put booking-service's real token there",
                        path.display()
                    );
                }
                Some(token)
            }
            None => None,
        };
        let tls = match &self.memory_service_ca_file {
            None => None,
            Some(ca) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "BOOKING_MEMORY_CA_FILE")?));
                if let (Some(cert), Some(key)) = (
                    &self.memory_service_client_cert_file,
                    &self.memory_service_client_key_file,
                ) {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "BOOKING_MEMORY_CLIENT_CERT_FILE")?,
                        read(key, "BOOKING_MEMORY_CLIENT_KEY_FILE")?,
                    ));
                }
                Some(tls)
            }
        };
        if token.is_some() && plaintext && !targets.iter().all(is_loopback) {
            tracing::warn!(
                url = %self.memory_service_url,
                "the memory-service token travels in clear over http://; use https:// with BOOKING_MEMORY_CA_FILE"
            );
        }
        Ok(MemoryClientSettings {
            url: self.memory_service_url.clone(),
            timeout: self.memory_call_timeout,
            token,
            tls,
            resolve_interval: self.memory_resolve_interval,
        })
    }

    /// The delivery retry horizon in force (shortest, longest).
    pub fn retry_horizon(&self) -> (Duration, Duration) {
        self.policy().deliver_retry.horizon()
    }

    pub fn workers(&self) -> WorkerSettings {
        WorkerSettings {
            concurrency: self.worker_concurrency.max(1),
            poll_interval: self.worker_poll_interval,
            heartbeat_interval: self.worker_heartbeat_interval,
            missed_heartbeats: self.worker_missed_heartbeats.max(1),
            job_retention: self.job_retention,
            prune_interval: self.job_prune_interval,
            sweep_grace: self.followup_sweep_grace,
        }
    }
}

/// Added to twice the memory-service deadline to make a delivery's claim lease.
const CLAIM_LEASE_MARGIN: Duration = Duration::from_secs(10);

/// True when `url`'s host is a loopback address or `localhost`.
fn is_loopback(target: &crate::memory_endpoints::Target) -> bool {
    target.host.eq_ignore_ascii_case("localhost")
        || target
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> Settings {
        Settings::for_database("postgres://localhost/x", url)
    }

    fn refusal(settings: &Settings) -> String {
        match settings.memory_client() {
            Ok(_) => panic!("accepted a set-up that leaks or drops a credential"),
            Err(error) => format!("{error:#}"),
        }
    }

    fn temp_file(content: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("maitre-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::write(&path, content).expect("write");
        path
    }

    #[test]
    fn tls_material_with_a_plaintext_url_is_refused() {
        let mut with_ca = settings("http://memory:50051");
        with_ca.memory_service_ca_file = Some(temp_file("ca"));
        assert!(refusal(&with_ca).contains("use https://"));

        let mut with_cert = settings("http://memory:50051");
        with_cert.memory_service_client_cert_file = Some(temp_file("cert"));
        with_cert.memory_service_client_key_file = Some(temp_file("key"));
        assert!(refusal(&with_cert).contains("use https://"));
    }

    #[test]
    fn a_client_certificate_without_a_ca_is_refused() {
        let mut s = settings("https://memory:50051");
        s.memory_service_client_cert_file = Some(temp_file("cert"));
        s.memory_service_client_key_file = Some(temp_file("key"));
        assert!(refusal(&s).contains("needs BOOKING_MEMORY_CA_FILE"));
    }

    #[test]
    fn https_without_a_ca_is_refused() {
        assert!(refusal(&settings("https://memory:50051")).contains("BOOKING_MEMORY_CA_FILE"));
    }

    #[test]
    fn empty_and_placeholder_tokens_are_refused() {
        let mut s = settings("http://127.0.0.1:50051");
        s.memory_service_token_file = Some(temp_file("\n"));
        assert!(refusal(&s).contains("is empty"));
        s.memory_service_token_file = Some(temp_file("CHANGE-ME-booking-token-0001\n"));
        assert!(refusal(&s).contains("placeholder"));
        s.memory_service_token_file = Some(temp_file("a-real-looking-token-000001\n"));
        let client = s.memory_client().expect("a real token over loopback");
        assert_eq!(client.token.as_deref(), Some("a-real-looking-token-000001"));
    }

    #[test]
    fn the_default_retry_horizon_covers_a_night_and_matches_the_docs() {
        let (low, high) = settings("http://127.0.0.1:50051").retry_horizon();
        assert!(low >= Duration::from_secs(12 * 3600), "{low:?}");
        assert_eq!(crate::domain::backoff::hours(low), "12.9 h");
        assert_eq!(crate::domain::backoff::hours(high), "25.7 h");
        // --help and the README state these figures.
        let help = {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        };
        assert!(help.contains("12.9 h to 25.7 h"), "{help}");
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains("12.9 h to 25.7 h"),
            "README states the horizon"
        );
    }

    #[test]
    fn loopback_urls_are_recognised() {
        let loopback = |url: &str| {
            crate::memory_endpoints::parse_targets(url)
                .unwrap()
                .iter()
                .all(is_loopback)
        };
        assert!(loopback("http://127.0.0.1:50051"));
        assert!(loopback("http://localhost:50051"));
        assert!(loopback("http://[::1]:50051"));
        assert!(loopback("http://127.0.0.1:50051,http://localhost:50061"));
        assert!(!loopback("http://memory-service:50051"));
        assert!(!loopback(
            "http://127.0.0.1:50051,http://memory-service:50051"
        ));
    }

    #[test]
    fn a_list_of_memory_urls_keeps_the_tls_rules() {
        // One plaintext entry among TLS ones would send the token in clear.
        let mut mixed = settings("https://memory-a:50051,http://memory-b:50051");
        mixed.memory_service_ca_file = Some("/dev/null".into());
        let error = refusal(&mixed);
        assert!(error.contains("mixes http:// and https://"), "{error}");
        let error = refusal(&settings("memory:50051"));
        assert!(error.contains("http:// or https://"), "{error}");
        let list = settings("http://127.0.0.1:50051,http://127.0.0.1:50061").memory_client();
        assert!(list.is_ok_and(|list| list.url == "http://127.0.0.1:50051,http://127.0.0.1:50061"));
    }
}
