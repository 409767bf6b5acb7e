use futures::future::join_all;
use maitre_api::memory::v1 as pb;
use tonic::Code;

use crate::support::{TestApp, reason, spawn_app};

#[tokio::test]
async fn first_message_creates_the_conversation_and_is_stored() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();

    let response = app
        .store(TestApp::message(
            &conversation,
            "alice",
            "I'd like a table for two",
            Some((0.4, "joy")),
        ))
        .await
        .expect("stored");

    assert!(response.conversation_created);
    assert_eq!(response.conversation_message_count, 1);
    let message = response.message.expect("message");
    assert_eq!(message.sequence, 1);
    assert_eq!(message.conversation_id, conversation);
    let (content, score, label): (String, f64, String) = sqlx::query_as(
        "SELECT content, emotion_score, emotion_label FROM memory.messages WHERE conversation_id = $1::uuid",
    )
    .bind(&conversation)
    .fetch_one(&app.db)
    .await
    .expect("row");
    assert_eq!(
        (content.as_str(), score, label.as_str()),
        ("I'd like a table for two", 0.4, "joy")
    );

    let second = app
        .store(TestApp::message(&conversation, "alice", "Friday?", None))
        .await
        .expect("stored");
    assert!(!second.conversation_created);
    assert_eq!(second.message.expect("message").sequence, 2);
}

#[tokio::test]
async fn empty_conversation_id_starts_a_new_conversation() {
    let app = spawn_app().await;
    let response = app
        .store(TestApp::message("", "bob", "hi", None))
        .await
        .expect("stored");
    let id = response.message.expect("message").conversation_id;
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(
        app.conversation(&id).await.expect("conversation").user_id,
        "bob"
    );
}

#[tokio::test]
async fn emotion_statistics_are_exact_after_a_mixed_series() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let series = [
        Some((0.5, "joy")),
        None,
        Some((-0.25, "anger")),
        Some((0.75, "joy")),
        None,
        Some((-1.0, "anger")),
        Some((-0.5, "sadness")),
    ];
    for (i, emotion) in series.iter().enumerate() {
        app.store(TestApp::message(
            &conversation,
            "carol",
            &format!("m{i}"),
            *emotion,
        ))
        .await
        .expect("stored");
    }

    let conversation = app.conversation(&conversation).await.expect("conversation");
    let stats = conversation.emotion_stats.expect("stats");
    assert_eq!(conversation.message_count, 7);
    assert_eq!(stats.scored_message_count, 5);
    // (0.5 - 0.25 + 0.75 - 1.0 - 0.5) / 5 = -0.1
    assert!(
        (stats.average_score - (-0.1)).abs() < 1e-12,
        "average {}",
        stats.average_score
    );
    assert_eq!(stats.label_counts.get("joy"), Some(&2));
    assert_eq!(stats.label_counts.get("anger"), Some(&2));
    assert_eq!(stats.label_counts.get("sadness"), Some(&1));
    assert_eq!(stats.last_score, -0.5);
    // Window [0.5, -0.25, 0.75, -1.0, -0.5]: older [0.5, -0.25] mean 0.125,
    // newer [0.75, -1.0, -0.5] mean -0.25: a fall of 0.375.
    assert_eq!(stats.trend, pb::EmotionTrend::Declining as i32);
}

#[tokio::test]
async fn trend_reads_only_the_last_ten_scores() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    // Five very negative scores, then ten rising ones: the old ones fall out.
    let scores: Vec<f64> = std::iter::repeat_n(-1.0, 5)
        .chain((0..10).map(|i| f64::from(i) / 10.0))
        .collect();
    for (i, score) in scores.iter().enumerate() {
        app.store(TestApp::message(
            &conversation,
            "dan",
            &format!("m{i}"),
            Some((*score, "mixed")),
        ))
        .await
        .expect("stored");
    }
    let stats = app
        .conversation(&conversation)
        .await
        .expect("conversation")
        .emotion_stats
        .expect("stats");
    assert_eq!(stats.trend, pb::EmotionTrend::Improving as i32);
    assert!((stats.recent_average_score - 0.45).abs() < 1e-12);
    assert_eq!(stats.scored_message_count, 15);
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_first_result_and_changes_nothing() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let mut request = TestApp::message(&conversation, "erin", "book it", Some((0.9, "joy")));
    request.request_id = "req-1".into();

    let first = app.store(request.clone()).await.expect("first");
    let retry = app.store(request.clone()).await.expect("retry");

    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(
        first.message.as_ref().map(|m| &m.message_id),
        retry.message.as_ref().map(|m| &m.message_id)
    );
    assert_eq!(retry.message.expect("message").content, "book it");
    let conversation = app.conversation(&conversation).await.expect("conversation");
    assert_eq!(conversation.message_count, 1);
    assert_eq!(
        conversation
            .emotion_stats
            .expect("stats")
            .scored_message_count,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
}

#[tokio::test]
async fn concurrent_retries_with_one_request_id_store_one_message() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let mut request = TestApp::message(&conversation, "fay", "once", Some((0.1, "calm")));
    request.request_id = "same".into();
    let results = join_all((0..20).map(|_| app.store(request.clone()))).await;
    let ids: std::collections::HashSet<String> = results
        .into_iter()
        .map(|r| {
            r.expect("every retry answers")
                .message
                .expect("message")
                .message_id
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    let conversation = app.conversation(&conversation).await.expect("conversation");
    assert_eq!(conversation.message_count, 1);
    assert_eq!(
        conversation
            .emotion_stats
            .expect("stats")
            .scored_message_count,
        1
    );
}

#[tokio::test]
async fn two_hundred_concurrent_messages_on_one_conversation_are_all_counted() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    let calls = (0..200).map(|i| {
        let emotion = if i % 2 == 0 {
            Some((0.5, "joy"))
        } else {
            Some((-0.5, "anger"))
        };
        app.store(TestApp::message(
            &conversation,
            "gus",
            &format!("m{i}"),
            emotion,
        ))
    });
    for result in join_all(calls).await {
        result.expect("every call stored");
    }

    let conversation = app.conversation(&conversation).await.expect("conversation");
    let stats = conversation.emotion_stats.expect("stats");
    assert_eq!(conversation.message_count, 200);
    assert_eq!(stats.scored_message_count, 200);
    assert_eq!(stats.label_counts.get("joy"), Some(&100));
    assert_eq!(stats.label_counts.get("anger"), Some(&100));
    assert!(stats.average_score.abs() < 1e-12);
    let (rows, distinct_seq, max_seq): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq), max(seq) FROM memory.messages")
            .fetch_one(&app.db)
            .await
            .expect("counts");
    assert_eq!((rows, distinct_seq, max_seq), (200, 200, 200));
}

#[tokio::test]
async fn another_users_conversation_is_refused_and_untouched() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "hana", "mine", None))
        .await
        .expect("stored");

    let status = app
        .store(TestApp::message(&conversation, "mallory", "hijack", None))
        .await
        .expect_err("refused");

    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "CONVERSATION_USER_MISMATCH");
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    assert_eq!(
        app.conversation(&conversation)
            .await
            .expect("conversation")
            .message_count,
        1
    );
}
