use maitre_api::memory::v1 as pb;
use tonic::Code;

use crate::support::{TestApp, reason, spawn_app, violated_fields};

async fn conversation_with(app: &TestApp, user: &str, messages: usize) -> String {
    let conversation = uuid::Uuid::now_v7().to_string();
    for i in 0..messages {
        app.store(TestApp::message(
            &conversation,
            user,
            &format!("m{i}"),
            None,
        ))
        .await
        .expect("stored");
    }
    conversation
}

async fn walk(app: &TestApp, conversation: &str, order: pb::SortOrder, page_size: i32) -> Vec<i64> {
    let mut seen = Vec::new();
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
        assert!(page.messages.len() <= page_size as usize);
        seen.extend(page.messages.iter().map(|m| m.sequence));
        if page.next_page_token.is_empty() {
            return seen;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn pagination_walks_every_message_exactly_once_in_order() {
    let app = spawn_app().await;
    let conversation = conversation_with(&app, "ivy", 23).await;

    let oldest_first = walk(&app, &conversation, pb::SortOrder::OldestFirst, 5).await;
    assert_eq!(oldest_first, (1..=23).collect::<Vec<_>>());
    let newest_first = walk(&app, &conversation, pb::SortOrder::NewestFirst, 7).await;
    assert_eq!(newest_first, (1..=23).rev().collect::<Vec<_>>());
    // Exactly one page when it fits: no empty trailing page.
    let exact = walk(&app, &conversation, pb::SortOrder::Unspecified, 23).await;
    assert_eq!(exact.len(), 23);
}

#[tokio::test]
async fn a_page_token_from_another_query_is_refused() {
    let app = spawn_app().await;
    let first = conversation_with(&app, "jo", 3).await;
    let second = conversation_with(&app, "jo", 3).await;
    let page = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: first.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page");

    for (conversation, order) in [
        (second, pb::SortOrder::OldestFirst),
        (first, pb::SortOrder::NewestFirst),
    ] {
        let status = app
            .list_messages(pb::ListMessagesRequest {
                conversation_id: conversation,
                page_size: 1,
                page_token: page.next_page_token.clone(),
                order: order as i32,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
}

#[tokio::test]
async fn emotion_history_returns_the_last_n_scored_messages_oldest_first() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let scores = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6];
    for (i, score) in scores.iter().enumerate() {
        app.store(TestApp::message(
            &conversation,
            "kim",
            "scored",
            Some((*score, "mixed")),
        ))
        .await
        .expect("stored");
        app.store(TestApp::message(
            &conversation,
            "kim",
            &format!("unscored {i}"),
            None,
        ))
        .await
        .expect("stored");
    }

    let points = app.history(&conversation, 4).await.expect("history");

    assert_eq!(
        points.iter().map(|p| p.score).collect::<Vec<_>>(),
        [0.3, -0.4, 0.5, -0.6]
    );
    assert_eq!(
        points.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        [5, 7, 9, 11]
    );
    assert!(
        points
            .iter()
            .all(|p| p.label == "mixed" && !p.message_id.is_empty())
    );
    assert_eq!(
        app.history(&conversation, 0)
            .await
            .expect("default limit")
            .len(),
        6
    );
}

#[tokio::test]
async fn unknown_conversations_are_not_found() {
    let app = spawn_app().await;
    let unknown = uuid::Uuid::now_v7().to_string();

    let get = app.conversation(&unknown).await.expect_err("not found");
    let list = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: unknown.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not found");
    let history = app.history(&unknown, 5).await.expect_err("not found");

    for status in [get, list, history] {
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(reason(&status), "CONVERSATION_NOT_FOUND");
    }
}

#[tokio::test]
async fn emotion_history_is_an_index_only_scan_on_the_covering_index() {
    let app = spawn_app().await;
    // Enough rows for the planner to prefer the index, as in production.
    sqlx::query(
        "INSERT INTO memory.conversations (id, user_id, created_at, last_message_at, message_count) \
         SELECT ('00000000-0000-7000-8000-' || lpad(c::text, 12, '0'))::uuid, 'u' || c, now(), now(), 50 \
         FROM generate_series(1, 200) c",
    )
    .execute(&app.db)
    .await
    .expect("conversations");
    sqlx::query(
        "INSERT INTO memory.messages (conversation_id, seq, id, user_id, role, content, emotion_score, emotion_label, created_at) \
         SELECT ('00000000-0000-7000-8000-' || lpad(c::text, 12, '0'))::uuid, s, gen_random_uuid(), 'u' || c, 1, 'x', \
                CASE WHEN s % 2 = 0 THEN 0.5 END, CASE WHEN s % 2 = 0 THEN 'joy' END, now() \
         FROM generate_series(1, 200) c, generate_series(1, 50) s",
    )
    .execute(&app.db)
    .await
    .expect("messages");
    sqlx::query("VACUUM ANALYZE memory.messages")
        .execute(&app.db)
        .await
        .expect("vacuum");

    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        memory_service::store::messages::EMOTION_HISTORY
            .replace("$1", "'00000000-0000-7000-8000-000000000007'::uuid")
            .replace("$2", "20")
    )))
    .fetch_all(&app.db)
    .await
    .expect("explain");
    let plan = plan.join("\n");

    assert!(
        plan.contains("Index Only Scan using messages_emotion_history_idx"),
        "plan was:\n{plan}"
    );
}
