//! HoldSeats, ConfirmHold, ReleaseHold: seats reserved while the customer
//! pays, counted everywhere while live, free again the moment they expire.

use std::{collections::HashSet, time::Duration};

use futures::future::join_all;
use maitre_api::booking::v1 as booking;
use maitre_runtime::fields::to_timestamp;
use tonic::Code;

use crate::stack::{Stack, reason, spawn_stack_with, violated_fields};

/// No follow-up comes due during these tests, and no worker runs at all:
/// whatever a hold does, it does without a job.
fn no_workers(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
    s.disable_workers = true;
}

pub fn hold_request(
    slot: &booking::Slot,
    customer: &str,
    party_size: i32,
) -> booking::HoldSeatsRequest {
    booking::HoldSeatsRequest {
        customer_id: customer.into(),
        slot_id: slot.slot_id.clone(),
        party_size,
        request_id: uuid::Uuid::now_v7().to_string(),
    }
}

pub fn confirm_request(hold: &booking::Hold, name: &str) -> booking::ConfirmHoldRequest {
    booking::ConfirmHoldRequest {
        hold_id: hold.hold_id.clone(),
        customer_id: hold.customer_id.clone(),
        customer_name: name.into(),
        conversation_id: String::new(),
        deposit: Some(booking::Money {
            currency_code: "EUR".into(),
            amount_minor: 2500,
        }),
    }
}

pub async fn hold(
    stack: &Stack,
    request: booking::HoldSeatsRequest,
) -> Result<booking::Hold, tonic::Status> {
    stack
        .booking
        .clone()
        .hold_seats(request)
        .await
        .map(|r| r.into_inner().hold.expect("hold"))
}

pub async fn confirm(
    stack: &Stack,
    request: booking::ConfirmHoldRequest,
) -> Result<booking::ConfirmHoldResponse, tonic::Status> {
    stack
        .booking
        .clone()
        .confirm_hold(request)
        .await
        .map(|r| r.into_inner())
}

