//! Fail closed: who may call what, and the configurations that must refuse
//! to start rather than leave the server open.

use maitre_api::memory::v1::{self as pb, memory_service_client::MemoryServiceClient};
use maitre_runtime::{
    server::AuthMode,
    testkit::{fresh_database, http_get, sample},
};
use memory_service::{config::Settings, startup::Application};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{TestApp, make_pki, reason, spawn_app_with};

const ASSISTANT: &str = "assistant-token-0123456789abc";
const BOOKING: &str = "booking-service-token-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn as_caller<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

fn erase(user: &str) -> pb::DeleteUserDataRequest {
    pb::DeleteUserDataRequest {
        user_id: user.into(),
    }
}

async fn spawn_with_tokens() -> TestApp {
    spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.auth_tokens = Some(format!(
            "assistant:{ASSISTANT},booking-service:{BOOKING},admin:{ADMIN}"
        ));
    })
    .await
}

#[tokio::test]
async fn each_caller_may_call_only_what_it_is_granted() {
    let app = spawn_with_tokens().await;
    let mut client = app.client.clone();
    let conversation = uuid::Uuid::now_v7().to_string();

    // booking-service stores follow-ups and reads emotion history...
    client
        .store_message(as_caller(
            TestApp::message(&conversation, "ana", "follow-up", Some((0.4, "calm"))),
            BOOKING,
        ))
        .await
        .expect("booking-service may store");
    client
        .get_emotion_history(as_caller(
            pb::GetEmotionHistoryRequest {
                conversation_id: conversation.clone(),
                limit: 10,
            },
            BOOKING,
        ))
        .await
        .expect("booking-service may read emotion history");
    // ...and nothing else: no reading messages.
    let denied = client
        .list_messages(as_caller(
            pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                ..Default::default()
            },
            BOOKING,
        ))
        .await
        .expect_err("booking-service may not read messages");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(reason(&denied), "METHOD_NOT_GRANTED");
    // The assistant may not erase a user; booking-service (its customer
    // erasure calls DeleteUserData) and admin may.
    let denied = client
        .delete_user_data(as_caller(erase("ana"), ASSISTANT))
        .await
        .expect_err("the assistant does not erase");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages").await,
        1,
        "nothing erased by a caller without the grant"
    );

    // The assistant reads what it needs; admin may erase.
    client
        .list_messages(as_caller(
            pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                ..Default::default()
            },
            ASSISTANT,
        ))
        .await
        .expect("assistant reads messages");
    let erased = client
        .delete_user_data(as_caller(erase("ana"), BOOKING))
        .await
        .expect("booking-service erases a customer")
        .into_inner();
    assert!(erased.complete);
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 0);
    client
        .delete_user_data(as_caller(erase("ana"), ADMIN))
        .await
        .expect("admin erases");

    // Refusals are counted by caller and method.
    let (_, metrics) = http_get(app.admin_addr.expect("admin"), "/metrics").await;
    let erase_by_assistant = [
        ("caller", "assistant"),
        ("method", "maitre.memory.v1.MemoryService/DeleteUserData"),
    ];
    assert_eq!(
        sample(&metrics, "maitre_rpc_denied_total", &erase_by_assistant),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "maitre_rpc_requests_total",
            &[
                ("method", "maitre.memory.v1.MemoryService/DeleteUserData"),
                ("code", "PERMISSION_DENIED")
            ]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn grants_can_be_set_by_the_operator() {
    let app = spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.auth_tokens = Some(format!("auditor:{ASSISTANT}"));
        s.server.auth_grants = Some("auditor=GetConversation,ListMessages".into());
    })
    .await;
    let mut client = app.client.clone();
    let status = client
        .store_message(as_caller(TestApp::message("", "x", "hi", None), ASSISTANT))
        .await
        .expect_err("read-only caller");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .get_conversation(as_caller(
            pb::GetConversationRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
            },
            ASSISTANT,
        ))
        .await
        .expect_err("no such conversation");
    assert_eq!(
        status.code(),
        Code::NotFound,
        "granted, so it gets an answer"
    );
}

