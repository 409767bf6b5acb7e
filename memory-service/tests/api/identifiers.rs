//! Identifiers mean one thing: a user id, channel or request id that looks
//! like another is refused, for every RPC that takes one, with a field
//! violation naming the field and a reason; nothing is written or erased.

use maitre_api::memory::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{TestApp, spawn_app};

/// One class of look-alike characters: an example value per member, and the
/// reason the refusal carries.
struct Class {
    name: &'static str,
    reason: &'static str,
    values: Vec<String>,
}

fn around(c: char) -> String {
    format!("ali{c}ce")
}

fn classes() -> Vec<Class> {
    let inside = |chars: &[char]| chars.iter().map(|c| around(*c)).collect();
    vec![
        Class {
            name: "surrounding whitespace",
            reason: "SURROUNDING_WHITESPACE",
            values: [
                "alice ",
                " alice",
                "alice\t",
                "\u{00A0}alice",
                "alice\u{3000}",
            ]
            .map(String::from)
            .to_vec(),
        },
        Class {
            name: "bidi overrides and embeddings",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}']),
        },
        Class {
            name: "bidi isolates",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}']),
        },
        Class {
            name: "bidi marks",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{200E}', '\u{200F}', '\u{061C}']),
        },
        Class {
            name: "zero-width characters",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}']),
        },
        Class {
            name: "soft hyphen and other format characters",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{00AD}', '\u{2061}', '\u{180E}', '\u{E0001}', '\u{FFF9}']),
        },
        Class {
            name: "control characters",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{1}', '\u{1B}', '\u{7F}', '\u{85}', '\n']),
        },
        Class {
            name: "invisible fillers and separators",
            reason: "INVALID_CHARACTERS",
            values: inside(&['\u{3164}', '\u{2800}', '\u{2028}', '\u{00A0}', '\u{FE0F}']),
        },
        Class {
            name: "not NFC",
            reason: "NOT_NORMALIZED",
            values: vec!["jose\u{301}".into()],
        },
    ]
}

/// The (field, reason) pairs of an INVALID_ARGUMENT.
fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.reason))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_refused(status: &tonic::Status, field: &str, reason: &str, case: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert_eq!(
        violations(status),
        [(field.to_owned(), reason.to_owned())],
        "{case}"
    );
}

#[tokio::test]
async fn store_message_refuses_look_alike_user_ids_channels_and_request_ids() {
    let app = spawn_app().await;
    for class in classes() {
        for value in &class.values {
            let case = format!("{}: {value:?}", class.name);
            let mut user = TestApp::message("", value, "hi", None);
            user.request_id = "r".into();
            let status = app.store(user).await.expect_err(&case);
            assert_refused(&status, "user_id", class.reason, &case);

            let mut channel = TestApp::message("", "alice", "hi", None);
            channel.channel = value.clone();
            let status = app.store(channel).await.expect_err(&case);
            assert_refused(&status, "channel", class.reason, &case);

            let mut key = TestApp::message("", "alice", "hi", None);
            key.request_id = value.clone();
            let status = app.store(key).await.expect_err(&case);
            assert_refused(&status, "request_id", class.reason, &case);
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations").await,
        0
    );

    // Plain identifiers, non-ASCII ones and inner ASCII spaces still pass.
    for user in ["alice", "ana lópez", "用户-42", "emoji-🙂"] {
        let mut ok = TestApp::message("", user, "hi", None);
        ok.channel = "whats app".into();
        ok.request_id = format!("key of {user}");
        app.store(ok).await.expect(user);
    }
    // An empty channel is still allowed (it is optional).
    let mut no_channel = TestApp::message("", "alice", "hi", None);
    no_channel.channel.clear();
    app.store(no_channel).await.expect("empty channel");
}

#[tokio::test]
async fn look_alike_user_ids_neither_list_nor_erase_the_real_user() {
    let app = spawn_app().await;
    // "alice" exists: a look-alike id must neither erase nor list her.
    app.store(TestApp::message("", "alice", "mine", None))
        .await
        .expect("stored");
    for class in classes() {
        for value in &class.values {
            let case = format!("{}: {value:?}", class.name);
            // Erasure takes any id that can have been stored (ids from
            // before these rules must stay erasable; control characters
            // never were) and matches it exactly: a look-alike erases nothing.
            let erased = app
                .client
                .clone()
                .delete_user_data(pb::DeleteUserDataRequest {
                    user_id: value.clone(),
                })
                .await;
            if value.chars().any(char::is_control) {
                let status = erased.expect_err(&case);
                assert_refused(&status, "user_id", "INVALID_CHARACTERS", &case);
            } else {
                let erased = erased.expect(&case).into_inner();
                assert_eq!(erased.conversations_deleted, 0, "{case}");
            }

            let status = app
                .client
                .clone()
                .list_conversations(pb::ListConversationsRequest {
                    user_id: value.clone(),
                    ..Default::default()
                })
                .await
                .expect_err(&case);
            assert_refused(&status, "user_id", class.reason, &case);
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.erased_conversations")
            .await,
        0
    );
}

#[tokio::test]
async fn a_user_id_stored_before_the_identifier_rules_can_still_be_erased() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "bob", "old", None))
        .await
        .expect("stored");
    // As an older version accepted it: with a trailing space.
    sqlx::query("UPDATE memory.conversations SET user_id = 'bob ' WHERE id = $1::uuid")
        .bind(&conversation)
        .execute(&app.db)
        .await
        .expect("legacy id");
    let erased = app
        .client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "bob ".into(),
        })
        .await
        .expect("erasable")
        .into_inner();
    assert_eq!(erased.conversations_deleted, 1);
    let status = app
        .client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: String::new(),
        })
        .await
        .expect_err("an id is required");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn several_bad_identifiers_are_reported_together() {
    let app = spawn_app().await;
    let mut request = TestApp::message("", "alice\u{202E}", "hi", None);
    request.channel = "web ".into();
    request.request_id = "\u{200B}r1".into();
    let status = app.store(request).await.expect_err("refused");
    assert_eq!(
        violations(&status),
        [
            ("user_id".to_owned(), "INVALID_CHARACTERS".to_owned()),
            ("channel".to_owned(), "SURROUNDING_WHITESPACE".to_owned()),
            ("request_id".to_owned(), "INVALID_CHARACTERS".to_owned()),
        ]
    );
}
