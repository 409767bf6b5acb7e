//! Pre-event reminders: written with the booking when the event is further
//! ahead than BOOKING_REMINDER_LEAD, sent that long before it starts,
//! cancelled and moved with the booking.

use std::time::Duration;

use maitre_api::booking::v1 as booking;
use maitre_runtime::{fields::to_timestamp, testkit::wait_for};

use crate::stack::{Stack, WITHIN, quick, spawn_stack_with};

const PRE_EVENT: &str = "pre_event";

/// Follow-ups at once after the event, reminders an hour before it.
fn quick_with_an_hours_lead(s: &mut booking_service::config::Settings) {
    quick(s);
    s.reminder_lead = Duration::from_secs(3600);
}

/// Reminders an hour before the event, follow-ups not before an hour after
/// it (nothing is delivered while the test runs).
fn reminders_an_hour_ahead_no_delivery(s: &mut booking_service::config::Settings) {
    s.followup_delay = Duration::from_secs(3600);
    s.reminder_lead = Duration::from_secs(3600);
}

fn reminders(follow_ups: &[booking::FollowUp]) -> Vec<&booking::FollowUp> {
    follow_ups
        .iter()
        .filter(|f| f.trigger == PRE_EVENT)
        .collect()
}

/// The reminder row of a booking: (state, scheduled_at, last_error), and
/// its deliver job's run_at if one is pending.
async fn reminder_row(
    stack: &Stack,
    booking_id: &str,
) -> Vec<(
    i16,
    chrono::DateTime<chrono::Utc>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
)> {
    sqlx::query_as(
        "SELECT f.state, f.scheduled_at, f.last_error, \
                (SELECT j.run_at FROM apalis.jobs j WHERE j.job_type = 'maitre.followup.deliver' \
                   AND j.idempotency_key = f.id::text || '/1' AND j.status = 'Pending') \
         FROM booking.scheduled_followups f \
         WHERE f.booking_id = $1::uuid AND f.trigger = 'pre_event' ORDER BY f.created_at, f.id",
    )
    .bind(booking_id)
    .fetch_all(&stack.db)
    .await
    .expect("reminders")
}

fn start_of(slot: &booking::Slot) -> chrono::DateTime<chrono::Utc> {
    let start = slot.start_time.expect("start");
    chrono::DateTime::from_timestamp(start.seconds, start.nanos as u32).expect("time")
}

async fn labelled_slot(stack: &Stack, starts_in: Duration, label: &str) -> booking::Slot {
    let start = chrono::Utc::now() + chrono::Duration::from_std(starts_in).expect("duration");
    stack
        .booking
        .clone()
        .create_slot(booking::CreateSlotRequest {
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(start + chrono::Duration::seconds(1))),
            capacity: 10,
            label: label.into(),
            request_id: String::new(),
            time_zone: "Europe/Paris".into(),
        })
        .await
        .expect("slot")
        .into_inner()
        .slot
        .expect("slot")
}

/// Makes a booking's PENDING reminder due now, with its deliver job: what
/// the clock does when the lead time before the event is reached.
async fn remind_now(stack: &Stack, booking_id: &str) {
    let moved = sqlx::query(
        "WITH r AS ( \
             UPDATE booking.scheduled_followups SET scheduled_at = now() \
             WHERE booking_id = $1::uuid AND trigger = 'pre_event' AND state = 1 \
             RETURNING id, attempts) \
         UPDATE apalis.jobs j SET run_at = now() FROM r \
         WHERE j.job_type = 'maitre.followup.deliver' \
           AND j.idempotency_key = r.id::text || '/' || (r.attempts + 1) AND j.status = 'Pending'",
    )
    .bind(booking_id)
    .execute(&stack.db)
    .await
    .expect("reminder due");
    assert_eq!(
        moved.rows_affected(),
        1,
        "one pending reminder with its job"
    );
}

