//! Tools of the attack drills: memory-service alone with its admin port,
//! raw HTTP/2 connections (the `h2` crate) carrying gRPC bodies encoded by
//! hand, `/metrics` samples, and "ordinary" clients that keep calling while
//! an attack runs and count what they got.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use maitre_runtime::testkit::process::Process;
use tokio::{net::TcpStream, task::JoinHandle};
use tonic::{Code, Request, transport::Channel};

use crate::{
    client::reason,
    harness::{Options, Stack, free_port},
};

/// Deploy limit of a service's memory (deploy/: `resources.limits.memory`).
pub const DEPLOY_MEMORY_LIMIT: u64 = 256 * 1024 * 1024;

/// StoreMessage's path.
pub const STORE_MESSAGE: &str = "/maitre.memory.v1.MemoryService/StoreMessage";

/// A memory-service process of its own (no booking-service), with its admin
/// port on, on a fresh database.
pub struct Target {
    pub stack: Stack,
    pub admin: SocketAddr,
}

impl Target {
    /// memory-service with `env` on top of the drills' usual settings.
    pub async fn memory(drill: &str, env: &[(&'static str, &str)]) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("admin address");
        let mut memory_env = vec![("ADMIN_ADDR", admin.to_string())];
        memory_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let stack = Stack::start(
            drill,
            Options {
                booking_processes: 0,
                memory_env,
                ..Options::default()
            },
        )
        .await;
        Self { stack, admin }
    }

    pub fn proc(&self) -> &Process {
        &self.stack.memory
    }

    pub fn port(&self) -> u16 {
        self.stack.memory.port()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The process is still running (not crashed, not killed by the OOM killer).
    pub fn assert_alive(&self) {
        let pid = self.proc().pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("State:") && !l.contains("zombie")),
            "memory-service (pid {pid}) is no longer running\n{}",
            self.proc().tail()
        );
    }

    /// Lines of memory-service's log containing `needle`;
    /// `None` when the log goes to the test's output (TEST_LOG).
    pub fn log_lines(&self, needle: &str) -> Option<usize> {
        let log = std::fs::read_to_string(self.proc().log()?).unwrap_or_default();
        Some(log.lines().filter(|line| line.contains(needle)).count())
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> Metrics {
        scrape(self.admin).await
    }

    /// Waits (at most `within`) until `metric{labels}` satisfies `check`;
    /// returns its value then.
    pub async fn wait_metric(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
        within: Duration,
        check: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.metrics().await.get(metric, labels);
            if check(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {metric}{labels:?} to reach the \
                 expected value; last value {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU time memory-service has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.proc()
            .cpu_seconds()
            .expect("memory-service's CPU time")
    }

    fn peak_rss_bytes(&self) -> u64 {
        self.proc()
            .peak_rss_bytes()
            .expect("memory-service's peak RSS")
    }

    /// Peak RSS of memory-service so far, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        mib(self.peak_rss_bytes())
    }

    /// Asserts the peak RSS stayed under the deploy limit.
    pub fn assert_peak_rss_under_limit(&self) -> f64 {
        let peak = self.peak_rss_bytes();
        assert!(
            peak < DEPLOY_MEMORY_LIMIT,
            "memory-service's peak RSS {:.1} MiB reached the deploy limit {:.0} MiB",
            mib(peak),
            mib(DEPLOY_MEMORY_LIMIT)
        );
        mib(peak)
    }
}

#[allow(clippy::cast_precision_loss)]
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `GET /metrics` on the admin port.
pub async fn scrape(admin: SocketAddr) -> Metrics {
    let (status, body) = maitre_runtime::testkit::http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    Metrics(body)
}

/// Polls one unlabelled metric (a gauge) every 50 ms until stopped; keeps
/// the highest value seen.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<f64>,
}

impl Sampler {
    pub fn start(admin: SocketAddr, metric: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut max = 0.0_f64;
                while !stop.load(Ordering::Relaxed) {
                    max = max.max(scrape(admin).await.get(metric, &[]));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                max.max(scrape(admin).await.get(metric, &[]))
            }
        });
        Self { stop, task }
    }