/// The slot as ListAvailability shows it (any free seats or none).
async fn listed(stack: &Stack, slot: &booking::Slot) -> Option<booking::Slot> {
    stack
        .booking
        .clone()
        .list_availability(booking::ListAvailabilityRequest {
            start_time: slot.start_time,
            end_time: Some(to_timestamp(
                chrono::Utc::now() + chrono::Duration::days(30),
            )),
            min_available_seats: 1,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("availability")
        .into_inner()
        .slots
        .into_iter()
        .find(|s| s.slot_id == slot.slot_id)
}

/// The one slot's booked seats, and how many bookings there are.
async fn booked_and_bookings(stack: &Stack) -> (i32, i64) {
    sqlx::query_as("SELECT booked, (SELECT count(*) FROM booking.bookings) FROM booking.slots")
        .fetch_one(&stack.db)
        .await
        .expect("counts")
}

/// Lets a hold's time run out (its expiry is read from the database's
/// clock: moving the expiry into the past is what waiting would do).
async fn expire(stack: &Stack, hold_id: &str) {
    sqlx::query("UPDATE booking.holds SET expires_at = clock_timestamp() - interval '1 ms' WHERE id = $1::uuid")
        .bind(hold_id)
        .execute(&stack.db)
        .await
        .expect("expired");
}

#[tokio::test]
async fn a_hold_takes_seats_until_it_expires_and_then_frees_them_without_any_job() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;

    let held = hold(&stack, hold_request(&slot, "ana", 3))
        .await
        .expect("held");
    assert_eq!(held.state, booking::HoldState::Held as i32);
    assert_eq!(held.party_size, 3);
    let expires = held.expire_time.expect("expiry").seconds;
    let in_ten_minutes = (chrono::Utc::now() + chrono::Duration::minutes(10)).timestamp();
    assert!(
        (expires - in_ten_minutes).abs() <= 5,
        "BOOKING_HOLD_TTL's default is 10 minutes"
    );

    let shown = listed(&stack, &slot).await.expect("one seat left");
    assert_eq!(
        (shown.booked_seats, shown.held_seats, shown.available_seats),
        (0, 3, 1)
    );
    // A booking and another hold see the held seats as taken.
    let full = stack
        .book(Stack::booking_request(&slot, "bea", "", 2))
        .await
        .expect_err("held seats are taken");
    assert_eq!(
        (full.code(), reason(&full)),
        (Code::FailedPrecondition, "SLOT_FULL".into())
    );
    let also_full = hold(&stack, hold_request(&slot, "bea", 2))
        .await
        .expect_err("full");
    assert_eq!(reason(&also_full), "SLOT_FULL");

    expire(&stack, &held.hold_id).await;
    let shown = listed(&stack, &slot).await.expect("free again");
    assert_eq!((shown.held_seats, shown.available_seats), (0, 4));
    let booked = stack
        .book(Stack::booking_request(&slot, "bea", "", 4))
        .await
        .expect("the expired hold's seats are free");
    assert_eq!(booked.party_size, 4);

    let late = confirm(&stack, confirm_request(&held, "Ana"))
        .await
        .expect_err("expired");
    assert_eq!(
        (late.code(), reason(&late)),
        (Code::FailedPrecondition, "HOLD_EXPIRED".into())
    );
    assert_eq!(
        booked_and_bookings(&stack).await,
        (4, 1),
        "the late confirmation took nothing"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn confirming_a_hold_books_its_seats_exactly_once() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 3)
        .await;
    let hold_seats = hold_request(&slot, "ana", 2);
    let held = hold(&stack, hold_seats.clone()).await.expect("held");
    let request = confirm_request(&held, "Ana");

    // 25 concurrent confirmations of one hold: one booking, all answered with it.
    let answers = join_all((0..25).map(|_| confirm(&stack, request.clone()))).await;
    let ids: HashSet<String> = answers
        .iter()
        .map(|a| {
            a.as_ref()
                .expect("every confirmation answers")
                .booking
                .clone()
                .expect("booking")
                .booking_id
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        answers
            .iter()
            .filter(|a| !a.as_ref().expect("ok").replayed)
            .count(),
        1
    );
    let booking = answers[0]
        .as_ref()
        .expect("ok")
        .booking
        .clone()
        .expect("booking");
    assert_eq!(booking.state, booking::BookingState::Confirmed as i32);
    assert_eq!(booking.party_size, 2);
    assert_eq!(booking.customer_name, "Ana");
    assert_eq!(booking.request_id, format!("hold:{}", held.hold_id));
    let deposit = booking.deposit.clone().expect("deposit");
    assert_eq!(deposit.state, booking::PaymentState::Pending as i32);

    let (booked, held_now, bookings, plan_jobs, hold_booking): (
        i32,
        i32,
        i64,
        i64,
        Option<uuid::Uuid>,
    ) = sqlx::query_as(
        "SELECT s.booked, booking.held_seats(s.id), \
                    (SELECT count(*) FROM booking.bookings), \
                    (SELECT count(*) FROM apalis.jobs WHERE job_type = 'maitre.followup.plan'), \
                    (SELECT booking_id FROM booking.holds) \
             FROM booking.slots s",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert_eq!((booked, held_now, bookings, plan_jobs), (2, 0, 1, 1));
    assert_eq!(
        hold_booking.map(|id| id.to_string()),
        Some(booking.booking_id.clone())
    );
    let shown = listed(&stack, &slot).await.expect("one seat left");
    assert_eq!(
        (shown.booked_seats, shown.held_seats, shown.available_seats),
        (2, 0, 1)
    );

    // The same hold confirmed with another payload is refused and names the booking.
    let mut other = request.clone();
    other.customer_name = "Someone Else".into();
    let refused = confirm(&stack, other).await.expect_err("another payload");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::FailedPrecondition, "HOLD_ALREADY_CONFIRMED".into())
    );
    // Another customer cannot confirm it, nor learn that it exists.
    let mut stranger = request.clone();
    stranger.customer_id = "mallory".into();
    let hidden = confirm(&stack, stranger).await.expect_err("not theirs");
    assert_eq!(
        (hidden.code(), reason(&hidden)),
        (Code::NotFound, "HOLD_NOT_FOUND".into())
    );
    // A confirmed hold is not released.
    let release = stack
        .booking
        .clone()
        .release_hold(booking::ReleaseHoldRequest {
            hold_id: held.hold_id.clone(),
            customer_id: "ana".into(),
        })
        .await
        .expect_err("confirmed");
    assert_eq!(reason(&release), "HOLD_ALREADY_CONFIRMED");
    // The hold, asked for again by its key, says what became of it.
    let again = hold(&stack, hold_seats).await.expect("replayed");
    assert_eq!(again.state, booking::HoldState::Confirmed as i32);
    assert_eq!(again.booking_id, booking.booking_id);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_released_hold_frees_its_seats_and_cannot_be_confirmed() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 2)
        .await;
    let held = hold(&stack, hold_request(&slot, "ana", 2))
        .await
        .expect("held");
    assert!(
        listed(&stack, &slot).await.is_none(),
        "a fully held slot is not listed"
    );

    let release = booking::ReleaseHoldRequest {
        hold_id: held.hold_id.clone(),
        customer_id: "ana".into(),
    };
    let mut client = stack.booking.clone();
    let stranger = client
        .release_hold(booking::ReleaseHoldRequest {
            customer_id: "mallory".into(),
            ..release.clone()
        })
        .await
        .expect_err("not theirs");
    assert_eq!(
        (stranger.code(), reason(&stranger)),
        (Code::NotFound, "HOLD_NOT_FOUND".into())
    );
    for _ in 0..2 {
        let released = client
            .release_hold(release.clone())
            .await
            .expect("released (twice is harmless)")
            .into_inner()
            .hold
            .expect("hold");
        assert_eq!(released.state, booking::HoldState::Released as i32);
    }
    assert_eq!(
        listed(&stack, &slot).await.expect("free").available_seats,
        2
    );
    let refused = confirm(&stack, confirm_request(&held, "Ana"))
        .await
        .expect_err("released");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::FailedPrecondition, "HOLD_RELEASED".into())
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn hold_requests_are_idempotent_and_refused_with_reasons() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 3)
        .await;
    let request = hold_request(&slot, "ana", 2);

    let answers = join_all((0..20).map(|_| {
        let mut client = stack.booking.clone();
        let request = request.clone();
        async move { client.hold_seats(request).await }
    }))
    .await;
    let holds: Vec<booking::HoldSeatsResponse> = answers
        .into_iter()
        .map(|a| a.expect("every retry answers").into_inner())
        .collect();
    let ids: HashSet<&str> = holds
        .iter()
        .map(|h| h.hold.as_ref().expect("hold").hold_id.as_str())
        .collect();
    assert_eq!(ids.len(), 1, "one hold for one key");
    assert_eq!(holds.iter().filter(|h| !h.replayed).count(), 1);
    let held_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM booking.holds")
        .fetch_one(&stack.db)
        .await
        .expect("count");
    assert_eq!(held_rows, 1);

    let reused = hold(
        &stack,
        booking::HoldSeatsRequest {
            party_size: 1,
            ..request.clone()
        },
    )
    .await
    .expect_err("same key, other payload");
    assert_eq!(
        (reused.code(), reason(&reused)),
        (Code::InvalidArgument, "REQUEST_ID_REUSED".into())
    );
    // The key is the customer's own: another customer's same key is another hold.
    let other = hold(
        &stack,
        booking::HoldSeatsRequest {
            customer_id: "bea".into(),
            party_size: 1,
            ..request.clone()
        },
    )
    .await
    .expect("another customer's key");
    assert_ne!(other.hold_id, holds[0].hold.as_ref().expect("hold").hold_id);

    let full = hold(&stack, hold_request(&slot, "cy", 1))
        .await
        .expect_err("full");
    assert_eq!(full.code(), Code::FailedPrecondition);
    assert_eq!(reason(&full), "SLOT_FULL");
    let missing = hold(
        &stack,
        booking::HoldSeatsRequest {
            slot_id: uuid::Uuid::now_v7().to_string(),
            ..hold_request(&slot, "cy", 1)
        },
    )
    .await
    .expect_err("no such slot");
    assert_eq!(
        (missing.code(), reason(&missing)),
        (Code::NotFound, "SLOT_NOT_FOUND".into())
    );
    let bad = hold(
        &stack,
        booking::HoldSeatsRequest {
            customer_id: format!("erased:{}", "ab".repeat(32)),
            slot_id: "not-a-uuid".into(),
            party_size: 0,
            request_id: "r".into(),
        },
    )
    .await
    .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&bad),
        ["customer_id", "slot_id", "party_size"]
    );

    // A slot that has started takes no hold.
    sqlx::query("UPDATE booking.slots SET starts_at = now() - interval '1 minute'")
        .execute(&stack.db)
        .await
        .expect("started");
    let started = hold(&stack, hold_request(&slot, "cy", 1))
        .await
        .expect_err("started");
    assert_eq!(reason(&started), "SLOT_STARTED");
    stack.shutdown().await;
}

