//! Booking rules: no cancelling once the slot has started, a conversation
//! belongs to one customer, follow-up dates in the slot's time zone, and
//! customer names rendered as written.

use std::time::Duration;

use chrono::{Datelike, TimeZone};
use futures::future::join_all;
use maitre_api::booking::v1::{self as booking, FollowUpState};
use maitre_runtime::fields::to_timestamp;
use tonic::Code;

use crate::stack::{Stack, reason, spawn_stack_with};

fn no_delivery(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
}

/// Everything a refused booking or cancel could have changed.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct State {
    booked_seats: i64,
    bookings: i64,
    confirmed: i64,
    pending_payments: i64,
    pending_follow_ups: i64,
    jobs: i64,
    conversation_owners: i64,
}

async fn state(stack: &Stack) -> State {
    sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(booked), 0)::bigint FROM booking.slots) AS booked_seats, \
                (SELECT count(*) FROM booking.bookings) AS bookings, \
                (SELECT count(*) FROM booking.bookings WHERE state = 1) AS confirmed, \
                (SELECT count(*) FROM booking.payments WHERE state = 1) AS pending_payments, \
                (SELECT count(*) FROM booking.scheduled_followups WHERE state = 1) \
                   AS pending_follow_ups, \
                (SELECT count(*) FROM apalis.jobs) AS jobs, \
                (SELECT count(*) FROM booking.conversation_owners) AS conversation_owners",
    )
    .fetch_one(&stack.db)
    .await
    .expect("state")
}

async fn cancel(
    stack: &Stack,
    booking_id: &str,
) -> Result<booking::CancelBookingResponse, tonic::Status> {
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: booking_id.into(),
            reason: "too late".into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn cancelling_after_the_slot_started_is_refused_and_changes_nothing() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_secs(3600), 6)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "lena", "", 2))
        .await
        .expect("booked");
    // Cancelled before the start: allowed, and again after it: harmless.
    let early = stack
        .book(Stack::booking_request(&slot, "mo", "", 1))
        .await
        .expect("booked");
    cancel(&stack, &early.booking_id)
        .await
        .expect("cancelled in time");
    stack.plan_early(&booked.booking_id).await;
    stack
        .wait_follow_up(&booked.booking_id, "planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;
    let start = slot.start_time.expect("start");
    let wait = (start.seconds - chrono::Utc::now().timestamp() + 1).max(0);
    tokio::time::sleep(Duration::from_secs(wait as u64)).await;

    let before = state(&stack).await;
    let status = cancel(&stack, &booked.booking_id)
        .await
        .expect_err("started");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "SLOT_STARTED");
    assert_eq!(state(&stack).await, before, "nothing changed");
    let kept = stack
        .booking
        .clone()
        .get_booking(booking::GetBookingRequest {
            booking_id: booked.booking_id.clone(),
        })
        .await
        .expect("booking")
        .into_inner()
        .booking
        .expect("booking");
    assert_eq!(
        kept, booked,
        "still confirmed, deposit pending, no cancel time"
    );
    assert_eq!(
        stack.follow_ups(&booked.booking_id).await[0].state,
        FollowUpState::Pending as i32,
        "its follow-up still due"
    );
    let again = cancel(&stack, &early.booking_id)
        .await
        .expect("an earlier cancellation repeated");
    assert_eq!(again.follow_ups_cancelled, 0);
    assert_eq!(state(&stack).await, before);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_conversation_belongs_to_the_customer_who_first_booked_with_it() {
    let stack = spawn_stack_with(no_delivery).await;
    let hour = Duration::from_secs(3600);
    let slot = stack.slot(hour, hour, 20).await;
    let conversation = stack.conversation("amy", &[(-0.9, "anger")]).await;
    let amys = stack
        .book(Stack::booking_request(&slot, "amy", &conversation, 1))
        .await
        .expect("amy books with her conversation");

    let before = state(&stack).await;
    let status = stack
        .book(Stack::booking_request(&slot, "bea", &conversation, 2))
        .await
        .expect_err("bea with amy's conversation");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "CONVERSATION_BELONGS_TO_ANOTHER_CUSTOMER");
    assert!(!status.message().contains("amy"), "names no other customer");
    assert_eq!(state(&stack).await, before, "nothing written");

    // amy may use it again; after her booking is cancelled it is still hers.
    stack
        .book(Stack::booking_request(&slot, "amy", &conversation, 1))
        .await
        .expect("amy again");
    cancel(&stack, &amys.booking_id).await.expect("cancelled");
    let status = stack
        .book(Stack::booking_request(&slot, "bea", &conversation, 2))
        .await
        .expect_err("still amy's");
    assert_eq!(reason(&status), "CONVERSATION_BELONGS_TO_ANOTHER_CUSTOMER");
    // bea's own conversation and no conversation are fine.
    let beas = stack.conversation("bea", &[(0.2, "calm")]).await;
    stack
        .book(Stack::booking_request(&slot, "bea", &beas, 1))
        .await
        .expect("bea with hers");
    stack
        .book(Stack::booking_request(&slot, "bea", "", 1))
        .await
        .expect("bea without one");
    stack.shutdown().await;
}