    /// The highest value seen.
    pub async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("metrics sampler")
    }
}

/// A `/metrics` exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// `metric{labels...}` (a sample including those labels), 0 when absent.
    pub fn get(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        maitre_runtime::testkit::sample(&self.0, metric, labels).unwrap_or(0.0)
    }

    /// Connections the server closed for `reason`.
    pub fn closed(&self, reason: &str) -> f64 {
        self.get(
            "maitre_connections_closed_by_server_total",
            &[("reason", reason)],
        )
    }

    /// Calls of `method` (e.g. `maitre.memory.v1.MemoryService/StoreMessage`)
    /// answered with `code` (e.g. `OK`).
    pub fn rpcs(&self, method: &str, code: &str) -> f64 {
        self.get(
            "maitre_rpc_requests_total",
            &[("method", method), ("code", code)],
        )
    }
}

/// A small, valid StoreMessage request (new request id each time).
pub fn store_request(conversation: &str, user: &str) -> memory::StoreMessageRequest {
    memory::StoreMessageRequest {
        conversation_id: conversation.to_owned(),
        user_id: user.to_owned(),
        channel: "web".into(),
        role: memory::Role::User as i32,
        content: "Is the terrace open tonight?".into(),
        request_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    }
}

/// A gRPC message on the wire: flag 0 (uncompressed), u32 big-endian length,
/// the protobuf bytes.
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len()).expect("a message under 4 GiB");
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// The HEADERS of a gRPC call to `path` on `addr`, with `grpc-timeout`.
pub fn grpc_headers(addr: SocketAddr, path: &str, grpc_timeout: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(())
        .expect("request headers")
}

/// The gRPC status carried by response headers (a trailers-only answer) or
/// trailers: code and ErrorInfo reason.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<(Code, String)> {
    let status = tonic::Status::from_header_map(headers)?;
    Some((status.code(), reason(&status)))
}

/// One raw HTTP/2 connection: the request handle and its driver task, which
/// ends with how the connection ended.
pub struct RawH2 {
    pub send: h2::client::SendRequest<Bytes>,
    pub driver: JoinHandle<Result<(), h2::Error>>,
}

pub async fn raw_h2(addr: SocketAddr) -> RawH2 {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(connection);
    RawH2 { send, driver }
}

/// One complete unary call over a raw HTTP/2 connection of its own: HEADERS,
/// `message` (a gRPC frame) with END_STREAM, then the answer's status (from
/// the headers of a trailers-only answer, else from the trailers).
pub async fn raw_unary(addr: SocketAddr, path: &str, message: Bytes) -> Result<Code, String> {
    let RawH2 { send, driver } = raw_h2(addr).await;
    let call = async {
        let mut send = send.ready().await.map_err(|e| e.to_string())?;
        let (response, mut body) = send
            .send_request(grpc_headers(addr, path, "5S"), false)
            .map_err(|e| e.to_string())?;
        body.send_data(message, true).map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        if let Some((code, _)) = grpc_status(response.headers()) {
            return Ok(code);
        }
        let mut received = response.into_body();
        while let Some(chunk) = received.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = received.flow_control().release_capacity(chunk.len());
        }
        let trailers = received.trailers().await.map_err(|e| e.to_string())?;
        trailers
            .as_ref()
            .and_then(grpc_status)
            .map(|(code, _)| code)
            .ok_or_else(|| "an answer without grpc-status".to_owned())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 10s".into()));
    driver.abort();
    result
}

