use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use maitre_runtime::testkit::{proxy::TcpProxy, with_host};

use crate::support::{TestApp, reason, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_follows_the_database_and_liveness_does_not() {
    let database = url_host_port(&maitre_runtime::testkit::admin_url());
    let proxy = TcpProxy::start(database.parse().expect("DATABASE_URL host:port")).await;
    let app = spawn_app_with(|settings| {
        // Same database, reached through the proxy.
        settings.common.database_url =
            with_host(&settings.common.database_url, &proxy.addr.to_string());
        settings.common.db_acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let service = memory_service::startup::SERVICE_NAME;
    let within = Duration::from_secs(10);
    app.wait_for_health("", ServingStatus::Serving, within)
        .await;
    app.wait_for_health(service, ServingStatus::Serving, within)
        .await;

    proxy.take_down();
    app.wait_for_health("", ServingStatus::NotServing, within)
        .await;
    app.wait_for_health(service, ServingStatus::NotServing, within)
        .await;
    assert_eq!(
        app.health("liveness").await.expect("liveness"),
        ServingStatus::Serving as i32
    );
    let started = std::time::Instant::now();
    let status = app
        .store(TestApp::message("", "pia", "while down", None))
        .await
        .expect_err("database down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "DATABASE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failed fast, not hung"
    );

    proxy.bring_up();
    app.wait_for_health("", ServingStatus::Serving, within)
        .await;
    app.store(TestApp::message("", "pia", "after", None))
        .await
        .expect("stored once the database is back");
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_exits_cleanly() {
    let app = spawn_app().await;
    app.wait_for_health("", ServingStatus::Serving, Duration::from_secs(10))
        .await;
    app.shutdown().await.expect("clean exit");
}

#[tokio::test]
async fn reflection_lists_this_ports_services_in_v1_and_v1alpha() {
    let app = spawn_app().await;
    use tonic_reflection::pb::{v1, v1alpha};

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let mut stream = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("answer")
        .expect("one message");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1 answer: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    // Only what this port answers: never booking-service's API.
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            memory_service::startup::SERVICE_NAME,
        ],
    );

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "maitre.memory.v1.MemoryService".into(),
            ),
        ),
    };
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let mut stream = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("answer")
        .expect("one message");
    assert!(
        matches!(
            response.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_method_of_another_service_is_unimplemented_and_the_status_names_this_ports_service() {
    let app = spawn_app().await;
    let mut client = tonic::client::Grpc::new(app.channel.clone());
    client.ready().await.expect("ready");
    let status = client
        .unary::<_, maitre_api::booking::v1::CreateSlotResponse, _>(
            tonic::Request::new(maitre_api::booking::v1::CreateSlotRequest::default()),
            http::uri::PathAndQuery::from_static("/maitre.booking.v1.BookingService/CreateSlot"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("memory-service does not serve BookingService");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(reason(&status), "METHOD_NOT_FOUND");
    assert!(
        status
            .message()
            .contains("it serves maitre.memory.v1.MemoryService"),
        "{status:?}"
    );
    // The port still works for its own service afterwards.
    app.store(TestApp::message("", "pia", "still here", None))
        .await
        .expect("stored");
}

/// The host:port of a postgres URL (resolving "localhost" to 127.0.0.1).
fn url_host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    host_port.replace("localhost", "127.0.0.1")
}
