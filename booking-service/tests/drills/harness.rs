//! The drills' stack: memory-service and booking-service as real processes
//! (maitre-runtime's `testkit::process`: binaries, free ports, log files,
//! health waits, SIGKILL, SIGTERM, restarts on the same port) on a fresh
//! database, with the settings that make follow-ups quick. Every child is
//! killed when its [`Process`] is dropped, so a failing drill leaves
//! nothing running.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use maitre_runtime::testkit::process::{free_port, health, wait_health};
use maitre_runtime::testkit::{
    fresh_database,
    process::{self, Process, Spec},
    proxy::TcpProxy,
    with_host,
};
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::client::Client;

/// How long a service may take to answer SERVING after it is started.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// Health name that reports SERVING as long as the process runs.
pub const LIVENESS: &str = "liveness";
/// The gRPC service names the services' health reports readiness under.
pub const MEMORY_GRPC_NAME: &str = "maitre.memory.v1.MemoryService";
pub const BOOKING_GRPC_NAME: &str = booking_service::startup::SERVICE_NAME;

/// booking-service's binary, built for this test target.
fn booking_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_booking-service"))
}

/// memory-service's binary: next to this test's, once it has been built
/// (a `cargo nextest run --workspace` builds it too).
fn memory_binary() -> PathBuf {
    process::binary("memory-service", None).unwrap_or_else(|e| panic!("{e:#}"))
}

/// True when the services' output should go to the test's output, at `info`.
fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// What a drill's stack looks like.
pub struct Options {
    /// booking-service processes sharing the one database and queue.
    pub booking_processes: usize,
    /// Both services reach PostgreSQL through a [`TcpProxy`] the drill can
    /// take down.
    pub via_proxy: bool,
    /// Both services' pool acquire timeout (how fast a call fails while the
    /// database is away); `None` keeps their default (2 s), which rides out
    /// a busy shared PostgreSQL better.
    pub db_acquire_timeout: Option<&'static str>,
    /// Extra settings for booking-service.
    pub booking_env: Vec<(&'static str, String)>,
    /// Extra settings for memory-service (they win over the drills' common ones).
    pub memory_env: Vec<(&'static str, String)>,
    /// memory-service processes; booking-service is given all their URLs
    /// and balances over them. With more than one, each gets its own admin
    /// port ([`Stack::memory_admin`]).
    pub memory_processes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            booking_processes: 1,
            via_proxy: false,
            db_acquire_timeout: None,
            booking_env: Vec::new(),
            memory_env: Vec::new(),
            memory_processes: 1,
        }
    }
}

/// memory-service and booking-service processes on a fresh database.
pub struct Stack {
    /// The test's own connection, straight to PostgreSQL (never via the proxy).
    pub db: PgPool,
    pub proxy: Option<TcpProxy>,
    pub memory: Process,
    /// memory-service processes beyond the first ([`Options::memory_processes`]).
    pub more_memory: Vec<Process>,
    /// Admin (`/metrics`) address of each memory-service process, first
    /// one first; empty with a single process.
    pub memory_admin: Vec<SocketAddr>,
    pub booking: Vec<Process>,
}

