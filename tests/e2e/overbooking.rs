use std::{collections::HashSet, time::Duration};

use futures::future::join_all;
use maitre_api::booking::v1 as booking;
use tonic::Code;

use crate::stack::{Stack, reason, spawn_stack_with};

#[tokio::test]
async fn three_hundred_concurrent_bookings_never_oversell_forty_seats() {
    let stack = spawn_stack_with(|s| {
        s.followup_delay = Duration::from_secs(3600);
        // All 300 at once, not shed: this test is about seats.
        s.server.max_concurrent_rpcs = 1000;
    })
    .await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 40)
        .await;

    let calls = (0..300).map(|i| {
        let request = Stack::booking_request(&slot, &format!("c{i}"), "", i % 4 + 1);
        let party = request.party_size;
        let stack = &stack;
        async move { (party, stack.book(request).await) }
    });
    let results = join_all(calls).await;

    let mut confirmed_seats = 0;
    let mut confirmed = 0;
    for (party, result) in &results {
        match result {
            Ok(b) => {
                assert_eq!(b.state, booking::BookingState::Confirmed as i32);
                confirmed_seats += party;
                confirmed += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(status), "SLOT_FULL");
            }
        }
    }
    let (booked, rows, seats_in_rows): (i32, i64, i64) = sqlx::query_as(
        "SELECT s.booked, (SELECT count(*) FROM booking.bookings), \
                (SELECT COALESCE(sum(party_size), 0) FROM booking.bookings WHERE state = 1) \
         FROM booking.slots s",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert!(confirmed_seats <= 40);
    assert_eq!(
        booked, confirmed_seats,
        "seats taken equal the confirmed party sizes"
    );
    assert_eq!(rows, confirmed);
    assert_eq!(seats_in_rows, i64::from(confirmed_seats));
    // With party sizes 1-4 the slot fills up to at least 37 before refusing.
    assert!(confirmed_seats >= 37, "only {confirmed_seats} seats sold");
    stack.shutdown().await;
}

#[tokio::test]
async fn concurrent_retries_with_one_request_id_make_one_booking() {
    let stack = spawn_stack_with(|s| s.followup_delay = Duration::from_secs(3600)).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 10)
        .await;
    let request = Stack::booking_request(&slot, "gil", "", 3);

    let results = join_all((0..25).map(|_| stack.book(request.clone()))).await;

    let ids: HashSet<String> = results
        .into_iter()
        .map(|r| r.expect("every retry answers").booking_id)
        .collect();
    assert_eq!(ids.len(), 1);
    let (bookings, booked, plan_jobs): (i64, i32, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM booking.bookings), (SELECT booked FROM booking.slots), \
                (SELECT count(*) FROM apalis.jobs WHERE job_type = 'maitre.followup.plan')",
    )
    .fetch_one(&stack.db)
    .await
    .expect("counts");
    assert_eq!((bookings, booked, plan_jobs), (1, 3, 1));
    stack.shutdown().await;
}
