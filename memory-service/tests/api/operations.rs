//! What operators rely on: metrics, request ids, deadlines, load shedding,
//! authentication and TLS.

use std::time::{Duration, Instant};

use futures::future::join_all;
use maitre_api::memory::v1::memory_service_client::MemoryServiceClient;
use maitre_runtime::testkit::{http_get, sample};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use maitre_runtime::server::AuthMode;

use crate::support::{
    TestApp, lock_conversation, make_pki, reason, spawn_app, spawn_app_with, timerless_client,
};

#[tokio::test]
async fn metrics_count_rpcs_by_method_and_code_with_latency_buckets() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    for i in 0..5 {
        app.store(TestApp::message(
            &conversation,
            "ops",
            &format!("m{i}"),
            Some((0.1, "calm")),
        ))
        .await
        .expect("stored");
    }
    app.conversation("not-a-uuid").await.expect_err("invalid");

    let (status, body) = http_get(app.admin_addr.expect("admin port"), "/metrics").await;

    assert_eq!(status, 200);
    let store = [
        ("method", "maitre.memory.v1.MemoryService/StoreMessage"),
        ("code", "OK"),
    ];
    assert_eq!(
        sample(&body, "maitre_rpc_requests_total", &store),
        Some(5.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "maitre_rpc_duration_seconds_count", &store),
        Some(5.0)
    );
    let slow_bucket = [store[0], store[1], ("le", "10.0")];
    assert_eq!(
        sample(&body, "maitre_rpc_duration_seconds_bucket", &slow_bucket),
        Some(5.0)
    );
    let invalid = [
        ("method", "maitre.memory.v1.MemoryService/GetConversation"),
        ("code", "INVALID_ARGUMENT"),
    ];
    assert_eq!(
        sample(&body, "maitre_rpc_requests_total", &invalid),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "maitre_rpc_in_flight",
            &[("service", "memory-service")]
        ),
        Some(0.0)
    );
    assert!(sample(&body, "maitre_db_pool_max_connections", &[]).is_some_and(|max| max >= 1.0));
    assert!(sample(&body, "maitre_db_pool_connections", &[("state", "idle")]).is_some());
    assert_eq!(
        http_get(app.admin_addr.expect("admin"), "/healthz").await.0,
        200
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app().await;
    let mut request = Request::new(TestApp::message("", "rid", "hi", None));
    request
        .metadata_mut()
        .insert("x-request-id", "client-chosen-42".parse().expect("header"));
    let response = app
        .client
        .clone()
        .store_message(request)
        .await
        .expect("stored");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-42")
    );

    let response = app
        .client
        .clone()
        .store_message(TestApp::message("", "rid", "hi", None))
        .await
        .expect("stored");
    let generated = response
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated:?}");
}

