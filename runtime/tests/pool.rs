//! The services' connection pool (`db::connect_lazy`) with the patched
//! sqlx (`patches/sqlx-core/PATCHES.md`): a query that ran to completion
//! goes back to the pool without a ping round trip, a connection that
//! still owes the server something never goes back before it is settled,
//! and one left inside a transaction block is closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use maitre_runtime::{
    db::{PoolSettings, Pooler, connect_lazy},
    testkit::{fresh_database, wait_for, with_host},
};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const WITHIN: Duration = Duration::from_secs(20);

fn settings(url: &str, max_connections: u32) -> PoolSettings {
    PoolSettings {
        url: url.to_owned(),
        direct_url: None,
        pooler: Pooler::None,
        max_connections,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(30),
        application_name: "pool-test".into(),
        asynchronous_commit: false,
    }
}

/// host:port of the PostgreSQL server in `url`.
async fn server_addr(url: &str) -> SocketAddr {
    let options = PgConnectOptions::from_str(url).expect("DATABASE_URL parses");
    tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .expect("DATABASE_URL's host resolves")
        .next()
        .expect("an address for DATABASE_URL's host")
}

/// A TCP proxy in front of PostgreSQL that counts the Sync messages clients
/// send: each is one request for a ReadyForQuery, i.e. one round trip.
struct SyncCounter {
    addr: SocketAddr,
    syncs: Arc<AtomicUsize>,
}

impl SyncCounter {
    async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(server).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = upstream.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    });
                    let mut messages = FrontendMessages::default();
                    let mut buffer = [0_u8; 8192];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        let syncs = messages.feed(&buffer[..n]);
                        counted.fetch_add(syncs, Ordering::SeqCst);
                    }
                });
            }
        });
        Self { addr, syncs }
    }

    fn syncs(&self) -> usize {
        self.syncs.load(Ordering::SeqCst)
    }
}

/// The client side of the PostgreSQL protocol, message by message: untyped
/// messages (SSLRequest, StartupMessage) until the startup message, then a
/// type byte and a length each.
#[derive(Default)]
struct FrontendMessages {
    pending: Vec<u8>,
    started: bool,
}

impl FrontendMessages {
    /// Adds bytes; returns the Sync messages completed by them.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        const SSL_REQUEST: u32 = 80_877_103;
        const GSSENC_REQUEST: u32 = 80_877_104;
        self.pending.extend_from_slice(bytes);
        let mut syncs = 0;
        loop {
            let header = if self.started { 5 } else { 8 };
            if self.pending.len() < header {
                return syncs;
            }
            let offset = usize::from(self.started);
            let length = u32::from_be_bytes(self.pending[offset..offset + 4].try_into().unwrap());
            let total = offset + length as usize;
            if self.pending.len() < total {
                return syncs;
            }
            if self.started {
                syncs += usize::from(self.pending[0] == b'S');
            } else {
                let code = u32::from_be_bytes(self.pending[4..8].try_into().unwrap());
                self.started = code != SSL_REQUEST && code != GSSENC_REQUEST;
            }
            self.pending.drain(..total);
        }
    }
}

/// A fresh database with a table `t (n int)`, and a pool of one connection.
async fn one_connection_with_a_table() -> (String, PgPool) {
    let url = fresh_database().await;
    let pool = connect_lazy(&settings(&url, 1)).unwrap();
    sqlx::query("CREATE TABLE t (n int)")
        .execute(&pool)
        .await
        .unwrap();
    (url, pool)
}

