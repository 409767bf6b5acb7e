//! Property tests: random requests against one running memory-service, and
//! random page tokens through `maitre_runtime::pagination::decode`.
//!
//! For every random StoreMessageRequest (any strings, NUL and control
//! characters included, any f64 including NaN and infinities, any enum
//! number, random maps and tool items, request ids that collide):
//! the answer is OK, INVALID_ARGUMENT or FAILED_PRECONDITION (never
//! INTERNAL, UNKNOWN or a hang), and the database moved by exactly what the
//! answer says: nothing on an error or a replay, one message (and one
//! conversation when `conversation_created`) on a fresh OK.

use std::{collections::HashMap, time::Duration};

use maitre_api::memory::v1 as pb;
use maitre_runtime::pagination::{self, PageTokenError};
use proptest::{
    collection::{hash_map, vec},
    option,
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tonic::Code;

use crate::support::{TestApp, spawn_app};

/// Users the generated requests mostly speak for, so that conversations and
/// request ids collide (replays, another user's conversation).
const USERS: [&str; 2] = ["fuzz-ana", "fuzz-ben"];

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Regressions are reported in the failure message, not written
        // into the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any text: printable unicode, control characters and NUL, short and long.
fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => regex(&format!("\\PC{{0,{max}}}")),
        2 => regex(&format!("(?s).{{0,{max}}}")),
        1 => regex("[\\x00-\\x1f a-z]{0,12}"),
        1 => Just(String::new()),
    ]
    .boxed()
}

fn regex(pattern: &str) -> BoxedStrategy<String> {
    proptest::string::string_regex(pattern)
        .expect("regex")
        .boxed()
}

/// Text that is sometimes far past every size limit.
fn sized_text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        8 => text(max),
        1 => (1usize..70_000).prop_map(|n| "é".repeat(n / 2)),
    ]
    .boxed()
}

/// Mostly `valid`, now and then `garbage`: with a dozen fields, about a
/// third of the requests are valid, so both paths get exercised.
fn mostly<T: std::fmt::Debug + Clone + 'static>(
    valid: impl Strategy<Value = T> + 'static,
    garbage: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![14 => valid, 1 => garbage].boxed()
}

/// Any f64: out of range, NaN, the infinities, anything.
fn any_score() -> BoxedStrategy<f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-1.000_000_1),
        any::<f64>(),
    ]
    .boxed()
}

fn label() -> BoxedStrategy<String> {
    // Valid labels include upper case and spaces around: trimmed and lowered.
    mostly(
        prop_oneof![regex("[a-z0-9_-]{1,12}"), regex(" ?[A-Za-z]{1,8} ?")],
        text(40),
    )
}

fn emotion() -> BoxedStrategy<pb::Emotion> {
    let scores = hash_map(label(), mostly(0.0..=1.0f64, any_score()), 0..4);
    (mostly(-1.0..=1.0f64, any_score()), label(), scores)
        .prop_map(|(score, label, scores)| pb::Emotion {
            score,
            label,
            scores,
        })
        .boxed()
}

/// Tool-call and tool-result text, NUL included (refused: jsonb cannot hold it).
fn tool_text(max: usize) -> BoxedStrategy<String> {
    text(max)
}

fn tool_call() -> impl Strategy<Value = pb::ToolCall> {
    (tool_text(12), tool_text(12), tool_text(64)).prop_map(|(id, name, arguments_json)| {
        pb::ToolCall {
            id,
            name,
            arguments_json,
        }
    })
}

fn tool_result() -> impl Strategy<Value = pb::ToolResult> {
    (tool_text(12), tool_text(64), any::<bool>()).prop_map(|(tool_call_id, content, is_error)| {
        pb::ToolResult {
            tool_call_id,
            content,
            is_error,
        }
    })
}

/// A conversation id: none (new), a known one (maybe another user's), a
/// fresh UUID, or anything at all.
fn conversation_id(known: Vec<String>) -> BoxedStrategy<String> {
    let valid = prop_oneof![
        2 => Just(String::new()),
        3 => proptest::sample::select(known),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
    ];
    mostly(valid, text(40))
}

fn user_id() -> BoxedStrategy<String> {
    mostly(
        proptest::sample::select(USERS.to_vec()).prop_map(String::from),
        sized_text(140),
    )
}

fn request_id() -> BoxedStrategy<String> {
    let valid = prop_oneof![
        3 => Just(String::new()),
        // Few distinct values: retries and reuse across users happen.
        2 => regex("r[0-3]"),
        1 => regex("\\PC{1,40}"),
    ];
    mostly(valid, sized_text(140))
}

fn metadata() -> BoxedStrategy<HashMap<String, String>> {
    mostly(
        hash_map(regex("[a-z_]{1,8}"), regex("\\PC{0,20}"), 0..4),
        prop_oneof![
            hash_map(text(16), text(40), 0..70),
            hash_map(text(16), sized_text(40), 0..3),
        ],
    )
}

