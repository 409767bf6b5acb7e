//! Idempotency keys bound to their request and their caller: a retry replays,
//! a reuse with another request is refused, and one caller's key is never
//! another's.

use futures::future::join_all;
use maitre_api::memory::v1 as pb;
use maitre_runtime::server::AuthMode;
use tonic::{Code, Request};

use crate::support::{TestApp, reason, spawn_app, spawn_app_with, violated_fields};

const ASSISTANT: &str = "assistant-token-0123456789abc";
const BOOKING: &str = "booking-service-token-0123456789";

fn as_caller<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

async fn counts(app: &TestApp) -> (i64, i64) {
    (
        app.count("SELECT count(*) FROM memory.messages").await,
        app.count("SELECT coalesce(sum(message_count), 0)::bigint FROM memory.conversations")
            .await,
    )
}

#[tokio::test]
async fn same_key_same_request_replays_and_writes_once() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let mut request = TestApp::message(&conversation, "ivy", "book it", Some((0.5, "joy")));
    request.request_id = "k1".into();
    request.metadata = (0..16).map(|i| (format!("m{i}"), format!("{i}"))).collect();
    let first = app.store(request.clone()).await.expect("first");
    assert!(!first.replayed);
    for _ in 0..3 {
        // A fresh map: another iteration order, the same request.
        let mut retry = request.clone();
        retry.metadata = retry.metadata.into_iter().collect();
        let retry = app.store(retry).await.expect("retry");
        assert!(retry.replayed);
        assert_eq!(retry.message, first.message);
    }
    assert_eq!(counts(&app).await, (1, 1));

    // A key first used for a new conversation (empty id) replays too.
    let mut fresh = TestApp::message("", "ivy", "new one", None);
    fresh.request_id = "k2".into();
    let first = app.store(fresh.clone()).await.expect("first");
    let retry = app.store(fresh).await.expect("retry");
    assert!(retry.replayed);
    assert_eq!(retry.message, first.message);
    assert_eq!(counts(&app).await, (2, 2));
}

#[tokio::test]
async fn same_key_with_another_request_is_refused_and_writes_nothing() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let mut original = TestApp::message(&conversation, "jon", "table for 2", Some((0.5, "joy")));
    original.request_id = "k".into();
    app.store(original.clone()).await.expect("first");
    let before = counts(&app).await;

    let other_conversation = uuid::Uuid::now_v7().to_string();
    type Change = Box<dyn Fn(&mut pb::StoreMessageRequest)>;
    let changes: Vec<(&str, Change)> = vec![
        (
            "other content",
            Box::new(|r| r.content = "table for 20".into()),
        ),
        (
            "other conversation",
            Box::new(move |r| r.conversation_id = other_conversation.clone()),
        ),
        ("no conversation", Box::new(|r| r.conversation_id.clear())),
        (
            "other emotion score",
            Box::new(|r| r.emotion.as_mut().expect("emotion").score = -0.5),
        ),
        (
            "other emotion label",
            Box::new(|r| r.emotion.as_mut().expect("emotion").label = "anger".into()),
        ),
        ("no emotion", Box::new(|r| r.emotion = None)),
        ("other role", Box::new(|r| r.role = pb::Role::System as i32)),
        ("other channel", Box::new(|r| r.channel = "sms".into())),
        (
            "metadata",
            Box::new(|r| {
                r.metadata.insert("k".into(), "v".into());
            }),
        ),
    ];
    for (what, change) in changes {
        let mut reused = original.clone();
        change(&mut reused);
        let status = app.store(reused).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{what}");
        assert_eq!(violated_fields(&status), ["request_id"], "{what}");
        assert_eq!(counts(&app).await, before, "{what}: nothing written");
    }
    // The original still replays.
    assert!(app.store(original).await.expect("retry").replayed);
    // Keys are per user: another user may use the same request_id.
    let mut other_user = TestApp::message("", "kim", "mine", None);
    other_user.request_id = "k".into();
    assert!(!app.store(other_user).await.expect("other user").replayed);
}

#[tokio::test]
async fn concurrent_reuses_with_different_requests_store_exactly_one() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let calls = (0..20).map(|i| {
        let mut request = TestApp::message(&conversation, "lou", &format!("v{}", i % 2), None);
        request.request_id = "race".into();
        app.store(request)
    });
    let results = join_all(calls).await;
    let mut stored = Vec::new();
    for result in results {
        match result {
            Ok(response) => stored.push(response.message.expect("message")),
            Err(status) => assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{status:?}"),
        }
    }
    // Every OK answer is the one stored message, with the content it asked for.
    assert!(!stored.is_empty());
    assert!(stored.iter().all(|m| m.message_id == stored[0].message_id));
    assert_eq!(counts(&app).await, (1, 1));
}

async fn spawn_with_tokens() -> TestApp {
    spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.auth_tokens = Some(format!("assistant:{ASSISTANT},booking-service:{BOOKING}"));
    })
    .await
}

#[tokio::test]
async fn keys_are_scoped_by_caller_so_none_can_claim_anothers() {
    let app = spawn_with_tokens().await;
    let mut client = app.client.clone();
    let conversation = uuid::Uuid::now_v7().to_string();
    let follow_up_id = uuid::Uuid::now_v7().to_string();

    // The attacker (any other client) saw a pending follow-up id and stores
    // its own text under it first.
    let mut forged = TestApp::message(&conversation, "mia", "pay here: evil.example", None);
    forged.request_id = follow_up_id.clone();
    forged.role = pb::Role::Assistant as i32;
    let forged = client
        .store_message(as_caller(forged, ASSISTANT))
        .await
        .expect("stored under the assistant's own key")
        .into_inner();
    assert!(!forged.replayed);

    // booking-service's delivery is its own message, not a replay of that.
    let mut delivery = TestApp::message(&conversation, "mia", "How was your dinner?", None);
    delivery.request_id = follow_up_id.clone();
    delivery.role = pb::Role::Assistant as i32;
    let delivered = client
        .store_message(as_caller(delivery.clone(), BOOKING))
        .await
        .expect("delivered")
        .into_inner();
    assert!(!delivered.replayed);
    let message = delivered.message.expect("message");
    assert_eq!(message.content, "How was your dinner?");
    assert_ne!(
        message.message_id,
        forged.message.expect("message").message_id
    );
    // Each caller's retry replays its own message, never the other's.
    let retried = client
        .store_message(as_caller(delivery, BOOKING))
        .await
        .expect("retry")
        .into_inner();
    assert!(retried.replayed);
    assert_eq!(
        retried.message.expect("message").message_id,
        message.message_id
    );
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 2);
}

#[tokio::test]
async fn keys_stored_before_callers_and_fingerprints_still_replay() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let mut request = TestApp::message(&conversation, "ned", "old", None);
    request.request_id = "legacy".into();
    app.store(request.clone()).await.expect("stored");
    // As the migration leaves a message stored before it.
    sqlx::query("UPDATE memory.messages SET request_caller = NULL, request_fingerprint = NULL")
        .execute(&app.db)
        .await
        .expect("made legacy");
    let retry = app.store(request).await.expect("retry across the upgrade");
    assert!(retry.replayed);
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
}
