//! The services' real binaries as child processes, for the fault drills
//! and the bench: find the binary, pick a port, migrate, spawn with a log
//! file, wait for gRPC health SERVING, SIGTERM or SIGKILL, restart on the
//! same port, and the log's tail when something fails. A [`Process`] kills
//! its child when dropped, so a failing test or bench leaves nothing running.

use std::{
    fs::OpenOptions,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal, unistd::Pid};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::wait_for;

/// Lines of a child's log shown when it fails.
const TAIL_LINES: usize = 40;

/// Settings the services read from the environment (the shared names and
/// each service's prefix): none of the developer's own may leak into a
/// child, whose settings are exactly what its [`Spec`] says.
const SCRUBBED_PREFIXES: &[&str] = &[
    "MEMORY_", "BOOKING_", "AUTH_", "TLS_", "DB_", "MAX_", "HTTP2_", "OTEL_",
];
const SCRUBBED_NAMES: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_DIRECT_URL",
    "GRPC_ADDR",
    "ADMIN_ADDR",
    "SKIP_MIGRATIONS",
    "SHUTDOWN_TIMEOUT",
    "HEALTH_INTERVAL",
    "RUST_LOG",
    "LOG_FORMAT",
    "REFLECTION",
    "RPC_TIMEOUT",
    "REQUEST_READ_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "TCP_KEEPALIVE",
];

/// The binary `name` (which is also its cargo package): in `dir` when given,
/// otherwise in the directory of the running executable's profile
/// (`target/<profile>/`; a test or bench executable runs from its `deps/`).
pub fn binary(name: &str, dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(dir) => dir.to_owned(),
        None => {
            let exe = std::env::current_exe().context("the running executable's path")?;
            let mut dir = exe
                .parent()
                .context("the running executable has no directory")?
                .to_owned();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "{} not found: build it first with `cargo build{release} -p {name}`",
            path.display()
        );
    }
    Ok(path)
}

/// A loopback port nobody listens on right now. Taken below the kernel's
/// ephemeral range when it can be: tests running alongside open thousands
/// of outgoing connections (the attack drills), any of which could
/// otherwise take the port as its local one before the service binds it,
/// or while a killed service is restarted on it.
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

/// `binary` with the developer's service settings removed and no stdin.
fn command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if SCRUBBED_PREFIXES.iter().any(|p| name.starts_with(p))
            || SCRUBBED_NAMES.contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    command.stdin(Stdio::null());
    command
}

