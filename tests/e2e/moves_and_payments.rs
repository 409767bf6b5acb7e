//! MoveBooking and RecordPayment, and what CancelBooking does to a paid
//! deposit.

use std::time::Duration;

use futures::future::join_all;
use maitre_api::booking::v1 as booking;
use tonic::Code;

use crate::{
    holds::{hold, hold_request},
    stack::{Stack, quick, reason, spawn_stack_with, violated_fields},
};

fn no_delivery(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
}

fn move_request(booking: &booking::Booking, slot: &booking::Slot) -> booking::MoveBookingRequest {
    booking::MoveBookingRequest {
        booking_id: booking.booking_id.clone(),
        slot_id: slot.slot_id.clone(),
        request_id: uuid::Uuid::now_v7().to_string(),
    }
}

async fn move_to(
    stack: &Stack,
    request: booking::MoveBookingRequest,
) -> Result<booking::MoveBookingResponse, tonic::Status> {
    stack
        .booking
        .clone()
        .move_booking(request)
        .await
        .map(|r| r.into_inner())
}

/// Seats booked in each slot, as the slot rows say and as the bookings say.
async fn seats(stack: &Stack, slot: &booking::Slot) -> (i32, i64) {
    sqlx::query_as(
        "SELECT s.booked, (SELECT COALESCE(sum(b.party_size), 0) FROM booking.bookings b \
                           WHERE b.slot_id = s.id AND b.state = 1) \
         FROM booking.slots s WHERE s.id = $1::uuid",
    )
    .bind(&slot.slot_id)
    .fetch_one(&stack.db)
    .await
    .expect("seats")
}

async fn plan_job_due(stack: &Stack, booking: &booking::Booking) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar(
        "SELECT run_at FROM apalis.jobs WHERE job_type = 'maitre.followup.plan' \
         AND idempotency_key = $1 || '/1' AND status = 'Pending'",
    )
    .bind(&booking.booking_id)
    .fetch_one(&stack.db)
    .await
    .expect("the plan job")
}

fn end_of(slot: &booking::Slot) -> chrono::DateTime<chrono::Utc> {
    let end = slot.end_time.expect("end");
    chrono::DateTime::from_timestamp(end.seconds, end.nanos as u32).expect("time")
}

