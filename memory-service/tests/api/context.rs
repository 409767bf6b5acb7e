//! GetContext: the newest messages within a token budget, the conversation
//! and its state, in one statement whose cost follows the window.

use maitre_api::memory::v1 as pb;
use pb::update_conversation_state_request::Update;
use tonic::Code;

use crate::{
    state::{conversation, update},
    support::{TestApp, reason, spawn_app, violated_fields},
};

async fn context(
    app: &TestApp,
    id: &str,
    token_budget: i32,
    max_messages: i32,
) -> Result<pb::GetContextResponse, tonic::Status> {
    app.client
        .clone()
        .get_context(pb::GetContextRequest {
            conversation_id: id.into(),
            token_budget,
            max_messages,
        })
        .await
        .map(|r| r.into_inner())
}

/// A message of `role` whose own tokens are `tokens` (stored usage), in
/// conversation `id` of user "gus".
fn counted(id: &str, role: pb::Role, content: &str, tokens: u32) -> pb::StoreMessageRequest {
    let usage = match role {
        pb::Role::Assistant => pb::TokenUsage {
            input_tokens: 5_000,
            output_tokens: tokens,
        },
        _ => pb::TokenUsage {
            input_tokens: tokens,
            output_tokens: 0,
        },
    };
    pb::StoreMessageRequest {
        role: role as i32,
        token_usage: Some(usage),
        ..TestApp::message(id, "gus", content, None)
    }
}

fn contents(response: &pb::GetContextResponse) -> Vec<&str> {
    response
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect()
}

#[tokio::test]
async fn returns_the_newest_messages_that_fit_oldest_first_with_stats_and_state() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    for (i, role) in [pb::Role::User, pb::Role::Assistant]
        .iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let mut request = counted(&id, *role, &format!("m{}", i + 1), 10);
        request.emotion = Some(pb::Emotion {
            score: -0.5,
            label: "anger".into(),
            scores: Default::default(),
        });
        app.store(request).await.expect("stored");
    }
    update(
        &app,
        &id,
        0,
        Update::StateJson(r#"{"step": "time"}"#.into()),
    )
    .await
    .expect("state");

    let all = context(&app, &id, 1_000, 0).await.expect("context");
    assert_eq!(contents(&all), ["m1", "m2", "m3", "m4", "m5", "m6"]);
    assert_eq!((all.token_count, all.truncated), (60, false));
    let conversation = all.conversation.as_ref().expect("conversation");
    assert_eq!(conversation.message_count, 6);
    assert_eq!(
        conversation
            .emotion_stats
            .as_ref()
            .expect("stats")
            .scored_message_count,
        6
    );
    let state = all.state.as_ref().expect("state");
    assert_eq!(
        (state.version, state.state_json.as_str()),
        (1, r#"{"step": "time"}"#)
    );

    // 35 tokens: the three newest (30); the fourth would pass the budget.
    let cut = context(&app, &id, 35, 0).await.expect("context");
    assert_eq!(contents(&cut), ["m4", "m5", "m6"]);
    assert_eq!((cut.token_count, cut.truncated), (30, true));
    // Exactly at the budget still fits.
    assert_eq!(
        contents(&context(&app, &id, 40, 0).await.expect("context")),
        ["m3", "m4", "m5", "m6"]
    );
    // The message cap.
    let capped = context(&app, &id, 1_000, 2).await.expect("context");
    assert_eq!(
        (contents(&capped), capped.truncated),
        (vec!["m5", "m6"], true)
    );
}

#[tokio::test]
async fn the_window_is_contiguous_and_empty_when_the_newest_message_alone_passes_the_budget() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    for (content, tokens) in [("small-old", 1), ("huge", 500), ("a", 10), ("b", 10)] {
        app.store(counted(&id, pb::Role::User, content, tokens))
            .await
            .expect("stored");
    }
    // "huge" ends the window: the smaller message before it is not taken.
    let window = context(&app, &id, 100, 0).await.expect("context");
    assert_eq!(
        (contents(&window), window.token_count, window.truncated),
        (vec!["a", "b"], 20, true)
    );

    app.store(counted(&id, pb::Role::User, "newest and long", 101))
        .await
        .expect("stored");
    let empty = context(&app, &id, 100, 0).await.expect("context");
    assert!(empty.messages.is_empty());
    assert_eq!((empty.token_count, empty.truncated), (0, true));
    assert_eq!(empty.conversation.expect("conversation").message_count, 5);
}

