//! booking-service's balanced client over TLS: it dials each replica by
//! address but checks the certificate against the name in
//! `BOOKING_MEMORY_URL` (and sends it as `:authority`), so a server
//! certificate that names only the service, not any pod address, is
//! accepted; one that names something else is refused.

use std::{path::Path, time::Duration};

use booking_service::{
    config::Settings as BookingSettings,
    memory_client::{MemoryClient, MemoryError},
};
use maitre_runtime::testkit::{fresh_database, process::free_port};
use memory_service::config::Settings as MemorySettings;
use tokio::sync::oneshot;
use tonic::Code;

/// A CA and a server certificate for `names` only, in `dir`.
fn pki(dir: &Path, names: &[&str]) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("sign");
    std::fs::create_dir_all(dir).expect("pki dir");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
}

/// memory-service over TLS with a certificate for `names`; booking-service's
/// client of it through `url_host`; the answer to one GetEmotionHistory.
async fn call_through_tls(names: &[&str], url_host: &str) -> Result<Vec<f64>, MemoryError> {
    let dir = std::env::temp_dir().join(format!("maitre-tls-{}", uuid::Uuid::now_v7().simple()));
    pki(&dir, names);
    let database_url = fresh_database().await;
    let port = free_port();
    let mut memory = MemorySettings::for_database(&database_url);
    memory.common.grpc_addr = format!("127.0.0.1:{port}").parse().expect("addr");
    memory.common.admin_addr = "off".parse().expect("off");
    memory.server.tls_cert_file = Some(dir.join("server.pem"));
    memory.server.tls_key_file = Some(dir.join("server.key"));
    let app = memory_service::startup::Application::build(memory)
        .await
        .expect("memory-service");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let mut booking =
        BookingSettings::for_database(&database_url, &format!("https://{url_host}:{port}"));
    booking.memory_service_ca_file = Some(dir.join("ca.pem"));
    booking.memory_call_timeout = Duration::from_secs(5);
    let client =
        MemoryClient::new(&booking.memory_client().expect("client settings")).expect("client");
    let answer = client.emotion_scores(uuid::Uuid::now_v7(), 5).await;
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    answer
}

#[tokio::test]
async fn the_certificate_is_checked_against_the_configured_name_not_the_address() {
    // `localhost` resolves to 127.0.0.1 (and maybe ::1, where nothing
    // listens: that address never joins). The certificate names no address.
    match call_through_tls(&["localhost"], "localhost").await {
        // An unknown conversation: the call went through TLS and was answered.
        Err(MemoryError::NotFound) | Ok(_) => {}
        Err(other) => panic!("TLS to memory-service by name failed: {other}"),
    }
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    match call_through_tls(&["memory-somewhere-else"], "localhost").await {
        Err(MemoryError::Failed { code, .. }) => assert_eq!(code, Code::Unavailable),
        other => panic!("a certificate for another name was accepted: {other:?}"),
    }
}