#[tokio::test]
async fn health_needs_no_credentials_and_reflection_needs_some() {
    let app = spawn_with_tokens().await;
    // Readiness turns SERVING once the database answered (on a busy machine
    // not necessarily before the first check); without a token all along.
    app.wait_for_health(
        "",
        ServingStatus::Serving,
        std::time::Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        app.health("").await.expect("health without a token"),
        ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1;
    let list = || v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let status = reflection
        .server_reflection_info(futures::stream::iter([list()]))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    reflection
        .server_reflection_info(as_caller(futures::stream::iter([list()]), BOOKING))
        .await
        .expect("any authenticated caller may describe the API");
}

#[tokio::test]
async fn client_certificates_name_their_caller_and_unknown_names_get_nothing() {
    let pki = make_pki(&["booking-service", "intruder"]);
    let app = spawn_app_with(|s| {
        s.server.auth_mode = AuthMode::Required;
        s.server.tls_cert_file = Some(pki.dir.join("server.pem"));
        s.server.tls_key_file = Some(pki.dir.join("server.key"));
        s.server.tls_client_ca_file = Some(pki.dir.join("ca.pem"));
    })
    .await;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let client = |index: usize| {
        let (cert, key) = &pki.clients[index];
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key));
        let channel = Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy();
        MemoryServiceClient::new(channel)
    };
    let mut booking = client(0);
    booking
        .store_message(TestApp::message("", "tls", "by certificate", None))
        .await
        .expect("booking-service's certificate may store");
    let status = booking
        .list_messages(pb::ListMessagesRequest {
            conversation_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("but not read messages");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Chains to the CA, but its name is granted nothing.
    let status = client(1)
        .store_message(TestApp::message("", "tls", "intruder", None))
        .await
        .expect_err("a valid certificate is not a grant");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    let (_, metrics) = http_get(app.admin_addr.expect("admin"), "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "maitre_rpc_denied_total",
            &[
                ("caller", "unknown"),
                ("method", "maitre.memory.v1.MemoryService/StoreMessage")
            ]
        ),
        Some(1.0),
        "names outside the grants are not metric labels"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// Why `Application::build` refused `settings`, or a panic if it started.
async fn refusal(tweak: impl FnOnce(&mut Settings)) -> String {
    let mut settings = Settings::for_database(&fresh_database().await);
    settings.common.grpc_addr = "127.0.0.1:0".parse().expect("address");
    settings.common.admin_addr = "off".parse().expect("off");
    settings.server.auth_mode = AuthMode::Required;
    tweak(&mut settings);
    match Application::build(settings).await {
        Ok(_) => panic!("started with an unsafe configuration"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test]
async fn configurations_that_would_leave_the_server_open_refuse_to_start() {
    let dir = std::env::temp_dir().join(format!("maitre-auth-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).expect("write");
        path
    };
    let empty = file("empty", "");
    let comments = file("comments", "# tokens go here\n\n");
    let placeholder = file("placeholder", "admin:CHANGE-ME-admin-token-000001\n");
    let bare = file("bare", "a-token-without-its-caller-name\n");

    type Tweak<'a> = Box<dyn FnOnce(&mut Settings) + 'a>;
    let cases: Vec<(&str, Tweak, &str)> = vec![
        ("nothing configured", Box::new(|_| {}), "AUTH_MODE=none"),
        (
            "empty file",
            Box::new(|s| s.server.auth_tokens_file = Some(empty.clone())),
            "lists no token",
        ),
        (
            "comments only",
            Box::new(|s| s.server.auth_tokens_file = Some(comments.clone())),
            "lists no token",
        ),
        (
            "unreadable file",
            Box::new(|s| s.server.auth_tokens_file = Some(dir.join("missing"))),
            "reading AUTH_TOKENS_FILE",
        ),
        (
            "placeholder",
            Box::new(|s| s.server.auth_tokens_file = Some(placeholder.clone())),
            "placeholder",
        ),
        (
            "token without a name",
            Box::new(|s| s.server.auth_tokens_file = Some(bare.clone())),
            "caller-name:token",
        ),
        (
            "empty AUTH_TOKENS",
            Box::new(|s| s.server.auth_tokens = Some(" , ".into())),
            "lists no token",
        ),
        (
            "grant typo",
            Box::new(|s| {
                s.server.auth_tokens = Some(format!("admin:{ADMIN}"));
                s.server.auth_grants = Some("admin=DeleteUserDate".into());
            }),
            "no such method",
        ),
        (
            "none with tokens",
            Box::new(|s| {
                s.server.auth_mode = AuthMode::None;
                s.server.auth_tokens = Some(format!("admin:{ADMIN}"));
            }),
            "AUTH_MODE=none, yet",
        ),
    ];
    for (case, tweak, expected) in cases {
        let error = refusal(tweak).await;
        assert!(error.contains(expected), "{case}: {error}");
        assert!(
            !error.contains(ADMIN),
            "{case}: a token in an error: {error}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn no_authentication_is_an_explicit_choice_that_still_starts_anywhere() {
    // Loopback: silent; any other address: a loud warning (not asserted
    // here), but it starts, as the operator asked.
    for addr in ["127.0.0.1:0", "0.0.0.0:0"] {
        let mut settings = Settings::for_database(&fresh_database().await);
        settings.common.grpc_addr = addr.parse().expect("address");
        settings.common.admin_addr = "off".parse().expect("off");
        settings.server.auth_mode = AuthMode::None;
        Application::build(settings).await.expect("explicitly open");
    }
}

#[tokio::test]
async fn the_assistant_keeps_state_and_reads_context_and_booking_service_may_not() {
    use pb::update_conversation_state_request::Update;
    let app = spawn_with_tokens().await;
    let mut client = app.client.clone();
    let conversation = uuid::Uuid::now_v7().to_string();
    client
        .store_message(as_caller(
            TestApp::message(&conversation, "ana", "hello", None),
            ASSISTANT,
        ))
        .await
        .expect("assistant stores");
    let write = |version| pb::UpdateConversationStateRequest {
        conversation_id: conversation.clone(),
        expected_version: version,
        update: Some(Update::StateJson(r#"{"step": "greeted"}"#.into())),
    };
    let denied = client
        .update_conversation_state(as_caller(write(0), BOOKING))
        .await
        .expect_err("booking-service does not write state");
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "METHOD_NOT_GRANTED")
    );
    let denied = client
        .get_context(as_caller(
            pb::GetContextRequest {
                conversation_id: conversation.clone(),
                ..Default::default()
            },
            BOOKING,
        ))
        .await
        .expect_err("booking-service does not read context");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversation_states")
            .await,
        0
    );

    client
        .update_conversation_state(as_caller(write(0), ASSISTANT))
        .await
        .expect("assistant writes state");
    let state = client
        .get_conversation_state(as_caller(
            pb::GetConversationStateRequest {
                conversation_id: conversation.clone(),
            },
            ASSISTANT,
        ))
        .await
        .expect("assistant reads state")
        .into_inner()
        .state
        .expect("state");
    assert_eq!(state.version, 1);
    let context = client
        .get_context(as_caller(
            pb::GetContextRequest {
                conversation_id: conversation.clone(),
                ..Default::default()
            },
            ASSISTANT,
        ))
        .await
        .expect("assistant reads context")
        .into_inner();
    assert_eq!(
        (context.messages.len(), context.state.map(|s| s.version)),
        (1, Some(1))
    );
    // No token at all: refused before anything is read.
    let status = client
        .get_context(pb::GetContextRequest {
            conversation_id: conversation,
            ..Default::default()
        })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
}