fn token_usage() -> BoxedStrategy<Option<pb::TokenUsage>> {
    let count = mostly(0..=i32::MAX as u32, any::<u32>());
    option::of(
        (count.clone(), count).prop_map(|(input_tokens, output_tokens)| pb::TokenUsage {
            input_tokens,
            output_tokens,
        }),
    )
    .boxed()
}

fn store_request(known: Vec<String>) -> impl Strategy<Value = pb::StoreMessageRequest> {
    let head = (
        conversation_id(known),
        user_id(),
        mostly(regex("\\PC{0,20}"), sized_text(70)),
        mostly(1..=4i32, any::<i32>()),
        mostly(regex("\\PC{0,200}"), sized_text(200)),
        option::of(emotion()),
    );
    let tail = (
        metadata(),
        token_usage(),
        mostly(vec(tool_call(), 0..3), vec(tool_call(), 0..70)),
        vec(tool_result(), 0..3),
        request_id(),
    );
    (head, tail).prop_map(
        |(
            (conversation_id, user_id, channel, role, content, emotion),
            (metadata, token_usage, tool_calls, tool_results, request_id),
        )| pb::StoreMessageRequest {
            conversation_id,
            user_id,
            channel,
            role,
            content,
            emotion,
            metadata,
            token_usage,
            tool_calls,
            tool_results,
            request_id,
        },
    )
}

async fn counts(app: &TestApp) -> (i64, i64) {
    (
        app.count("SELECT count(*) FROM memory.messages").await,
        app.count("SELECT count(*) FROM memory.conversations").await,
    )
}

/// Shortened for failure messages: a 60 KB string helps nobody.
fn short(request: &pb::StoreMessageRequest) -> String {
    let text = format!("{request:?}");
    if text.len() > 2000 {
        format!(
            "{}… ({} bytes)",
            &text[..text.floor_char_boundary(2000)],
            text.len()
        )
    } else {
        text
    }
}

