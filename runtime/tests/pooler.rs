//! `DB_POOLER=transaction` through a real PgBouncer 1.18 in transaction
//! mode (Debian's, started by each test with 2 server connections): the
//! services' pool (`db::connect_lazy`) runs hundreds of concurrent
//! statements with no prepared-statement error, where sqlx's usual named
//! statements (and its unnamed two-round-trip path) fail; PgBouncer refuses
//! the `options` startup parameter, so the statement timeout comes from the
//! role's settings, and applies.
//!
//! Without pgbouncer installed the tests are skipped, except under CI
//! (`CI` set), where they fail saying how to install it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{str::FromStr, time::Duration};

use maitre_runtime::{
    db::{
        DbFailure, PoolSettings, Pooler, classify, connect_lazy, connect_options,
        server_statement_timeout,
    },
    testkit::{fresh_database, pgbouncer},
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// Concurrent clients of each workload, against 2 server connections.
const TASKS: usize = 300;

/// A custom type: its OID is looked up by the driver (the `resolve_types`
/// path) and decoded from the row description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "mood", rename_all = "lowercase")]
enum Mood {
    Calm,
    Angry,
}

fn pooled(url: &str, direct: &str, statement_timeout: Duration) -> PoolSettings {
    PoolSettings {
        url: url.to_owned(),
        direct_url: Some(direct.to_owned()),
        pooler: Pooler::Transaction,
        // Far more client connections than PgBouncer has server ones, so
        // the exchanges of different clients interleave on each.
        max_connections: 40,
        acquire_timeout: Duration::from_secs(30),
        statement_timeout,
        application_name: "pooler-test".into(),
        asynchronous_commit: false,
    }
}

async fn schema(direct: &str) {
    let pool = PgPool::connect(direct).await.expect("direct connection");
    sqlx::raw_sql(
        "CREATE TYPE mood AS ENUM ('calm', 'angry');
         CREATE TABLE notes (id bigserial PRIMARY KEY, mood mood NOT NULL,
                             body jsonb NOT NULL, tags text[] NOT NULL)",
    )
    .execute(&pool)
    .await
    .expect("schema");
    pool.close().await;
}

/// One client's statements: different SQL and parameter counts, a custom
/// type both ways, jsonb, an array, and a transaction of two statements.
async fn client(pool: &PgPool, n: i64, persistent: bool) -> Result<(), sqlx::Error> {
    let doubled: i64 = sqlx::query_scalar("SELECT $1::int8 * 2")
        .bind(n)
        .persistent(persistent)
        .fetch_one(pool)
        .await?;
    assert_eq!(doubled, n * 2, "another client's answer");
    let mood = if n % 2 == 0 { Mood::Calm } else { Mood::Angry };
    let (id, stored): (i64, Mood) = sqlx::query_as(
        "INSERT INTO notes (mood, body, tags) VALUES ($1, $2, $3) RETURNING id, mood",
    )
    .bind(mood)
    .bind(serde_json::json!({ "n": n }))
    .bind(vec![format!("t{n}")])
    .persistent(persistent)
    .fetch_one(pool)
    .await?;
    assert_eq!(stored, mood, "another client's row");
    let mut tx = pool.begin().await?;
    let body: serde_json::Value = sqlx::query_scalar("SELECT body FROM notes WHERE id = $1")
        .bind(id)
        .persistent(persistent)
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(body["n"], n, "another client's row");
    sqlx::query("UPDATE notes SET tags = tags || $2 WHERE id = $1 AND mood = $3")
        .bind(id)
        .bind(vec!["seen".to_owned()])
        .bind(mood)
        .persistent(persistent)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Runs [`client`] `TASKS` times at once; the errors, as text. Not
/// `persistent`: sqlx's one-off statements (the unnamed statement).
async fn workload(pool: &PgPool, persistent: bool) -> Vec<String> {
    let tasks: Vec<_> = (0..TASKS as i64)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move { client(&pool, n, persistent).await })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await.expect("client task") {
            Ok(()) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

#[tokio::test]
async fn the_pooler_mode_runs_hundreds_of_concurrent_clients_through_pgbouncer() {
    let Some(binary) = pgbouncer::require("pooler mode") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 2);
    let direct = fresh_database().await;
    schema(&direct).await;
    let pool = connect_lazy(&pooled(
        &bouncer.url(&direct),
        &direct,
        Duration::from_secs(5),
    ))
    .unwrap();
    // The second round runs on cached descriptions only; the third with
    // one-off statements (described each time).
    for (round, persistent) in [(0, true), (1, true), (2, false)] {
        let errors = workload(&pool, persistent).await;
        assert!(
            errors.is_empty(),
            "round {round}: {} of {TASKS} clients failed, e.g. {:?}\npgbouncer:\n{}",
            errors.len(),
            &errors[..errors.len().min(3)],
            bouncer.log()
        );
    }
    let check = PgPool::connect(&direct).await.unwrap();
    let (rows, seen): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE 'seen' = ANY (tags)) FROM notes")
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!((rows, seen), (3 * TASKS as i64, 3 * TASKS as i64));
    let named: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pooler-test'",
    )
    .fetch_one(&check)
    .await
    .unwrap();
    assert!(
        named <= 2,
        "at most PgBouncer's 2 server connections: {named}"
    );
    pool.close().await;
    check.close().await;
}