/// The race the design exists for: a booking reads the slot, then waits
/// for its row lock while a hold commits. When it gets the row, it must see
/// that hold's seats (`held_seats` reads with a fresh snapshot), or the
/// seats are sold twice.
#[tokio::test]
async fn a_booking_that_waited_for_the_slot_sees_the_hold_committed_meanwhile() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let slot_id: uuid::Uuid = slot.slot_id.parse().expect("uuid");

    // A hold of 3 seats, written by HoldSeats's own statement, not committed yet.
    let mut tx = stack.db.begin().await.expect("begin");
    let outcome: String = sqlx::query_scalar(booking_service::store::holds::HOLD)
        .bind(uuid::Uuid::now_v7())
        .bind("ana")
        .bind(slot_id)
        .bind(3)
        .bind("hold-1")
        .bind(chrono::Utc::now())
        .bind(vec![0u8; 32])
        .bind(600.0_f64)
        .fetch_one(&mut *tx)
        .await
        .expect("held");
    assert_eq!(outcome, "held");

    let booking = {
        let stack = &stack;
        async move {
            stack
                .book(Stack::booking_request(&slot, "bea", "", 2))
                .await
        }
    };
    let commit = async {
        stack.blocked_on_locks(1).await;
        tx.commit().await.expect("commit");
    };
    let (booked, ()) = tokio::join!(booking, commit);
    let refused = booked.expect_err("3 held + 2 booked would be 5 of 4 seats");
    assert_eq!(reason(&refused), "SLOT_FULL");
    let (seats, held): (i32, i32) =
        sqlx::query_as("SELECT booked, booking.held_seats(id) FROM booking.slots")
            .fetch_one(&stack.db)
            .await
            .expect("seats");
    assert_eq!((seats, held), (0, 3));
    stack.shutdown().await;
}

