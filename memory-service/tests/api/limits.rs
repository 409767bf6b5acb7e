//! Bounded responses and bounded state: listings cut by a byte budget, a
//! response limit under every client's default, a cap on the distinct emotion
//! labels a conversation keeps, and start-up refusing limits that break them.

use std::{collections::HashMap, time::Instant};

use clap::Parser as _;
use futures::{StreamExt, future::join_all};
use maitre_api::memory::v1::{self as pb, memory_service_client::MemoryServiceClient};
use memory_service::{
    config::{Cli, Settings},
    startup::{Application, MAX_RESPONSE_BYTES},
};
use prost::Message as _;
use tonic::{Code, transport::Channel};

use crate::support::{TestApp, spawn_app, spawn_app_with, violated_fields};

/// What most gRPC clients accept by default, tonic's included.
const CLIENT_DEFAULT_LIMIT: usize = 4 * 1024 * 1024;
/// The default `MEMORY_MAX_PAGE_BYTES`.
const DEFAULT_PAGE_BYTES: usize = 1024 * 1024;

/// A message at every default limit: 32 KiB of content, 32 KiB of tool calls
/// and results in 64 items, 8 KiB of metadata in 64 entries, 32 per-emotion
/// scores with 32-character keys, and the longest ids.
fn largest_message(conversation: &str, i: usize) -> pb::StoreMessageRequest {
    let text = |n: usize, c: char| c.to_string().repeat(n);
    pb::StoreMessageRequest {
        conversation_id: conversation.into(),
        user_id: text(128, 'u'),
        channel: text(64, 'c'),
        role: pb::Role::Assistant as i32,
        content: text(32 * 1024, 'x'),
        emotion: Some(pb::Emotion {
            score: -0.123_456_789,
            label: text(32, 'j'),
            scores: (0..32)
                .map(|k| (format!("{k:0>32}"), 0.987_654_321))
                .collect(),
        }),
        // 64 entries of 3 + 125 bytes: 8192.
        metadata: (0..64)
            .map(|k| (format!("k{k:02}"), text(125, 'm')))
            .collect(),
        token_usage: Some(pb::TokenUsage {
            input_tokens: i32::MAX as u32,
            output_tokens: i32::MAX as u32,
        }),
        // 32 calls and 32 results of 512 bytes each: 32768.
        tool_calls: (0..32)
            .map(|k| pb::ToolCall {
                id: format!("call{k:04}"),
                name: format!("tool{k:04}"),
                arguments_json: text(496, 'a'),
            })
            .collect(),
        tool_results: (0..32)
            .map(|k| pb::ToolResult {
                tool_call_id: format!("call{k:04}"),
                content: text(504, 'r'),
                is_error: true,
            })
            .collect(),
        request_id: format!("{i:0>128}"),
    }
}

/// Stores `count` largest messages in one new conversation, eight at a time.
async fn conversation_of_largest_messages(app: &TestApp, count: usize) -> String {
    let conversation = uuid::Uuid::now_v7().to_string();
    let stored: Vec<_> = futures::stream::iter(0..count)
        .map(|i| app.store(largest_message(&conversation, i)))
        .buffer_unordered(8)
        .collect()
        .await;
    for result in stored {
        result.expect("a message at every limit is accepted");
    }
    conversation
}

/// A client of its own (its own connection), with tonic's default limits.
fn default_client(app: &TestApp) -> MemoryServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .expect("uri")
        .connect_lazy();
    MemoryServiceClient::new(channel)
}