async fn store_case(app: &TestApp, request: pb::StoreMessageRequest) -> Result<(), TestCaseError> {
    let before = counts(app).await;
    let shown = short(&request);
    let answer = tokio::time::timeout(Duration::from_secs(10), app.store(request.clone()))
        .await
        .map_err(|_| TestCaseError::fail(format!("no answer within 10 s to {shown}")))?;
    let after = counts(app).await;
    match answer {
        Ok(response) if response.replayed => {
            prop_assert_eq!(after, before, "a replay wrote something: {}", shown);
        }
        Ok(response) => {
            let created = i64::from(response.conversation_created);
            prop_assert_eq!(
                after,
                (before.0 + 1, before.1 + created),
                "OK (created: {}) but the counts moved otherwise: {}",
                created == 1,
                shown
            );
            let message = response.message.expect("message");
            prop_assert_eq!(&message.content, &request.content);
            prop_assert_eq!(message.sequence, response.conversation_message_count);
        }
        Err(status) => {
            // Past the request size limit tonic refuses before validation.
            let oversized = matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
                && status.message().contains("too large");
            prop_assert!(
                oversized
                    || matches!(
                        status.code(),
                        Code::InvalidArgument | Code::FailedPrecondition
                    ),
                "{:?} ({}) for {}",
                status.code(),
                status.message(),
                shown
            );
            prop_assert_eq!(
                after,
                before,
                "refused ({:?}) but wrote: {}",
                status.code(),
                shown
            );
        }
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn random_store_messages_never_fail_internally_nor_write_partially() {
    let rt = runtime();
    let app = rt.block_on(spawn_app());
    // One conversation per user to aim at.
    let known: Vec<String> = rt.block_on(async {
        let mut known = Vec::new();
        for user in USERS {
            let stored = app
                .store(TestApp::message("", user, "seed", Some((0.0, "neutral"))))
                .await
                .expect("seed message");
            known.push(stored.message.expect("message").conversation_id);
        }
        known
    });

    let mut runner = TestRunner::new(config(200));
    let result = runner.run(&store_request(known), |request| {
        rt.block_on(store_case(&app, request))
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }

    rt.block_on(async {
        app.store(TestApp::message("", "fuzz-ana", "still serving", None))
            .await
            .expect("a valid message after the fuzzing");
        let (messages, conversations) = counts(&app).await;
        let stored: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(message_count), 0)::bigint FROM memory.conversations",
        )
        .fetch_one(&app.db)
        .await
        .expect("sum");
        assert_eq!(stored, messages, "conversation counters match the messages");
        assert!(conversations >= 2);
        app.shutdown().await.expect("clean shutdown");
    });
}

/// Random read requests: never INTERNAL or UNKNOWN either.
#[test]
fn random_reads_never_fail_internally() {
    let rt = runtime();
    let app = rt.block_on(spawn_app());
    let conversation = rt.block_on(async {
        let mut id = String::new();
        for i in 0..3 {
            let stored = app
                .store(TestApp::message(
                    &id,
                    "fuzz-ana",
                    &format!("m{i}"),
                    Some((0.1, "calm")),
                ))
                .await
                .expect("seed");
            id = stored.message.expect("message").conversation_id;
        }
        id
    });
    let read = (
        conversation_id(vec![conversation]),
        user_id(),
        prop_oneof![3 => -2..=600i32, 1 => any::<i32>()],
        prop_oneof![text(60), regex("[A-Za-z0-9_-]{0,80}")],
        prop_oneof![4 => 0..=3i32, 1 => any::<i32>()],
    );
    let mut runner = TestRunner::new(config(100));
    let result = runner.run(&read, |(conversation_id, user_id, size, token, order)| {
        rt.block_on(async {
            let mut client = app.client.clone();
            let answers = [
                client
                    .list_messages(pb::ListMessagesRequest {
                        conversation_id: conversation_id.clone(),
                        page_size: size,
                        page_token: token.clone(),
                        order,
                    })
                    .await
                    .map(|_| ()),
                client
                    .get_emotion_history(pb::GetEmotionHistoryRequest {
                        conversation_id: conversation_id.clone(),
                        limit: size,
                    })
                    .await
                    .map(|_| ()),
                client
                    .list_conversations(pb::ListConversationsRequest {
                        user_id: user_id.clone(),
                        filter: order,
                        page_size: size,
                        page_token: token.clone(),
                    })
                    .await
                    .map(|_| ()),
                client
                    .get_conversation(pb::GetConversationRequest {
                        conversation_id: conversation_id.clone(),
                    })
                    .await
                    .map(|_| ()),
            ];
            for answer in answers {
                if let Err(status) = answer {
                    prop_assert!(
                        matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                        "{:?} ({}) for {:?} {:?} {} {:?} {}",
                        status.code(),
                        status.message(),
                        conversation_id,
                        user_id,
                        size,
                        token,
                        order
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    rt.block_on(async { app.shutdown().await.expect("clean shutdown") });
}

/// NUL inside a tool call's text is refused (PostgreSQL's jsonb cannot hold
/// \u0000), not answered INTERNAL.
#[tokio::test]
async fn nul_in_tool_calls_is_refused_not_internal() {
    let app = spawn_app().await;
    for request in [
        pb::StoreMessageRequest {
            tool_calls: vec![pb::ToolCall {
                id: "t1".into(),
                name: "lookup".into(),
                arguments_json: "{\"q\":\"a\0b\"}".into(),
            }],
            ..TestApp::message("", "fuzz-ana", "calling a tool", None)
        },
        pb::StoreMessageRequest {
            tool_results: vec![pb::ToolResult {
                tool_call_id: "t1".into(),
                content: "\0".into(),
                is_error: false,
            }],
            ..TestApp::message("", "fuzz-ana", "a tool answered", None)
        },
    ] {
        match app.store(request).await {
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        }
    }
}

// ---------------------------------------------------------------- tokens
/// Keys of the shapes the services put in tokens, and others. No floats:
/// serde_json does not promise to parse every f64 back bit for bit, and no
/// service puts one in a token.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        text(20).prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            hash_map(text(8), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Tries every key type the services decode.
fn decode_all(query: &str, token: &str) {
    let _ = pagination::decode::<i64>(query, token);
    let _ = pagination::decode::<uuid::Uuid>(query, token);
    let _ = pagination::decode::<(i64, String)>(query, token);
    let _ = pagination::decode::<HashMap<String, i64>>(query, token);
    let _ = pagination::decode::<memory_service::domain::queries::ConversationCursor>(query, token);
    let _ = pagination::decode::<serde_json::Value>(query, token);
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn decoding_any_string_never_panics(query in text(40), token in text(300)) {
        decode_all(&query, &token);
    }

    #[test]
    fn decoding_base64_noise_never_panics(token in "[A-Za-z0-9_=+/-]{0,400}") {
        decode_all("ListMessages|x|OldestFirst", &token);
    }

    #[test]
    fn tokens_of_any_key_decode_only_for_their_query(
        query in text(40),
        other in text(40),
        key in json_value(),
    ) {
        let token = pagination::encode(&query, &key);
        decode_all(&query, &token);
        decode_all(&other, &token);
        prop_assert_eq!(pagination::decode::<serde_json::Value>(&query, &token), Ok(key.clone()));
        if other != query {
            prop_assert_eq!(
                pagination::decode::<serde_json::Value>(&other, &token),
                Err(PageTokenError::OtherQuery)
            );
        }
        // Any suffix or prefix cut of a real token is refused, never a panic.
        for cut in [1, token.len() / 2, token.len().saturating_sub(1)] {
            if let Some(part) = token.get(..cut) {
                decode_all(&query, part);
            }
        }
    }
}
