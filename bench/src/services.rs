//! Both services as child processes from the release build, through
//! maitre-runtime's process harness: migrate, serve on free loopback
//! ports, wait for gRPC health SERVING, and stop with SIGTERM.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use maitre_runtime::testkit::{
    process::{self, Process, Spec, free_port},
    with_host,
};

/// How long a service may take to become SERVING.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a service may take to exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Where the binaries are and what they connect to.
pub struct Launch {
    pub bin_dir: PathBuf,
    pub database_url: String,
    pub log_dir: PathBuf,
    /// host:port of a transaction-mode pooler the services go through
    /// (`--pooler`); `None`: straight to `database_url`.
    pub pooler: Option<String>,
}

/// Both services, wired together.
pub struct Stack {
    pub memory: Process,
    pub booking: Process,
}

impl Launch {
    fn spec(&self, name: &str) -> Result<Spec> {
        let binary = process::binary(name, Some(&self.bin_dir))?;
        let spec = Spec::new(name, binary, free_port())
            .log(Some(self.log_dir.join(format!("{name}.log"))), true)
            .ready_within(READY_WITHIN);
        let spec = match &self.pooler {
            None => spec.env("DATABASE_URL", &self.database_url),
            Some(pooler) => spec
                .env("DATABASE_URL", with_host(&self.database_url, pooler))
                .env("DATABASE_DIRECT_URL", &self.database_url)
                .env("DB_POOLER", "transaction"),
        };
        Ok(spec
            .env("RUST_LOG", "warn")
            // The bench's clients present no credentials and speak plain HTTP/2.
            .env("AUTH_MODE", "none")
            .env("ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("SKIP_MIGRATIONS", "true"))
    }

    /// `<service> migrate` against the bench database.
    pub fn migrate(&self, name: &str) -> Result<()> {
        process::migrate(
            &process::binary(name, Some(&self.bin_dir))?,
            &self.database_url,
        )
    }

    /// Starts memory-service, then booking-service pointed at it, with the
    /// follow-up delay at zero and 100 ms polling (and its follow-up workers
    /// on or off); returns once both are SERVING.
    pub async fn start(&self, workers: bool) -> Result<Stack> {
        let memory = Process::start(self.spec("memory-service")?).await?;
        let booking = self
            .spec("booking-service")?
            .env("BOOKING_MEMORY_URL", memory.url())
            .env("BOOKING_FOLLOWUP_DELAY", "0s")
            .env("BOOKING_WORKER_POLL_INTERVAL", "100ms")
            .env("BOOKING_DISABLE_WORKERS", (!workers).to_string());
        let booking = Process::start(booking).await?;
        Ok(Stack { memory, booking })
    }
}

impl Stack {
    /// SIGTERM to booking-service first (it calls memory-service while
    /// draining), then memory-service.
    pub async fn stop(mut self) -> Result<()> {
        let booking = self.booking.term(STOP_WITHIN).await;
        let memory = self.memory.term(STOP_WITHIN).await;
        booking?;
        memory?;
        Ok(())
    }
}
