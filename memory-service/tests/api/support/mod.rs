//! Test harness: a real memory-service in-process on port 0, with its own
//! fresh database (see `maitre_runtime::testkit`).
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use maitre_api::memory::v1::{self as pb, memory_service_client::MemoryServiceClient};
use maitre_runtime::testkit::fresh_database;
use memory_service::{config::Settings, startup::Application};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub client: MemoryServiceClient<Channel>,
    pub channel: Channel,
    /// A direct pool on the test database, to check stored rows.
    pub db: PgPool,
    pub database_url: String,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the service with default settings adjusted by `tweak`.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    maitre_runtime::telemetry::init_for_tests();
    spawn_on(fresh_database().await, tweak).await
}

/// Starts the service on an existing database: a second replica of an app
/// when given its `database_url`.
pub async fn spawn_on(database_url: String, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::for_database(&database_url);
    settings.common.grpc_addr = "127.0.0.1:0".parse().expect("address");
    settings.common.admin_addr = "127.0.0.1:0".parse().expect("address");
    settings.common.health_interval = Duration::from_millis(200);
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("build app");
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stop_rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        // Lazy: a TLS-only server would refuse a plaintext handshake here.
        .connect_lazy();
    let db = PgPool::connect(&database_url).await.expect("test pool");
    TestApp {
        addr,
        admin_addr,
        client: MemoryServiceClient::new(channel.clone()),
        channel,
        db,
        database_url,
        stop: Some(stop_tx),
        server: Some(server),
    }
}

impl TestApp {
    /// A message from `user` in `conversation`, optionally scored.
    pub fn message(
        conversation: &str,
        user: &str,
        content: &str,
        emotion: Option<(f64, &str)>,
    ) -> pb::StoreMessageRequest {
        pb::StoreMessageRequest {
            conversation_id: conversation.into(),
            user_id: user.into(),
            channel: "web".into(),
            role: pb::Role::User as i32,
            content: content.into(),
            emotion: emotion.map(|(score, label)| pb::Emotion {
                score,
                label: label.into(),
                scores: Default::default(),
            }),
            ..Default::default()
        }
    }

    pub async fn store(
        &self,
        request: pb::StoreMessageRequest,
    ) -> Result<pb::StoreMessageResponse, tonic::Status> {
        self.client
            .clone()
            .store_message(request)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn conversation(&self, id: &str) -> Result<pb::Conversation, tonic::Status> {
        self.client
            .clone()
            .get_conversation(pb::GetConversationRequest {
                conversation_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().conversation.expect("conversation"))
    }

    pub async fn list_messages(
        &self,
        request: pb::ListMessagesRequest,
    ) -> Result<pb::ListMessagesResponse, tonic::Status> {
        self.client
            .clone()
            .list_messages(request)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn history(
        &self,
        id: &str,
        limit: i32,
    ) -> Result<Vec<pb::EmotionPoint>, tonic::Status> {
        self.client
            .clone()
            .get_emotion_history(pb::GetEmotionHistoryRequest {
                conversation_id: id.into(),
                limit,
            })
            .await
            .map(|r| r.into_inner().points)
    }

    pub async fn health(&self, service: &str) -> Result<i32, tonic::Status> {
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status)
    }

    /// Waits until `service`'s health is `status`, or panics after `within`.
    pub async fn wait_for_health(
        &self,
        service: &str,
        status: tonic_health::pb::health_check_response::ServingStatus,
        within: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.health(service).await.ok() == Some(status as i32) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health of {service:?} never became {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db)
            .await
            .expect("count query")
    }

    /// Stops the server the way SIGTERM does and waits for it to exit.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }
}

/// Holds the row lock of `conversation` until the transaction ends: calls
/// that write it wait.
pub async fn lock_conversation(
    app: &TestApp,
    conversation: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.db.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM memory.conversations WHERE id = $1::uuid FOR UPDATE")
        .bind(conversation)
        .execute(&mut *tx)
        .await
        .expect("lock");
    tx
}

/// The field names of an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// A gRPC client over a bare HTTP/2 connection, without tonic's `Channel`:
/// the `Channel` starts a timer of its own for any `grpc-timeout` header and
/// answers CANCELLED when it fires, which races the server's
/// DEADLINE_EXCEEDED. Here the server's answer is the only one.
pub type TimerlessClient = MemoryServiceClient<
    tower::util::BoxCloneService<
        http::Request<tonic::body::Body>,
        http::Response<hyper::body::Incoming>,
        hyper::Error,
    >,
>;

pub async fn timerless_client(addr: SocketAddr) -> TimerlessClient {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let service = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let mut sender = sender.clone();
        async move { sender.send_request(request).await }
    });
    let origin = format!("http://{addr}").parse().expect("origin");
    MemoryServiceClient::with_origin(tower::util::BoxCloneService::new(service), origin)
}

/// A CA, a server certificate for localhost/127.0.0.1 and client
/// certificates (one per name, as DNS SAN), written to a temporary directory.
pub struct Pki {
    pub dir: std::path::PathBuf,
    pub ca_pem: String,
    /// (certificate, key) PEM of one client certificate per name asked for.
    pub clients: Vec<(String, String)>,
}

pub fn make_pki(client_names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let clients = client_names
        .iter()
        .map(|name| leaf(vec![(*name).to_owned()]))
        .collect();
    let dir = std::env::temp_dir().join(format!("maitre-pki-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("pki dir");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), server_cert).expect("write");
    std::fs::write(dir.join("server.key"), server_key).expect("write");
    Pki {
        dir,
        ca_pem: ca_cert.pem(),
        clients,
    }
}