#[tokio::test]
async fn tokens_come_from_the_stored_usage_of_the_message_itself_or_an_estimate() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    // 40 bytes, no usage: 4 + 40 / 4 = 14.
    app.store(TestApp::message(&id, "hal", &"x".repeat(40), None))
        .await
        .expect("stored");
    let only = context(&app, &id, 1_000, 0).await.expect("context");
    assert_eq!(only.token_count, 14);
    // An assistant message counts its output tokens, not the prompt it read.
    app.store(pb::StoreMessageRequest {
        role: pb::Role::Assistant as i32,
        token_usage: Some(pb::TokenUsage {
            input_tokens: 9_000,
            output_tokens: 7,
        }),
        ..TestApp::message(&id, "hal", "sure", None)
    })
    .await
    .expect("stored");
    // An assistant message with only input tokens: its own size is unknown,
    // so estimated (4 + ceil(41 / 4) = 15).
    app.store(pb::StoreMessageRequest {
        role: pb::Role::Assistant as i32,
        token_usage: Some(pb::TokenUsage {
            input_tokens: 9_000,
            output_tokens: 0,
        }),
        ..TestApp::message(&id, "hal", &"y".repeat(41), None)
    })
    .await
    .expect("stored");
    let all = context(&app, &id, 1_000, 0).await.expect("context");
    assert_eq!(all.token_count, 14 + 7 + 15);
}

#[tokio::test]
async fn the_window_never_opens_on_tool_results_without_their_call() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    app.store(counted(&id, pb::Role::User, "book friday", 10))
        .await
        .expect("stored");
    app.store(pb::StoreMessageRequest {
        tool_calls: vec![pb::ToolCall {
            id: "c1".into(),
            name: "availability".into(),
            arguments_json: "{}".into(),
        }],
        ..counted(&id, pb::Role::Assistant, "checking", 10)
    })
    .await
    .expect("stored");
    app.store(pb::StoreMessageRequest {
        tool_results: vec![pb::ToolResult {
            tool_call_id: "c1".into(),
            content: "free".into(),
            is_error: false,
        }],
        ..counted(&id, pb::Role::Tool, "", 10)
    })
    .await
    .expect("stored");
    app.store(counted(&id, pb::Role::Assistant, "friday works", 10))
        .await
        .expect("stored");
    app.store(counted(&id, pb::Role::User, "great", 10))
        .await
        .expect("stored");

    // 30 tokens fit the tool result, the reply and the user; the result's
    // call does not fit, so the result is left out as well.
    let window = context(&app, &id, 30, 0).await.expect("context");
    assert_eq!(contents(&window), ["friday works", "great"]);
    assert_eq!((window.token_count, window.truncated), (20, true));
    // With its call, the result stays.
    let window = context(&app, &id, 40, 0).await.expect("context");
    assert_eq!(contents(&window), ["checking", "", "friday works", "great"]);
    assert_eq!(window.messages[1].tool_results.len(), 1);
}

#[tokio::test]
async fn unknown_erased_and_malformed_requests() {
    let app = spawn_app().await;
    let status = context(&app, &uuid::Uuid::now_v7().to_string(), 0, 0)
        .await
        .expect_err("unknown");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "CONVERSATION_NOT_FOUND")
    );

    let id = conversation(&app, "ivy").await;
    let fresh = context(&app, &id, 0, 0).await.expect("defaults");
    assert_eq!(fresh.messages.len(), 1);
    let state = fresh.state.expect("state");
    assert_eq!((state.version, state.state_json.as_str()), (0, "{}"));

    let status = app
        .client
        .clone()
        .get_context(pb::GetContextRequest {
            conversation_id: "x".into(),
            token_budget: -1,
            max_messages: 501,
        })
        .await
        .expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(fields, ["conversation_id", "max_messages", "token_budget"]);

    app.client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "ivy".into(),
        })
        .await
        .expect("erased");
    let status = context(&app, &id, 0, 0).await.expect_err("erased");
    assert_eq!(status.code(), Code::NotFound);
}

/// Shared buffers the statement touched, and its plan, for a window of 10
/// messages in conversation `id`.
async fn cost(app: &TestApp, id: uuid::Uuid) -> (i64, String) {
    let sql = memory_service::store::context::GET_CONTEXT
        .replace("$1", &format!("'{id}'::uuid"))
        .replace("$2", "100")
        .replace("$3", "100")
        .replace("$4", "1000000")
        .replace("$5", "2::smallint")
        .replace("$6", "4::smallint");
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) {sql}"
    )))
    .fetch_all(&app.db)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    let top = plan
        .lines()
        .find(|line| line.trim_start().starts_with("Buffers:"))
        .unwrap_or_default();
    let blocks = top
        .split_whitespace()
        .filter_map(|part| part.split('=').nth(1))
        .filter_map(|n| n.parse::<i64>().ok())
        .sum();
    (blocks, plan)
}

