use maitre_api::memory::v1 as pb;
use tonic::Code;

use crate::support::{TestApp, reason, spawn_app, violated_fields};

fn valid() -> pb::StoreMessageRequest {
    TestApp::message("", "olga", "hello", Some((0.3, "joy")))
}

#[tokio::test]
async fn every_store_message_rule_names_its_field_and_writes_nothing() {
    let app = spawn_app().await;
    let cases: Vec<(&str, pb::StoreMessageRequest, &str)> = vec![
        (
            "bad uuid",
            pb::StoreMessageRequest {
                conversation_id: "not-a-uuid".into(),
                ..valid()
            },
            "conversation_id",
        ),
        (
            "no user",
            pb::StoreMessageRequest {
                user_id: String::new(),
                ..valid()
            },
            "user_id",
        ),
        (
            "blank user",
            pb::StoreMessageRequest {
                user_id: "   ".into(),
                ..valid()
            },
            "user_id",
        ),
        (
            "long user",
            pb::StoreMessageRequest {
                user_id: "u".repeat(129),
                ..valid()
            },
            "user_id",
        ),
        (
            "long channel",
            pb::StoreMessageRequest {
                channel: "c".repeat(65),
                ..valid()
            },
            "channel",
        ),
        (
            "no role",
            pb::StoreMessageRequest { role: 0, ..valid() },
            "role",
        ),
        (
            "unknown role",
            pb::StoreMessageRequest {
                role: 99,
                ..valid()
            },
            "role",
        ),
        (
            "huge content",
            pb::StoreMessageRequest {
                content: "x".repeat(32 * 1024 + 1),
                ..valid()
            },
            "content",
        ),
        (
            "nul content",
            pb::StoreMessageRequest {
                content: "a\0b".into(),
                ..valid()
            },
            "content",
        ),
        (
            "score too high",
            pb::StoreMessageRequest {
                emotion: Some(pb::Emotion {
                    score: 1.5,
                    label: "joy".into(),
                    ..Default::default()
                }),
                ..valid()
            },
            "emotion.score",
        ),
        (
            "score NaN",
            pb::StoreMessageRequest {
                emotion: Some(pb::Emotion {
                    score: f64::NAN,
                    label: "joy".into(),
                    ..Default::default()
                }),
                ..valid()
            },
            "emotion.score",
        ),
        (
            "no label",
            pb::StoreMessageRequest {
                emotion: Some(pb::Emotion {
                    score: 0.1,
                    label: String::new(),
                    ..Default::default()
                }),
                ..valid()
            },
            "emotion.label",
        ),
        (
            "long label",
            pb::StoreMessageRequest {
                emotion: Some(pb::Emotion {
                    score: 0.1,
                    label: "a".repeat(33),
                    ..Default::default()
                }),
                ..valid()
            },
            "emotion.label",
        ),
        (
            "per-emotion score out of range",
            pb::StoreMessageRequest {
                emotion: Some(pb::Emotion {
                    score: 0.1,
                    label: "joy".into(),
                    scores: [("joy".to_string(), 2.0)].into(),
                }),
                ..valid()
            },
            "emotion.scores",
        ),
        (
            "huge metadata",
            pb::StoreMessageRequest {
                metadata: [("k".to_string(), "v".repeat(9000))].into(),
                ..valid()
            },
            "metadata",
        ),
        (
            "too many metadata entries",
            pb::StoreMessageRequest {
                metadata: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..valid()
            },
            "metadata",
        ),
        (
            "token count overflow",
            pb::StoreMessageRequest {
                token_usage: Some(pb::TokenUsage {
                    input_tokens: u32::MAX,
                    output_tokens: 1,
                }),
                ..valid()
            },
            "token_usage.input_tokens",
        ),
        (
            "long request id",
            pb::StoreMessageRequest {
                request_id: "r".repeat(129),
                ..valid()
            },
            "request_id",
        ),
    ];

    for (name, request, field) in cases {
        let status = app.store(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert_eq!(violated_fields(&status), [field], "{name}");
        assert_eq!(reason(&status), "INVALID_ARGUMENT", "{name}");
    }
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations").await,
        0
    );
    // Still serving.
    app.store(valid())
        .await
        .expect("a valid message after all that");
}

#[tokio::test]
async fn several_bad_fields_are_all_reported() {
    let app = spawn_app().await;
    let status = app
        .store(pb::StoreMessageRequest {
            conversation_id: "x".into(),
            user_id: String::new(),
            role: 0,
            ..valid()
        })
        .await
        .expect_err("refused");
    assert_eq!(
        violated_fields(&status),
        ["conversation_id", "user_id", "role"]
    );
}

#[tokio::test]
async fn read_requests_validate_ids_and_page_sizes() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let cases: Vec<(tonic::Status, &str)> = vec![
        (
            app.conversation("nope").await.expect_err("bad id"),
            "conversation_id",
        ),
        (
            app.list_messages(pb::ListMessagesRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                page_size: 501,
                ..Default::default()
            })
            .await
            .expect_err("page size"),
            "page_size",
        ),
        (
            app.list_messages(pb::ListMessagesRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                page_size: -1,
                ..Default::default()
            })
            .await
            .expect_err("negative page size"),
            "page_size",
        ),
        (
            app.list_messages(pb::ListMessagesRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                page_token: "garbage!".into(),
                ..Default::default()
            })
            .await
            .expect_err("token"),
            "page_token",
        ),
        (
            app.list_messages(pb::ListMessagesRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                order: 7,
                ..Default::default()
            })
            .await
            .expect_err("order"),
            "order",
        ),
        (
            app.history(&uuid::Uuid::now_v7().to_string(), 201)
                .await
                .expect_err("limit"),
            "limit",
        ),
        (
            client
                .list_conversations(pb::ListConversationsRequest {
                    user_id: String::new(),
                    ..Default::default()
                })
                .await
                .expect_err("user"),
            "user_id",
        ),
        (
            client
                .list_conversations(pb::ListConversationsRequest {
                    user_id: "u".into(),
                    filter: 9,
                    ..Default::default()
                })
                .await
                .expect_err("filter"),
            "filter",
        ),
        (
            client
                .delete_user_data(pb::DeleteUserDataRequest {
                    user_id: String::new(),
                })
                .await
                .expect_err("user"),
            "user_id",
        ),
        (
            client
                .close_conversation(pb::CloseConversationRequest {
                    conversation_id: "1".into(),
                })
                .await
                .expect_err("id"),
            "conversation_id",
        ),
    ];
    for (status, field) in cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violated_fields(&status), [field]);
    }
}
