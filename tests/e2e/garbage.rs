//! Raw garbage on both gRPC ports: an HTTP/1.1 request, random bytes, an
//! HTTP/2 preface followed by a truncated frame (left hanging, and closed),
//! 200 connections opened and dropped at once, and a well-framed gRPC call
//! whose protobuf payload does not decode. Whatever the server makes of each,
//! both services must go on answering valid calls and report SERVING.

use std::{net::SocketAddr, time::Duration};

use maitre_api::{booking::v1 as booking, memory::v1 as memory};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::stack::{Stack, spawn_stack};

/// HTTP/2 connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sends `bytes`, then reads whatever comes back for at most `linger`.
/// Returns what was read and whether the server closed the connection.
async fn send(addr: SocketAddr, bytes: &[u8], linger: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close (and reset) before everything is written.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut buf = [0_u8; 4096];
    let closed = tokio::time::timeout(linger, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (answer, closed)
}

/// Deterministic noise (xorshift64*), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.max(1);
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// An HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
fn frame_header(length: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = length.to_be_bytes()[1..].to_vec();
    header.extend([kind, flags]);
    header.extend(stream.to_be_bytes());
    header
}

/// Each flavour of garbage, named for the log.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    let mut truncated_settings = PREFACE.to_vec();
    // SETTINGS announcing 60 bytes of payload, carrying 7.
    truncated_settings.extend(frame_header(60, 0x4, 0, 0));
    truncated_settings.extend([0, 3, 0, 0, 0, 100, 0]);

    let mut truncated_headers = PREFACE.to_vec();
    truncated_headers.extend(frame_header(0, 0x4, 0, 0)); // empty SETTINGS
    // HEADERS on stream 1 (END_HEADERS) announcing 200 bytes, carrying 5
    // bytes of a literal header field.
    truncated_headers.extend(frame_header(200, 0x1, 0x4, 1));
    truncated_headers.extend([0x40, 0x0a, b':', b'p', b'a']);

    let mut preface_then_noise = PREFACE.to_vec();
    preface_then_noise.extend(noise(7, 4096));

    let mut oversized_frame = PREFACE.to_vec();
    oversized_frame.extend(frame_header(0xff_ffff, 0x0, 0, 1));
    oversized_frame.extend(noise(11, 1024));

    vec![
        ("an HTTP/1.1 request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "an HTTP/1.1 request with a body",
            concat!(
                "POST /maitre.memory.v1.MemoryService/StoreMessage HTTP/1.1\r\n",
                "Host: x\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n",
                "\0\0\0\0\0",
            )
            .as_bytes()
            .to_vec(),
        ),
        ("64 KB of random bytes", noise(0x5eed, 64 * 1024)),
        ("a TLS ClientHello-like start", {
            let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
            hello.extend(noise(3, 512));
            hello
        }),
        ("the HTTP/2 preface, cut short", PREFACE[..10].to_vec()),
        (
            "the preface and a truncated SETTINGS frame",
            truncated_settings,
        ),
        (
            "the preface and a truncated HEADERS frame",
            truncated_headers,
        ),
        ("the preface and random bytes", preface_then_noise),
        ("the preface and a 16 MB DATA frame header", oversized_frame),
    ]
}

/// A valid call on each service, and both health names SERVING.
async fn still_serving(stack: &Stack, after: &str) {
    let mut memory_client = stack.memory.clone();
    let stored = tokio::time::timeout(
        Duration::from_secs(10),
        memory_client.store_message(memory::StoreMessageRequest {
            user_id: "garbage-survivor".into(),
            role: memory::Role::User as i32,
            content: format!("still here after {after}"),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("memory-service hangs after {after}"));
    stored.unwrap_or_else(|e| panic!("memory-service after {after}: {e:?}"));

    let now = chrono::Utc::now();
    let listed = tokio::time::timeout(
        Duration::from_secs(10),
        stack
            .booking
            .clone()
            .list_availability(booking::ListAvailabilityRequest {
                start_time: Some(maitre_runtime::fields::to_timestamp(now)),
                end_time: Some(maitre_runtime::fields::to_timestamp(
                    now + chrono::Duration::days(1),
                )),
                ..Default::default()
            }),
    )
    .await
    .unwrap_or_else(|_| panic!("booking-service hangs after {after}"));
    listed.unwrap_or_else(|e| panic!("booking-service after {after}: {e:?}"));

    for (addr, name) in [
        (stack.memory_addr, "maitre.memory.v1.MemoryService"),
        (stack.booking_addr, "maitre.booking.v1.BookingService"),
    ] {
        // A new connection each time: the server must still accept.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{name} refuses connections after {after}: {e}"));
        let mut health = HealthClient::new(channel);
        for service in [name, ""] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health of {name} after {after}: {e:?}"))
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "{name} ({service:?}) after {after}"
            );
        }
    }
}