#[tokio::test]
async fn the_cost_follows_the_window_not_the_length_of_the_conversation() {
    let app = spawn_app().await;
    let (short, long) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for (id, count) in [(short, 20), (long, 50_000)] {
        sqlx::query(
            "INSERT INTO memory.conversations (id, user_id, created_at, last_message_at, message_count) \
             VALUES ($1, 'u', now(), now(), $2)",
        )
        .bind(id)
        .bind(count)
        .execute(&app.db)
        .await
        .expect("conversation");
        // 10 tokens each (stored usage): a budget of 100 takes 10.
        sqlx::query(
            "INSERT INTO memory.messages (conversation_id, seq, id, user_id, role, content, input_tokens, created_at) \
             SELECT $1, s, gen_random_uuid(), 'u', 1, repeat('x', 60), 10, now() FROM generate_series(1, $2) s",
        )
        .bind(id)
        .bind(count)
        .execute(&app.db)
        .await
        .expect("messages");
    }
    sqlx::query("VACUUM ANALYZE memory.messages")
        .execute(&app.db)
        .await
        .expect("vacuum");

    let (short_blocks, _) = cost(&app, short).await;
    let (long_blocks, long_plan) = cost(&app, long).await;
    assert!(long_plan.contains("messages_pkey"), "plan:\n{long_plan}");
    assert!(
        !long_plan.contains("Seq Scan on messages"),
        "plan:\n{long_plan}"
    );
    // One B-tree level more per probe at most, never a walk over the history.
    assert!(
        long_blocks <= short_blocks + 30,
        "20 messages: {short_blocks} blocks, 50,000: {long_blocks}\n{long_plan}"
    );
    let window = context(&app, &long.to_string(), 100, 0)
        .await
        .expect("context");
    assert_eq!((window.messages.len(), window.truncated), (10, true));
    assert_eq!(window.messages.last().expect("newest").sequence, 50_000);
}

#[tokio::test]
async fn the_answer_is_cut_at_the_byte_budget_whatever_the_messages_claim_in_tokens() {
    // A listing page of 10,000 bytes: each message below is 3,000 bytes of
    // content claiming 1 token, so three fit (with ~200 bytes each besides).
    let app = crate::support::spawn_app_with(|s| s.max_page_bytes = 10_000).await;
    let id = uuid::Uuid::now_v7().to_string();
    for i in 0..5 {
        app.store(counted(
            &id,
            pb::Role::User,
            &format!("{i}{}", "z".repeat(2_999)),
            1,
        ))
        .await
        .expect("stored");
    }
    let window = context(&app, &id, 1_000_000, 500).await.expect("context");
    assert_eq!(window.messages.len(), 3);
    assert_eq!((window.token_count, window.truncated), (3, true));
    assert!(window.messages[0].content.starts_with('2'));

    // Full emotions and request ids count too: 32 per-emotion scores with
    // long labels make each of these messages weigh about 2 KB more.
    let id = uuid::Uuid::now_v7().to_string();
    for i in 0..5 {
        let mut request = counted(&id, pb::Role::User, &format!("{i}{}", "e".repeat(999)), 1);
        request.request_id = format!("{i}{}", "r".repeat(120));
        request.emotion = Some(pb::Emotion {
            score: 0.5,
            label: "joy".into(),
            scores: (0..32)
                .map(|k| (format!("{k:02}{}", "x".repeat(30)), 0.5))
                .collect(),
        });
        app.store(request).await.expect("stored");
    }
    let window = context(&app, &id, 1_000_000, 500).await.expect("context");
    assert_eq!(
        window.messages.len(),
        3,
        "about 3.3 KB each, three fit in 10,000 bytes"
    );
}

#[tokio::test]
async fn the_newest_message_is_never_left_out_for_its_bytes() {
    let app = crate::support::spawn_app_with(|s| s.max_page_bytes = 1_000).await;
    let id = uuid::Uuid::now_v7().to_string();
    for i in 0..3 {
        app.store(counted(
            &id,
            pb::Role::User,
            &format!("{i}{}", "z".repeat(2_999)),
            1,
        ))
        .await
        .expect("stored");
    }
    let window = context(&app, &id, 1_000, 0).await.expect("context");
    assert_eq!(window.messages.len(), 1);
    assert!(window.messages[0].content.starts_with('2'));
    assert_eq!((window.token_count, window.truncated), (1, true));
}
