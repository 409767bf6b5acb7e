//! The memory-service replicas booking-service spreads its calls over.
//!
//! `BOOKING_MEMORY_URL` names one or more endpoints, comma-separated. A
//! background task resolves every name again each `resolve_interval` (a
//! Kubernetes headless Service answers with one address per ready pod) and
//! probes each address with a TCP connect; tonic's balancer sends each call
//! to one of the reachable replicas, picked at random (tonic's connections
//! report no load, so its power-of-two-choices comes down to a uniform
//! pick: a fair share each). Replicas that appear join without a restart;
//! replicas that vanish from DNS leave; a replica whose port refuses
//! connections leaves at once, one that does not answer the probe after
//! two rounds in a row. A call that fails UNAVAILABLE at the transport asks
//! for an early round ([`Discovery::suspect`], probes only) and its retry
//! waits for that round, so it does not go to the replica that just died.
//!
//! What a TCP probe cannot see: a replica that accepts connections but
//! does not answer (stopped process, sidecar proxy); its calls end at their
//! deadline and are retried by the jobs.
//!
//! Fallbacks keep calls failing fast rather than waiting for a replica that
//! may never come (tonic's balancer queues a call while it has no
//! endpoint): when no address answers the probe, every resolved address
//! stays in (calls then fail UNAVAILABLE at once, as with a single
//! endpoint); when resolution fails, the last set is kept; when no name has
//! ever resolved, calls fail UNAVAILABLE without waiting
//! ([`Discovery::has_replicas`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use http::Uri;
use tokio::sync::{Notify, mpsc::Sender, watch};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, channel::Change};

/// Re-resolution interval when the settings leave it at zero.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe's TCP connect may take before it counts as unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Unanswered probes in a row that take a replica out (a refused connection
/// takes it out at once): one lost SYN must not drop a busy replica.
const UNANSWERED_ROUNDS: u8 = 2;
/// How long a name's resolution may take before the round keeps the last set.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Least time between two rounds, however many calls report a failure.
const MIN_ROUND_GAP: Duration = Duration::from_millis(250);
/// Endpoint changes queued for the balancer (which takes them when it next
/// routes a call).
const CHANGES_BUFFER: usize = 1024;

/// One entry of `BOOKING_MEMORY_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As configured: the `:authority` calls carry and the name TLS checks.
    pub uri: Uri,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses a comma-separated list of `http://` or `https://` URLs with one
/// scheme for all (a mixed list would send the token in clear to some).
pub fn parse_targets(list: &str) -> Result<Vec<Target>, String> {
    let mut targets = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let uri: Uri = entry
            .parse()
            .map_err(|e| format!("{entry:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{entry:?} must start with http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{entry:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        targets.push(Target {
            uri,
            host,
            port,
            tls,
        });
    }
    match targets.first() {
        None => Err("names no endpoint".into()),
        Some(first) if targets.iter().any(|t| t.tls != first.tls) => {
            Err("mixes http:// and https:// endpoints".into())
        }
        Some(_) => Ok(targets),
    }
}

/// How each endpoint is dialled.
#[derive(Clone)]
pub struct Dial {
    pub timeout: Duration,
    pub tls: Option<ClientTlsConfig>,
    pub resolve_interval: Duration,
}

/// What the background task has done so far.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Rounds started and finished.
    started: u64,
    finished: u64,
    /// Replicas in the balancer after the last round.
    endpoints: usize,
}

/// Handle on the background task that keeps the balancer's endpoints.
#[derive(Debug, Clone)]
pub struct Discovery {
    early_round: Arc<Notify>,
    progress: watch::Receiver<Progress>,
}

impl Discovery {
    /// A call just failed at the transport: probe the replicas again now
    /// rather than at the next interval. Waits (at most `within`) until a
    /// round started after this call has finished, so a retry made next
    /// sees its outcome.
    pub async fn suspect(&self, within: Duration) {
        let mut progress = self.progress.clone();
        let started = progress.borrow_and_update().started;
        self.early_round.notify_one();
        let _ = tokio::time::timeout(within, progress.wait_for(|p| p.finished > started)).await;
    }

