//! Operating the pair: booking-service's metrics after real traffic, and
//! authentication on both hops.

use std::time::Duration;

use maitre_api::booking::v1::FollowUpState;
use maitre_runtime::server::AuthMode;
use maitre_runtime::testkit::{http_get, sample, wait_for};
use tonic::Code;

use crate::stack::{Stack, WITHIN, spawn_stack, spawn_stack_with_memory};

#[tokio::test]
async fn booking_metrics_show_rpcs_queues_jobs_and_follow_ups() {
    let stack = spawn_stack().await;
    let conversation = stack.conversation("mia", &[(0.8, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 10)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "mia", &conversation, 2))
        .await
        .expect("booked");
    stack
        .wait_follow_up(&booked.booking_id, "SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    let admin = stack.booking_admin.expect("admin port");

    // Gauges are refreshed every 200 ms in tests: wait until the finished
    // follow-up job (it planned and delivered) left the gauges (finished
    // jobs are history, not counted).
    let body = wait_for("job gauges", WITHIN, || async {
        let (_, body) = http_get(admin, "/metrics").await;
        let delivered = sample(
            &body,
            "maitre_job_runs_total",
            &[("queue", "maitre.followup.plan"), ("outcome", "ok")],
        );
        let live = ["pending", "scheduled", "running"].iter().any(|state| {
            sample(
                &body,
                "maitre_jobs",
                &[("queue", "maitre.followup.plan"), ("state", state)],
            )
            .is_some_and(|n| n > 0.0)
        });
        (delivered == Some(1.0) && !live).then_some(body)
    })
    .await;

    let create = [
        ("method", "maitre.booking.v1.BookingService/CreateBooking"),
        ("code", "OK"),
    ];
    assert_eq!(
        sample(&body, "maitre_rpc_requests_total", &create),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "maitre_rpc_duration_seconds_count", &create),
        Some(1.0)
    );
    for queue in ["maitre.followup.plan", "maitre.followup.deliver"] {
        assert_eq!(
            sample(&body, "maitre_jobs", &[("queue", queue), ("state", "done")]),
            None,
            "finished jobs are not counted: {body}"
        );
    }
    assert_eq!(
        sample(
            &body,
            "maitre_job_runs_total",
            &[("queue", "maitre.followup.plan"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "maitre_job_runs_total",
            &[("queue", "maitre.followup.deliver"), ("outcome", "ok")]
        ),
        None,
        "one job per booking: no deliver job ran"
    );
    assert_eq!(
        sample(
            &body,
            "maitre_followup_deliveries_total",
            &[("outcome", "sent")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "maitre_followups", &[("state", "pending")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "maitre_plan_start_delay_seconds_count", &[]),
        Some(1.0)
    );
    let delay_sum = sample(&body, "maitre_plan_start_delay_seconds_sum", &[]).expect("delay");
    assert!(
        (0.0..5.0).contains(&delay_sum),
        "the follow-up job started {delay_sum} s after it came due"
    );
    assert!(sample(&body, "maitre_db_pool_connections", &[("state", "in_use")]).is_some());

    // memory-service counted the follow-up's StoreMessage.
    let (_, memory) = http_get(stack.memory_admin.expect("admin"), "/metrics").await;
    let stored = [
        ("method", "maitre.memory.v1.MemoryService/StoreMessage"),
        ("code", "OK"),
    ];
    assert_eq!(
        sample(&memory, "maitre_rpc_requests_total", &stored),
        Some(2.0),
        "history + follow-up"
    );
    stack.shutdown().await;
}

/// booking-service's token at memory-service: it may read emotion history
/// and deliver, nothing more.
const MEMORY_TOKEN: &str = "booking-to-memory-token-0001";
/// The test's own client of memory-service (it reads messages back).
const MEMORY_ADMIN_TOKEN: &str = "admin-of-memory-token-000001";
const BOOKING_TOKEN: &str = "assistant-to-booking-token-01";

#[tokio::test]
async fn both_hops_authenticate_and_the_follow_up_still_arrives() {
    let token_file =
        std::env::temp_dir().join(format!("maitre-token-{}", uuid::Uuid::now_v7().simple()));
    std::fs::write(&token_file, format!("{MEMORY_TOKEN}\n")).expect("token file");
    let stack = spawn_stack_with_memory(
        |memory| {
            memory.server.auth_mode = AuthMode::Required;
            memory.server.auth_tokens = Some(format!(
                "booking-service:{MEMORY_TOKEN},admin:{MEMORY_ADMIN_TOKEN}"
            ));
        },
        |booking| {
            booking.server.auth_mode = AuthMode::Required;
            booking.server.auth_tokens = Some(format!("admin:{BOOKING_TOKEN}"));
            booking.memory_service_token_file = Some(token_file.clone());
        },
        Some(MEMORY_ADMIN_TOKEN),
        Some(BOOKING_TOKEN),
    )
    .await;

    // Unauthenticated calls are refused and leave nothing behind.
    let slot_status = stack
        .booking_without_token()
        .create_slot(maitre_api::booking::v1::CreateSlotRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(slot_status.code(), Code::Unauthenticated);

    let conversation = stack.conversation("noa", &[(-0.6, "anger")]).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "noa", &conversation, 1))
        .await
        .expect("booked");
    let sent = stack
        .wait_follow_up(
            &booked.booking_id,
            "SENT through an authenticated hop",
            |f| f.state == FollowUpState::Sent as i32,
        )
        .await;
    assert_eq!(
        sent.template_key, "service_recovery",
        "history read with booking's token"
    );
    assert_eq!(stack.assistant_messages(&conversation).await.len(), 1);
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM booking.slots")
        .fetch_one(&stack.db)
        .await
        .expect("slots");
    assert_eq!(slots, 1, "the refused CreateSlot wrote nothing");
    let _ = std::fs::remove_file(&token_file);
    stack.shutdown().await;
}