/// The whole path: a booking for tomorrow gets its reminder when the lead
/// time is reached (made due now here), worded with the event in the
/// slot's zone, and its follow-up after the event, both stored in the
/// customer's conversation, in that order.
#[tokio::test]
async fn a_reminder_is_sent_before_the_event_and_the_follow_up_after_it() {
    let stack = spawn_stack_with(quick_with_an_hours_lead).await;
    let conversation = stack.conversation("ana", &[(0.7, "joy")]).await;
    let slot = labelled_slot(&stack, Duration::from_secs(86_400), "the rooftop").await;
    let booked = stack
        .book(Stack::booking_request(&slot, "ana", &conversation, 2))
        .await
        .expect("booked");
    let rows = reminder_row(&stack, &booked.booking_id).await;
    let expected = start_of(&slot) - chrono::Duration::hours(1);
    assert_eq!(
        rows[0].1.timestamp(),
        expected.timestamp(),
        "due the lead before the start"
    );

    remind_now(&stack, &booked.booking_id).await;
    let reminder = stack
        .wait_follow_up(&booked.booking_id, "the reminder sent", |f| {
            f.trigger == PRE_EVENT && f.state == booking::FollowUpState::Sent as i32
        })
        .await;
    assert_eq!(reminder.template_key, "event_reminder");
    assert!(
        reminder.rendered_text.contains("the rooftop"),
        "{}",
        reminder.rendered_text
    );
    assert!(
        reminder.rendered_text.contains("Customer ana"),
        "{}",
        reminder.rendered_text
    );
    // The time is the event's, in the slot's zone.
    let paris = start_of(&slot).with_timezone(&chrono_tz::Europe::Paris);
    assert!(
        reminder
            .rendered_text
            .contains(&paris.format("%H:%M").to_string()),
        "{}",
        reminder.rendered_text
    );

    // The event happens (moved into the past here), and its follow-up comes.
    sqlx::query(
        "UPDATE booking.slots SET starts_at = now() - interval '2 hours', \
                                  ends_at = now() - interval '1 hour'",
    )
    .execute(&stack.db)
    .await
    .expect("the event is over");
    stack.plan_early(&booked.booking_id).await;
    stack
        .wait_follow_up(&booked.booking_id, "the follow-up sent", |f| {
            f.trigger == "post_event" && f.state == booking::FollowUpState::Sent as i32
        })
        .await;
    let stored = stack.assistant_messages(&conversation).await;
    assert_eq!(stored.len(), 2, "the reminder, then the follow-up");
    assert_eq!(stored[0].content, reminder.rendered_text);
    stack.shutdown().await;
}

/// A reminder whose event has started by the time it goes out (a retry, a
/// re-drive or the sweep running late) is cancelled, never sent.
#[tokio::test]
async fn a_reminder_is_never_sent_once_the_event_has_started() {
    let stack = spawn_stack_with(quick_with_an_hours_lead).await;
    let conversation = stack.conversation("ana", &[(0.7, "joy")]).await;
    let slot = labelled_slot(&stack, Duration::from_secs(86_400), "the rooftop").await;
    let booked = stack
        .book(Stack::booking_request(&slot, "ana", &conversation, 2))
        .await
        .expect("booked");
    sqlx::query("UPDATE booking.slots SET starts_at = now() - interval '1 minute'")
        .execute(&stack.db)
        .await
        .expect("started");
    remind_now(&stack, &booked.booking_id).await;
    let cancelled = stack
        .wait_follow_up(&booked.booking_id, "the reminder cancelled", |f| {
            f.trigger == PRE_EVENT && f.state == booking::FollowUpState::Cancelled as i32
        })
        .await;
    assert!(
        cancelled.last_error.starts_with("REMINDER_TOO_LATE"),
        "{}",
        cancelled.last_error
    );
    assert!(stack.assistant_messages(&conversation).await.is_empty());
    stack.shutdown().await;
}

#[tokio::test]
async fn a_booking_inside_the_lead_gets_no_reminder() {
    let stack = spawn_stack_with(reminders_an_hour_ahead_no_delivery).await;
    let soon = stack
        .slot(Duration::from_secs(1800), Duration::from_secs(3600), 4)
        .await;
    let later = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(3600), 4)
        .await;
    let inside = stack
        .book(Stack::booking_request(&soon, "ana", "", 1))
        .await
        .expect("booked");
    let outside = stack
        .book(Stack::booking_request(&later, "bea", "", 1))
        .await
        .expect("booked");

    assert!(reminder_row(&stack, &inside.booking_id).await.is_empty());
    let rows = reminder_row(&stack, &outside.booking_id).await;
    assert_eq!(rows.len(), 1);
    let (state, due, _, job) = &rows[0];
    assert_eq!(*state, 1, "PENDING");
    let expected = start_of(&later) - chrono::Duration::hours(1);
    assert_eq!(due.timestamp(), expected.timestamp());
    assert_eq!(
        job.as_ref().map(|j| j.timestamp()),
        Some(expected.timestamp()),
        "its deliver job is due then"
    );
    let listed = stack.follow_ups(&outside.booking_id).await;
    let listed = reminders(&listed);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].rendered_text, "", "worded when it is sent");
    stack.shutdown().await;
}

