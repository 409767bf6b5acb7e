//! Bad input on every RPC of both services, beyond what
//! `memory-service/tests/api/validation.rs` and `bookings.rs` already cover:
//! empty and oversized strings, malformed UUIDs, out-of-range numbers,
//! unknown enum values, absurd page sizes, page tokens from other queries,
//! timestamps far away or malformed. Each call must be INVALID_ARGUMENT
//! naming exactly the bad field, write nothing, and leave the service
//! serving.

use std::{future::Future, pin::Pin, time::Duration};

use booking_service::{domain::booking::FollowUpPage, jobs::PLAN_QUEUE};
use maitre_api::{
    booking::v1::{self as booking, list_follow_ups_request::Parent},
    memory::v1 as memory,
};
use maitre_runtime::{fields::to_timestamp, testkit::wait_for};
use prost_types::Timestamp;
use tonic::{Code, Status};

use crate::stack::{Stack, WITHIN, reason, spawn_stack_with, violated_fields};

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// One RPC on a cloned client, its answer dropped.
macro_rules! call {
    ($client:expr, $method:ident, $request:expr) => {{
        let mut client = $client.clone();
        let request = $request;
        Box::pin(async move { client.$method(request).await.map(|_| ()) }) as Call
    }};
}

/// What a case expects: the call, and the one field it must name.
struct Case {
    name: String,
    field: &'static str,
    call: Call,
}

fn case(name: impl Into<String>, field: &'static str, call: Call) -> Case {
    Case {
        name: name.into(),
        field,
        call,
    }
}

/// Follow-ups stay pending (no delivery during the test), so nothing moves
/// in the database while the bad calls run.
fn no_delivery(settings: &mut booking_service::config::Settings) {
    settings.followup_delay = Duration::from_secs(3600);
}

/// Every row count, and the state that an update could change.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Snapshot {
    slots: i64,
    booked_seats: i64,
    bookings: i64,
    cancelled_bookings: i64,
    payments: i64,
    follow_ups: i64,
    follow_ups_not_pending: i64,
    jobs: i64,
    conversation_owners: i64,
    conversations: i64,
    closed_conversations: i64,
    messages: i64,
    /// Conversation states and the sum of their versions.
    states: i64,
    state_versions: i64,
}

async fn snapshot(stack: &Stack) -> Snapshot {
    sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM booking.slots) AS slots, \
           (SELECT COALESCE(sum(booked), 0)::bigint FROM booking.slots) AS booked_seats, \
           (SELECT count(*) FROM booking.bookings) AS bookings, \
           (SELECT count(*) FROM booking.bookings WHERE state <> 1) AS cancelled_bookings, \
           (SELECT count(*) FROM booking.payments) AS payments, \
           (SELECT count(*) FROM booking.scheduled_followups) AS follow_ups, \
           (SELECT count(*) FROM booking.scheduled_followups WHERE state <> 1) \
              AS follow_ups_not_pending, \
           (SELECT count(*) FROM apalis.jobs) AS jobs, \
           (SELECT count(*) FROM booking.conversation_owners) AS conversation_owners, \
           (SELECT count(*) FROM memory.conversations) AS conversations, \
           (SELECT count(*) FROM memory.conversations WHERE closed_at IS NOT NULL) \
              AS closed_conversations, \
           (SELECT count(*) FROM memory.messages) AS messages, \
           (SELECT count(*) FROM memory.conversation_states) AS states, \
           (SELECT COALESCE(sum(version), 0)::bigint FROM memory.conversation_states) \
              AS state_versions",
    )
    .fetch_one(&stack.db)
    .await
    .expect("snapshot")
}

/// Data for the bad calls to aim at, and page tokens of real queries.
struct Fixture {
    /// ada's conversation: 3 messages, 2 bookings.
    conv_a: String,
    /// bob's conversation: 1 message, 1 booking.
    conv_b: String,
    /// ada's first booking.
    booking_x: String,
    /// bob's booking.
    booking_bob: String,
    slot: booking::Slot,
    /// The window the availability token was issued for.
    window: (Timestamp, Timestamp),
    /// ListMessages(conv_a, oldest first, 1 per page).
    messages_token: String,
    /// ListConversations(ada, active first, 1 per page).
    conversations_token: String,
    /// ListAvailability(window, any seat, 1 per page).
    availability_token: String,
    /// ListBookings(ada, 1 per page).
    bookings_token: String,
    /// ListFollowUps(conversation conv_a, 1 per page).
    follow_ups_token: String,
    /// A token ListFollowUps(booking_x) would issue.
    booking_x_token: String,
}