    /// False when the balancer holds no replica at all (no name ever
    /// resolved): a call would wait for one. Waits (at most `within`) for
    /// the first round; true when it has not finished by then.
    pub async fn has_replicas(&self, within: Duration) -> bool {
        let mut progress = self.progress.clone();
        match tokio::time::timeout(within, progress.wait_for(|p| p.finished > 0)).await {
            Ok(Ok(progress)) => progress.endpoints > 0,
            _ => true,
        }
    }
}

/// A channel that balances over every reachable address of `targets`, and
/// the handle of the task that keeps it current. The task stops when the
/// channel and all its clones are gone. Needs a Tokio runtime. Fails on
/// settings no replica could be dialled with (e.g. unusable TLS material),
/// so that they stop the service at start.
pub fn balanced_channel(
    targets: Vec<Target>,
    dial: Dial,
) -> Result<(Channel, Discovery), tonic::transport::Error> {
    for target in &targets {
        endpoint(
            target,
            SocketAddr::from(([127, 0, 0, 1], target.port)),
            &dial,
        )?;
    }
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(CHANGES_BUFFER);
    let early_round = Arc::new(Notify::new());
    let (progress_tx, progress) = watch::channel(Progress::default());
    let keeper = Keeper::new(targets, dial, changes, early_round.clone(), Arc::new(dns));
    tokio::spawn(keeper.run(progress_tx));
    Ok((
        channel,
        Discovery {
            early_round,
            progress,
        },
    ))
}

/// How a target's name becomes addresses (DNS; a fake in tests).
type Resolver = Arc<
    dyn Fn(Target) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

fn dns(target: Target) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
    Box::pin(async move { resolve(&target).await })
}

struct Keeper {
    targets: Vec<Target>,
    dial: Dial,
    resolver: Resolver,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    early_round: Arc<Notify>,
    /// Addresses the balancer has now.
    current: BTreeSet<SocketAddr>,
    /// The last successful resolution of each target (by index), kept when
    /// a later one fails.
    resolved: BTreeMap<usize, Vec<SocketAddr>>,
    /// Unanswered probes in a row, by address.
    unanswered: BTreeMap<SocketAddr, u8>,
    /// Set while no address answers, to warn once per streak.
    none_reachable: bool,
}

/// What a probe found at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Accepted,
    /// Nothing listens there: the replica is gone.
    Refused,
    /// No answer in time, or another error: maybe a passing hiccup.
    Unanswered,
}

impl Keeper {
    fn new(
        targets: Vec<Target>,
        dial: Dial,
        changes: Sender<Change<SocketAddr, Endpoint>>,
        early_round: Arc<Notify>,
        resolver: Resolver,
    ) -> Self {
        Self {
            targets,
            dial,
            resolver,
            changes,
            early_round,
            current: BTreeSet::new(),
            resolved: BTreeMap::new(),
            unanswered: BTreeMap::new(),
            none_reachable: false,
        }
    }

    async fn run(mut self, progress: watch::Sender<Progress>) {
        let interval = match self.dial.resolve_interval {
            Duration::ZERO => DEFAULT_RESOLVE_INTERVAL,
            interval => interval,
        };
        let mut resolve = true;
        loop {
            progress.send_modify(|p| p.started += 1);
            // Early rounds only probe, unless no name has resolved yet.
            let resolve_now = resolve || self.resolved.is_empty();
            if self.round(resolve_now).await.is_err() {
                break;
            }
            let endpoints = self.current.len();
            progress.send_modify(|p| {
                p.finished += 1;
                p.endpoints = endpoints;
            });
            tokio::select! {
                () = tokio::time::sleep(MIN_ROUND_GAP) => {}
                () = self.changes.closed() => break,
            }
            tokio::select! {
                () = tokio::time::sleep(interval.saturating_sub(MIN_ROUND_GAP)) => resolve = true,
                () = self.early_round.notified() => resolve = false,
                () = self.changes.closed() => break,
            }
        }
        tracing::debug!("memory-service channel dropped; endpoint discovery stops");
    }