async fn all_idle(pool: &PgPool) {
    wait_for("every connection back in the pool", WITHIN, || async {
        (pool.num_idle() == pool.size() as usize).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_completed_query_costs_one_round_trip_and_no_release_ping() {
    let url = fresh_database().await;
    let proxy = SyncCounter::start(server_addr(&url).await).await;
    // In clear, so the proxy can read the messages (sqlx prefers TLS when
    // the server offers it).
    let proxied = with_host(&url, &proxy.addr.to_string());
    let separator = if proxied.contains('?') { '&' } else { '?' };
    let proxied = format!("{proxied}{separator}sslmode=disable");
    let pool = connect_lazy(&settings(&proxied, 1)).unwrap();
    const QUERY: &str = "SELECT $1::int4 + 1";
    // Connects and prepares the statement (its own round trips).
    sqlx::query_scalar::<_, i32>(QUERY)
        .bind(0)
        .fetch_one(&pool)
        .await
        .unwrap();
    all_idle(&pool).await;
    let before = proxy.syncs();

    for i in 0..50 {
        let got: i32 = sqlx::query_scalar(QUERY)
            .bind(i)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(got, i + 1);
    }
    all_idle(&pool).await;
    // Unpatched sqlx pings every connection it takes back: 100.
    assert_eq!(proxy.syncs() - before, 50, "one Sync per query");
    pool.close().await;
}

#[tokio::test]
async fn a_query_dropped_mid_flight_keeps_its_connection_out_of_the_pool() {
    let url = fresh_database().await;
    let pool = connect_lazy(&settings(&url, 2)).unwrap();
    let admin = PgPool::connect(&url).await.unwrap();
    let mut admin_connection = admin.acquire().await.unwrap();
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    all_idle(&pool).await;
    assert_eq!(pool.size(), 1);

    // The pool's only connection starts a statement that waits for a lock
    // the test holds; the caller gives up (a gRPC deadline drops the
    // handler the same way).
    sqlx::query("SELECT pg_advisory_lock(7)")
        .execute(&mut *admin_connection)
        .await
        .unwrap();
    let slow = tokio::spawn({
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT pg_advisory_lock(7)")
                .execute(&pool)
                .await
        }
    });
    wait_for("the statement to wait for the lock", WITHIN, || async {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
        )
        .bind(first)
        .fetch_one(&admin)
        .await
        .unwrap();
        waiting.then_some(())
    })
    .await;
    slow.abort();
    assert!(slow.await.unwrap_err().is_cancelled());

    // The next caller must not get the busy connection (it would wait for
    // the sleep, and read its leftovers first).
    let next: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(next, first, "handed the busy connection to the next caller");
    sqlx::query("SELECT pg_advisory_unlock(7)")
        .execute(&mut *admin_connection)
        .await
        .unwrap();
    drop(admin_connection);
    pool.close().await;
    admin.close().await;
}

#[tokio::test]
async fn a_transaction_dropped_uncommitted_is_rolled_back_before_reuse() {
    let (url, pool) = one_connection_with_a_table().await;
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    {
        let mut transaction = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *transaction)
            .await
            .unwrap();
        // Dropped without commit.
    }
    all_idle(&pool).await;
    // Settled before it went back: the server has the rollback already (a
    // ROLLBACK left in the client's buffer would show "idle in transaction").
    let admin = PgPool::connect(&url).await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
        .bind(first)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(state, "idle");
    admin.close().await;
    // The same connection (the pool holds one), outside any transaction.
    let (pid, rows, in_transaction): (i32, i64, bool) = sqlx::query_as(
        "SELECT pg_backend_pid(), (SELECT count(*) FROM t), \
         txid_current_if_assigned() IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pid, first);
    assert_eq!(rows, 0, "the insert was rolled back");
    assert!(!in_transaction, "still inside the insert's transaction");
    pool.close().await;
}

#[tokio::test]
async fn a_connection_left_inside_a_transaction_block_is_closed_not_reused() {
    let (_, pool) = one_connection_with_a_table().await;
    let first = {
        // What a `begin` cancelled after its BEGIN went out leaves: a
        // transaction block that no guard will end.
        let mut connection = pool.acquire().await.unwrap();
        sqlx::query("BEGIN")
            .execute(&mut *connection)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *connection)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await
            .unwrap()
    };
    all_idle(&pool).await;
    let (pid, rows): (i32, i64) =
        sqlx::query_as("SELECT pg_backend_pid(), (SELECT count(*) FROM t)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(pid, first, "reused a connection inside a transaction block");
    assert_eq!(rows, 0, "the open transaction's insert was rolled back");
    pool.close().await;
}
