use std::time::Duration;

use maitre_api::booking::v1 as booking;
use maitre_runtime::fields::to_timestamp;
use tonic::Code;

use crate::stack::{Stack, reason, spawn_stack_with, violated_fields};

fn no_delivery(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
}

#[tokio::test]
async fn slots_are_created_once_per_request_id_and_listed_by_free_seats() {
    let stack = spawn_stack_with(no_delivery).await;
    let base = chrono::Utc::now() + chrono::Duration::hours(2);
    let mut client = stack.booking.clone();
    let mut ids = Vec::new();
    for i in 0..5 {
        let request = booking::CreateSlotRequest {
            start_time: Some(to_timestamp(base + chrono::Duration::hours(i))),
            end_time: Some(to_timestamp(
                base + chrono::Duration::hours(i) + chrono::Duration::minutes(90),
            )),
            capacity: 4,
            label: format!("table {i}"),
            request_id: format!("slot-{i}"),
            time_zone: String::new(),
        };
        let first = client
            .create_slot(request.clone())
            .await
            .expect("slot")
            .into_inner()
            .slot
            .expect("slot");
        let again = client
            .create_slot(request)
            .await
            .expect("slot again")
            .into_inner()
            .slot
            .expect("slot");
        assert_eq!(first.slot_id, again.slot_id, "same request_id, same slot");
        ids.push(first);
    }
    // Fill slot 1 to 3/4 seats.
    stack
        .book(Stack::booking_request(&ids[1], "kai", "", 3))
        .await
        .expect("booked");

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_availability(booking::ListAvailabilityRequest {
                start_time: Some(to_timestamp(base)),
                end_time: Some(to_timestamp(base + chrono::Duration::days(1))),
                min_available_seats: 2,
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        seen.extend(page.slots.into_iter().map(|s| s.label));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["table 0", "table 2", "table 3", "table 4"]);
    stack.shutdown().await;
}

#[tokio::test]
async fn bookings_can_be_read_listed_and_cancelled_twice_harmlessly() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 8)
        .await;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(
            stack
                .book(Stack::booking_request(&slot, "lou", "", 2))
                .await
                .expect("booked"),
        );
    }
    let mut client = stack.booking.clone();

    let got = client
        .get_booking(booking::GetBookingRequest {
            booking_id: made[0].booking_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .booking
        .expect("booking");
    assert_eq!(got, made[0]);
    let deposit = got.deposit.expect("deposit");
    assert_eq!(deposit.state, booking::PaymentState::Pending as i32);
    assert_eq!(deposit.amount.expect("amount").amount_minor, 2500);

    let page = client
        .list_bookings(booking::ListBookingsRequest {
            customer_id: "lou".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.bookings.len(), 2);
    assert_eq!(
        page.bookings[0].booking_id, made[2].booking_id,
        "newest first"
    );
    let rest = client
        .list_bookings(booking::ListBookingsRequest {
            customer_id: "lou".into(),
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.bookings.len(), 1);
    assert!(rest.next_page_token.is_empty());

    for _ in 0..2 {
        let cancelled = client
            .cancel_booking(booking::CancelBookingRequest {
                booking_id: made[0].booking_id.clone(),
                reason: "ill".into(),
            })
            .await
            .expect("cancel")
            .into_inner()
            .booking
            .expect("booking");
        assert_eq!(cancelled.state, booking::BookingState::Cancelled as i32);
        assert_eq!(
            cancelled.deposit.expect("deposit").state,
            booking::PaymentState::Voided as i32
        );
    }
    let booked: i32 = sqlx::query_scalar("SELECT booked FROM booking.slots")
        .fetch_one(&stack.db)
        .await
        .expect("booked");
    assert_eq!(booked, 4, "seats released once, not twice");
    stack.shutdown().await;
}

#[tokio::test]
async fn refusals_carry_the_right_code_and_reason() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 3)
        .await;
    stack
        .book(Stack::booking_request(&slot, "max", "", 2))
        .await
        .expect("booked");

    let full = stack
        .book(Stack::booking_request(&slot, "max", "", 2))
        .await
        .expect_err("full");
    assert_eq!(full.code(), Code::FailedPrecondition);
    assert_eq!(reason(&full), "SLOT_FULL");
    use tonic_types::StatusExt;
    let info = full.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("available_seats").map(String::as_str),
        Some("1")
    );

    let mut unknown = Stack::booking_request(&slot, "max", "", 1);
    unknown.slot_id = uuid::Uuid::now_v7().to_string();
    let not_found = stack.book(unknown).await.expect_err("unknown slot");
    assert_eq!(
        (not_found.code(), reason(&not_found).as_str()),
        (Code::NotFound, "SLOT_NOT_FOUND")
    );

    let soon = stack
        .slot(Duration::from_millis(300), Duration::from_secs(60), 3)
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = stack
        .book(Stack::booking_request(&soon, "max", "", 1))
        .await
        .expect_err("started");
    assert_eq!(
        (started.code(), reason(&started).as_str()),
        (Code::FailedPrecondition, "SLOT_STARTED")
    );

    let missing = stack
        .booking
        .clone()
        .get_booking(booking::GetBookingRequest {
            booking_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("missing");
    assert_eq!(
        (missing.code(), reason(&missing).as_str()),
        (Code::NotFound, "BOOKING_NOT_FOUND")
    );
    let cancel_missing = stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .expect_err("missing");
    assert_eq!(cancel_missing.code(), Code::NotFound);
    stack.shutdown().await;
}

#[tokio::test]
async fn every_booking_rule_names_its_field_and_writes_nothing() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let valid = Stack::booking_request(&slot, "nia", "", 2);
    let money = |currency: &str, amount| {
        Some(booking::Money {
            currency_code: currency.into(),
            amount_minor: amount,
        })
    };
    let cases: Vec<(booking::CreateBookingRequest, &str)> = vec![
        (
            booking::CreateBookingRequest {
                customer_id: String::new(),
                ..valid.clone()
            },
            "customer_id",
        ),
        (
            booking::CreateBookingRequest {
                customer_name: " ".into(),
                ..valid.clone()
            },
            "customer_name",
        ),
        (
            booking::CreateBookingRequest {
                customer_name: "n".repeat(201),
                ..valid.clone()
            },
            "customer_name",
        ),
        (
            booking::CreateBookingRequest {
                conversation_id: "nope".into(),
                ..valid.clone()
            },
            "conversation_id",
        ),
        (
            booking::CreateBookingRequest {
                slot_id: String::new(),
                ..valid.clone()
            },
            "slot_id",
        ),
        (
            booking::CreateBookingRequest {
                slot_id: "x".into(),
                ..valid.clone()
            },
            "slot_id",
        ),
        (
            booking::CreateBookingRequest {
                party_size: 0,
                ..valid.clone()
            },
            "party_size",
        ),
        (
            booking::CreateBookingRequest {
                party_size: 21,
                ..valid.clone()
            },
            "party_size",
        ),
        (
            booking::CreateBookingRequest {
                party_size: -3,
                ..valid.clone()
            },
            "party_size",
        ),
        (
            booking::CreateBookingRequest {
                deposit: None,
                ..valid.clone()
            },
            "deposit",
        ),
        (
            booking::CreateBookingRequest {
                deposit: money("eur", 10),
                ..valid.clone()
            },
            "deposit.currency_code",
        ),
        (
            booking::CreateBookingRequest {
                deposit: money("EUR", -1),
                ..valid.clone()
            },
            "deposit.amount_minor",
        ),
        (
            booking::CreateBookingRequest {
                request_id: String::new(),
                ..valid.clone()
            },
            "request_id",
        ),
        (
            booking::CreateBookingRequest {
                request_id: "r".repeat(129),
                ..valid.clone()
            },
            "request_id",
        ),
    ];
    for (request, field) in cases {
        let status = stack.book(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert_eq!(violated_fields(&status), [field]);
    }

    let now = chrono::Utc::now();
    let slot_request = |start: chrono::DateTime<chrono::Utc>,
                        end: chrono::DateTime<chrono::Utc>,
                        capacity| booking::CreateSlotRequest {
        start_time: Some(to_timestamp(start)),
        end_time: Some(to_timestamp(end)),
        capacity,
        label: String::new(),
        request_id: String::new(),
        time_zone: String::new(),
    };
    let hour = chrono::Duration::hours(1);
    let slot_cases: Vec<(booking::CreateSlotRequest, &str)> = vec![
        (slot_request(now + hour, now, 4), "end_time"),
        (slot_request(now + hour, now + hour * 2, 0), "capacity"),
        (slot_request(now + hour, now + hour * 2, 10_001), "capacity"),
        (
            slot_request(now - hour * 48, now - hour * 47, 4),
            "start_time",
        ),
        (
            slot_request(
                now + chrono::Duration::days(3650),
                now + chrono::Duration::days(3651),
                4,
            ),
            "start_time",
        ),
        (
            booking::CreateSlotRequest {
                start_time: None,
                ..slot_request(now, now + hour, 4)
            },
            "start_time",
        ),
        (
            booking::CreateSlotRequest {
                label: "l".repeat(201),
                ..slot_request(now + hour, now + hour * 2, 4)
            },
            "label",
        ),
    ];
    for (request, field) in slot_cases {
        let status = stack
            .booking
            .clone()
            .create_slot(request)
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            violated_fields(&status).contains(&field.to_string()),
            "{field}: {:?}",
            violated_fields(&status)
        );
    }
    let rows: (i64, i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM booking.slots), (SELECT count(*) FROM booking.bookings), (SELECT booked FROM booking.slots LIMIT 1)",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert_eq!(rows, (1, 0, 0), "nothing written");
    stack.shutdown().await;
}

#[tokio::test]
async fn the_plan_job_row_matches_what_apalis_writes() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "pia", "", 1))
        .await
        .expect("booked");

    // A reference row written by apalis's own push_tasks.
    let reference = uuid::Uuid::now_v7();
    let mut tx = stack.db.begin().await.expect("begin");
    let job = booking_service::jobs::PlanFollowUp {
        booking_id: reference,
        attempt: 1,
        trace_parent: None,
    };
    booking_service::store::jobs::push_plan(&mut tx, &job, None)
        .await
        .expect("push_tasks");
    tx.commit().await.expect("commit");

    type Row = (
        String,
        String,
        String,
        i32,
        i32,
        Option<i32>,
        Option<String>,
        Option<String>,
        Vec<u8>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, job_type, status, attempts, max_attempts, priority, metadata::text, idempotency_key, job \
         FROM apalis.jobs ORDER BY idempotency_key = $1 DESC",
    )
    .bind(format!("{}/1", booked.booking_id))
    .fetch_all(&stack.db)
    .await
    .expect("job rows");
    assert_eq!(rows.len(), 2);
    let (ours, theirs) = (&rows[0], &rows[1]);
    assert_eq!(
        ours.7.as_deref(),
        Some(format!("{}/1", booked.booking_id).as_str())
    );
    assert_eq!(
        (&ours.1, &ours.2, ours.3, ours.4, ours.5, &ours.6),
        (
            &theirs.1, &theirs.2, theirs.3, theirs.4, theirs.5, &theirs.6
        )
    );
    assert_eq!(ours.0.len(), 26, "a ULID like apalis's own: {}", ours.0);
    assert!(ours.0.chars().all(|c| c.is_ascii_alphanumeric()));
    let payload: booking_service::jobs::PlanFollowUp =
        serde_json::from_slice(&ours.8).expect("decodes as the worker will");
    assert_eq!(payload.booking_id.to_string(), booked.booking_id);
    assert_eq!(payload.attempt, 1);
    stack.shutdown().await;
}