    /// Resolves (when `resolve`), probes and hands the balancer what
    /// changed. Errs only when the balancer is gone.
    async fn round(&mut self, resolve: bool) -> Result<(), ()> {
        if resolve {
            self.resolve().await;
        }
        let candidates: BTreeSet<SocketAddr> = self.resolved.values().flatten().copied().collect();
        let probes = futures::future::join_all(
            candidates
                .iter()
                .map(|&addr| async move { (addr, probe(addr).await) }),
        )
        .await;
        self.unanswered.retain(|addr, _| candidates.contains(addr));
        let mut usable = BTreeSet::new();
        let mut answering = 0;
        for (addr, probe) in probes {
            let strikes = self.unanswered.entry(addr).or_default();
            *strikes = match probe {
                Probe::Accepted => 0,
                Probe::Refused => UNANSWERED_ROUNDS,
                Probe::Unanswered => strikes.saturating_add(1),
            };
            // A replica in the balancer stays through one unanswered probe; a
            // new one joins only once it answers.
            let stays = self.current.contains(&addr) && *strikes < UNANSWERED_ROUNDS;
            if probe == Probe::Accepted {
                answering += 1;
            }
            if probe == Probe::Accepted || stays {
                usable.insert(addr);
            }
        }

        let wanted = if answering == 0 {
            if !self.none_reachable && !candidates.is_empty() {
                tracing::warn!(addresses = ?candidates, "no memory-service replica answers; calls will fail UNAVAILABLE until one does");
            }
            self.none_reachable = true;
            candidates
        } else {
            if self.none_reachable {
                tracing::info!(addresses = ?usable, "memory-service replicas answer again");
            }
            self.none_reachable = false;
            usable
        };
        self.apply(&wanted).await
    }

    /// Resolves every target at once; a target whose resolution fails or
    /// comes back empty keeps its last addresses.
    async fn resolve(&mut self) {
        let answers =
            futures::future::join_all(self.targets.iter().map(|t| (self.resolver)(t.clone())))
                .await;
        for ((index, target), answer) in self.targets.iter().enumerate().zip(answers) {
            match answer {
                Ok(addrs) if !addrs.is_empty() => {
                    self.resolved.insert(index, addrs);
                }
                Ok(_) => {
                    tracing::warn!(host = %target.host, "memory-service name resolves to no address; keeping the last known ones")
                }
                Err(error) => {
                    tracing::warn!(host = %target.host, %error, "resolving memory-service failed; keeping the last known addresses")
                }
            }
        }
    }

    /// Hands the balancer the difference between what it has and `wanted`.
    async fn apply(&mut self, wanted: &BTreeSet<SocketAddr>) -> Result<(), ()> {
        let leaving: Vec<SocketAddr> = self.current.difference(wanted).copied().collect();
        for gone in leaving {
            tracing::info!(address = %gone, "memory-service replica leaves the balancer");
            self.changes
                .send(Change::Remove(gone))
                .await
                .map_err(|_| ())?;
            self.current.remove(&gone);
        }
        let joining: Vec<SocketAddr> = wanted.difference(&self.current).copied().collect();
        for new in joining {
            let Some(target) = self.target_of(new) else {
                continue;
            };
            match endpoint(target, new, &self.dial) {
                Ok(endpoint) => {
                    tracing::info!(address = %new, host = %target.host, "memory-service replica joins the balancer");
                    self.changes
                        .send(Change::Insert(new, endpoint))
                        .await
                        .map_err(|_| ())?;
                    self.current.insert(new);
                }
                // Not counted as in the balancer: tried again next round.
                Err(error) => {
                    tracing::error!(address = %new, %error, "cannot build an endpoint for a memory-service replica")
                }
            }
        }
        Ok(())
    }

    /// The configured target an address was resolved from.
    fn target_of(&self, addr: SocketAddr) -> Option<&Target> {
        self.resolved
            .iter()
            .find(|(_, addrs)| addrs.contains(&addr))
            .and_then(|(&index, _)| self.targets.get(index))
    }
}

async fn resolve(target: &Target) -> std::io::Result<Vec<SocketAddr>> {
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(addrs) => Ok(addrs?.collect()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "DNS did not answer in time",
        )),
    }
}

/// Whether something accepts TCP connections at `addr`.
async fn probe(addr: SocketAddr) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Probe::Accepted,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        _ => Probe::Unanswered,
    }
}

