//! Idempotency keys bound to their request: every RPC that takes a
//! `request_id` replays the same request, refuses the key with any other
//! payload (REQUEST_ID_REUSED, nothing written), and scopes it (CreateBooking
//! by customer, CreateSlot by authenticated caller).

use std::time::Duration;

use futures::future::join_all;
use maitre_api::booking::v1 as booking;
use maitre_runtime::{fields::to_timestamp, server::AuthMode};
use tonic::Code;

use crate::stack::{Stack, reason, spawn_stack_with, spawn_stack_with_memory, violated_fields};

fn no_delivery(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
}

/// What a refused call could have written.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Written {
    slots: i64,
    booked_seats: i64,
    bookings: i64,
    payments: i64,
    jobs: i64,
    conversation_owners: i64,
}

async fn written(stack: &Stack) -> Written {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM booking.slots) AS slots, \
                (SELECT COALESCE(sum(booked), 0)::bigint FROM booking.slots) AS booked_seats, \
                (SELECT count(*) FROM booking.bookings) AS bookings, \
                (SELECT count(*) FROM booking.payments) AS payments, \
                (SELECT count(*) FROM apalis.jobs) AS jobs, \
                (SELECT count(*) FROM booking.conversation_owners) AS conversation_owners",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts")
}

fn assert_reused(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert_eq!(reason(status), "REQUEST_ID_REUSED", "{what}");
    assert_eq!(violated_fields(status), ["request_id"], "{what}");
}

#[tokio::test]
async fn create_booking_replays_the_same_request_and_refuses_the_key_for_any_other() {
    let stack = spawn_stack_with(no_delivery).await;
    let hour = Duration::from_secs(3600);
    let slot = stack.slot(hour, hour, 10).await;
    let other_slot = stack.slot(hour * 2, hour, 10).await;
    let conversation = stack.conversation("ines", &[(0.2, "calm")]).await;
    let other_conversation = stack.conversation("ines", &[(0.3, "calm")]).await;
    let first_request = Stack::booking_request(&slot, "ines", &conversation, 2);
    let first = stack
        .booking
        .clone()
        .create_booking(first_request.clone())
        .await
        .expect("booked")
        .into_inner();
    assert!(!first.replayed);
    let first = first.booking.expect("booking");
    // Planning done (its deliver job queued), so the queue holds still.
    stack.plan_early(&first.booking_id).await;
    stack
        .wait_follow_up(&first.booking_id, "planned", |f| {
            f.state == booking::FollowUpState::Pending as i32
        })
        .await;

    // The same request again: the same booking, nothing written.
    let before = written(&stack).await;
    let again = stack
        .booking
        .clone()
        .create_booking(first_request.clone())
        .await
        .expect("replayed")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.booking.expect("booking"), first);
    assert_eq!(written(&stack).await, before);

    let variants: Vec<(&str, booking::CreateBookingRequest)> = vec![
        (
            "another slot",
            booking::CreateBookingRequest {
                slot_id: other_slot.slot_id.clone(),
                ..first_request.clone()
            },
        ),
        (
            "another party size",
            booking::CreateBookingRequest {
                party_size: 3,
                ..first_request.clone()
            },
        ),
        (
            "another name",
            booking::CreateBookingRequest {
                customer_name: "Ines Other".into(),
                ..first_request.clone()
            },
        ),
        (
            "another conversation",
            booking::CreateBookingRequest {
                conversation_id: other_conversation.clone(),
                ..first_request.clone()
            },
        ),
        (
            "no conversation",
            booking::CreateBookingRequest {
                conversation_id: String::new(),
                ..first_request.clone()
            },
        ),
        (
            "another deposit",
            booking::CreateBookingRequest {
                deposit: Some(booking::Money {
                    currency_code: "EUR".into(),
                    amount_minor: 1,
                }),
                ..first_request.clone()
            },
        ),
        (
            "another currency",
            booking::CreateBookingRequest {
                deposit: Some(booking::Money {
                    currency_code: "USD".into(),
                    amount_minor: 2500,
                }),
                ..first_request.clone()
            },
        ),
        (
            "a slot that does not exist",
            booking::CreateBookingRequest {
                slot_id: uuid::Uuid::now_v7().to_string(),
                ..first_request.clone()
            },
        ),
    ];
    for (what, request) in variants {
        let status = stack.book(request).await.expect_err(what);
        assert_reused(&status, what);
        assert_eq!(written(&stack).await, before, "{what} wrote");
    }
    // The replay still works after all that.
    assert_eq!(
        stack.book(first_request.clone()).await.expect("replay"),
        first
    );

    // Keys are per customer: another customer's same key is another booking.
    let other_customer = booking::CreateBookingRequest {
        customer_id: "jon".into(),
        conversation_id: String::new(),
        ..first_request.clone()
    };
    let jons = stack.book(other_customer).await.expect("jon's booking");
    assert_ne!(jons.booking_id, first.booking_id);
    stack.shutdown().await;
}

