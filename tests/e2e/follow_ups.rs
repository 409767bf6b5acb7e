use std::time::Duration;

use maitre_api::booking::v1::{self as booking, FollowUpState};

use crate::stack::{Stack, planned_follow_up, spawn_stack, spawn_stack_with};

/// Stores the history, books, waits for delivery; returns the sent follow-up.
async fn journey(
    stack: &Stack,
    customer: &str,
    scores: &[(f64, &str)],
) -> (String, booking::FollowUp) {
    let conversation = stack.conversation(customer, scores).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 10)
        .await;
    let started = std::time::Instant::now();
    let confirmed = stack
        .book(Stack::booking_request(&slot, customer, &conversation, 2))
        .await
        .expect("booked");
    assert_eq!(confirmed.state, booking::BookingState::Confirmed as i32);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "confirmed at once, not after planning"
    );

    let sent = stack
        .wait_follow_up(&confirmed.booking_id, "the follow-up to be SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    (conversation, sent)
}

async fn assert_delivered_once(stack: &Stack, conversation: &str, sent: &booking::FollowUp) {
    let delivered = stack.assistant_messages(conversation).await;
    assert_eq!(
        delivered.len(),
        1,
        "exactly one follow-up message: {delivered:?}"
    );
    assert_eq!(delivered[0].message_id, sent.message_id);
    assert_eq!(delivered[0].content, sent.rendered_text);
    assert_eq!(delivered[0].request_id, sent.follow_up_id);
    assert_eq!(sent.attempts, 1);
    assert!(sent.last_error.is_empty());
}