/// A lazily connecting channel of its own (its own TCP connection).
pub fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("URL")
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// What the ordinary clients got.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: usize,
    /// When each successful call ended.
    pub ok_at: Vec<Instant>,
    /// How long each successful call took.
    pub latencies: Vec<Duration>,
    /// `code: message` of every failed call.
    pub failures: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.ok_at.extend(other.ok_at);
        self.latencies.extend(other.latencies);
        self.failures.extend(other.failures);
    }

    /// `ok=N failed=N latency p50/max=...` for the DRILL lines.
    pub fn summary(&self) -> String {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let ms = |d: Option<&Duration>| d.map_or(0, Duration::as_millis);
        format!(
            "ordinary-ok={} ordinary-failed={} ordinary-latency-p50/max={}/{}ms",
            self.ok,
            self.failures.len(),
            ms(sorted.get(sorted.len() / 2)),
            ms(sorted.last()),
        )
    }

    /// Successful calls that ended within `[from, to)`.
    pub fn ok_between(&self, from: Instant, to: Instant) -> usize {
        self.ok_at
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    }
}

/// Deadline of an ordinary call; one still unanswered well after it hung.
/// Generous: the drills run a debug build on a machine the attacking
/// client and other tests share; latency is reported, not asserted.
const ORDINARY_DEADLINE: Duration = Duration::from_secs(15);
const ORDINARY_HUNG_AFTER: Duration = Duration::from_secs(20);

/// Clients calling StoreMessage one call after another (no retries) until
/// stopped: `tasks` of them, the first `fresh` opening a new connection for
/// every call (a client arriving during the attack). They run on a thread
/// and runtime of their own, so an attack the test process itself drives
/// (thousands of calls on the test's runtime) does not delay them: their
/// latency is the server's.
pub struct Ordinary {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Tally>,
}

impl Ordinary {
    pub fn start(addr: SocketAddr, tasks: usize, fresh: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the ordinary clients' runtime");
                runtime.block_on(async move {
                    let tasks: Vec<_> = (0..tasks)
                        .map(|task| {
                            tokio::spawn(ordinary_client(
                                addr,
                                task,
                                task < fresh,
                                pause,
                                stop.clone(),
                            ))
                        })
                        .collect();
                    let mut tally = Tally::default();
                    for task in tasks {
                        tally.merge(task.await.expect("ordinary client task"));
                    }
                    tally
                })
            }
        });
        Self { stop, thread }
    }

    /// Stops the clients (each ends its call in progress) and adds up.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("ordinary clients' thread"))
            .await
            .expect("joining the ordinary clients")
    }
}

async fn ordinary_client(
    addr: SocketAddr,
    task: usize,
    fresh: bool,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> Tally {
    let conversation = uuid::Uuid::now_v7().to_string();
    let user = format!("ordinary-{task}");
    let mut client = MemoryServiceClient::new(channel(addr));
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        if fresh {
            client = MemoryServiceClient::new(channel(addr));
        }
        let mut request = Request::new(store_request(&conversation, &user));
        request.set_timeout(ORDINARY_DEADLINE);
        let started = Instant::now();
        match tokio::time::timeout(ORDINARY_HUNG_AFTER, client.store_message(request)).await {
            Ok(Ok(_)) => {
                tally.ok += 1;
                tally.ok_at.push(Instant::now());
                tally.latencies.push(started.elapsed());
            }
            Ok(Err(status)) => tally.failures.push(format!(
                "{:?} {}: {}",
                status.code(),
                reason(&status),
                status.message()
            )),
            Err(_) => tally
                .failures
                .push(format!("no answer within {ORDINARY_HUNG_AFTER:?}")),
        }
        tokio::time::sleep(pause).await;
    }
    tally
}

/// One ordinary StoreMessage call on a connection of its own.
pub async fn one_call(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut client = MemoryServiceClient::new(channel(addr));
    let mut request = Request::new(store_request(&uuid::Uuid::now_v7().to_string(), "probe"));
    request.set_timeout(timeout);
    match tokio::time::timeout(
        timeout + Duration::from_secs(2),
        client.store_message(request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no answer".into()),
    }
}