/// Pages through a conversation to the end; returns every sequence seen and
/// each page's encoded size.
async fn walk_messages(
    app: &TestApp,
    conversation: &str,
    order: pb::SortOrder,
    page_size: i32,
) -> (Vec<i64>, Vec<usize>) {
    let mut sequences = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .list_messages(pb::ListMessagesRequest {
                conversation_id: conversation.into(),
                page_size,
                page_token: token.clone(),
                order: order as i32,
            })
            .await
            .expect("page");
        assert!(!page.messages.is_empty(), "a page is never empty");
        sizes.push(page.encoded_len());
        sequences.extend(page.messages.iter().map(|m| m.sequence));
        if page.next_page_token.is_empty() {
            return (sequences, sizes);
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn eight_parallel_full_pages_of_the_largest_messages_reach_default_clients() {
    let app = spawn_app().await;
    let started = Instant::now();
    let conversation = conversation_of_largest_messages(&app, 501).await;
    eprintln!("stored 501 largest messages in {:?}", started.elapsed());

    let calls = (0..8).map(|_| {
        let mut client = default_client(&app);
        let conversation = conversation.clone();
        async move {
            client
                .list_messages(pb::ListMessagesRequest {
                    conversation_id: conversation,
                    page_size: 500,
                    ..Default::default()
                })
                .await
        }
    });
    let pages = join_all(calls).await;

    for page in pages {
        let page = page.expect("a full page reaches a client with the default limit");
        let page = page.into_inner();
        let encoded = page.encoded_len();
        let one = page.messages[0].encoded_len();
        eprintln!(
            "page of {} messages ({one} bytes each): {encoded} bytes",
            page.messages.len()
        );
        assert!(encoded < CLIENT_DEFAULT_LIMIT);
        assert!(encoded <= DEFAULT_PAGE_BYTES, "{encoded} bytes");
        // Cut by bytes, not by count: the next message would not have fitted.
        assert!(page.messages.len() < 500);
        assert!(encoded + one + 64 > DEFAULT_PAGE_BYTES);
        assert!(!page.next_page_token.is_empty());
        assert_eq!(
            page.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
            (1..=page.messages.len() as i64).collect::<Vec<_>>()
        );
    }

    let (oldest_first, sizes) =
        walk_messages(&app, &conversation, pb::SortOrder::OldestFirst, 500).await;
    assert_eq!(oldest_first, (1..=501).collect::<Vec<_>>());
    assert!(sizes.iter().all(|&s| s <= DEFAULT_PAGE_BYTES), "{sizes:?}");
    eprintln!("oldest first: {} pages of {sizes:?} bytes", sizes.len());
    let (newest_first, _) =
        walk_messages(&app, &conversation, pb::SortOrder::NewestFirst, 500).await;
    assert_eq!(newest_first, (1..=501).rev().collect::<Vec<_>>());

    // Still serving, and every message was stored whole.
    let stored = app.conversation(&conversation).await.expect("still up");
    assert_eq!(stored.message_count, 501);
    let first = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: conversation,
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page");
    let mut expected = largest_message(&stored.conversation_id, 0);
    let message = &first.messages[0];
    assert_eq!(message.content, expected.content);
    assert_eq!(message.metadata, expected.metadata);
    assert_eq!(message.tool_calls, std::mem::take(&mut expected.tool_calls));
    assert_eq!(message.tool_results.len(), 32);
    assert_eq!(message.emotion, expected.emotion);
}

#[tokio::test]
async fn a_conversation_of_one_giant_message_is_one_page_without_a_token() {
    // A budget below one message still answers with that message.
    for budget in [DEFAULT_PAGE_BYTES, 1] {
        let app = spawn_app_with(|s| s.max_page_bytes = budget).await;
        let conversation = conversation_of_largest_messages(&app, 1).await;
        for order in [pb::SortOrder::OldestFirst, pb::SortOrder::NewestFirst] {
            let page = app
                .list_messages(pb::ListMessagesRequest {
                    conversation_id: conversation.clone(),
                    page_size: 500,
                    order: order as i32,
                    ..Default::default()
                })
                .await
                .expect("page");
            assert_eq!(page.messages.len(), 1);
            assert!(page.next_page_token.is_empty());
        }
    }
}

#[tokio::test]
async fn a_budget_smaller_than_a_message_pages_one_message_at_a_time() {
    let app = spawn_app_with(|s| s.max_page_bytes = 1).await;
    let conversation = uuid::Uuid::now_v7().to_string();
    for i in 0..5 {
        app.store(TestApp::message(
            &conversation,
            "ada",
            &format!("m{i}"),
            None,
        ))
        .await
        .expect("stored");
    }

    let (oldest_first, sizes) =
        walk_messages(&app, &conversation, pb::SortOrder::OldestFirst, 0).await;
    assert_eq!(oldest_first, [1, 2, 3, 4, 5]);
    assert_eq!(sizes.len(), 5, "one message a page");
    let (newest_first, _) =
        walk_messages(&app, &conversation, pb::SortOrder::NewestFirst, 500).await;
    assert_eq!(newest_first, [5, 4, 3, 2, 1]);
}

#[tokio::test]
async fn conversation_listings_are_cut_by_the_same_budget() {
    let labels: Vec<String> = (0..32).map(|i| format!("{i:0>32}")).collect();
    let app = spawn_app_with(|s| s.max_page_bytes = 4 * 1024).await;
    // Conversations with every label slot used: about 1.8 KB each.
    let mut ids = Vec::new();
    for _ in 0..7 {
        let id = uuid::Uuid::now_v7().to_string();
        for label in &labels {
            app.store(TestApp::message(&id, "bea", "x", Some((0.5, label))))
                .await
                .expect("stored");
        }
        ids.push(id);
    }
    ids.reverse(); // newest first

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .client
            .clone()
            .list_conversations(pb::ListConversationsRequest {
                user_id: "bea".into(),
                page_size: 500,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= 4 * 1024, "{}", page.encoded_len());
        assert!(!page.conversations.is_empty());
        seen.extend(page.conversations.into_iter().map(|c| c.conversation_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every conversation once, newest first");
    assert!(pages >= 4, "cut by bytes: {pages} pages");
}

fn label_counts(conversation: &pb::Conversation) -> HashMap<String, i64> {
    conversation
        .emotion_stats
        .clone()
        .expect("stats")
        .label_counts
}

#[tokio::test]
async fn a_conversation_counts_at_most_the_cap_of_distinct_labels_plus_the_overflow() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    for i in 0..300 {
        app.store(TestApp::message(
            &conversation,
            "cy",
            "scored",
            Some((0.1, &format!("label{i:03}"))),
        ))
        .await
        .expect("stored");
    }
    eprintln!(
        "300 scored StoreMessage calls, 300 labels: {:?}",
        started.elapsed()
    );

    let counts = label_counts(&app.conversation(&conversation).await.expect("conversation"));
    assert_eq!(counts.len(), 32 + 1);
    assert_eq!(counts.values().sum::<i64>(), 300);
    assert_eq!(counts["~other"], 300 - 32);
    assert!((0..32).all(|i| counts[&format!("label{i:03}")] == 1));

    // Labels counted before the cap keep counting, whatever their case or
    // spaces; a new label still goes to the overflow.
    for label in ["label000", " LABEL031 ", "Label031", "newcomer"] {
        app.store(TestApp::message(
            &conversation,
            "cy",
            "again",
            Some((0.1, label)),
        ))
        .await
        .expect("stored");
    }
    let stored = app.conversation(&conversation).await.expect("conversation");
    let counts = label_counts(&stored);
    assert_eq!(counts.len(), 33);
    assert_eq!(counts["label000"], 2);
    assert_eq!(counts["label031"], 3);
    assert_eq!(counts["~other"], 300 - 32 + 1);
    assert_eq!(counts.values().sum::<i64>(), 304);
    assert_eq!(
        stored.emotion_stats.expect("stats").scored_message_count,
        304
    );

    // Each message keeps its own label.
    let history = app.history(&conversation, 2).await.expect("history");
    assert_eq!(
        history.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(),
        ["label031", "newcomer"]
    );
    let newest = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: conversation,
            page_size: 1,
            order: pb::SortOrder::NewestFirst as i32,
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(
        newest.messages[0].emotion.as_ref().expect("emotion").label,
        "newcomer"
    );
}

#[tokio::test]
async fn the_distinct_label_cap_is_configurable() {
    let app = spawn_app_with(|s| s.max_distinct_labels = 1).await;
    let conversation = uuid::Uuid::now_v7().to_string();
    for label in ["calm", "joy", "calm", "anger"] {
        app.store(TestApp::message(
            &conversation,
            "di",
            "x",
            Some((0.0, label)),
        ))
        .await
        .expect("stored");
    }
    let counts = label_counts(&app.conversation(&conversation).await.expect("conversation"));
    assert_eq!(
        counts,
        HashMap::from([("calm".to_owned(), 2), ("~other".to_owned(), 2)])
    );
}

#[tokio::test]
async fn no_caller_can_send_the_overflow_label() {
    let app = spawn_app().await;
    for label in ["~other", " ~OTHER ", "~"] {
        let status = app
            .store(TestApp::message("", "eve", "x", Some((0.0, label))))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["emotion.label"]);
    }
    let mut scored = TestApp::message("", "eve", "x", Some((0.0, "joy")));
    if let Some(emotion) = scored.emotion.as_mut() {
        emotion.scores.insert("~other".into(), 0.5);
    }
    let status = app.store(scored).await.expect_err("refused");
    assert_eq!(violated_fields(&status), ["emotion.scores"]);
}

async fn build_error(tweak: impl FnOnce(&mut Settings)) -> String {
    // Never reaches the database: limits are checked first.
    let mut settings = Settings::for_database("postgres://nobody@127.0.0.1:1/none");
    settings.common.grpc_addr = "127.0.0.1:0".parse().expect("address");
    settings.common.admin_addr = "off".parse().expect("address");
    tweak(&mut settings);
    match Application::build(settings).await {
        Ok(_) => panic!("limits accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_page_budget_over_the_response_limit_is_refused_at_start_up() {
    let over = build_error(|s| s.max_page_bytes = MAX_RESPONSE_BYTES + 1).await;
    assert!(over.contains("MEMORY_MAX_PAGE_BYTES"), "{over}");
    let zero = build_error(|s| s.max_page_bytes = 0).await;
    assert!(zero.contains("MEMORY_MAX_PAGE_BYTES"), "{zero}");

    // As an operator would set it.
    let cli =
        Cli::try_parse_from(["memory-service", "--max-page-bytes", "4194304"]).expect("parses");
    assert_eq!(cli.settings.max_page_bytes, 4 * 1024 * 1024);
    assert!(cli.settings.check_limits().is_err());

    // The largest allowed budget serves.
    let app = spawn_app_with(|s| s.max_page_bytes = MAX_RESPONSE_BYTES).await;
    app.store(TestApp::message("", "fay", "x", None))
        .await
        .expect("serving");
}

#[tokio::test]
async fn limits_that_would_outgrow_the_response_limit_are_refused_at_start_up() {
    let content = build_error(|s| s.max_content_bytes = 2 * 1024 * 1024).await;
    assert!(content.contains("MEMORY_MAX_CONTENT_BYTES"), "{content}");
    let labels = build_error(|s| {
        s.max_distinct_labels = 100_000;
        s.max_label_chars = 64;
    })
    .await;
    assert!(labels.contains("MEMORY_MAX_DISTINCT_LABELS"), "{labels}");
    let history = build_error(|s| s.max_label_chars = 100_000).await;
    assert!(history.contains("MEMORY_MAX_LABEL_CHARS"), "{history}");
    let none = build_error(|s| s.max_distinct_labels = 0).await;
    assert!(none.contains("MEMORY_MAX_DISTINCT_LABELS"), "{none}");
}

#[tokio::test]
async fn conversations_stored_before_the_cap_are_folded_by_the_migration() {
    let app = spawn_app_with(|s| s.common.skip_migrations = true).await;
    let migrator = memory_service::store::migrator();
    migrator
        .run_to(20261123000001, &app.db)
        .await
        .expect("the schema before the cap");
    // As the uncapped write path left it: 300 labels, label000 the most
    // counted (5), label001..label031 next (2), the rest once.
    let conversation = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO memory.conversations \
           (id, user_id, created_at, last_message_at, message_count, scored_count, label_counts) \
         SELECT $1, 'gus', now(), now(), 335, 335, jsonb_object_agg( \
           'label' || lpad(i::text, 3, '0'), CASE WHEN i = 0 THEN 5 WHEN i < 32 THEN 2 ELSE 1 END) \
         FROM generate_series(0, 299) i",
    )
    .bind(conversation)
    .execute(&app.db)
    .await
    .expect("legacy conversation");
    migrator.run(&app.db).await.expect("migrations");

    let id = conversation.to_string();
    let counts = label_counts(&app.conversation(&id).await.expect("conversation"));
    assert_eq!(counts.len(), 33);
    assert_eq!(counts.values().sum::<i64>(), 335);
    assert_eq!(counts["label000"], 5);
    assert!((1..32).all(|i| counts[&format!("label{i:03}")] == 2));
    assert_eq!(counts["~other"], 268);

    // And it is capped from then on.
    for label in ["label000", "label299"] {
        app.store(TestApp::message(&id, "gus", "x", Some((0.0, label))))
            .await
            .expect("stored");
    }
    let counts = label_counts(&app.conversation(&id).await.expect("conversation"));
    assert_eq!(
        (counts.len(), counts["label000"], counts["~other"]),
        (33, 6, 269)
    );
}
