//! The services as child processes: binaries, free ports, environment, log
//! files, health waits, `kill -9`, SIGTERM and restarts on the same port.
//! Every child is killed when its [`Proc`] is dropped, so a failing drill
//! leaves nothing running.

use std::{
    fs::OpenOptions,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use maitre_runtime::testkit::{fresh_database, proxy::TcpProxy, wait_for, with_host};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::client::Client;

/// How long a service may take to answer SERVING after it is started.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// Health name that reports SERVING as long as the process runs.
pub const LIVENESS: &str = "liveness";
/// Lines of a service's log shown when a drill fails.
const TAIL_LINES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Memory,
    Booking,
}

impl Service {
    pub fn binary_name(self) -> &'static str {
        match self {
            Service::Memory => "memory-service",
            Service::Booking => "booking-service",
        }
    }

    /// The gRPC service name its health reports readiness under.
    pub fn grpc_name(self) -> &'static str {
        match self {
            Service::Memory => "maitre.memory.v1.MemoryService",
            Service::Booking => booking_service::startup::SERVICE_NAME,
        }
    }
}

/// The service's binary: booking-service's is built for this test target;
/// memory-service's lies in the same directory once it has been built.
pub fn binary(service: Service) -> PathBuf {
    let booking = PathBuf::from(env!("CARGO_BIN_EXE_booking-service"));
    if service == Service::Booking {
        return booking;
    }
    let path = booking
        .parent()
        .expect("booking-service's binary has a directory")
        .join(service.binary_name());
    assert!(
        path.is_file(),
        "{} not found: the drills run memory-service's binary as well; build it first with \
         `cargo build -p memory-service` (a `cargo nextest run --workspace` builds it too)",
        path.display()
    );
    path
}

/// A loopback port nobody listens on right now. Taken below the kernel's
/// ephemeral range when it can be: drills running alongside open thousands
/// of outgoing connections (attacks.rs), any of which could otherwise take
/// the port as its local one before the service binds it, or while a
/// killed service is restarted on it.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        for _ in 0..100 {
            let port = rand::random_range(10_000..ephemeral_low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// True when the services' output should go to the test's output, at `info`.
fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// Prefixes of settings the services read from the environment: none of the
/// developer's own may leak into a drill.
const SERVICE_ENV_PREFIXES: &[&str] = &[
    "MEMORY_",
    "BOOKING_",
    "FOLLOWUP_",
    "WORKER_",
    "JOB_",
    "METRICS_",
    "AUTH_",
    "TLS_",
    // The server's connection and HTTP/2 limits (MAX_CONNECTIONS,
    // MAX_CONNECTION_AGE, HTTP2_KEEPALIVE_INTERVAL, ...).
    "MAX_CONNECTION",
    "HTTP2_",
];

fn command(service: Service) -> Command {
    let mut command = Command::new(binary(service));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if SERVICE_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
            || matches!(
                name.as_ref(),
                "RUST_LOG"
                    | "LOG_FORMAT"
                    | "REFLECTION"
                    | "MAX_CONCURRENT_RPCS"
                    | "RPC_TIMEOUT"
                    | "MAX_RPC_TIMEOUT"
                    | "REQUEST_READ_TIMEOUT"
                    | "MAX_CONCURRENT_STREAMS"
                    | "HANDSHAKE_TIMEOUT"
                    | "TCP_KEEPALIVE"
                    | "MAX_HEALTH_WATCHERS"
            )
        {
            command.env_remove(name.as_ref());
        }
    }
    command
        .env("RUST_LOG", if test_log() { "info" } else { "warn" })
        .env("LOG_FORMAT", "text")
        // Loopback only; drills that test authentication set their own.
        .env("AUTH_MODE", "none")
        .stdin(Stdio::null());
    command
}

