//! MAX_CONNECTION_AGE: a server asks each client connection to go away
//! (GOAWAY) once it is this old, so long-lived clients reconnect and spread
//! over replicas the autoscaler added; a connection still busy
//! MAX_CONNECTION_AGE_GRACE later is cut.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use maitre_api::memory::v1::memory_service_client::MemoryServiceClient;
use maitre_runtime::{
    server::MaybeDuration,
    testkit::{http_get, sample},
};
use tokio::net::TcpListener;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{TestApp, spawn_app_with};

const AGE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(1);

async fn app_with_short_connection_age() -> TestApp {
    spawn_app_with(|settings| {
        settings.server.max_connection_age = MaybeDuration(Some(AGE));
        settings.server.max_connection_age_grace = GRACE;
    })
    .await
}

/// A loopback relay to `target` that counts the TCP connections clients
/// open through it: each is one HTTP/2 connection to the server.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, opened)
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

#[tokio::test]
async fn a_client_is_asked_to_reconnect_once_its_connection_is_old_and_its_calls_go_on() {
    let app = app_with_short_connection_age().await;
    let (relay, opened) = counting_relay(app.addr).await;
    let mut client = MemoryServiceClient::new(channel(relay));

    // One channel, a call every 100 ms for 3.5 connection ages.
    let conversation = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < AGE * 7 / 2 {
        let message = TestApp::message(&conversation, "age-user", "still here", None);
        // A call that races the GOAWAY is refused before the server reads
        // it (UNAVAILABLE); like any client, retry that once.
        let stored = match client.store_message(message.clone()).await {
            Err(status) if status.code() == Code::Unavailable => {
                client.store_message(message).await
            }
            other => other,
        };
        if let Err(status) = stored {
            panic!("call {calls} failed across a connection recycle: {status:?}");
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connections = opened.load(Ordering::SeqCst);
    assert!(
        connections >= 3,
        "{calls} calls over {:?} used {connections} connection(s): the server never asked the client to reconnect",
        started.elapsed()
    );
    // Every old connection went away on the GOAWAY: none had to be cut.
    let (_, metrics) = http_get(app.admin_addr.expect("admin"), "/metrics").await;
    let cut = sample(
        &metrics,
        "maitre_connections_closed_by_server_total",
        &[("reason", "max_age")],
    );
    assert_eq!(cut.unwrap_or(0.0), 0.0, "{metrics}");
}

#[tokio::test]
async fn a_connection_still_busy_after_the_grace_is_cut() {
    let app = app_with_short_connection_age().await;
    let mut health = HealthClient::new(channel(app.addr));
    // A Health/Watch stream never ends by itself: it keeps its connection
    // busy past the GOAWAY.
    let watch_started = Instant::now();
    let mut stream = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    let lasted = watch_started.elapsed();
    assert!(
        ended.is_ok(),
        "the stream outlived MAX_CONNECTION_AGE + grace by far"
    );
    assert!(
        lasted >= (AGE + GRACE) * 3 / 4,
        "the stream was cut after {lasted:?}, before the grace was over"
    );
    let (_, metrics) = http_get(app.admin_addr.expect("admin"), "/metrics").await;
    let cut = sample(
        &metrics,
        "maitre_connections_closed_by_server_total",
        &[("reason", "max_age")],
    );
    assert_eq!(cut, Some(1.0), "{metrics}");
}