#[tokio::test]
async fn without_a_lead_there_are_no_reminders() {
    let stack = spawn_stack_with(|s| {
        s.followup_delay = Duration::from_secs(3600);
        s.reminder_lead = Duration::ZERO;
    })
    .await;
    let later = stack
        .slot(
            Duration::from_secs(7 * 86_400),
            Duration::from_secs(3600),
            4,
        )
        .await;
    let booked = stack
        .book(Stack::booking_request(&later, "ana", "", 1))
        .await
        .expect("booked");
    assert!(reminder_row(&stack, &booked.booking_id).await.is_empty());
    stack.shutdown().await;
}

/// A cancelled booking's reminder is cancelled with it, and its deliver job,
/// run anyway, delivers nothing.
#[tokio::test]
async fn a_cancelled_bookings_reminder_is_never_sent() {
    let stack = spawn_stack_with(quick_with_an_hours_lead).await;
    let conversation = stack.conversation("ana", &[(0.1, "calm")]).await;
    let later = stack
        .slot(Duration::from_secs(7200), Duration::from_secs(3600), 4)
        .await;
    let booked = stack
        .book(Stack::booking_request(&later, "ana", &conversation, 1))
        .await
        .expect("booked");
    let cancelled = stack
        .booking
        .clone()
        .cancel_booking(booking::CancelBookingRequest {
            booking_id: booked.booking_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancelled")
        .into_inner();
    assert_eq!(cancelled.follow_ups_cancelled, 1, "the reminder");
    let rows = reminder_row(&stack, &booked.booking_id).await;
    assert_eq!(rows[0].0, 3, "CANCELLED");

    // Its job comes due now: it runs, finds the reminder cancelled, and stops.
    sqlx::query(
        "UPDATE apalis.jobs SET run_at = now() WHERE job_type = 'maitre.followup.deliver' \
         AND status = 'Pending'",
    )
    .execute(&stack.db)
    .await
    .expect("due now");
    wait_for("the reminder's job to have run", WITHIN, || async {
        (stack
            .jobs(booking_service::jobs::DELIVER_QUEUE, "Done")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert!(stack.assistant_messages(&conversation).await.is_empty());
    stack.shutdown().await;
}

/// A move reschedules the reminder to the new event, cancels it when the
/// new event is inside the lead, and gives a booking without one a new one
/// when the new event is far enough ahead.
#[tokio::test]
async fn a_reminder_moves_with_its_booking() {
    let stack = spawn_stack_with(reminders_an_hour_ahead_no_delivery).await;
    let hour = Duration::from_secs(3600);
    let first = stack.slot(hour * 3, hour, 4).await;
    let second = stack.slot(hour * 5, hour, 4).await;
    let soon = stack.slot(hour / 2, hour, 4).await;
    let last = stack.slot(hour * 8, hour, 4).await;
    let booked = stack
        .book(Stack::booking_request(&first, "ana", "", 1))
        .await
        .expect("booked");
    let move_to = |slot: &booking::Slot| booking::MoveBookingRequest {
        booking_id: booked.booking_id.clone(),
        slot_id: slot.slot_id.clone(),
        request_id: uuid::Uuid::now_v7().to_string(),
    };
    let mut client = stack.booking.clone();

    client.move_booking(move_to(&second)).await.expect("moved");
    let rows = reminder_row(&stack, &booked.booking_id).await;
    assert_eq!(rows.len(), 1);
    let expected = (start_of(&second) - chrono::Duration::hours(1)).timestamp();
    assert_eq!((rows[0].0, rows[0].1.timestamp()), (1, expected));
    assert_eq!(
        rows[0].3.map(|j| j.timestamp()),
        Some(expected),
        "its job moved too"
    );

    client.move_booking(move_to(&soon)).await.expect("moved");
    let rows = reminder_row(&stack, &booked.booking_id).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 3, "CANCELLED: the new event is inside the lead");
    assert!(
        rows[0]
            .2
            .as_deref()
            .unwrap_or_default()
            .starts_with("REMINDER_SKIPPED")
    );

    client.move_booking(move_to(&last)).await.expect("moved");
    let rows = reminder_row(&stack, &booked.booking_id).await;
    assert_eq!(rows.len(), 2, "the skipped one, and a new one");
    let expected = (start_of(&last) - chrono::Duration::hours(1)).timestamp();
    assert_eq!((rows[1].0, rows[1].1.timestamp()), (1, expected));
    assert_eq!(rows[1].3.map(|j| j.timestamp()), Some(expected));
    stack.shutdown().await;
}

/// The reminder is worded when it is sent: a booking moved after it was
/// made is reminded of its new event.
#[tokio::test]
async fn a_moved_bookings_reminder_names_the_new_event() {
    let stack = spawn_stack_with(quick_with_an_hours_lead).await;
    let conversation = stack.conversation("ana", &[(0.2, "calm")]).await;
    let first = labelled_slot(&stack, Duration::from_secs(86_400), "the old cellar").await;
    let second = labelled_slot(&stack, Duration::from_secs(2 * 86_400), "the garden").await;
    let booked = stack
        .book(Stack::booking_request(&first, "ana", &conversation, 1))
        .await
        .expect("booked");
    stack
        .booking
        .clone()
        .move_booking(booking::MoveBookingRequest {
            booking_id: booked.booking_id.clone(),
            slot_id: second.slot_id.clone(),
            request_id: "reschedule".into(),
        })
        .await
        .expect("moved");
    remind_now(&stack, &booked.booking_id).await;
    let reminder = stack
        .wait_follow_up(&booked.booking_id, "the reminder sent", |f| {
            f.trigger == PRE_EVENT && f.state == booking::FollowUpState::Sent as i32
        })
        .await;
    assert!(
        reminder.rendered_text.contains("the garden"),
        "{}",
        reminder.rendered_text
    );
    stack.shutdown().await;
}

/// Two moves of one booking at once (both waiting for it): the one that
/// goes second sees what the first did to the reminder, so the booking ends
/// with exactly one reminder, due the lead before the slot it ended in.
#[tokio::test]
async fn two_moves_at_once_leave_one_reminder_at_the_right_time() {
    let stack = spawn_stack_with(reminders_an_hour_ahead_no_delivery).await;
    let hour = Duration::from_secs(3600);
    // Booked inside the lead: no reminder yet; both moves go far enough ahead.
    let soon = stack.slot(hour / 2, hour, 4).await;
    let first = stack.slot(hour * 5, hour, 4).await;
    let second = stack.slot(hour * 9, hour, 4).await;
    let booked = stack
        .book(Stack::booking_request(&soon, "ana", "", 1))
        .await
        .expect("booked");
    assert!(reminder_row(&stack, &booked.booking_id).await.is_empty());

    // Something else holds the booking (as a third move would): both moves
    // queue behind it, then run one after the other.
    let mut tx = stack.db.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM booking.bookings WHERE id = $1::uuid FOR UPDATE")
        .bind(&booked.booking_id)
        .execute(&mut *tx)
        .await
        .expect("locked");
    let move_to = |slot: &booking::Slot| {
        let mut client = stack.booking.clone();
        let request = booking::MoveBookingRequest {
            booking_id: booked.booking_id.clone(),
            slot_id: slot.slot_id.clone(),
            request_id: uuid::Uuid::now_v7().to_string(),
        };
        async move { client.move_booking(request).await }
    };
    let release = async {
        stack.blocked_on_locks(2).await;
        tx.commit().await.expect("commit");
    };
    let (a, b, ()) = tokio::join!(move_to(&first), move_to(&second), release);
    a.expect("first move");
    b.expect("second move");

    let slot_id: String = sqlx::query_scalar("SELECT slot_id::text FROM booking.bookings")
        .fetch_one(&stack.db)
        .await
        .expect("slot");
    let ended_in = if slot_id == first.slot_id {
        &first
    } else {
        &second
    };
    let live: Vec<_> = reminder_row(&stack, &booked.booking_id)
        .await
        .into_iter()
        .filter(|(state, ..)| *state == 1)
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    let expected = (start_of(ended_in) - chrono::Duration::hours(1)).timestamp();
    assert_eq!(
        live[0].1.timestamp(),
        expected,
        "due the lead before the slot it ended in"
    );
    assert_eq!(
        live[0].3.map(|j| j.timestamp()),
        Some(expected),
        "and its job with it"
    );
    stack.shutdown().await;
}