/// Runs `<service> migrate` against `database_url` and waits for it.
pub fn migrate(service: Service, database_url: &str) {
    let output = command(service)
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .output()
        .unwrap_or_else(|e| panic!("running {} migrate: {e}", service.binary_name()));
    assert!(
        output.status.success(),
        "{} migrate failed ({}):\n{}{}",
        service.binary_name(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// How a stopped process ended.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// When the signal was sent.
    pub signalled_at: Instant,
    /// From the signal to the exit.
    pub took: Duration,
}

/// One service process, restartable on the same port with the same settings.
pub struct Proc {
    pub name: String,
    pub service: Service,
    pub port: u16,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    /// Starts `serve` and waits until it reports SERVING.
    pub async fn start(
        name: &str,
        service: Service,
        port: u16,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut proc = Self {
            name: name.to_owned(),
            service,
            port,
            log,
            env,
            child: None,
            starts: 0,
        };
        proc.start_serving().await;
        proc
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process running").id()
    }

    /// The process's peak resident set size so far (`VmHWM` in
    /// `/proc/<pid>/status`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no VmHWM line in {path}"))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let mut command = command(self.service);
        command
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if !test_log() {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
            let _ = writeln!(file, "===== {} start #{} =====", self.name, self.starts);
            command
                .env("NO_COLOR", "1")
                .stdout(file.try_clone().expect("log file handle"))
                .stderr(file);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
    }

    /// Spawns and waits for SERVING; a process that dies at once (its port
    /// not yet free, say) is started again, a few times.
    async fn start_serving(&mut self) {
        let mut tries = 0;
        loop {
            tries += 1;
            self.spawn();
            match self.wait_ready().await {
                Ok(()) => return,
                Err(why) if tries < 3 && self.exited() => {
                    eprintln!("{}: {why}; starting it again", self.name);
                    self.child = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(why) => panic!("{}: {why}\n{}", self.name, self.tail()),
            }
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.child {
            None => true,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Waits until gRPC health `""` answers SERVING; fails if the process dies.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("exited ({status}) before serving"));
            }
            if health(self.port, "").await == Ok(ServingStatus::Serving as i32) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not SERVING after {READY_WITHIN:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`, and reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("process running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} had died before the kill ({status})\n{}",
                self.name,
                self.tail()
            );
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping the killed process");
    }

    /// `kill -TERM` and waits (at most `within`) for the exit.
    pub async fn term(&mut self, within: Duration) -> Stopped {
        let pid = self.pid().to_string();
        let signalled_at = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let child = self.child.as_mut().expect("process running");
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the process") {
                break status;
            }
            assert!(
                signalled_at.elapsed() < within,
                "{} still running {within:?} after SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.child = None;
        Stopped {
            status,
            signalled_at,
            took: signalled_at.elapsed(),
        }
    }

    /// Starts it again, same port and settings, and waits for SERVING.
    pub async fn restart(&mut self) {
        assert!(self.exited(), "{} is still running", self.name);
        self.child = None;
        self.start_serving().await;
    }

    /// The last lines of its log (or a note when logs go to the test output).
    pub fn tail(&self) -> String {
        if test_log() {
            return format!("({} logged to the test output)", self.name);
        }
        format!(
            "----- last lines of {} ({}) -----\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, TAIL_LINES)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        } else if !test_log() {
            // A passing drill leaves no files behind.
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks `service`'s health on `port` once; no answer is an `Err`.
pub async fn health(port: u16, service: &str) -> Result<i32, String> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("health URL")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(response.into_inner().status)
}

/// Waits until health `name` on `port` reports `want`.
pub async fn wait_health(port: u16, name: &str, want: ServingStatus, within: Duration) {
    wait_for(
        &format!("health {name:?} on port {port} to be {want:?}"),
        within,
        || async { (health(port, name).await == Ok(want as i32)).then_some(()) },
    )
    .await
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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            booking_processes: 1,
            via_proxy: false,
            db_acquire_timeout: None,
            booking_env: Vec::new(),
            memory_env: Vec::new(),
        }
    }
}

/// memory-service and booking-service processes on a fresh database.
pub struct Stack {
    /// The test's own connection, straight to PostgreSQL (never via the proxy).
    pub db: PgPool,
    pub proxy: Option<TcpProxy>,
    pub memory: Proc,
    pub booking: Vec<Proc>,
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
        migrate(Service::Memory, &database_url);
        migrate(Service::Booking, &database_url);

        let logs = std::env::temp_dir().join("maitre-drills");
        std::fs::create_dir_all(&logs).expect("log directory");
        let run = uuid::Uuid::now_v7().simple().to_string();
        let log = |name: &str| logs.join(format!("{drill}-{name}-{}.log", &run[run.len() - 12..]));
        let common = |prefix: &str| {
            let mut env = vec![
                ("DATABASE_URL".to_owned(), service_url.clone()),
                ("MAX_CONCURRENT_RPCS".to_owned(), "1000".to_owned()),
                (format!("{prefix}_ADMIN_ADDR"), "off".to_owned()),
                (format!("{prefix}_SKIP_MIGRATIONS"), "true".to_owned()),
                (format!("{prefix}_HEALTH_INTERVAL"), "200ms".to_owned()),
            ];
            if let Some(timeout) = options.db_acquire_timeout {
                env.push((format!("{prefix}_DB_ACQUIRE_TIMEOUT"), timeout.to_owned()));
            }
            env
        };

        let memory_port = free_port();
        let mut memory_env = common("MEMORY");
        memory_env.push(("GRPC_ADDR".to_owned(), format!("127.0.0.1:{memory_port}")));
        memory_env.extend(
            options
                .memory_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        let memory = Proc::start(
            "memory-service",
            Service::Memory,
            memory_port,
            log("memory"),
            memory_env,
        )
        .await;

        let mut booking = Vec::new();
        for i in 0..options.booking_processes {
            let port = free_port();
            let mut env = common("BOOKING");
            let quick = [
                ("GRPC_ADDR", format!("127.0.0.1:{port}")),
                (
                    "BOOKING_MEMORY_URL",
                    format!("http://127.0.0.1:{memory_port}"),
                ),
                ("BOOKING_FOLLOWUP_DELAY", "0s".into()),
                ("BOOKING_WORKER_POLL_INTERVAL", "100ms".into()),
                ("BOOKING_WORKER_HEARTBEAT_INTERVAL", "1s".into()),
                ("BOOKING_WORKER_MISSED_HEARTBEATS", "3".into()),
                ("BOOKING_FOLLOWUP_RETRY_BASE", "200ms".into()),
                ("BOOKING_FOLLOWUP_RETRY_MAX", "1s".into()),
                ("BOOKING_FOLLOWUP_DELIVER_MAX_ATTEMPTS", "100".into()),
                ("SHUTDOWN_TIMEOUT", "20s".into()),
            ];
            env.extend(quick.into_iter().map(|(k, v)| (k.to_owned(), v)));
            env.extend(
                options
                    .booking_env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone())),
            );
            let name = if options.booking_processes == 1 {
                "booking-service".to_owned()
            } else {
                format!("booking-service-{}", i + 1)
            };
            booking.push(Proc::start(&name, Service::Booking, port, log(&name), env).await);
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
            booking,
        }
    }

    /// A client of booking-service process `i` and of memory-service.
    pub fn client(&self, i: usize) -> Client {
        Client::new(self.booking[i].port, self.memory.port)
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