#[tokio::test]
async fn deadlines_are_honoured_and_a_retry_with_the_request_id_is_safe() {
    let app = spawn_app_with(|s| s.server.rpc_timeout = Duration::from_secs(3)).await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "dl", "first", None))
        .await
        .expect("stored");
    let lock = lock_conversation(&app, &conversation).await;
    let late = |request_id: &str| {
        let mut message = TestApp::message(&conversation, "dl", "late", None);
        message.request_id = request_id.into();
        message
    };

    // The header a client sends for a 150 ms deadline, over a connection
    // with no client-side timer: only the server's deadline can answer.
    let mut request = Request::new(late("late-1"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "150m".parse().expect("header"));
    let started = Instant::now();
    let status = timerless_client(app.addr)
        .await
        .store_message(request)
        .await
        .expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // No grpc-timeout: the server's default deadline (3 s here) applies.
    let started = Instant::now();
    let status = app
        .store(late("late-2"))
        .await
        .expect_err("server deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // As gRPC warns, a call past its deadline may still take effect (its
    // statement was already waiting in PostgreSQL): retrying with the same
    // request_id is what makes that safe, exactly once either way.
    lock.rollback().await.expect("release");
    for request_id in ["late-1", "late-2"] {
        app.store(late(request_id)).await.expect("retry answers");
    }
    assert_eq!(
        app.conversation(&conversation)
            .await
            .expect("conversation")
            .message_count,
        3
    );
}

#[tokio::test]
async fn past_the_concurrency_limit_calls_fail_fast_with_resource_exhausted() {
    let app = spawn_app_with(|s| s.server.max_concurrent_rpcs = 4).await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "shed", "first", None))
        .await
        .expect("stored");
    let lock = lock_conversation(&app, &conversation).await;

    // 4 calls hold the permits (blocked on the lock); 40 more arrive.
    let blocked: Vec<_> = (0..4)
        .map(|i| {
            let app_client = app.client.clone();
            let request = TestApp::message(&conversation, "shed", &format!("held {i}"), None);
            tokio::spawn(async move { app_client.clone().store_message(request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shed = join_all((0..40).map(|i| {
        let mut client = app.client.clone();
        let request = TestApp::message(&conversation, "shed", &format!("extra {i}"), None);
        async move {
            let started = Instant::now();
            (client.store_message(request).await, started.elapsed())
        }
    }))
    .await;
    for (result, took) in &shed {
        let status = result.as_ref().expect_err("shed");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason(status), "OVERLOADED");
        assert!(
            *took < Duration::from_millis(500),
            "refused at once, not queued: {took:?}"
        );
    }
    // Health still answers while saturated.
    assert_eq!(
        app.health("").await.expect("health"),
        ServingStatus::Serving as i32
    );

    lock.rollback().await.expect("release");
    for call in blocked {
        call.await
            .expect("join")
            .expect("held calls complete once the lock is gone");
    }
    assert_eq!(
        app.conversation(&conversation)
            .await
            .expect("conversation")
            .message_count,
        5
    );
}

const TOKEN: &str = "a-long-enough-test-token-0001";

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

#[tokio::test]
async fn with_tokens_configured_only_the_right_token_gets_in() {
    let app = spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.auth_tokens = Some(format!(
            "assistant:{TOKEN},booking-service:another-valid-token-00002"
        ))
    })
    .await;
    let mut client = app.client.clone();

    for token in [
        None,
        Some("wrong-token-but-long-enough"),
        Some("a-long-enough-test-token-000"),
    ] {
        let status = client
            .store_message(with_token(
                TestApp::message("", "auth", "secret", None),
                token,
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages").await,
        0,
        "no trace in the database"
    );

    client
        .store_message(with_token(
            TestApp::message("", "auth", "welcome", None),
            Some(TOKEN),
        ))
        .await
        .expect("right token");
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    // The kubelet needs no token.
    assert_eq!(
        app.health("liveness").await.expect("health"),
        ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn reflection_can_be_switched_off() {
    let app = spawn_app_with(|s| s.server.reflection = false).await;
    use tonic_reflection::pb::v1;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let status = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect_err("no reflection");
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn mtls_admits_clients_with_a_certificate_and_refuses_others() {
    let pki = make_pki(&["booking-service"]);
    let app = spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.tls_cert_file = Some(pki.dir.join("server.pem"));
        s.server.tls_key_file = Some(pki.dir.join("server.key"));
        s.server.tls_client_ca_file = Some(pki.dir.join("ca.pem"));
    })
    .await;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let endpoint = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
    };

    let (client_cert_pem, client_key_pem) = &pki.clients[0];
    let channel = endpoint(Some(Identity::from_pem(client_cert_pem, client_key_pem)))
        .connect()
        .await
        .expect("handshake with a client certificate");
    MemoryServiceClient::new(channel)
        .store_message(TestApp::message("", "tls", "over mTLS", None))
        .await
        .expect("call over mTLS");

    let refused = match endpoint(None).connect().await {
        Err(_) => true,
        Ok(channel) => MemoryServiceClient::new(channel)
            .store_message(TestApp::message("", "tls", "no cert", None))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must not get in");
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn a_client_cannot_ask_for_a_deadline_longer_than_the_servers_maximum() {
    let app = spawn_app_with(|s| s.server.max_rpc_timeout = Duration::from_secs(1)).await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "cap", "first", None))
        .await
        .expect("stored");
    let lock = lock_conversation(&app, &conversation).await;
    let mut request = Request::new(TestApp::message(&conversation, "cap", "late", None));
    // The largest value the header can carry: about 11,400 years.
    request
        .metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().expect("header"));
    let started = Instant::now();
    let status = timerless_client(app.addr)
        .await
        .store_message(request)
        .await
        .expect_err("capped deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    lock.rollback().await.expect("release");
}

#[tokio::test]
async fn a_saturated_pool_does_not_turn_readiness_off() {
    // Two pooled connections, both held by calls waiting on a row lock: the
    // pool is exhausted, the database is fine, and readiness must say so.
    let app = spawn_app_with(|s| {
        s.common.db_max_connections = 2;
        s.common.db_acquire_timeout = Duration::from_millis(300);
    })
    .await;
    // Two conversations: the group commit writes one conversation's calls
    // one at a time, so two calls on one would hold one connection.
    let mut locks = Vec::new();
    let mut held = Vec::new();
    for i in 0..2 {
        let conversation = uuid::Uuid::now_v7().to_string();
        app.store(TestApp::message(&conversation, "pool", "first", None))
            .await
            .expect("stored");
        locks.push(lock_conversation(&app, &conversation).await);
        let mut client = app.client.clone();
        let request = TestApp::message(&conversation, "pool", &format!("held {i}"), None);
        held.push(tokio::spawn(
            async move { client.store_message(request).await },
        ));
    }
    // The pool is exhausted: another call cannot get a connection.
    let starved =
        maitre_runtime::testkit::wait_for("an exhausted pool", Duration::from_secs(10), || async {
            let mut client = app.client.clone();
            let request = TestApp::message("", "pool-other", "starved", None);
            client
                .store_message(request)
                .await
                .err()
                .filter(|s| s.code() == Code::Unavailable)
        })
        .await;
    assert_eq!(starved.code(), Code::Unavailable);
    // Readiness is re-checked every 200 ms here: watch it for 2 s.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(
            app.health("").await.expect("health"),
            ServingStatus::Serving as i32,
            "a busy pool is not a dead database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for lock in locks {
        lock.rollback().await.expect("release");
    }
    for call in held {
        call.await.expect("join").expect("held calls complete");
    }
}