/// The other way round: a hold that waited for the slot row sees the
/// booking committed meanwhile.
#[tokio::test]
async fn a_hold_that_waited_for_the_slot_sees_the_booking_committed_meanwhile() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let slot_id: uuid::Uuid = slot.slot_id.parse().expect("uuid");

    let mut tx = stack.db.begin().await.expect("begin");
    sqlx::query("UPDATE booking.slots SET booked = booked + 3 WHERE id = $1")
        .bind(slot_id)
        .execute(&mut *tx)
        .await
        .expect("seats taken");
    let holding = hold(&stack, hold_request(&slot, "bea", 2));
    let commit = async {
        stack.blocked_on_locks(1).await;
        tx.commit().await.expect("commit");
    };
    let (held, ()) = tokio::join!(holding, commit);
    assert_eq!(
        reason(&held.expect_err("3 booked + 2 held would be 5 of 4")),
        "SLOT_FULL"
    );
    stack.shutdown().await;
}

/// The live-holds read (the body of `booking.held_seats`, as the database
/// holds it) reads only live holds through `holds_live_idx`, however many
/// expired and confirmed ones the slot has: its cost does not grow with
/// history.
#[tokio::test]
async fn counting_live_holds_reads_only_the_live_ones() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    for i in 0..3 {
        hold(&stack, hold_request(&slot, &format!("live{i}"), 1))
            .await
            .expect("held");
    }
    // 20,000 holds of the past on this slot (expired unconfirmed), and the
    // other slots a real table holds, with some history each.
    sqlx::query(
        "INSERT INTO booking.holds (id, slot_id, customer_id, party_size, request_id, created_at, expires_at) \
         SELECT gen_random_uuid(), $1::uuid, 'old' || i, 1, 'r' || i, now() - interval '2 days', \
                now() - interval '1 day' + i * interval '1 ms' \
         FROM generate_series(1, 20000) AS i",
    )
    .bind(&slot.slot_id)
    .execute(&stack.db)
    .await
    .expect("history");
    sqlx::query(
        "WITH other AS ( \
             INSERT INTO booking.slots (id, starts_at, ends_at, capacity, created_at) \
             SELECT gen_random_uuid(), now() + interval '1 day', now() + interval '2 days', 10, now() \
             FROM generate_series(1, 300) RETURNING id) \
         INSERT INTO booking.holds (id, slot_id, customer_id, party_size, request_id, created_at, expires_at) \
         SELECT gen_random_uuid(), other.id, 'other' || i, 1, other.id || '/' || i, \
                now() - interval '2 days', now() - interval '1 day' \
         FROM other, generate_series(1, 50) AS i",
    )
    .execute(&stack.db)
    .await
    .expect("other slots");
    sqlx::query("ANALYZE booking.holds")
        .execute(&stack.db)
        .await
        .expect("analyze");

    let body: String =
        sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE proname = 'held_seats'")
            .fetch_one(&stack.db)
            .await
            .expect("function");
    // Its SELECT, with the function's parameter and clock variable as
    // placeholders.
    let select = body
        .split("RETURN (")
        .nth(1)
        .and_then(|rest| rest.rsplit_once(");"))
        .map(|(select, _)| {
            select
                .replace("= slot ", "= $1 ")
                .replace("> read_at", "> $2")
        })
        .expect("the function returns one SELECT");
    assert!(select.contains("$1") && select.contains("$2"), "{select}");
    let held: i32 = sqlx::query_scalar(sqlx::AssertSqlSafe(select.clone()))
        .bind(slot.slot_id.parse::<uuid::Uuid>().expect("uuid"))
        .bind(chrono::Utc::now())
        .fetch_one(&stack.db)
        .await
        .expect("held");
    assert_eq!(held, 3);
    // As PL/pgSQL may come to run it: a generic plan, blind to the values.
    let mut conn = stack.db.acquire().await.expect("connection");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET plan_cache_mode = force_generic_plan; PREPARE live_holds(uuid, timestamptz) AS {select}"
    )))
    .execute(&mut *conn)
    .await
    .expect("prepare");
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE live_holds('{}', clock_timestamp())",
        slot.slot_id
    )))
    .fetch_all(&mut *conn)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains("holds_live_idx"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(
        !plan.contains("Rows Removed by Filter"),
        "expired holds are not read: {plan}"
    );
    stack.shutdown().await;
}

