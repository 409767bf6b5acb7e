//! A TCP forwarder standing between a service and a dependency (PostgreSQL,
//! memory-service), so that a test can make it "go away" (cut every open
//! connection and refuse new ones, as a stopped server does) and come back,
//! without touching the real server.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl TcpProxy {
    /// Forwards 127.0.0.1:<random port> to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (up_tx, _) = watch::channel(true);
        let up = Arc::new(up_tx);
        tokio::spawn(serve(listener, addr, target, up.clone()));
        Self { addr, up }
    }

    /// Cuts every open connection; new ones are refused until `bring_up`.
    pub fn take_down(&self) {
        self.up.send_replace(false);
    }

    pub fn bring_up(&self) {
        self.up.send_replace(true);
    }
}

async fn serve(
    mut listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    up: Arc<watch::Sender<bool>>,
) {
    loop {
        let mut state = up.subscribe();
        let went_down = tokio::select! {
            accepted = listener.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(forward(client, target, up.subscribe()));
                }
                false
            }
            down = state.wait_for(|up| !*up) => down.is_ok(),
        };
        if !went_down {
            continue;
        }
        // Stop listening: connects are refused, like a stopped server.
        drop(listener);
        let mut back = up.subscribe();
        if back.wait_for(|up| *up).await.is_err() {
            return;
        }
        listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = up.wait_for(|up| !*up) => {}
    }
}