/// The endpoint of one replica: dialled by address, addressed (authority,
/// TLS name) by the configured name.
fn endpoint(
    target: &Target,
    addr: SocketAddr,
    dial: &Dial,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if target.tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .origin(target.uri.clone())
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .timeout(dial.timeout);
    if let Some(tls) = &dial.tls {
        endpoint = endpoint.tls_config(tls.clone().domain_name(target.host.clone()))?;
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::{net::TcpListener, sync::mpsc};

    use super::*;

    /// What the balancer was told, in order: `+addr` inserted, `-addr` removed.
    fn drain(changes: &mut mpsc::Receiver<Change<SocketAddr, Endpoint>>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        while let Ok(change) = changes.try_recv() {
            seen.insert(match change {
                Change::Insert(addr, _) => format!("+{}", addr.port()),
                Change::Remove(addr) => format!("-{}", addr.port()),
            });
        }
        seen
    }

    fn set<const N: usize>(changes: [String; N]) -> BTreeSet<String> {
        changes.into_iter().collect()
    }

    /// Replicas that come and go in "DNS", and one that stops answering.
    #[tokio::test]
    async fn replicas_join_and_leave_as_dns_and_probes_say() {
        let live: Vec<TcpListener> = futures::future::join_all(
            (0..3).map(|_| async { TcpListener::bind("127.0.0.1:0").await.unwrap() }),
        )
        .await;
        let addrs: Vec<SocketAddr> = live.iter().map(|l| l.local_addr().unwrap()).collect();
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let answer: Arc<Mutex<std::io::Result<Vec<SocketAddr>>>> =
            Arc::new(Mutex::new(Ok(vec![addrs[0]])));
        let dns_answer = answer.clone();
        let resolver: Resolver = Arc::new(move |_| {
            let answer = match &*dns_answer.lock().unwrap() {
                Ok(addrs) => Ok(addrs.clone()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            Box::pin(async move { answer })
        });
        let (tx, mut changes) = mpsc::channel(64);
        let mut keeper = Keeper::new(
            parse_targets("http://memory-service-pods:50051").unwrap(),
            Dial {
                timeout: Duration::from_secs(1),
                tls: None,
                resolve_interval: Duration::from_secs(60),
            },
            tx,
            Arc::new(Notify::new()),
            resolver,
        );
        let port = |i: usize| addrs[i].port();
        let answer_with = |addrs: Vec<SocketAddr>| *answer.lock().unwrap() = Ok(addrs);

        keeper.round(true).await.unwrap();
        assert_eq!(drain(&mut changes), set([format!("+{}", port(0))]));

        // The autoscaler added two pods.
        answer_with(addrs.clone());
        keeper.round(true).await.unwrap();
        assert_eq!(
            drain(&mut changes),
            set([format!("+{}", port(1)), format!("+{}", port(2))])
        );

        // One pod left DNS, and DNS lists one whose process is gone.
        answer_with(vec![addrs[1], addrs[2], dead]);
        keeper.round(true).await.unwrap();
        assert_eq!(drain(&mut changes), set([format!("-{}", port(0))]));

        // DNS fails: the last known set stays.
        *answer.lock().unwrap() = Err(std::io::Error::other("SERVFAIL"));
        keeper.round(true).await.unwrap();
        assert!(drain(&mut changes).is_empty());

        // Nothing answers the probe: every resolved address goes in, so calls
        // fail fast rather than wait for a replica.
        drop(live);
        answer_with(vec![addrs[2], dead]);
        keeper.round(true).await.unwrap();
        assert_eq!(
            drain(&mut changes),
            set([format!("+{}", dead.port()), format!("-{}", port(1))])
        );
    }

    #[test]
    fn lists_parse_with_one_scheme() {
        let targets = parse_targets("http://memory-a:50051, http://10.0.0.7:7000,").unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(
            (targets[0].host.as_str(), targets[0].port),
            ("memory-a", 50051)
        );
        assert_eq!(
            (targets[1].host.as_str(), targets[1].port),
            ("10.0.0.7", 7000)
        );
        assert_eq!(parse_targets("https://[::1]").unwrap()[0].host, "::1");
        assert_eq!(parse_targets("https://[::1]").unwrap()[0].port, 443);
        for bad in [
            "",
            " , ",
            "memory:50051",
            "ftp://memory",
            "http://a:1,https://b:2",
        ] {
            assert!(parse_targets(bad).is_err(), "{bad:?} accepted");
        }
    }
}