async fn fixture(stack: &Stack) -> Fixture {
    let conv_a = stack
        .conversation("ada", &[(-0.2, "sadness"), (0.1, "calm"), (0.4, "joy")])
        .await;
    let conv_a2 = stack.conversation("ada", &[(0.3, "joy")]).await;
    let conv_b = stack.conversation("bob", &[(0.5, "joy")]).await;
    assert_ne!(conv_a, conv_a2);

    let hour = Duration::from_secs(3600);
    let slot = stack.slot(hour, hour, 10).await;
    let _later = stack.slot(hour * 2, hour, 10).await;
    let mut bookings = Vec::new();
    for (customer, conversation) in [("ada", &conv_a), ("ada", &conv_a), ("bob", &conv_b)] {
        bookings.push(
            stack
                .book(Stack::booking_request(&slot, customer, conversation, 1))
                .await
                .expect("booked")
                .booking_id,
        );
    }
    // Let planning finish: every booking has its pending follow-up and no
    // plan job is left, so the database holds still from here on.
    for id in &bookings {
        stack.plan_early(id).await;
        stack
            .wait_follow_up(id, "a planned follow-up", |f| {
                f.state == booking::FollowUpState::Pending as i32
            })
            .await;
    }
    wait_for("all plan jobs done", WITHIN, || async {
        (stack.jobs(PLAN_QUEUE, "Done").await == 3).then_some(())
    })
    .await;

    let mut m = stack.memory.clone();
    let mut b = stack.booking.clone();
    let messages_token = m
        .list_messages(memory::ListMessagesRequest {
            conversation_id: conv_a.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("messages")
        .into_inner()
        .next_page_token;
    let conversations_token = m
        .list_conversations(memory::ListConversationsRequest {
            user_id: "ada".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("conversations")
        .into_inner()
        .next_page_token;
    let now = chrono::Utc::now();
    let window = (
        to_timestamp(now),
        to_timestamp(now + chrono::Duration::days(1)),
    );
    let availability_token = b
        .list_availability(booking::ListAvailabilityRequest {
            start_time: Some(window.0),
            end_time: Some(window.1),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("availability")
        .into_inner()
        .next_page_token;
    let bookings_token = b
        .list_bookings(booking::ListBookingsRequest {
            customer_id: "ada".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("bookings")
        .into_inner()
        .next_page_token;
    let follow_ups = b
        .list_follow_ups(booking::ListFollowUpsRequest {
            parent: Some(Parent::ConversationId(conv_a.clone())),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("follow-ups")
        .into_inner();
    let booking_x = bookings[0].clone();
    let booking_x_token = FollowUpPage {
        booking_id: Some(booking_x.parse().expect("uuid")),
        conversation_id: None,
        page_size: 1,
        after: None,
    }
    .next_token(follow_ups.follow_ups[0].follow_up_id.parse().expect("uuid"));
    let fixture = Fixture {
        conv_a,
        conv_b,
        booking_x,
        booking_bob: bookings[2].clone(),
        slot,
        window,
        messages_token,
        conversations_token,
        availability_token,
        bookings_token,
        follow_ups_token: follow_ups.next_page_token,
        booking_x_token,
    };
    for (name, token) in [
        ("messages", &fixture.messages_token),
        ("conversations", &fixture.conversations_token),
        ("availability", &fixture.availability_token),
        ("bookings", &fixture.bookings_token),
        ("follow-ups", &fixture.follow_ups_token),
    ] {
        assert!(!token.is_empty(), "the {name} query has a second page");
    }
    fixture
}

/// Runs every case: INVALID_ARGUMENT naming `field`, then `probe` (a valid
/// call) still works. Finally nothing was written.
async fn run(stack: &Stack, cases: Vec<Case>, probe: impl Fn() -> Call) {
    let before = snapshot(stack).await;
    let count = cases.len();
    let mut failures = Vec::new();
    for Case { name, field, call } in cases {
        match call.await {
            Ok(()) => failures.push(format!("{name}: accepted")),
            Err(status) => {
                let fields = violated_fields(&status);
                if status.code() != Code::InvalidArgument
                    || fields != [field]
                    || reason(&status) != "INVALID_ARGUMENT"
                {
                    failures.push(format!(
                        "{name}: expected INVALID_ARGUMENT naming [{field}], \
                         got {:?} {:?} naming {fields:?}",
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
        if let Err(status) = probe().await {
            failures.push(format!("after {name}: a valid call failed: {status:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases went wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(snapshot(stack).await, before, "bad calls wrote something");
}

/// A request past the server's size limit: RESOURCE_EXHAUSTED, as gRPC says.
fn assert_oversized(status: &Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
}

fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

fn in_hours(hours: i64) -> Option<Timestamp> {
    Some(to_timestamp(
        chrono::Utc::now() + chrono::Duration::hours(hours),
    ))
}

fn emotion(score: f64, label: &str, scores: &[(&str, f64)]) -> Option<memory::Emotion> {
    Some(memory::Emotion {
        score,
        label: label.into(),
        scores: scores.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    })
}

fn tool(id: &str, arguments_json: String) -> memory::ToolCall {
    memory::ToolCall {
        id: id.into(),
        name: "lookup".into(),
        arguments_json,
    }
}

const TEN_KB: usize = 10 * 1024;
/// A UUID with one non-hex digit.
const BAD_UUID: &str = "0192f0c1-7b2a-7cc3-9d4e-1a2b3c4d5e6g";
/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: valid timestamps, absurd dates.
const YEAR_1: i64 = -62_135_596_800;
const YEAR_9999: i64 = 253_402_300_799;

fn huge() -> String {
    "a".repeat(TEN_KB)
}

/// A case per bad variant of a valid request: `$base` edited by `|r| ...`.
macro_rules! variants {
    ($cases:ident, $client:expr, $method:ident, $rpc:literal, $base:expr;
     $($name:literal, $field:literal, |$r:ident| $edit:expr;)+) => {
        $({
            #[allow(unused_mut)]
            let mut $r = $base.clone();
            $edit;
            $cases.push(case(concat!($rpc, ": ", $name), $field, call!($client, $method, $r)));
        })+
    };
}

fn memory_cases(stack: &Stack, f: &Fixture) -> Vec<Case> {
    let m = &stack.memory;
    let mut cases = Vec::new();
    let store = memory::StoreMessageRequest {
        conversation_id: f.conv_a.clone(),
        user_id: "ada".into(),
        channel: "web".into(),
        role: memory::Role::User as i32,
        content: "hello again".into(),
        emotion: emotion(0.1, "calm", &[]),
        ..Default::default()
    };
    variants! { cases, m, store_message, "StoreMessage", store;
        "score +inf", "emotion.score", |r| r.emotion = emotion(f64::INFINITY, "joy", &[]);
        "score -inf", "emotion.score", |r| r.emotion = emotion(f64::NEG_INFINITY, "joy", &[]);
        "score -1.0001", "emotion.score", |r| r.emotion = emotion(-1.0001, "joy", &[]);
        "per-emotion score < 0", "emotion.scores",
            |r| r.emotion = emotion(0.1, "joy", &[("joy", -0.1)]);
        "per-emotion NaN", "emotion.scores",
            |r| r.emotion = emotion(0.1, "joy", &[("joy", f64::NAN)]);
        "per-emotion key not a label", "emotion.scores",
            |r| r.emotion = emotion(0.1, "joy", &[("Big Joy!", 0.5)]);
        "33 per-emotion scores", "emotion.scores", |r| {
            let many: Vec<(String, f64)> = (0..33).map(|i| (format!("e{i}"), 0.5)).collect();
            let scores = many.into_iter().collect();
            r.emotion = Some(memory::Emotion { score: 0.1, label: "joy".into(), scores })
        };
        "label with a space", "emotion.label", |r| r.emotion = emotion(0.1, "big joy", &[]);
        "label of 10 KB", "emotion.label", |r| r.emotion = emotion(0.1, &"j".repeat(TEN_KB), &[]);
        "label with NUL", "emotion.label", |r| r.emotion = emotion(0.1, "jo\0y", &[]);
        "conversation id with a non-hex digit", "conversation_id",
            |r| r.conversation_id = BAD_UUID.into();
        "conversation id of 10 KB", "conversation_id", |r| r.conversation_id = huge();
        "user id of 10 KB", "user_id", |r| r.user_id = huge();
        "user id with a newline", "user_id", |r| r.user_id = "ada\nbob".into();
        "user id with NUL", "user_id", |r| r.user_id = "ada\0".into();
        "channel with a tab", "channel", |r| r.channel = "we\tb".into();
        "channel of 10 KB", "channel", |r| r.channel = huge();
        "role -1", "role", |r| r.role = -1;
        "role i32::MAX", "role", |r| r.role = i32::MAX;
        "content of 100 KB", "content", |r| r.content = "x".repeat(100 << 10);
        "metadata with an empty key", "metadata",
            |r| r.metadata = [(String::new(), "v".into())].into();
        "metadata value with NUL", "metadata", |r| r.metadata = [("k".into(), "v\0".into())].into();
        "output tokens u32::MAX", "token_usage.output_tokens", |r| {
            r.token_usage = Some(memory::TokenUsage { input_tokens: 1, output_tokens: u32::MAX })
        };
        "65 tool calls", "tool_calls",
            |r| r.tool_calls = (0..65).map(|i| tool(&format!("t{i}"), "{}".into())).collect();
        "40 KB of tool arguments", "tool_results",
            |r| r.tool_calls = vec![tool("t", "x".repeat(40 << 10))];
        "request id with BEL", "request_id", |r| r.request_id = "req\u{7}".into();
        "request id of 10 KB", "request_id", |r| r.request_id = huge();
        "request id of 129 two-byte chars", "request_id", |r| r.request_id = "é".repeat(129);
    }
    let get = memory::GetConversationRequest {
        conversation_id: f.conv_a.clone(),
    };
    variants! { cases, m, get_conversation, "GetConversation", get;
        "empty id", "conversation_id", |r| r.conversation_id = String::new();
        "id of 10 KB", "conversation_id", |r| r.conversation_id = huge();
        "non-hex uuid", "conversation_id", |r| r.conversation_id = BAD_UUID.into();
    }
    let messages = memory::ListMessagesRequest {
        conversation_id: f.conv_a.clone(),
        page_size: 1,
        ..Default::default()
    };
    variants! { cases, m, list_messages, "ListMessages", messages;
        "empty conversation id", "conversation_id", |r| r.conversation_id = String::new();
        "page size 10^6", "page_size", |r| r.page_size = 1_000_000;
        "page size i32::MIN", "page_size", |r| r.page_size = i32::MIN;
        "order -1", "order", |r| r.order = -1;
        "token of another conversation", "page_token", |r| {
            r.conversation_id = f.conv_b.clone();
            r.page_token = f.messages_token.clone()
        };
        "token of the other order", "page_token", |r| {
            r.order = memory::SortOrder::NewestFirst as i32;
            r.page_token = f.messages_token.clone()
        };
        "token of ListConversations", "page_token",
            |r| r.page_token = f.conversations_token.clone();
        "token of ListBookings", "page_token", |r| r.page_token = f.bookings_token.clone();
        "token of 10 KB", "page_token", |r| r.page_token = "A".repeat(TEN_KB);
    }
    let history = memory::GetEmotionHistoryRequest {
        conversation_id: f.conv_a.clone(),
        limit: 5,
    };
    variants! { cases, m, get_emotion_history, "GetEmotionHistory", history;
        "empty conversation id", "conversation_id", |r| r.conversation_id = String::new();
        "limit -1", "limit", |r| r.limit = -1;
        "limit 10^6", "limit", |r| r.limit = 1_000_000;
    }
    let conversations = memory::ListConversationsRequest {
        user_id: "ada".into(),
        page_size: 1,
        ..Default::default()
    };
    variants! { cases, m, list_conversations, "ListConversations", conversations;
        "user id of 10 KB", "user_id", |r| r.user_id = huge();
        "user id with NUL", "user_id", |r| r.user_id = "ada\0".into();
        "filter -1", "filter", |r| r.filter = -1;
        "page size -1", "page_size", |r| r.page_size = -1;
        "page size 10^6", "page_size", |r| r.page_size = 1_000_000;
        "token of user ada used for bob", "page_token", |r| {
            r.user_id = "bob".into();
            r.page_token = f.conversations_token.clone()
        };
        "token of another filter", "page_token", |r| {
            r.filter = memory::ConversationFilter::ActiveOnly as i32;
            r.page_token = f.conversations_token.clone()
        };
        "token of ListMessages", "page_token", |r| r.page_token = f.messages_token.clone();
    }
    let close = memory::CloseConversationRequest {
        conversation_id: f.conv_a.clone(),
    };
    variants! { cases, m, close_conversation, "CloseConversation", close;
        "empty id", "conversation_id", |r| r.conversation_id = String::new();
        "id of 10 KB", "conversation_id", |r| r.conversation_id = huge();
        "non-hex uuid", "conversation_id", |r| r.conversation_id = BAD_UUID.into();
    }
    let state = memory::GetConversationStateRequest {
        conversation_id: f.conv_a.clone(),
    };
    variants! { cases, m, get_conversation_state, "GetConversationState", state;
        "empty id", "conversation_id", |r| r.conversation_id = String::new();
        "id of 10 KB", "conversation_id", |r| r.conversation_id = huge();
        "non-hex uuid", "conversation_id", |r| r.conversation_id = BAD_UUID.into();
    }
    use memory::update_conversation_state_request::Update;
    let update = memory::UpdateConversationStateRequest {
        conversation_id: f.conv_a.clone(),
        expected_version: 0,
        update: Some(Update::StateJson(r#"{"step": "menu"}"#.into())),
    };
    variants! { cases, m, update_conversation_state, "UpdateConversationState", update;
        "non-hex uuid", "conversation_id", |r| r.conversation_id = BAD_UUID.into();
        "expected version -1", "expected_version", |r| r.expected_version = -1;
        "expected version i64::MIN", "expected_version", |r| r.expected_version = i64::MIN;
        "no update", "update", |r| r.update = None;
        "a state that is an array", "state_json", |r| r.update = Some(Update::StateJson("[]".into()));
        "a state that is a string", "state_json", |r| r.update = Some(Update::StateJson("\"s\"".into()));
        "a state that is not JSON", "state_json", |r| r.update = Some(Update::StateJson("{'a': 1}".into()));
        "an empty state", "state_json", |r| r.update = Some(Update::StateJson(String::new()));
        "a state of 100 KB", "state_json",
            |r| r.update = Some(Update::StateJson(format!("{{\"a\": \"{}\"}}", "x".repeat(100 << 10))));
        "a state nested 1,000 deep", "state_json",
            |r| r.update = Some(Update::StateJson(format!("{{\"a\": {}{}}}", "[".repeat(1000), "]".repeat(1000))));
        "a state with \\u0000", "state_json",
            |r| r.update = Some(Update::StateJson(r#"{"a": "\u0000"}"#.into()));
        "a patch that is not JSON", "merge_patch_json",
            |r| r.update = Some(Update::MergePatchJson("{".into()));
        "a patch making the state an array", "merge_patch_json",
            |r| r.update = Some(Update::MergePatchJson("[1]".into()));
    }
    let context = memory::GetContextRequest {
        conversation_id: f.conv_a.clone(),
        token_budget: 100,
        max_messages: 10,
    };
    variants! { cases, m, get_context, "GetContext", context;
        "empty id", "conversation_id", |r| r.conversation_id = String::new();
        "non-hex uuid", "conversation_id", |r| r.conversation_id = BAD_UUID.into();
        "token budget -1", "token_budget", |r| r.token_budget = -1;
        "token budget i32::MAX", "token_budget", |r| r.token_budget = i32::MAX;
        "max messages 10^6", "max_messages", |r| r.max_messages = 1_000_000;
        "max messages i32::MIN", "max_messages", |r| r.max_messages = i32::MIN;
    }
    // Refused, and ada's data stays.
    let delete = memory::DeleteUserDataRequest {
        user_id: "ada".into(),
    };
    variants! { cases, m, delete_user_data, "DeleteUserData", delete;
        "blank user id", "user_id", |r| r.user_id = "   ".into();
        "user id of 129 characters", "user_id", |r| r.user_id = "a".repeat(129);
        "user id with a newline", "user_id", |r| r.user_id = "ada\n".into();
    }
    cases
}

fn booking_cases(stack: &Stack, f: &Fixture) -> Vec<Case> {
    use booking::list_follow_ups_request::Parent::{BookingId, ConversationId};
    let b = &stack.booking;
    let mut cases = Vec::new();
    let money = |currency: &str, amount_minor| {
        Some(booking::Money {
            currency_code: currency.into(),
            amount_minor,
        })
    };
    let slot = booking::CreateSlotRequest {
        start_time: in_hours(1),
        end_time: in_hours(2),
        capacity: 4,
        label: "table".into(),
        request_id: String::new(),
        time_zone: String::new(),
    };
    let now = chrono::Utc::now().timestamp();
    variants! { cases, b, create_slot, "CreateSlot", slot;
        "no end", "end_time", |r| r.end_time = None;
        "ends before it starts", "end_time", |r| r.start_time = in_hours(3);
        "ends when it starts", "end_time", |r| r.end_time = r.start_time;
        "8 days long", "end_time", |r| r.end_time = in_hours(1 + 8 * 24);
        "starts in year 1", "start_time", |r| r.start_time = ts(YEAR_1, 0);
        "starts in year 9999", "start_time", |r| r.start_time = ts(YEAR_9999, 0);
        "starts at the epoch", "start_time", |r| r.start_time = ts(0, 0);
        "seconds i64::MAX", "start_time", |r| r.start_time = ts(i64::MAX, 0);
        "seconds i64::MIN", "start_time", |r| r.start_time = ts(i64::MIN, 0);
        "negative nanos", "start_time", |r| r.start_time = ts(now + 3600, -1);
        "capacity -1", "capacity", |r| r.capacity = -1;
        "capacity i32::MAX", "capacity", |r| r.capacity = i32::MAX;
        "capacity i32::MIN", "capacity", |r| r.capacity = i32::MIN;
        "label with a newline", "label", |r| r.label = "chef\ntable".into();
        "label of 10 KB", "label", |r| r.label = huge();
        "request id of 129 characters", "request_id", |r| r.request_id = "r".repeat(129);
        "request id with NUL", "request_id", |r| r.request_id = "r\0".into();
        "unknown time zone", "time_zone", |r| r.time_zone = "Mars/Olympus_Mons".into();
        "time zone in lower case", "time_zone", |r| r.time_zone = "europe/paris".into();
        "time zone as an offset", "time_zone", |r| r.time_zone = "+01:00".into();
        "time zone of 10 KB", "time_zone", |r| r.time_zone = huge();
        "time zone with NUL", "time_zone", |r| r.time_zone = "UTC\0".into();
    }
    let availability = booking::ListAvailabilityRequest {
        start_time: Some(f.window.0),
        end_time: Some(f.window.1),
        page_size: 1,
        ..Default::default()
    };
    variants! { cases, b, list_availability, "ListAvailability", availability;
        "no start", "start_time", |r| r.start_time = None;
        "no end", "end_time", |r| r.end_time = None;
        "end before start", "end_time", |r| (r.start_time, r.end_time) = (in_hours(2), in_hours(1));
        "starts in year 1", "start_time", |r| r.start_time = ts(YEAR_1, 0);
        "ends in year 9999", "end_time", |r| r.end_time = ts(YEAR_9999, 0);
        "nanos of 2 s", "start_time", |r| r.start_time = ts(now, 2_000_000_000);
        "min seats -1", "min_available_seats", |r| r.min_available_seats = -1;
        "min seats 10001", "min_available_seats", |r| r.min_available_seats = 10_001;
        "page size -1", "page_size", |r| r.page_size = -1;
        "page size 10^6", "page_size", |r| r.page_size = 1_000_000;
        "token of another window", "page_token", |r| {
            r.end_time = in_hours(48);
            r.page_token = f.availability_token.clone()
        };
        "token of another seat count", "page_token", |r| {
            r.min_available_seats = 5;
            r.page_token = f.availability_token.clone()
        };
        "token of ListBookings", "page_token", |r| r.page_token = f.bookings_token.clone();
        "token that is not base64", "page_token", |r| r.page_token = "not a token!".into();
    }
    let book = Stack::booking_request(&f.slot, "cyd", "", 1);
    variants! { cases, b, create_booking, "CreateBooking", book;
        "customer id of 10 KB", "customer_id", |r| r.customer_id = huge();
        "customer id with NUL", "customer_id", |r| r.customer_id = "cyd\0".into();
        "customer name with a newline", "customer_name", |r| r.customer_name = "Cyd\nEvil".into();
        "customer name of 10 KB", "customer_name", |r| r.customer_name = huge();
        "conversation id of 10 KB", "conversation_id", |r| r.conversation_id = huge();
        "slot id with a non-hex digit", "slot_id", |r| r.slot_id = BAD_UUID.into();
        "party size i32::MAX", "party_size", |r| r.party_size = i32::MAX;
        "party size i32::MIN", "party_size", |r| r.party_size = i32::MIN;
        "deposit i64::MIN", "deposit.amount_minor", |r| r.deposit = money("EUR", i64::MIN);
        "deposit -100", "deposit.amount_minor", |r| r.deposit = money("EUR", -100);
        "deposit i64::MAX", "deposit.amount_minor", |r| r.deposit = money("EUR", i64::MAX);
        "empty currency", "deposit.currency_code", |r| r.deposit = money("", 100);
        "currency of 4 letters", "deposit.currency_code", |r| r.deposit = money("EURO", 100);
        "currency with a non-ASCII letter", "deposit.currency_code",
            |r| r.deposit = money("ÉUR", 100);
        "request id with a newline", "request_id", |r| r.request_id = "r\n1".into();
        "customer id that is an erased customer's pseudonym", "customer_id",
            |r| r.customer_id = format!("erased:{}", "0".repeat(64));
    }
    let get = booking::GetBookingRequest {
        booking_id: f.booking_x.clone(),
    };
    variants! { cases, b, get_booking, "GetBooking", get;
        "empty id", "booking_id", |r| r.booking_id = String::new();
        "non-hex uuid", "booking_id", |r| r.booking_id = BAD_UUID.into();
        "id of 10 KB", "booking_id", |r| r.booking_id = huge();
    }
    let bookings = booking::ListBookingsRequest {
        customer_id: "ada".into(),
        page_size: 1,
        page_token: String::new(),
    };
    variants! { cases, b, list_bookings, "ListBookings", bookings;
        "empty customer", "customer_id", |r| r.customer_id = String::new();
        "customer id of 10 KB", "customer_id", |r| r.customer_id = huge();
        "page size -1", "page_size", |r| r.page_size = -1;
        "page size 10^6", "page_size", |r| r.page_size = 1_000_000;
        "token of ListAvailability", "page_token", |r| r.page_token = f.availability_token.clone();
        "token of customer ada used for bob", "page_token", |r| {
            r.customer_id = "bob".into();
            r.page_token = f.bookings_token.clone()
        };
        "token of ListFollowUps", "page_token", |r| r.page_token = f.follow_ups_token.clone();
    }
    // Refused, and the booking stays confirmed.
    let cancel = booking::CancelBookingRequest {
        booking_id: f.booking_x.clone(),
        reason: "ill".into(),
    };
    variants! { cases, b, cancel_booking, "CancelBooking", cancel;
        "reason of 10 KB", "reason", |r| r.reason = huge();
        "reason with NUL", "reason", |r| r.reason = "ill\0".into();
        "empty id", "booking_id", |r| r.booking_id = String::new();
        "id of 10 KB", "booking_id", |r| r.booking_id = huge();
    }
    // Refused, and ada's data stays.
    let erase = booking::EraseCustomerRequest {
        customer_id: "ada".into(),
    };
    variants! { cases, b, erase_customer, "EraseCustomer", erase;
        "empty customer id", "customer_id", |r| r.customer_id = String::new();
        "blank customer id", "customer_id", |r| r.customer_id = "   ".into();
        "customer id of 10 KB", "customer_id", |r| r.customer_id = huge();
        "customer id of 129 characters", "customer_id", |r| r.customer_id = "a".repeat(129);
        "customer id with NUL", "customer_id", |r| r.customer_id = "ada\0".into();
        "a pseudonym", "customer_id", |r| r.customer_id = format!("erased:{}", "0".repeat(64));
    }
    let follow_ups = booking::ListFollowUpsRequest {
        parent: Some(BookingId(f.booking_x.clone())),
        page_size: 1,
        page_token: String::new(),
    };
    variants! { cases, b, list_follow_ups, "ListFollowUps", follow_ups;
        "no parent", "parent", |r| r.parent = None;
        "empty booking id", "booking_id", |r| r.parent = Some(BookingId(String::new()));
        "empty conversation id", "conversation_id",
            |r| r.parent = Some(ConversationId(String::new()));
        "conversation id of 10 KB", "conversation_id", |r| r.parent = Some(ConversationId(huge()));
        "page size -1", "page_size", |r| r.page_size = -1;
        "page size 10^6", "page_size", |r| r.page_size = 1_000_000;
        "token of booking X used for conversation Y", "page_token", |r| {
            r.parent = Some(ConversationId(f.conv_b.clone()));
            r.page_token = f.booking_x_token.clone()
        };
        "token of booking X used for bob's booking", "page_token", |r| {
            r.parent = Some(BookingId(f.booking_bob.clone()));
            r.page_token = f.booking_x_token.clone()
        };
        "token of a conversation used for a booking", "page_token",
            |r| r.page_token = f.follow_ups_token.clone();
        "token of ListBookings", "page_token", |r| {
            r.parent = Some(ConversationId(f.conv_a.clone()));
            r.page_token = f.bookings_token.clone()
        };
    }
    cases
}

#[tokio::test]
async fn every_memory_rpc_refuses_bad_input_names_the_field_and_writes_nothing() {
    let stack = spawn_stack_with(no_delivery).await;
    let f = fixture(&stack).await;
    let cases = memory_cases(&stack, &f);
    let memory = stack.memory.clone();
    let conversation = f.conv_a.clone();
    run(&stack, cases, || {
        call!(
            memory,
            get_conversation,
            memory::GetConversationRequest {
                conversation_id: conversation.clone()
            }
        )
    })
    .await;
    // Past the transport's request size limit, refused before any
    // validation: RESOURCE_EXHAUSTED.
    let before = snapshot(&stack).await;
    let status = stack
        .memory
        .clone()
        .store_message(memory::StoreMessageRequest {
            user_id: "ada".into(),
            role: memory::Role::User as i32,
            content: "x".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .expect_err("1 MB of content");
    assert_oversized(&status);
    assert_eq!(snapshot(&stack).await, before, "an oversized call wrote");
    // ada's data is all still there.
    let conversation = stack
        .memory
        .clone()
        .get_conversation(memory::GetConversationRequest {
            conversation_id: f.conv_a.clone(),
        })
        .await
        .expect("still there")
        .into_inner()
        .conversation
        .expect("conversation");
    assert_eq!((conversation.message_count, conversation.active), (3, true));
    stack.shutdown().await;
}

#[tokio::test]
async fn every_booking_rpc_refuses_bad_input_names_the_field_and_writes_nothing() {
    let stack = spawn_stack_with(no_delivery).await;
    let f = fixture(&stack).await;
    let cases = booking_cases(&stack, &f);
    let client = stack.booking.clone();
    let booking_x = f.booking_x.clone();
    run(&stack, cases, || {
        call!(
            client,
            get_booking,
            booking::GetBookingRequest {
                booking_id: booking_x.clone()
            }
        )
    })
    .await;
    let before = snapshot(&stack).await;
    let status = stack
        .booking
        .clone()
        .create_slot(booking::CreateSlotRequest {
            start_time: in_hours(1),
            end_time: in_hours(2),
            capacity: 1,
            label: "l".repeat(1 << 20),
            request_id: String::new(),
            time_zone: String::new(),
        })
        .await
        .expect_err("a label of 1 MB");
    assert_oversized(&status);
    assert_eq!(snapshot(&stack).await, before, "an oversized call wrote");
    let kept = stack
        .booking
        .clone()
        .get_booking(booking::GetBookingRequest {
            booking_id: f.booking_x.clone(),
        })
        .await
        .expect("booking")
        .into_inner()
        .booking
        .expect("booking");
    assert_eq!(
        kept.state,
        booking::BookingState::Confirmed as i32,
        "not cancelled"
    );
    assert_eq!(
        stack.follow_ups(&f.booking_x).await[0].state,
        booking::FollowUpState::Pending as i32,
        "its follow-up still pending"
    );
    stack.assert_queues_clean().await;
    stack.shutdown().await;
}

/// google.protobuf.Timestamp's `nanos` must be 0..=999,999,999, also at a
/// second that ends a minute (where chrono would read 1.5 s of nanos as a
/// leap second).
#[tokio::test]
async fn nanos_of_a_second_or_more_are_refused_even_at_59_seconds() {
    let stack = spawn_stack_with(no_delivery).await;
    let at_59 = (chrono::Utc::now().timestamp() + 3600) / 60 * 60 + 59;
    let slot = stack
        .booking
        .clone()
        .create_slot(booking::CreateSlotRequest {
            start_time: ts(at_59, 1_500_000_000),
            end_time: ts(at_59 + 3600, 0),
            capacity: 2,
            label: String::new(),
            request_id: String::new(),
            time_zone: String::new(),
        })
        .await;
    let availability = stack
        .booking
        .clone()
        .list_availability(booking::ListAvailabilityRequest {
            start_time: ts(at_59, 1_999_999_999),
            end_time: ts(at_59 + 3600, 0),
            ..Default::default()
        })
        .await;
    for (rpc, answer) in [
        ("CreateSlot", slot.map(|_| ())),
        ("ListAvailability", availability.map(|_| ())),
    ] {
        let status = answer.expect_err(rpc);
        assert_eq!(status.code(), Code::InvalidArgument, "{rpc}");
        assert_eq!(violated_fields(&status), ["start_time"], "{rpc}");
    }
    stack.shutdown().await;
}