#[tokio::test]
async fn garbage_on_the_grpc_ports_leaves_both_services_serving() {
    let stack = spawn_stack().await;
    still_serving(&stack, "start-up").await;
    for (service, addr) in [
        ("memory-service", stack.memory_addr),
        ("booking-service", stack.booking_addr),
    ] {
        for (what, bytes) in garbage() {
            let (answer, closed) = send(addr, &bytes, Duration::from_secs(2)).await;
            eprintln!(
                "{service} got {what}: answered {} bytes, {}",
                answer.len(),
                if closed {
                    "closed the connection"
                } else {
                    "kept the connection open (we hung up)"
                }
            );
            still_serving(&stack, &format!("{what} to {service}")).await;
        }
    }
    stack.shutdown().await;
}

#[tokio::test]
async fn stalled_half_frames_do_not_block_other_callers() {
    let stack = spawn_stack().await;
    // Connections that stop in the middle of a frame and stay open.
    let mut stalled = Vec::new();
    for addr in [stack.memory_addr, stack.booking_addr] {
        for (_, bytes) in garbage().into_iter().skip(4) {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.write_all(&bytes).await;
            stalled.push(stream);
        }
    }
    still_serving(&stack, "stalled half frames (while they stay open)").await;
    drop(stalled);
    still_serving(&stack, "stalled half frames (after they hang up)").await;
    stack.shutdown().await;
}

#[tokio::test]
async fn two_hundred_connections_opened_and_dropped_leave_both_serving() {
    let stack = spawn_stack().await;
    for addr in [stack.memory_addr, stack.booking_addr] {
        // One after another...
        for _ in 0..200 {
            drop(TcpStream::connect(addr).await.expect("connect"));
        }
        // ...and all at once, some after the preface.
        let mut open = Vec::new();
        for i in 0..200 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            if i % 2 == 0 {
                let _ = stream.write_all(PREFACE).await;
            }
            open.push(stream);
        }
        drop(open);
    }
    still_serving(&stack, "200 connections opened and dropped").await;
    stack.shutdown().await;
}

/// A StoreMessage payload the generated code cannot decode: field 2
/// (`user_id`, a string) carrying bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "2")]
    user_id: Vec<u8>,
}

#[tokio::test]
async fn an_undecodable_protobuf_payload_is_refused_cleanly() {
    let stack = spawn_stack().await;
    let channel = Channel::from_shared(format!("http://{}", stack.memory_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary(
            tonic::Request::new(NotUtf8 {
                user_id: vec![0xff, 0xfe, 0x00, 0xc3],
            }),
            http::uri::PathAndQuery::from_static("/maitre.memory.v1.MemoryService/StoreMessage"),
            tonic_prost::ProstCodec::<NotUtf8, memory::StoreMessageResponse>::default(),
        )
        .await
        .expect_err("not UTF-8 in a string field");
    eprintln!(
        "undecodable StoreMessage: {:?} {:?}",
        status.code(),
        status.message()
    );
    // The caller's bytes are at fault: INVALID_ARGUMENT (tonic alone would
    // say INTERNAL), an answer rather than a hang or a reset, nothing stored.
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM memory.messages")
        .fetch_one(&stack.db)
        .await
        .expect("count");
    assert_eq!(messages, 0);
    still_serving(&stack, "an undecodable payload").await;
    stack.shutdown().await;
}
