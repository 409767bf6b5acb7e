//! Helpers for the services' integration tests and the bench: fresh
//! databases on the PostgreSQL named by `DATABASE_URL` (an admin URL, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), a TCP proxy to make a
//! dependency "go away", waiting for a condition with a deadline, the
//! services' real binaries as child processes ([`process`]), and a real
//! PgBouncer in transaction mode in front of the server ([`pgbouncer`]).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod pgbouncer;
pub mod process;
pub mod proxy;

use std::{future::Future, time::Duration};

use sqlx::PgPool;

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// `url` pointing at another host:port (same credentials and database).
pub fn with_host(url: &str, host_port: &str) -> String {
    let authority_start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[authority_start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let credentials = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!(
        "{}{credentials}{host_port}{}",
        &url[..authority_start],
        &rest[authority_end..]
    )
}

/// A fresh, empty database `maitre_test_<uuid>`; returns its URL.
/// (`scripts/test.sh` drops those left by earlier runs.)
pub async fn fresh_database() -> String {
    let name = format!("maitre_test_{}", uuid::Uuid::now_v7().simple());
    let admin = PgPool::connect(&admin_url())
        .await
        .expect("admin connection to DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    with_database(&admin_url(), &name)
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET http://{addr}{path}` over HTTP/1.1; returns (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to admin port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The value of the first sample of `metric` whose labels include all of
/// `labels` (`name="value"` pairs), from a Prometheus text exposition.
pub fn sample(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(metric) && line[metric.len()..].starts_with(['{', ' ']))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn replaces_the_host() {
        assert_eq!(
            with_host("postgres://u:p@h:5432/db", "127.0.0.1:9"),
            "postgres://u:p@127.0.0.1:9/db"
        );
        assert_eq!(
            with_host("postgres://h:5432/db", "127.0.0.1:9"),
            "postgres://127.0.0.1:9/db"
        );
    }
}