#[tokio::test]
async fn a_move_takes_the_seats_from_one_slot_to_the_other_with_its_follow_up_job() {
    let stack = spawn_stack_with(no_delivery).await;
    let from = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let to = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(5400), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&from, "ana", "", 3))
        .await
        .expect("booked");
    let request = move_request(&booked, &to);

    let moved = move_to(&stack, request.clone()).await.expect("moved");
    assert!(!moved.replayed);
    let moved = moved.booking.expect("booking");
    assert_eq!(moved.slot_id, to.slot_id);
    assert_eq!(moved.booking_id, booked.booking_id);
    assert_eq!(moved.slot_end_time, to.end_time);
    assert_eq!(moved.deposit, booked.deposit, "the deposit stays");
    assert_eq!(seats(&stack, &from).await, (0, 0));
    assert_eq!(seats(&stack, &to).await, (3, 3));
    // The follow-up comes due at the new event's end + BOOKING_FOLLOWUP_DELAY.
    let due = plan_job_due(&stack, &booked).await;
    assert_eq!(
        due.timestamp(),
        (end_of(&to) + chrono::Duration::hours(1)).timestamp()
    );
    let due_column: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT followup_due_at FROM booking.bookings")
            .fetch_one(&stack.db)
            .await
            .expect("due");
    assert_eq!(due_column, due);

    // A retry is answered, not moved again; the key with another target is refused.
    let again = move_to(&stack, request.clone()).await.expect("retry");
    assert!(again.replayed);
    assert_eq!(again.booking.expect("booking").slot_id, to.slot_id);
    let back = move_to(
        &stack,
        booking::MoveBookingRequest {
            slot_id: from.slot_id.clone(),
            ..request.clone()
        },
    )
    .await
    .expect_err("same key, other slot");
    assert_eq!(
        (back.code(), reason(&back)),
        (Code::InvalidArgument, "REQUEST_ID_REUSED".into())
    );
    assert_eq!(seats(&stack, &to).await, (3, 3));

    // 20 concurrent retries of a new move: one move.
    let home = move_request(&booked, &from);
    let answers = join_all((0..20).map(|_| move_to(&stack, home.clone()))).await;
    assert_eq!(
        answers
            .iter()
            .filter(|a| !a.as_ref().expect("every retry answers").replayed)
            .count(),
        1
    );
    assert_eq!(seats(&stack, &from).await, (3, 3));
    assert_eq!(seats(&stack, &to).await, (0, 0));
    let moves: i64 = sqlx::query_scalar("SELECT count(*) FROM booking.moves")
        .fetch_one(&stack.db)
        .await
        .expect("moves");
    assert_eq!(moves, 2);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_move_is_refused_with_a_reason_and_changes_nothing() {
    let stack = spawn_stack_with(no_delivery).await;
    let from = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let small = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(3600), 3)
        .await;
    let booked = stack
        .book(Stack::booking_request(&from, "ana", "", 2))
        .await
        .expect("booked");
    // Two of the small slot's three seats are held: the move of two does not fit.
    hold(&stack, hold_request(&small, "bea", 2))
        .await
        .expect("held");

    let full = move_to(&stack, move_request(&booked, &small))
        .await
        .expect_err("full");
    assert_eq!(
        (full.code(), reason(&full)),
        (Code::FailedPrecondition, "SLOT_FULL".into())
    );
    let same = move_to(&stack, move_request(&booked, &from))
        .await
        .expect_err("same slot");
    assert_eq!(
        (same.code(), reason(&same)),
        (Code::FailedPrecondition, "BOOKING_ALREADY_IN_SLOT".into())
    );
    let nowhere = move_to(
        &stack,
        booking::MoveBookingRequest {
            slot_id: uuid::Uuid::now_v7().to_string(),
            ..move_request(&booked, &from)
        },
    )
    .await
    .expect_err("no such slot");
    assert_eq!(
        (nowhere.code(), reason(&nowhere)),
        (Code::NotFound, "SLOT_NOT_FOUND".into())
    );
    let missing = move_to(
        &stack,
        booking::MoveBookingRequest {
            booking_id: uuid::Uuid::now_v7().to_string(),
            ..move_request(&booked, &small)
        },
    )
    .await
    .expect_err("no such booking");
    assert_eq!(
        (missing.code(), reason(&missing)),
        (Code::NotFound, "BOOKING_NOT_FOUND".into())
    );
    let invalid = move_to(
        &stack,
        booking::MoveBookingRequest {
            booking_id: "x".into(),
            slot_id: String::new(),
            request_id: String::new(),
        },
    )
    .await
    .expect_err("invalid");
    assert_eq!(
        violated_fields(&invalid),
        ["booking_id", "slot_id", "request_id"]
    );
    assert_eq!(seats(&stack, &from).await, (2, 2));
    assert_eq!(seats(&stack, &small).await, (0, 0));
    let due_before = plan_job_due(&stack, &booked).await;
    assert_eq!(
        due_before.timestamp(),
        (end_of(&from) + chrono::Duration::hours(1)).timestamp()
    );

    // The booking's own slot has started: it stays where it is.
    let later = stack
        .slot(Duration::from_secs(9000), Duration::from_secs(3600), 4)
        .await;
    sqlx::query(
        "UPDATE booking.slots SET starts_at = now() - interval '1 minute' WHERE id = $1::uuid",
    )
    .bind(&from.slot_id)
    .execute(&stack.db)
    .await
    .expect("started");
    let started = move_to(&stack, move_request(&booked, &later))
        .await
        .expect_err("started");
    assert_eq!(
        (started.code(), reason(&started)),
        (Code::FailedPrecondition, "SLOT_STARTED".into())
    );
    let info = tonic_types::StatusExt::get_details_error_info(&started).expect("error info");
    assert_eq!(
        info.metadata.get("slot_id"),
        Some(&from.slot_id),
        "names the booking's own slot"
    );
    assert_eq!(seats(&stack, &later).await, (0, 0));

    // A cancelled booking does not move.
    let other = stack
        .book(Stack::booking_request(&later, "cy", "", 1))
        .await
        .expect("booked");
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: other.booking_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancelled");
    let cancelled = move_to(&stack, move_request(&other, &small))
        .await
        .expect_err("cancelled");
    assert_eq!(
        (cancelled.code(), reason(&cancelled)),
        (Code::FailedPrecondition, "BOOKING_CANCELLED".into())
    );
    stack.shutdown().await;
}

