//! The memory-service replicas booking-service spreads its calls over.
//!
//! `BOOKING_MEMORY_URL` names one or more endpoints, comma-separated. A
//! background task resolves every name again each `resolve_interval` (a
//! Kubernetes headless Service answers with one address per ready pod) and
//! probes each address with a TCP connect; tonic's balancer (power of two
//! choices on in-flight calls) picks among the reachable ones. Replicas that
//! appear join without a restart; replicas that vanish from DNS or stop
//! answering leave. A call that fails UNAVAILABLE asks for an early round
//! ([`Discovery::suspect`]), so its retry finds a dead replica gone.
//!
//! Two fallbacks keep calls failing fast rather than waiting for a replica
//! that may never come (tonic's balancer queues a call while it has no
//! endpoint): when no address answers the probe, every resolved address
//! stays in (calls then fail UNAVAILABLE at once, as with a single
//! endpoint); when resolution itself fails, the last set is kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use http::Uri;
use tokio::sync::{Notify, mpsc::Sender};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, channel::Change};

/// Re-resolution interval when the settings leave it at zero.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe's TCP connect may take before the address counts as dead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a name's resolution may take before the round keeps the last set.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Least time between two rounds, however many calls report a failure.
const MIN_ROUND_GAP: Duration = Duration::from_millis(100);
/// Calls queued in the balancer while it picks an endpoint.
const BALANCER_BUFFER: usize = 1024;

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

/// Handle on the background task that keeps the balancer's endpoints.
#[derive(Debug, Clone)]
pub struct Discovery {
    early_round: Arc<Notify>,
}

impl Discovery {
    /// A call just failed UNAVAILABLE: probe again now rather than at the
    /// next interval.
    pub fn suspect(&self) {
        self.early_round.notify_one();
    }
}

/// A channel that balances over every reachable address of `targets`, and
/// the handle of the task that keeps it current. The task stops when the
/// channel and all its clones are gone. Needs a Tokio runtime.
pub fn balanced_channel(targets: Vec<Target>, dial: Dial) -> (Channel, Discovery) {
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(BALANCER_BUFFER);
    let early_round = Arc::new(Notify::new());
    let keeper = Keeper::new(targets, dial, changes, early_round.clone(), Arc::new(dns));
    tokio::spawn(keeper.run());
    (channel, Discovery { early_round })
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
    /// Set while no address answers, to warn once per streak.
    none_reachable: bool,
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
            none_reachable: false,
        }
    }

    async fn run(mut self) {
        let interval = match self.dial.resolve_interval {
            Duration::ZERO => DEFAULT_RESOLVE_INTERVAL,
            interval => interval,
        };
        loop {
            if self.round().await.is_err() {
                tracing::debug!("memory-service channel dropped; endpoint discovery stops");
                return;
            }
            tokio::time::sleep(MIN_ROUND_GAP).await;
            tokio::select! {
                () = tokio::time::sleep(interval.saturating_sub(MIN_ROUND_GAP)) => {}
                () = self.early_round.notified() => {}
            }
        }
    }

    /// Resolves, probes and hands the balancer what changed. Errs only when
    /// the balancer is gone.
    async fn round(&mut self) -> Result<(), ()> {
        for (index, target) in self.targets.iter().enumerate() {
            match (self.resolver)(target.clone()).await {
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
        let candidates: BTreeSet<SocketAddr> = self.resolved.values().flatten().copied().collect();
        let reachable: BTreeSet<SocketAddr> = futures::future::join_all(
            candidates
                .iter()
                .map(|&addr| async move { probe(addr).await.then_some(addr) }),
        )
        .await
        .into_iter()
        .flatten()
        .collect();

        let wanted = if reachable.is_empty() {
            if !self.none_reachable && !candidates.is_empty() {
                tracing::warn!(addresses = ?candidates, "no memory-service replica answers; calls will fail UNAVAILABLE until one does");
            }
            self.none_reachable = true;
            candidates
        } else {
            if self.none_reachable {
                tracing::info!(addresses = ?reachable, "memory-service replicas answer again");
            }
            self.none_reachable = false;
            reachable
        };

        for &gone in self.current.difference(&wanted) {
            tracing::info!(address = %gone, "memory-service replica leaves the balancer");
            self.changes
                .send(Change::Remove(gone))
                .await
                .map_err(|_| ())?;
        }
        for &new in wanted.difference(&self.current) {
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
                }
                Err(error) => {
                    tracing::error!(address = %new, %error, "cannot build an endpoint for a memory-service replica");
                }
            }
        }
        self.current = wanted;
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

/// True when something accepts TCP connections at `addr`.
async fn probe(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
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
    fn drain(changes: &mut mpsc::Receiver<Change<SocketAddr, Endpoint>>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(change) = changes.try_recv() {
            seen.push(match change {
                Change::Insert(addr, _) => format!("+{}", addr.port()),
                Change::Remove(addr) => format!("-{}", addr.port()),
            });
        }
        seen.sort();
        seen
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
        let set = |addrs: Vec<SocketAddr>| *answer.lock().unwrap() = Ok(addrs);

        keeper.round().await.unwrap();
        assert_eq!(drain(&mut changes), [format!("+{}", port(0))]);

        // The autoscaler added two pods.
        set(addrs.clone());
        keeper.round().await.unwrap();
        assert_eq!(
            drain(&mut changes),
            [format!("+{}", port(1)), format!("+{}", port(2))]
        );

        // One pod left DNS, and DNS lists one whose process is gone.
        set(vec![addrs[1], addrs[2], dead]);
        keeper.round().await.unwrap();
        assert_eq!(drain(&mut changes), [format!("-{}", port(0))]);

        // DNS fails: the last known set stays.
        *answer.lock().unwrap() = Err(std::io::Error::other("SERVFAIL"));
        keeper.round().await.unwrap();
        assert_eq!(drain(&mut changes), Vec::<String>::new());

        // Nothing answers the probe: every resolved address goes in, so calls
        // fail fast rather than wait for a replica.
        drop(live);
        set(vec![addrs[2], dead]);
        keeper.round().await.unwrap();
        assert_eq!(
            drain(&mut changes),
            [format!("+{}", dead.port()), format!("-{}", port(1))]
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
