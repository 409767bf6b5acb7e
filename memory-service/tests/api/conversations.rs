use maitre_api::memory::v1 as pb;

use crate::support::{TestApp, spawn_app};

async fn list(
    app: &TestApp,
    user: &str,
    filter: pb::ConversationFilter,
    page_size: i32,
) -> Vec<pb::Conversation> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .client
            .clone()
            .list_conversations(pb::ListConversationsRequest {
                user_id: user.into(),
                filter: filter as i32,
                page_size,
                page_token: token.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        all.extend(page.conversations);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn conversations_list_active_first_and_active_only_on_request() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = uuid::Uuid::now_v7().to_string();
        app.store(TestApp::message(&id, "lea", &format!("c{i}"), None))
            .await
            .expect("stored");
        ids.push(id);
    }
    app.store(TestApp::message("", "someone-else", "x", None))
        .await
        .expect("stored");
    for closed in [&ids[1], &ids[3]] {
        app.client
            .clone()
            .close_conversation(pb::CloseConversationRequest {
                conversation_id: closed.clone(),
            })
            .await
            .expect("closed");
    }

    let all = list(&app, "lea", pb::ConversationFilter::Unspecified, 2).await;
    let order: Vec<&str> = all.iter().map(|c| c.conversation_id.as_str()).collect();
    assert_eq!(
        order,
        [&ids[4], &ids[2], &ids[0], &ids[3], &ids[1]].map(String::as_str)
    );
    assert_eq!(
        all.iter().map(|c| c.active).collect::<Vec<_>>(),
        [true, true, true, false, false]
    );

    let active = list(&app, "lea", pb::ConversationFilter::ActiveOnly, 2).await;
    assert_eq!(active.len(), 3);
    assert!(active.iter().all(|c| c.active));

    // A new message reopens a closed conversation.
    app.store(TestApp::message(&ids[1], "lea", "back", None))
        .await
        .expect("stored");
    assert!(
        app.conversation(&ids[1])
            .await
            .expect("conversation")
            .active
    );
}

#[tokio::test]
async fn erasing_a_user_removes_exactly_that_users_data() {
    let app = spawn_app().await;
    for _ in 0..3 {
        let id = uuid::Uuid::now_v7().to_string();
        for i in 0..4 {
            app.store(TestApp::message(
                &id,
                "max",
                &format!("m{i}"),
                Some((0.2, "joy")),
            ))
            .await
            .expect("stored");
        }
    }
    let kept = uuid::Uuid::now_v7().to_string();
    for i in 0..2 {
        app.store(TestApp::message(&kept, "nia", &format!("m{i}"), None))
            .await
            .expect("stored");
    }
    // A user id that merely starts the same must survive.
    app.store(TestApp::message("", "max2", "m", None))
        .await
        .expect("stored");

    let erased = app
        .client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "max".into(),
        })
        .await
        .expect("erased")
        .into_inner();

    assert_eq!(
        (erased.conversations_deleted, erased.messages_deleted),
        (3, 12)
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'max'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations WHERE user_id = 'max'")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 3);
    assert_eq!(
        app.conversation(&kept).await.expect("kept").message_count,
        2
    );

    let again = app
        .client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "max".into(),
        })
        .await
        .expect("erased twice")
        .into_inner();
    assert_eq!(
        (again.conversations_deleted, again.messages_deleted),
        (0, 0)
    );
}

#[tokio::test]
async fn conversations_are_listed_once_newest_created_first_whatever_their_ids() {
    let app = spawn_app().await;
    // Created in this order; ids that sort nowhere near creation order: the
    // smallest and largest UUIDs, v4 ids, v7 ids, and a v7 id from
    // the future (its time bits say 2100).
    let v7 = || uuid::Uuid::now_v7().to_string();
    let created = [
        v7(),
        "ffffffff-ffff-ffff-ffff-ffffffffffff".to_owned(),
        "9f1e4c2a-7d3b-4c8e-a1f0-5b6d7e8f9a0b".to_owned(),
        "00000000-0000-0000-0000-000000000001".to_owned(),
        v7(),
        "0418ed40-6c00-7000-8000-000000000000".to_owned(),
        "3b241101-e2bb-4255-8caf-4136c566a962".to_owned(),
        v7(),
    ];
    for (i, id) in created.iter().enumerate() {
        app.store(TestApp::message(id, "ola", &format!("c{i}"), None))
            .await
            .expect("stored");
    }
    // Closing one moves it to the closed group; a new message to an old one
    // does not move it (order is by creation).
    app.client
        .clone()
        .close_conversation(pb::CloseConversationRequest {
            conversation_id: created[2].clone(),
        })
        .await
        .expect("closed");
    app.store(TestApp::message(&created[0], "ola", "later", None))
        .await
        .expect("stored");

    let mut newest_first: Vec<&str> = created.iter().rev().map(String::as_str).collect();
    newest_first.retain(|id| *id != created[2]);
    newest_first.push(&created[2]);
    for page_size in [1, 2, 3, 50] {
        let all = list(&app, "ola", pb::ConversationFilter::Unspecified, page_size).await;
        let order: Vec<&str> = all.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(order, newest_first, "page size {page_size}");
        let active = list(&app, "ola", pb::ConversationFilter::ActiveOnly, page_size).await;
        let order: Vec<&str> = active.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(
            order,
            newest_first[..7],
            "active only, page size {page_size}"
        );
    }
}

#[tokio::test]
async fn page_tokens_of_another_listing_are_refused() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.store(TestApp::message("", "pia", "x", None))
            .await
            .expect("stored");
    }
    let first = app
        .client
        .clone()
        .list_conversations(pb::ListConversationsRequest {
            user_id: "pia".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    // Another user, the other filter, and a token of the id-ordered listing
    // (before conversations had a server-assigned order).
    let old_token = maitre_runtime::pagination::encode(
        "ListConversations|pia|false",
        &serde_json::json!({"in_closed": false, "last_id": uuid::Uuid::max()}),
    );
    for (user, filter, token) in [
        (
            "pib",
            pb::ConversationFilter::Unspecified,
            first.next_page_token.clone(),
        ),
        (
            "pia",
            pb::ConversationFilter::ActiveOnly,
            first.next_page_token.clone(),
        ),
        ("pia", pb::ConversationFilter::Unspecified, old_token),
    ] {
        let status = app
            .client
            .clone()
            .list_conversations(pb::ListConversationsRequest {
                user_id: user.into(),
                filter: filter as i32,
                page_size: 1,
                page_token: token,
            })
            .await
            .expect_err("a token of another listing");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(crate::support::violated_fields(&status), ["page_token"]);
    }
}