/// Bookings swapping slots at once all finish. (The slots are locked in id
/// order, so they queue up; a deadlock would be retried inside the call,
/// so this checks that every move completes, not the order itself.)
#[tokio::test]
async fn opposite_moves_at_once_both_finish() {
    let stack = spawn_stack_with(no_delivery).await;
    let a = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 20)
        .await;
    let b = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(3600), 20)
        .await;
    let mut in_a = Vec::new();
    let mut in_b = Vec::new();
    for i in 0..10 {
        in_a.push(
            stack
                .book(Stack::booking_request(&a, &format!("a{i}"), "", 1))
                .await
                .expect("a"),
        );
        in_b.push(
            stack
                .book(Stack::booking_request(&b, &format!("b{i}"), "", 1))
                .await
                .expect("b"),
        );
    }
    let moves = in_a
        .iter()
        .map(|x| move_request(x, &b))
        .chain(in_b.iter().map(|x| move_request(x, &a)));
    let answers = join_all(moves.map(|m| move_to(&stack, m))).await;
    for answer in answers {
        answer.expect("every move finishes");
    }
    assert_eq!(seats(&stack, &a).await, (10, 10));
    assert_eq!(seats(&stack, &b).await, (10, 10));
    stack.shutdown().await;
}

/// The follow-up moves with the booking: a booking first made for an event
/// next week, moved to one the day after tomorrow, is planned from the new
/// slot (its job made due now, as at the new event's end): its text is
/// dated by the new event.
#[tokio::test]
async fn a_moved_booking_is_followed_up_for_its_new_event() {
    let stack = spawn_stack_with(quick).await;
    let conversation = stack.conversation("ana", &[(0.8, "joy")]).await;
    let far = stack
        .slot(
            Duration::from_secs(7 * 86_400),
            Duration::from_secs(3600),
            4,
        )
        .await;
    let nearer = stack
        .slot(
            Duration::from_secs(2 * 86_400),
            Duration::from_secs(3600),
            4,
        )
        .await;
    let booked = stack
        .book(Stack::booking_request(&far, "ana", &conversation, 2))
        .await
        .expect("booked");
    move_to(&stack, move_request(&booked, &nearer))
        .await
        .expect("moved");
    assert_eq!(
        plan_job_due(&stack, &booked).await.timestamp(),
        end_of(&nearer).timestamp(),
        "due at the new event's end (+ BOOKING_FOLLOWUP_DELAY, 0 here)"
    );

    stack.plan_early(&booked.booking_id).await;
    let planned = stack
        .wait_follow_up(&booked.booking_id, "the follow-up planned", |f| {
            f.trigger == "post_event"
        })
        .await;
    assert_eq!(planned.conversation_id, conversation);
    let start = nearer.start_time.expect("start");
    let new_date = chrono::DateTime::from_timestamp(start.seconds, 0)
        .expect("time")
        .format("%A %-d %B %Y")
        .to_string();
    assert!(
        planned.rendered_text.contains(&new_date),
        "{} lacks {new_date}",
        planned.rendered_text
    );
    stack.shutdown().await;
}

fn payment(booking: &booking::Booking, reference: &str) -> booking::RecordPaymentRequest {
    booking::RecordPaymentRequest {
        booking_id: booking.booking_id.clone(),
        provider_reference: reference.into(),
        amount: Some(booking::Money {
            currency_code: "EUR".into(),
            amount_minor: 2500,
        }),
    }
}

async fn record(
    stack: &Stack,
    request: booking::RecordPaymentRequest,
) -> Result<booking::RecordPaymentResponse, tonic::Status> {
    stack
        .booking
        .clone()
        .record_payment(request)
        .await
        .map(|r| r.into_inner())
}

async fn cancel(stack: &Stack, booking: &booking::Booking) -> booking::Booking {
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: booking.booking_id.clone(),
            reason: "plans changed".into(),
        })
        .await
        .expect("cancelled")
        .into_inner()
        .booking
        .expect("booking")
}

fn deposit_state(booking: &booking::Booking) -> i32 {
    booking.deposit.as_ref().expect("deposit").state
}

