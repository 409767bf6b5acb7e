//! Running the real services as child processes from `target/release`:
//! migrate, serve on free loopback ports, wait for gRPC health SERVING,
//! and stop with SIGTERM.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal, unistd::Pid};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// How long a service may take to become SERVING.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a service may take to exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Where the binaries are and what they connect to.
pub struct Launch {
    pub bin_dir: PathBuf,
    pub database_url: String,
    pub log_dir: PathBuf,
}

/// One running service.
pub struct Service {
    pub name: &'static str,
    pub pid: u32,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// Both services, wired together.
pub struct Stack {
    pub memory: Service,
    pub booking: Service,
}

/// A port nobody listens on right now.
fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

impl Launch {
    fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found: build it first (cargo build --release -p memory-service -p booking-service, or scripts/bench.sh)",
                path.display()
            );
        }
        Ok(path)
    }

    /// `<service> migrate` against the bench database.
    pub async fn migrate(&self, name: &str) -> Result<()> {
        let output = Command::new(self.binary(name)?)
            .arg("migrate")
            .env("DATABASE_URL", &self.database_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {name} migrate"))?;
        if !output.status.success() {
            bail!(
                "{name} migrate failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    async fn spawn(
        &self,
        name: &'static str,
        addr: SocketAddr,
        env: &[(&str, String)],
    ) -> Result<Service> {
        let log = self.log_dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(self.binary(name)?)
            .arg("serve")
            .env("DATABASE_URL", &self.database_url)
            .env("RUST_LOG", "warn")
            // The bench's clients present no credentials and speak plain HTTP/2.
            .env("AUTH_MODE", "none")
            .env_remove("AUTH_TOKENS")
            .env_remove("AUTH_TOKENS_FILE")
            .env_remove("AUTH_GRANTS")
            .env_remove("TLS_CERT_FILE")
            .env_remove("TLS_KEY_FILE")
            .env_remove("TLS_CLIENT_CA_FILE")
            .env_remove("BOOKING_MEMORY_TOKEN_FILE")
            .env_remove("BOOKING_MEMORY_CA_FILE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Never leave a service behind if the bench fails.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("the service exited at once")?;
        Ok(Service {
            name,
            pid,
            addr,
            child,
            log,
        })
    }

    /// Starts memory-service, then booking-service pointed at it, with the
    /// follow-up delay at zero and 100 ms polling (and its follow-up workers
    /// on or off); returns once both are SERVING.
    pub async fn start(&self, workers: bool) -> Result<Stack> {
        let memory_addr = free_addr()?;
        let mut memory = self
            .spawn(
                "memory-service",
                memory_addr,
                &[
                    ("GRPC_ADDR", memory_addr.to_string()),
                    ("ADMIN_ADDR", free_addr()?.to_string()),
                    ("SKIP_MIGRATIONS", "true".into()),
                ],
            )
            .await?;
        memory.wait_ready().await?;
        let booking_addr = free_addr()?;
        let mut booking = self
            .spawn(
                "booking-service",
                booking_addr,
                &[
                    ("GRPC_ADDR", booking_addr.to_string()),
                    ("ADMIN_ADDR", free_addr()?.to_string()),
                    ("SKIP_MIGRATIONS", "true".into()),
                    ("BOOKING_MEMORY_URL", format!("http://{memory_addr}")),
                    ("BOOKING_FOLLOWUP_DELAY", "0s".into()),
                    ("BOOKING_WORKER_POLL_INTERVAL", "100ms".into()),
                    ("BOOKING_DISABLE_WORKERS", (!workers).to_string()),
                ],
            )
            .await?;
        booking.wait_ready().await?;
        Ok(Stack { memory, booking })
    }
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for `grpc.health.v1` to answer SERVING for the server ("").
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before serving; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                );
            }
            match check(&self.url()).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "NOT_SERVING".into(),
                Err(e) => last = format!("{e:#}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} not SERVING after {READY_WITHIN:?} ({last}); log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after `STOP_WITHIN`).
    pub async fn stop(mut self) -> Result<String> {
        if self.child.try_wait()?.is_some() {
            bail!(
                "{} had already exited; log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        let pid = Pid::from_raw(i32::try_from(self.pid).context("pid out of range")?);
        signal::kill(pid, signal::Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to {}", self.name))?;
        match tokio::time::timeout(STOP_WITHIN, self.child.wait()).await {
            Ok(status) => Ok(format!("{} stopped: {}", self.name, status?)),
            Err(_) => {
                self.child.kill().await?;
                bail!("{} ignored SIGTERM for {STOP_WITHIN:?}; killed", self.name)
            }
        }
    }

    /// Fails if the process has died.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} died ({status}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }
}

async fn check(url: &str) -> Result<bool> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