/// The same key, different payloads, all at once: one booking wins; every
/// other call replays it (same payload) or is refused (another payload).
#[tokio::test]
async fn concurrent_reuses_of_one_key_book_once() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 100)
        .await;
    let base = Stack::booking_request(&slot, "kim", "", 1);
    let calls = (0..24).map(|i| {
        let request = booking::CreateBookingRequest {
            party_size: i % 3 + 1,
            ..base.clone()
        };
        let stack = &stack;
        async move { (request.party_size, stack.book(request).await) }
    });
    let results = join_all(calls).await;
    let winner = results
        .iter()
        .find_map(|(_, r)| r.as_ref().ok())
        .expect("one booking")
        .clone();
    for (party, result) in &results {
        match result {
            Ok(booking) => {
                assert_eq!(booking.booking_id, winner.booking_id);
                assert_eq!(*party, winner.party_size);
            }
            Err(status) => {
                assert_ne!(*party, winner.party_size, "{status:?}");
                assert_reused(status, "concurrent reuse");
            }
        }
    }
    let (bookings, booked): (i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM booking.bookings), (SELECT booked FROM booking.slots)",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert_eq!((bookings, booked), (1, winner.party_size));
    stack.shutdown().await;
}

#[tokio::test]
async fn create_slot_keys_are_scoped_by_caller_and_bound_to_their_request() {
    const ADMIN: &str = "admin-token-0123456789abc";
    const PLANNER: &str = "planner-token-0123456789ab";
    let stack = spawn_stack_with_memory(
        |_| {},
        |booking| {
            no_delivery(booking);
            booking.server.auth_mode = AuthMode::Required;
            booking.server.auth_tokens = Some(format!("admin:{ADMIN},planner:{PLANNER}"));
            booking.server.auth_grants = Some("admin=*;planner=CreateSlot".into());
        },
        None,
        Some(ADMIN),
    )
    .await;
    let start = chrono::Utc::now() + chrono::Duration::hours(2);
    let request = booking::CreateSlotRequest {
        start_time: Some(to_timestamp(start)),
        end_time: Some(to_timestamp(start + chrono::Duration::hours(1))),
        capacity: 6,
        label: "Terrace".into(),
        request_id: "slot-key-1".into(),
        time_zone: "Europe/Paris".into(),
    };
    let mut admin = stack.booking_with_token(ADMIN);
    let mut planner = stack.booking_with_token(PLANNER);

    let first = admin
        .create_slot(request.clone())
        .await
        .expect("slot")
        .into_inner();
    assert!(!first.replayed);
    let first = first.slot.expect("slot");
    assert_eq!(first.time_zone, "Europe/Paris");
    let again = admin
        .create_slot(request.clone())
        .await
        .expect("replayed")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.slot.expect("slot"), first);

    // Another caller, the same key: its own slot.
    let theirs = planner
        .create_slot(request.clone())
        .await
        .expect("planner's slot")
        .into_inner();
    assert!(!theirs.replayed);
    assert_ne!(theirs.slot.expect("slot").slot_id, first.slot_id);

    let before = written(&stack).await;
    let variants: Vec<(&str, booking::CreateSlotRequest)> = vec![
        (
            "another capacity",
            booking::CreateSlotRequest {
                capacity: 7,
                ..request.clone()
            },
        ),
        (
            "another label",
            booking::CreateSlotRequest {
                label: "Cellar".into(),
                ..request.clone()
            },
        ),
        (
            "another start",
            booking::CreateSlotRequest {
                start_time: Some(to_timestamp(start + chrono::Duration::minutes(1))),
                ..request.clone()
            },
        ),
        (
            "another time zone",
            booking::CreateSlotRequest {
                time_zone: String::new(),
                ..request.clone()
            },
        ),
    ];
    for (what, variant) in variants {
        for client in [&mut admin, &mut planner] {
            let status = client.create_slot(variant.clone()).await.expect_err(what);
            assert_reused(&status, what);
        }
    }
    assert_eq!(written(&stack).await, before, "refusals wrote");
    stack.shutdown().await;
}

#[tokio::test]
async fn without_authentication_slot_keys_still_replay_and_refuse() {
    let stack = spawn_stack_with(no_delivery).await;
    let start = chrono::Utc::now() + chrono::Duration::hours(2);
    let request = booking::CreateSlotRequest {
        start_time: Some(to_timestamp(start)),
        end_time: Some(to_timestamp(start + chrono::Duration::hours(1))),
        capacity: 6,
        label: String::new(),
        request_id: "open-key".into(),
        time_zone: String::new(),
    };
    let mut client = stack.booking.clone();
    let first = client.create_slot(request.clone()).await.expect("slot");
    let first = first.into_inner().slot.expect("slot");
    assert_eq!(first.time_zone, "UTC", "empty means UTC");
    let again = client.create_slot(request.clone()).await.expect("again");
    assert_eq!(again.into_inner().slot.expect("slot"), first);
    let status = client
        .create_slot(booking::CreateSlotRequest {
            capacity: 5,
            ..request.clone()
        })
        .await
        .expect_err("reused");
    assert_reused(&status, "capacity");
    // Without a key, every call is a new slot.
    let keyless = booking::CreateSlotRequest {
        request_id: String::new(),
        ..request
    };
    let a = client.create_slot(keyless.clone()).await.expect("a");
    let b = client.create_slot(keyless).await.expect("b");
    assert_ne!(
        a.into_inner().slot.expect("slot").slot_id,
        b.into_inner().slot.expect("slot").slot_id
    );
    stack.shutdown().await;
}