/// A hold released (by an erasure, which does not wait for the slot row)
/// while its confirmation was between its seat check and its mark: the
/// confirmation fails whole, and no booking is left behind.
#[tokio::test]
async fn a_hold_released_while_being_confirmed_leaves_no_booking() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let held = hold(&stack, hold_request(&slot, "ana", 2))
        .await
        .expect("held");

    // What EraseCustomer does to the hold, not committed yet: it holds the
    // hold's row, so the confirmation waits at its mark.
    let mut tx = stack.db.begin().await.expect("begin");
    sqlx::query(
        "UPDATE booking.holds SET customer_id = 'erased:x', released_at = now() WHERE id = $1::uuid",
    )
    .bind(&held.hold_id)
    .execute(&mut *tx)
    .await
    .expect("released");
    let confirming = confirm(&stack, confirm_request(&held, "Ana"));
    let commit = async {
        stack.blocked_on_locks(1).await;
        tx.commit().await.expect("commit");
    };
    let (confirmed, ()) = tokio::join!(confirming, commit);
    let refused = confirmed.expect_err("the hold is gone");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::NotFound, "HOLD_NOT_FOUND".into())
    );
    assert_eq!(
        booked_and_bookings(&stack).await,
        (0, 0),
        "nothing of the booking was written"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn hold_keys_and_pseudonyms_are_reserved() {
    let stack = spawn_stack_with(no_workers).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let held = hold(&stack, hold_request(&slot, "ana", 1))
        .await
        .expect("held");
    // CreateBooking cannot take the key ConfirmHold will book under.
    let stolen = stack
        .book(booking::CreateBookingRequest {
            request_id: format!("hold:{}", held.hold_id),
            ..Stack::booking_request(&slot, "ana", "", 1)
        })
        .await
        .expect_err("reserved key");
    assert_eq!(violated_fields(&stolen), ["request_id"]);
    // Nobody confirms or releases as an erased customer's pseudonym.
    let pseudonym = format!("erased:{}", "ab".repeat(32));
    let as_pseudonym = confirm(
        &stack,
        booking::ConfirmHoldRequest {
            customer_id: pseudonym.clone(),
            ..confirm_request(&held, "Ana")
        },
    )
    .await
    .expect_err("pseudonym");
    assert_eq!(violated_fields(&as_pseudonym), ["customer_id"]);
    let release = stack
        .booking
        .clone()
        .release_hold(booking::ReleaseHoldRequest {
            hold_id: held.hold_id.clone(),
            customer_id: pseudonym,
        })
        .await
        .expect_err("pseudonym");
    assert_eq!(violated_fields(&release), ["customer_id"]);
    // The hold is still confirmable by its customer.
    confirm(&stack, confirm_request(&held, "Ana"))
        .await
        .expect("confirmed");
    stack.shutdown().await;
}