/// Runs `<binary> migrate` against `database_url` and waits for it.
pub fn migrate(binary: &Path, database_url: &str) -> Result<()> {
    let output = command(binary)
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {} migrate", binary.display()))?;
    if !output.status.success() {
        bail!(
            "{} migrate failed ({}):\n{}{}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Names the process in messages (`booking-service-2`, say).
    pub name: String,
    pub binary: PathBuf,
    /// The gRPC port (`GRPC_ADDR=127.0.0.1:<port>`), kept across restarts.
    pub port: u16,
    /// Settings on top of a scrubbed environment.
    pub env: Vec<(String, String)>,
    /// Where stdout and stderr go, appended to across restarts; `None`: the
    /// parent's (a test run with `TEST_LOG`).
    pub log: Option<PathBuf>,
    /// Keep the log when the process is dropped without a panic (a bench's
    /// logs are part of its output; a passing test leaves no files behind).
    pub keep_log: bool,
    /// How long it may take to answer SERVING once started.
    pub ready_within: Duration,
}

impl Spec {
    pub fn new(name: impl Into<String>, binary: PathBuf, port: u16) -> Self {
        Self {
            name: name.into(),
            binary,
            port,
            env: Vec::new(),
            log: None,
            keep_log: false,
            ready_within: Duration::from_secs(30),
        }
    }

    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn log(mut self, path: Option<PathBuf>, keep: bool) -> Self {
        self.log = path;
        self.keep_log = keep;
        self
    }

    pub fn ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }
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
pub struct Process {
    spec: Spec,
    child: Option<Child>,
    /// How many times it was started.
    starts: u32,
}

impl Process {
    /// Starts `serve` and waits until it reports SERVING.
    pub async fn start(spec: Spec) -> Result<Self> {
        let mut process = Self {
            spec,
            child: None,
            starts: 0,
        };
        process.start_serving().await?;
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn port(&self) -> u16 {
        self.spec.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.spec.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Its log file; `None` when it logs to the parent's output.
    pub fn log(&self) -> Option<&Path> {
        self.spec.log.as_deref()
    }

    /// The child's pid; 0 while it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn proc(&self) -> Result<procfs::process::Process> {
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        procfs::process::Process::new(pid).with_context(|| format!("{}: /proc/{pid}", self.name()))
    }

    /// Peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        let status = self.proc()?.status()?;
        let kib = status.vmhwm.context("no VmHWM in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }

    /// CPU time used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = self.proc()?.stat()?;
        Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }

    fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name());
        }
        self.starts += 1;
        let mut command = command(&self.spec.binary);
        command
            .arg("serve")
            .env("GRPC_ADDR", format!("127.0.0.1:{}", self.spec.port))
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        if let Some(log) = &self.spec.log {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("opening {}", log.display()))?;
            writeln!(file, "===== {} start #{} =====", self.name(), self.starts)?;
            command
                .env("NO_COLOR", "1")
                .stdout(file.try_clone()?)
                .stderr(file);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.name()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Spawns and waits for SERVING; a process that dies at once (its port
    /// not yet free, say) is started again, a few times.
    async fn start_serving(&mut self) -> Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            self.spawn()?;
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(why) if tries < 3 && self.exited() => {
                    eprintln!("{}: {why}; starting it again", self.name());
                    self.child = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(why) => bail!("{}: {why}\n{}", self.name(), self.tail()),
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
        let deadline = Instant::now() + self.spec.ready_within;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("exited ({status}) before serving"));
            }
            let last = match health(self.spec.port, "").await {
                Ok(status) if status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(status) => format!("status {status}"),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "not SERVING after {:?} ({last})",
                    self.spec.ready_within
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails, with the log's tail, if the process has died.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(child) = &mut self.child else {
            bail!("{} is not running", self.name());
        };
        if let Some(status) = child.try_wait()? {
            bail!("{} died ({status})\n{}", self.name(), self.tail());
        }
        Ok(())
    }

    /// SIGKILL, and reaps the process; fails if it had died already.
    pub fn kill(&mut self) -> Result<()> {
        self.ensure_running()?;
        let mut child = self.child.take().context("process running")?;
        child.kill().context("SIGKILL")?;
        child.wait().context("reaping the killed process")?;
        Ok(())
    }

    /// SIGTERM and waits (at most `within`) for the exit; a process still
    /// running then is killed and the call fails.
    pub async fn term(&mut self, within: Duration) -> Result<Stopped> {
        self.ensure_running()?;
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        let signalled_at = Instant::now();
        signal::kill(pid, signal::Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to {}", self.name()))?;
        let status = loop {
            let child = self.child.as_mut().context("process running")?;
            if let Some(status) = child.try_wait().context("waiting for the process")? {
                break status;
            }
            if signalled_at.elapsed() >= within {
                self.kill()?;
                bail!(
                    "{} still running {within:?} after SIGTERM; killed",
                    self.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.child = None;
        Ok(Stopped {
            status,
            signalled_at,
            took: signalled_at.elapsed(),
        })
    }

    /// Starts it again, same port and settings, and waits for SERVING.
    pub async fn restart(&mut self) -> Result<()> {
        if !self.exited() {
            bail!("{} is still running", self.name());
        }
        self.child = None;
        self.start_serving().await
    }

    /// The last lines of its log (or a note when it logs to the parent's output).
    pub fn tail(&self) -> String {
        let Some(log) = &self.spec.log else {
            return format!("({} logged to the test output)", self.name());
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "----- last lines of {} ({}) -----\n{}",
            self.name(),
            log.display(),
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        } else if let Some(log) = &self.spec.log
            && !self.spec.keep_log
        {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Asks the health of `service` ("" for the server) on `port` once; no
/// answer is an `Err`.
pub async fn health(port: u16, service: &str) -> Result<i32, String> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
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

/// Waits until the health of `service` on `port` reports `want`; panics
/// after `within`.
pub async fn wait_health(port: u16, service: &str, want: ServingStatus, within: Duration) {
    wait_for(
        &format!("health {service:?} on port {port} to be {want:?}"),
        within,
        || async { (health(port, service).await == Ok(want as i32)).then_some(()) },
    )
    .await
}