impl Stack {
    pub async fn start(drill: &str, options: Options) -> Self {
        let database_url = fresh_database().await;
        let proxy = match options.via_proxy {
            false => None,
            true => Some(TcpProxy::start(postgres_addr(&database_url).await).await),
        };
        let service_url = match &proxy {
            None => database_url.clone(),
            Some(proxy) => with_host(&database_url, &proxy.addr.to_string()),
        };
        // Migrate once, up front: two booking processes serving a fresh
        // database would otherwise race on the migrations.
        let (memory_binary, booking_binary) = (memory_binary(), booking_binary());
        for binary in [&memory_binary, &booking_binary] {
            process::migrate(binary, &database_url).unwrap_or_else(|e| panic!("{e:#}"));
        }

        let logs = std::env::temp_dir().join("maitre-drills");
        std::fs::create_dir_all(&logs).expect("log directory");
        let run = uuid::Uuid::now_v7().simple().to_string();
        let spec = |name: &str, binary: &PathBuf| {
            let log = logs.join(format!("{drill}-{name}-{}.log", &run[run.len() - 12..]));
            let mut spec = Spec::new(name, binary.clone(), free_port())
                .log((!test_log()).then_some(log), false)
                .ready_within(READY_WITHIN)
                .env("RUST_LOG", if test_log() { "info" } else { "warn" })
                .env("LOG_FORMAT", "text")
                // Loopback only; drills that test authentication set their own.
                .env("AUTH_MODE", "none")
                .env("DATABASE_URL", &service_url)
                .env("MAX_CONCURRENT_RPCS", "1000")
                .env("ADMIN_ADDR", "off")
                .env("SKIP_MIGRATIONS", "true");
            if let Some(timeout) = options.db_acquire_timeout {
                spec = spec.env("DB_ACQUIRE_TIMEOUT", timeout);
            }
            spec
        };
        let with = |spec: Spec, extra: &[(&'static str, String)]| {
            extra
                .iter()
                .fold(spec, |spec, (k, v)| spec.env(*k, v.clone()))
        };

        let mut memory = Vec::new();
        let mut memory_admin = Vec::new();
        for i in 0..options.memory_processes.max(1) {
            let mut spec = match options.memory_processes {
                0 | 1 => spec("memory-service", &memory_binary),
                _ => {
                    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    memory_admin.push(admin);
                    spec(&format!("memory-service-{}", i + 1), &memory_binary)
                        .env("ADMIN_ADDR", admin.to_string())
                }
            };
            spec = with(spec, &options.memory_env);
            memory.push(
                Process::start(spec)
                    .await
                    .unwrap_or_else(|e| panic!("{e:#}")),
            );
        }
        let memory_urls = memory
            .iter()
            .map(Process::url)
            .collect::<Vec<_>>()
            .join(",");
        let more_memory = memory.split_off(1);
        let memory = memory.remove(0);

        let mut booking = Vec::new();
        for i in 0..options.booking_processes {
            let name = if options.booking_processes == 1 {
                "booking-service".to_owned()
            } else {
                format!("booking-service-{}", i + 1)
            };
            let spec = spec(&name, &booking_binary)
                .env("BOOKING_MEMORY_URL", &memory_urls)
                .env("BOOKING_MEMORY_RESOLVE_INTERVAL", "500ms")
                .env("BOOKING_FOLLOWUP_DELAY", "0s")
                .env("BOOKING_WORKER_POLL_INTERVAL", "100ms")
                .env("BOOKING_WORKER_HEARTBEAT_INTERVAL", "1s")
                .env("BOOKING_WORKER_MISSED_HEARTBEATS", "3")
                .env("BOOKING_FOLLOWUP_RETRY_BASE", "200ms")
                .env("BOOKING_FOLLOWUP_RETRY_MAX", "1s")
                .env("BOOKING_FOLLOWUP_DELIVER_MAX_ATTEMPTS", "100")
                .env("SHUTDOWN_TIMEOUT", "20s");
            let process = Process::start(with(spec, &options.booking_env))
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
            booking.push(process);
        }

        let db = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await
            .expect("the drill's own database connection");
        Self {
            db,
            proxy,
            memory,
            more_memory,
            memory_admin,
            booking,
        }
    }

    /// A client of booking-service process `i` and of memory-service.
    pub fn client(&self, i: usize) -> Client {
        Client::new(self.booking[i].port(), self.memory.port())
    }
}

/// PostgreSQL's address from a `postgres://` URL, resolved (IPv4 first).
async fn postgres_addr(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&host_port)
        .await
        .unwrap_or_else(|e| panic!("resolving {host_port}: {e}"))
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .unwrap_or_else(|| panic!("{host_port} resolves to nothing"))
}