#[tokio::test]
async fn an_unhappy_customer_gets_a_service_recovery_message_once() {
    let stack = spawn_stack().await;
    let (conversation, sent) = journey(
        &stack,
        "ana",
        &[(-0.6, "anger"), (-0.8, "frustration"), (-0.2, "sadness")],
    )
    .await;
    assert_eq!(sent.template_key, "service_recovery");
    assert!(
        sent.rendered_text.contains("Customer ana"),
        "{}",
        sent.rendered_text
    );
    assert!(
        sent.rendered_text.contains("Chef's table"),
        "{}",
        sent.rendered_text
    );
    assert_delivered_once(&stack, &conversation, &sent).await;
    // One job per booking: it planned and delivered; no deliver job was made.
    // (The job is acknowledged after its run returns: wait for that.)
    maitre_runtime::testkit::wait_for("the follow-up job done", crate::stack::WITHIN, || async {
        (stack.jobs(booking_service::jobs::PLAN_QUEUE, "Done").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        stack.jobs_total(booking_service::jobs::DELIVER_QUEUE).await,
        0
    );
    // The job is done; waiting longer changes nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stack.assistant_messages(&conversation).await.len(), 1);
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_happy_customer_gets_a_review_request_once() {
    let stack = spawn_stack().await;
    let (conversation, sent) = journey(&stack, "ben", &[(0.7, "joy"), (0.9, "delight")]).await;
    assert_eq!(sent.template_key, "review_request");
    assert!(
        sent.rendered_text.contains("party of 2"),
        "{}",
        sent.rendered_text
    );
    assert_delivered_once(&stack, &conversation, &sent).await;
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_neutral_customer_gets_a_thank_you_once() {
    let stack = spawn_stack().await;
    let (conversation, sent) = journey(&stack, "cleo", &[(0.1, "calm"), (-0.05, "neutral")]).await;
    assert_eq!(sent.template_key, "thank_you");
    assert_delivered_once(&stack, &conversation, &sent).await;
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn a_booking_without_conversation_gets_a_thank_you_in_a_new_conversation() {
    let stack = spawn_stack().await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 10)
        .await;
    let confirmed = stack
        .book(Stack::booking_request(&slot, "dora", "", 1))
        .await
        .expect("booked");
    let sent = stack
        .wait_follow_up(&confirmed.booking_id, "SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    assert_eq!(sent.template_key, "thank_you");
    let conversations = stack
        .memory
        .clone()
        .list_conversations(maitre_api::memory::v1::ListConversationsRequest {
            user_id: "dora".into(),
            ..Default::default()
        })
        .await
        .expect("conversations")
        .into_inner()
        .conversations;
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0].message_count, 1);
    stack.shutdown().await;
}

#[tokio::test]
async fn cancelling_before_delivery_stores_no_message_and_returns_the_seats() {
    let stack = spawn_stack().await;
    let conversation = stack.conversation("eli", &[(-0.5, "anger")]).await;
    let slot = stack
        .slot(Duration::from_secs(2), Duration::from_secs(1), 10)
        .await;
    let confirmed = stack
        .book(Stack::booking_request(&slot, "eli", &conversation, 3))
        .await
        .expect("booked");
    // Planned ahead of the event (as when the sweep re-runs a stranded job):
    // a PENDING follow-up with its deliver job, which the cancel must stop.
    stack.plan_early(&confirmed.booking_id).await;
    stack
        .wait_follow_up(&confirmed.booking_id, "the follow-up to be planned", |f| {
            f.state == FollowUpState::Pending as i32
        })
        .await;

    let cancelled = stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: confirmed.booking_id.clone(),
            reason: "plans changed".into(),
        })
        .await
        .expect("cancelled")
        .into_inner();
    assert_eq!(cancelled.follow_ups_cancelled, 1);
    assert_eq!(
        cancelled.booking.expect("booking").state,
        booking::BookingState::Cancelled as i32
    );

    // Let the deliver job come due and run: it must find the follow-up cancelled.
    let deliver_done = || async {
        (stack
            .jobs(booking_service::jobs::DELIVER_QUEUE, "Done")
            .await
            >= 1)
            .then_some(())
    };
    maitre_runtime::testkit::wait_for("the deliver job to run", crate::stack::WITHIN, deliver_done)
        .await;
    assert!(
        stack.assistant_messages(&conversation).await.is_empty(),
        "no follow-up may be stored"
    );
    let follow_ups = stack.follow_ups(&confirmed.booking_id).await;
    assert_eq!(follow_ups.len(), 1);
    assert_eq!(follow_ups[0].state, FollowUpState::Cancelled as i32);

    let slot_now = stack
        .booking
        .clone()
        .list_availability(booking::ListAvailabilityRequest {
            start_time: slot.start_time,
            end_time: slot.end_time,
            ..Default::default()
        })
        .await
        .expect("availability")
        .into_inner()
        .slots;
    assert_eq!(slot_now[0].available_seats, 10, "seats came back");
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

#[tokio::test]
async fn cancelling_before_planning_plans_nothing() {
    // Workers off while booking and cancelling, so the plan job surely runs after the cancel.
    let mut stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let conversation = stack.conversation("fin", &[(0.5, "joy")]).await;
    let slot = stack
        .slot(Duration::from_secs(1), Duration::from_secs(1), 5)
        .await;
    let confirmed = stack
        .book(Stack::booking_request(&slot, "fin", &conversation, 1))
        .await
        .expect("booked");
    stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: confirmed.booking_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancelled");
    assert_eq!(
        stack
            .jobs(booking_service::jobs::PLAN_QUEUE, "Pending")
            .await,
        1,
        "the plan job waits in the queue"
    );

    // Now a worker process comes up and runs the plan job.
    stack.add_booking_service(|_| {}).await;
    let plan_done = || async {
        (stack.jobs(booking_service::jobs::PLAN_QUEUE, "Done").await == 1).then_some(())
    };
    maitre_runtime::testkit::wait_for("the plan job to run", crate::stack::WITHIN, plan_done).await;
    assert!(
        stack.follow_ups(&confirmed.booking_id).await.is_empty(),
        "a cancelled booking gets no follow-up"
    );
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

/// A plan run inserting its follow-up while a cancel of the booking is in
/// flight (its transaction not yet committed): the run waits for the cancel
/// and plans nothing. Reading the booking without a lock, it used to see it
/// confirmed and insert a PENDING follow-up the cancel could not see, left
/// PENDING on a cancelled booking for ever.
#[tokio::test]
async fn planning_waits_for_a_cancel_in_flight_and_plans_nothing() {
    let stack = spawn_stack_with(|s| s.disable_workers = true).await;
    let slot = stack
        .slot(Duration::from_secs(3600), Duration::from_secs(3600), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&slot, "vera", "", 1))
        .await
        .expect("booked");
    let booking_id: uuid::Uuid = booked.booking_id.parse().expect("uuid");

    // What CancelBooking does to the booking row, not yet committed.
    let mut cancel = stack.db.begin().await.expect("begin");
    sqlx::query(
        "UPDATE booking.bookings SET state = 2, cancelled_at = now() WHERE id = $1 AND state = 1",
    )
    .bind(booking_id)
    .execute(&mut *cancel)
    .await
    .expect("cancel in flight");

    let follow_up = planned_follow_up(&booked, "Vera");
    let planning = tokio::spawn({
        let pool = stack.db.clone();
        async move {
            let mut conn = pool.acquire().await.expect("connection");
            booking_service::store::followups::insert_planned(
                &mut conn,
                &follow_up,
                chrono::Utc::now(),
                None,
            )
            .await
            .expect("planning statement")
        }
    });
    stack.blocked_on_locks(1).await;
    cancel.commit().await.expect("commit the cancel");

    assert_eq!(
        planning.await.expect("join"),
        None,
        "nothing planned for a booking cancelled meanwhile"
    );
    assert!(
        stack.follow_ups(&booked.booking_id).await.is_empty(),
        "no follow-up on the cancelled booking"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn the_wording_follows_the_history_as_it_is_when_the_event_ends() {
    let stack = spawn_stack().await;
    // Happy when booking...
    let conversation = stack
        .conversation("gus", &[(0.7, "joy"), (0.9, "delight")])
        .await;
    let slot = stack
        .slot(Duration::from_secs(4), Duration::from_secs(1), 10)
        .await;
    let confirmed = stack
        .book(Stack::booking_request(&slot, "gus", &conversation, 2))
        .await
        .expect("booked");
    // ...unhappy by the end of the event: nothing is planned before it ends.
    assert!(stack.follow_ups(&confirmed.booking_id).await.is_empty());
    stack
        .add_messages(
            &conversation,
            "gus",
            &[
                (-0.9, "anger"),
                (-0.9, "anger"),
                (-0.9, "frustration"),
                (-0.9, "anger"),
            ],
        )
        .await;
    assert!(
        stack.follow_ups(&confirmed.booking_id).await.is_empty(),
        "planned before the event ended"
    );
    let sent = stack
        .wait_follow_up(&confirmed.booking_id, "SENT", |f| {
            f.state == FollowUpState::Sent as i32
        })
        .await;
    assert_eq!(
        sent.template_key, "service_recovery",
        "chosen from the newest history"
    );
    let end = slot.end_time.expect("end");
    let planned = sent.create_time.expect("created");
    assert!(
        (planned.seconds, planned.nanos) >= (end.seconds, end.nanos),
        "planned at {planned:?}, before the event ended at {end:?}"
    );
    assert_delivered_once(&stack, &conversation, &sent).await;
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}