#[tokio::test]
async fn a_payment_is_recorded_once_per_provider_reference() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "ana", "", 2))
        .await
        .expect("booked");
    let other = stack
        .book(Stack::booking_request(&slot, "bea", "", 2))
        .await
        .expect("booked");

    let wrong = record(
        &stack,
        booking::RecordPaymentRequest {
            amount: Some(booking::Money {
                currency_code: "EUR".into(),
                amount_minor: 2400,
            }),
            ..payment(&booked, "pi_1")
        },
    )
    .await
    .expect_err("not the deposit");
    assert_eq!(
        (wrong.code(), reason(&wrong)),
        (Code::FailedPrecondition, "PAYMENT_AMOUNT_MISMATCH".into())
    );

    // Concurrent deliveries of the provider's webhook: one records, all answer.
    let answers = join_all((0..20).map(|_| record(&stack, payment(&booked, "pi_1")))).await;
    assert_eq!(
        answers
            .iter()
            .filter(|a| !a.as_ref().expect("every delivery answers").replayed)
            .count(),
        1
    );
    let paid = answers[0]
        .as_ref()
        .expect("ok")
        .booking
        .clone()
        .expect("booking");
    let deposit = paid.deposit.clone().expect("deposit");
    assert_eq!(deposit.state, booking::PaymentState::Paid as i32);
    assert_eq!(deposit.provider_reference, "pi_1");
    assert!(deposit.paid_time.is_some());

    let other_amount = record(
        &stack,
        booking::RecordPaymentRequest {
            amount: Some(booking::Money {
                currency_code: "EUR".into(),
                amount_minor: 1,
            }),
            ..payment(&booked, "pi_1")
        },
    )
    .await
    .expect_err("the same reference for another amount is not a replay");
    assert_eq!(reason(&other_amount), "PAYMENT_AMOUNT_MISMATCH");
    let twice = record(&stack, payment(&booked, "pi_2"))
        .await
        .expect_err("another reference");
    assert_eq!(
        (twice.code(), reason(&twice)),
        (Code::FailedPrecondition, "PAYMENT_ALREADY_RECORDED".into())
    );
    let stolen = record(&stack, payment(&other, "pi_1"))
        .await
        .expect_err("another booking's reference");
    assert_eq!(
        (stolen.code(), reason(&stolen)),
        (Code::AlreadyExists, "PROVIDER_REFERENCE_USED".into())
    );
    assert_eq!(violated_fields(&stolen), ["provider_reference"]);
    let missing = record(
        &stack,
        booking::RecordPaymentRequest {
            booking_id: uuid::Uuid::now_v7().to_string(),
            ..payment(&booked, "pi_3")
        },
    )
    .await
    .expect_err("no such booking");
    assert_eq!(
        (missing.code(), reason(&missing)),
        (Code::NotFound, "BOOKING_NOT_FOUND".into())
    );
    let invalid = record(
        &stack,
        booking::RecordPaymentRequest {
            booking_id: String::new(),
            provider_reference: " pi".into(),
            amount: None,
        },
    )
    .await
    .expect_err("invalid");
    assert_eq!(
        violated_fields(&invalid),
        ["booking_id", "provider_reference", "amount"]
    );
    let unpaid = stack
        .booking
        .clone()
        .get_booking(booking::GetBookingRequest {
            booking_id: other.booking_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .booking
        .expect("booking");
    assert_eq!(
        deposit_state(&unpaid),
        booking::PaymentState::Pending as i32
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_paid_booking_leaves_the_deposit_to_refund() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;

    let paid = stack
        .book(Stack::booking_request(&slot, "ana", "", 2))
        .await
        .expect("booked");
    record(&stack, payment(&paid, "pi_paid"))
        .await
        .expect("paid");
    assert_eq!(
        deposit_state(&cancel(&stack, &paid).await),
        booking::PaymentState::RefundPending as i32
    );

    let unpaid = stack
        .book(Stack::booking_request(&slot, "bea", "", 2))
        .await
        .expect("booked");
    assert_eq!(
        deposit_state(&cancel(&stack, &unpaid).await),
        booking::PaymentState::Voided as i32
    );
    // The provider's webhook arrives after the cancel: the money goes back.
    let late = record(&stack, payment(&unpaid, "pi_late"))
        .await
        .expect("recorded");
    let late = late.booking.expect("booking");
    assert_eq!(
        deposit_state(&late),
        booking::PaymentState::RefundPending as i32
    );
    assert_eq!(late.deposit.expect("deposit").provider_reference, "pi_late");
    // Cancelling again changes nothing.
    assert_eq!(
        deposit_state(&cancel(&stack, &paid).await),
        booking::PaymentState::RefundPending as i32
    );

    // A cancel racing the webhook: whichever runs first, the deposit ends
    // REFUND_PENDING once both are done.
    for i in 0..10 {
        let racing = stack
            .book(Stack::booking_request(&slot, &format!("r{i}"), "", 1))
            .await
            .expect("booked");
        let reference = format!("pi_race_{i}");
        let (recorded, cancelled) =
            tokio::join!(record(&stack, payment(&racing, &reference)), async {
                cancel(&stack, &racing).await
            });
        recorded.expect("recorded");
        let _ = cancelled;
        let state: i16 =
            sqlx::query_scalar("SELECT state FROM booking.payments WHERE booking_id = $1::uuid")
                .bind(&racing.booking_id)
                .fetch_one(&stack.db)
                .await
                .expect("state");
        assert_eq!(
            i32::from(state),
            booking::PaymentState::RefundPending as i32,
            "race {i}"
        );
    }
    stack.shutdown().await;
}
