//! A TCP forwarder standing between a service and PostgreSQL, so that a test
//! can make "the database go away" (cut every connection, refuse new ones)
//! and come back, without touching the shared server.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct DbProxy {
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl DbProxy {
    /// Forwards 127.0.0.1:<random> to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (up_tx, _) = watch::channel(true);
        let up = Arc::new(up_tx);
        let accept_up = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*accept_up.borrow() {
                    drop(client);
                    continue;
                }
                let mut down = accept_up.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn take_down(&self) {
        self.up.send_replace(false);
    }

    pub fn bring_up(&self) {
        self.up.send_replace(true);
    }
}