/// The control: the same workload with sqlx's own statement handling fails
/// through the same PgBouncer, so the test above proves the mode.
#[tokio::test]
async fn named_statements_and_the_two_round_trip_path_fail_through_pgbouncer() {
    let Some(binary) = pgbouncer::require("pooler control") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 2);
    let direct = fresh_database().await;
    schema(&direct).await;
    // What PgBouncer accepts at start-up, nothing else changed.
    let options = PgConnectOptions::from_str(&bouncer.url(&direct))
        .unwrap()
        .extra_float_digits(None);
    for (what, persistent) in [
        ("named statements (sqlx's default)", true),
        (
            "one-off statements: unnamed, described and executed in two exchanges",
            false,
        ),
    ] {
        let pool = PgPoolOptions::new()
            .max_connections(40)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy_with(options.clone());
        let errors = workload(&pool, persistent).await;
        eprintln!(
            "{what}: {} of {TASKS} clients failed, e.g. {:?}",
            errors.len(),
            errors.first()
        );
        // Named statements fail whenever a client's next exchange lands on
        // another server connection: with 40 clients on 2, always some. The
        // one-off path fails only when two clients' exchanges interleave
        // (about 40 % here, but a quiet run could see none): reported only.
        if persistent {
            assert!(
                !errors.is_empty(),
                "{what}: expected failures through PgBouncer in transaction mode, none"
            );
        }
        pool.close().await;
    }
}

/// A column changed under a running pool (a migration during a rolling
/// deploy): the pooler mode decodes rows by what the server says now, not
/// by the description it cached at the statement's first run.
#[tokio::test]
async fn a_changed_column_is_read_as_it_is_now_through_pgbouncer() {
    let Some(binary) = pgbouncer::require("pooler schema change") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 2);
    let direct = fresh_database().await;
    let admin = PgPool::connect(&direct).await.expect("direct connection");
    sqlx::raw_sql(
        "CREATE TABLE shifting (id int PRIMARY KEY, a int4 NOT NULL, b text NOT NULL);
         INSERT INTO shifting VALUES (1, 7, 'seven')",
    )
    .execute(&admin)
    .await
    .expect("schema");
    let settings = pooled(&bouncer.url(&direct), &direct, Duration::from_secs(5));
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(connect_options(&settings).unwrap())
        .await
        .expect("pool through pgbouncer");
    let read = "SELECT * FROM shifting WHERE id = $1";
    let (_, a, b): (i32, i32, String) = sqlx::query_as(read)
        .bind(1)
        .fetch_one(&pool)
        .await
        .expect("first read");
    assert_eq!((a, b.as_str()), (7, "seven"));

    // The columns swap places and types; the same SQL on the same connection.
    sqlx::raw_sql(
        "ALTER TABLE shifting DROP COLUMN a;
         ALTER TABLE shifting ADD COLUMN a text NOT NULL DEFAULT 'new';
         UPDATE shifting SET b = 'eight'",
    )
    .execute(&admin)
    .await
    .expect("migration");
    let (_, b, a): (i32, String, String) = sqlx::query_as(read)
        .bind(1)
        .fetch_one(&pool)
        .await
        .expect("read after the migration");
    assert_eq!((b.as_str(), a.as_str()), ("eight", "new"));
}

#[tokio::test]
async fn pgbouncer_refuses_the_options_startup_parameter_the_direct_mode_sends() {
    let Some(binary) = pgbouncer::require("startup options") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 2);
    let direct = fresh_database().await;
    let mut settings = pooled(&bouncer.url(&direct), &direct, Duration::from_secs(5));
    settings.pooler = Pooler::None;
    let pool = connect_lazy(&settings).unwrap();
    let refused = sqlx::query("SELECT 1").execute(&pool).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("unsupported startup parameter"),
        "{refused}"
    );
    pool.close().await;
}

/// With the pooler the service cannot send `statement_timeout`; the role's
/// setting (`ALTER ROLE … IN DATABASE … SET`, what deploy/k8s/base/roles.sql
/// carries) reaches every server connection PgBouncer opens, and cuts a
/// long statement short (DATABASE_TIMEOUT, not a hang).
#[tokio::test]
async fn the_roles_statement_timeout_applies_through_pgbouncer() {
    let Some(binary) = pgbouncer::require("statement timeout") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 2);
    let direct = fresh_database().await;
    let database = PgConnectOptions::from_str(&direct)
        .unwrap()
        .get_database()
        .unwrap()
        .to_owned();
    let admin = PgPool::connect(&direct).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE CURRENT_USER IN DATABASE {database} SET statement_timeout = '300ms'"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let pool = connect_lazy(&pooled(
        &bouncer.url(&direct),
        &direct,
        Duration::from_millis(300),
    ))
    .unwrap();
    let mut connection = pool.acquire().await.unwrap();
    assert_eq!(
        server_statement_timeout(&mut connection).await.unwrap(),
        Duration::from_millis(300)
    );
    drop(connection);
    let started = std::time::Instant::now();
    let slow = sqlx::query("SELECT pg_sleep(3)").execute(&pool).await;
    let error = slow.expect_err("cut by the role's statement_timeout");
    assert_eq!(classify(&error), DbFailure::Timeout, "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
    pool.close().await;
}