/// Eight customers' first bookings of one unseen conversation, all at once:
/// exactly one customer gets it; the others' statements fail whole.
#[tokio::test]
async fn racing_first_bookings_of_one_conversation_leave_one_owner() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 100)
        .await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let calls = (0..16).map(|i| {
        let request = Stack::booking_request(&slot, &format!("racer{}", i % 8), &conversation, 1);
        let stack = &stack;
        async move { (request.customer_id.clone(), stack.book(request).await) }
    });
    let results = join_all(calls).await;
    let mut owners = std::collections::HashSet::new();
    let mut booked = 0;
    for (customer, result) in &results {
        match result {
            Ok(_) => {
                owners.insert(customer.clone());
                booked += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(status), "CONVERSATION_BELONGS_TO_ANOTHER_CUSTOMER");
            }
        }
    }
    assert_eq!(owners.len(), 1, "{owners:?}");
    let owner = owners.into_iter().next().expect("owner");
    let (bookings, seats, stored_owner): (i64, i32, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM booking.bookings), (SELECT booked FROM booking.slots), \
                (SELECT customer_id FROM booking.conversation_owners)",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert_eq!(
        (bookings, seats, stored_owner),
        (booked, booked as i32, owner)
    );
    stack.shutdown().await;
}

/// The first 01:00 UTC on a 4 December at least a day away: 20:00 on the
/// 3rd in New York (2026-12-04T01:00Z is Friday in UTC, Thursday there).
fn next_december_4th_0100_utc() -> chrono::DateTime<chrono::Utc> {
    let soon = chrono::Utc::now() + chrono::Duration::days(1);
    let mut year = soon.year();
    loop {
        let at = chrono::Utc
            .with_ymd_and_hms(year, 12, 4, 1, 0, 0)
            .single()
            .expect("a date");
        if at > soon {
            return at;
        }
        year += 1;
    }
}

#[tokio::test]
async fn follow_ups_date_the_event_where_it_happens() {
    let stack = spawn_stack_with(no_delivery).await;
    let start = next_december_4th_0100_utc();
    let mut slots = Vec::new();
    for zone in ["America/New_York", "", "Asia/Tokyo"] {
        let slot = stack
            .booking
            .clone()
            .create_slot(booking::CreateSlotRequest {
                start_time: Some(to_timestamp(start)),
                end_time: Some(to_timestamp(start + chrono::Duration::hours(2))),
                capacity: 4,
                label: "Dinner".into(),
                request_id: String::new(),
                time_zone: zone.into(),
            })
            .await
            .expect("slot")
            .into_inner()
            .slot
            .expect("slot");
        slots.push(slot);
    }
    assert_eq!(slots[0].time_zone, "America/New_York");
    assert_eq!(slots[1].time_zone, "UTC");
    let local_day = |day: u32| {
        chrono::NaiveDate::from_ymd_opt(start.year(), 12, day)
            .expect("date")
            .format("%A %-d %B %Y")
            .to_string()
    };
    for (slot, expected) in [
        (&slots[0], local_day(3)),
        (&slots[1], local_day(4)),
        (&slots[2], local_day(4)),
    ] {
        let booked = stack
            .book(Stack::booking_request(slot, "nora", "", 2))
            .await
            .expect("booked");
        assert_eq!(
            booked.slot_start_time, slot.start_time,
            "an instant, in UTC"
        );
        stack.plan_early(&booked.booking_id).await;
        let planned = stack
            .wait_follow_up(&booked.booking_id, "planned", |f| {
                f.trigger == "post_event" && f.state == FollowUpState::Pending as i32
            })
            .await;
        assert!(
            planned.rendered_text.contains(&expected),
            "{}: {} lacks {expected}",
            slot.time_zone,
            planned.rendered_text
        );
    }
    if start.year() == 2026 {
        assert_eq!(local_day(3), "Thursday 3 December 2026");
    }
    stack.shutdown().await;
}

#[tokio::test]
async fn hostile_customer_names_are_rendered_as_written() {
    let stack = spawn_stack_with(no_delivery).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 20)
        .await;
    let braces = "{}".repeat(100);
    let names = [
        "{slot_label}",
        "{event_date}",
        "{{customer_name}}",
        "{party_size}{customer_name}",
        braces.as_str(),
    ];
    for (i, name) in names.iter().enumerate() {
        let mut request = Stack::booking_request(&slot, &format!("h{i}"), "", 1);
        request.customer_name = (*name).into();
        let booked = stack.book(request).await.expect(name);
        assert_eq!(booked.customer_name, *name);
        stack.plan_early(&booked.booking_id).await;
        let planned = stack
            .wait_follow_up(&booked.booking_id, "planned", |f| {
                f.state == FollowUpState::Pending as i32
            })
            .await;
        assert!(
            planned.rendered_text.starts_with(&format!("Hi {name}, ")),
            "{name}: {}",
            planned.rendered_text
        );
        assert!(
            !planned.rendered_text.contains("{event_date}") || name.contains("{event_date}"),
            "{}",
            planned.rendered_text
        );
    }
    stack.shutdown().await;
}
