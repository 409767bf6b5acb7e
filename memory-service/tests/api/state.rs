//! UpdateConversationState / GetConversationState: a versioned JSON object
//! per conversation, written only by test-and-set.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use maitre_api::memory::v1 as pb;
use pb::update_conversation_state_request::Update;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{TestApp, reason, spawn_app, spawn_app_with, violated_fields};

/// A conversation of `user` with one message; returns its id.
pub async fn conversation(app: &TestApp, user: &str) -> String {
    app.store(TestApp::message("", user, "hello", None))
        .await
        .expect("stored")
        .message
        .expect("message")
        .conversation_id
}

pub async fn get_state(app: &TestApp, id: &str) -> Result<pb::ConversationState, tonic::Status> {
    app.client
        .clone()
        .get_conversation_state(pb::GetConversationStateRequest {
            conversation_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().state.expect("state"))
}

pub async fn update(
    app: &TestApp,
    id: &str,
    expected_version: i64,
    update: Update,
) -> Result<pb::ConversationState, tonic::Status> {
    app.client
        .clone()
        .update_conversation_state(pb::UpdateConversationStateRequest {
            conversation_id: id.into(),
            expected_version,
            update: Some(update),
        })
        .await
        .map(|r| r.into_inner().state.expect("state"))
}

fn replace(value: Value) -> Update {
    Update::StateJson(value.to_string())
}

fn patch(value: Value) -> Update {
    Update::MergePatchJson(value.to_string())
}

fn parsed(state: &pb::ConversationState) -> Value {
    serde_json::from_str(&state.state_json).expect("state is JSON")
}

/// The one field violation of an INVALID_ARGUMENT: (field, reason).
fn violation(status: &tonic::Status) -> Option<(String, String)> {
    let bad = status.get_details_bad_request()?;
    match bad.field_violations.as_slice() {
        [one] => Some((one.field.clone(), one.reason.clone())),
        _ => None,
    }
}

/// The `current_version` an ABORTED answer carries.
fn current_version(status: &tonic::Status) -> Option<i64> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("current_version").cloned())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_conversation_starts_without_state_and_each_write_adds_a_version() {
    let app = spawn_app().await;
    let id = conversation(&app, "ada").await;

    let empty = get_state(&app, &id).await.expect("state");
    assert_eq!((empty.version, parsed(&empty)), (0, json!({})));
    assert!(empty.update_time.is_none());

    let first = update(
        &app,
        &id,
        0,
        replace(json!({"step": "party_size", "guests": 2})),
    )
    .await
    .expect("first write");
    assert_eq!(first.version, 1);
    assert_eq!(parsed(&first), json!({"step": "party_size", "guests": 2}));
    assert!(first.update_time.is_some());

    let second = update(
        &app,
        &id,
        1,
        patch(json!({"step": "time", "guests": null, "slot": {"day": "fri"}})),
    )
    .await
    .expect("patched");
    assert_eq!(second.version, 2);
    assert_eq!(
        parsed(&second),
        json!({"step": "time", "slot": {"day": "fri"}})
    );

    // Nested objects merge, arrays and scalars replace (RFC 7396).
    let third = update(
        &app,
        &id,
        2,
        patch(json!({"slot": {"hour": 20}, "tags": ["quiet"]})),
    )
    .await
    .expect("patched");
    assert_eq!(
        parsed(&third),
        json!({"step": "time", "slot": {"day": "fri", "hour": 20}, "tags": ["quiet"]})
    );
    let read = get_state(&app, &id).await.expect("read");
    assert_eq!((read.version, parsed(&read)), (3, parsed(&third)));

    // The stored row is what the reads said.
    let (version, state): (i64, Value) = sqlx::query_as(
        "SELECT version, state FROM memory.conversation_states WHERE conversation_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .expect("row");
    assert_eq!((version, state), (3, parsed(&third)));
}

#[tokio::test]
async fn a_write_from_a_stale_version_is_aborted_with_the_current_version_and_changes_nothing() {
    let app = spawn_app().await;
    let id = conversation(&app, "ben").await;
    update(&app, &id, 0, replace(json!({"n": 1})))
        .await
        .expect("first");

    for (expected, change) in [
        (0, replace(json!({"n": 100}))),
        (0, patch(json!({"n": 100}))),
        (2, replace(json!({"n": 100}))),
        (7, patch(json!({"n": 100}))),
    ] {
        let status = update(&app, &id, expected, change)
            .await
            .expect_err("stale");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert_eq!(reason(&status), "STATE_VERSION_MISMATCH");
        assert_eq!(current_version(&status), Some(1), "{status:?}");
    }
    let state = get_state(&app, &id).await.expect("read");
    assert_eq!((state.version, parsed(&state)), (1, json!({"n": 1})));
}

#[tokio::test]
async fn thirty_two_writers_doing_read_modify_write_lose_no_increment() {
    const WRITERS: usize = 32;
    const INCREMENTS: i64 = 1_000;
    let app = Arc::new(spawn_app().await);
    let id = conversation(&app, "cy").await;
    let tickets = Arc::new(AtomicI64::new(INCREMENTS));
    let aborted = Arc::new(AtomicI64::new(0));

    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (app, id, tickets, aborted) =
            (app.clone(), id.clone(), tickets.clone(), aborted.clone());
        writers.spawn(async move {
            while tickets.fetch_sub(1, Ordering::SeqCst) > 0 {
                loop {
                    let read = get_state(&app, &id).await.expect("read");
                    let counter = parsed(&read)["counter"].as_i64().unwrap_or(0);
                    // Half the writers replace the whole state, half patch it.
                    let change = if writer % 2 == 0 {
                        replace(json!({"counter": counter + 1, "by": writer}))
                    } else {
                        patch(json!({"counter": counter + 1}))
                    };
                    match update(&app, &id, read.version, change).await {
                        Ok(_) => break,
                        Err(status) if status.code() == Code::Aborted => {
                            aborted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => panic!("writer {writer}: {status:?}"),
                    }
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }

    let state = get_state(&app, &id).await.expect("read");
    assert_eq!(parsed(&state)["counter"], json!(INCREMENTS), "lost updates");
    assert_eq!(state.version, INCREMENTS);
    // Not a proof of concurrency by itself, but 32 writers on one row with
    // no conflict at all would mean they never overlapped.
    assert!(
        aborted.load(Ordering::Relaxed) > 0,
        "no writer ever lost a race"
    );
}

#[tokio::test]
async fn states_that_are_not_objects_too_large_or_unstorable_are_refused_and_nothing_is_written() {
    let app = spawn_app_with(|s| s.max_state_bytes = 200).await;
    let id = conversation(&app, "dee").await;
    update(&app, &id, 0, replace(json!({"keep": true})))
        .await
        .expect("first");

    let cases: Vec<(Update, &str, &str)> = vec![
        (
            Update::StateJson("[1, 2]".into()),
            "state_json",
            "INVALID_STATE_JSON",
        ),
        (
            Update::StateJson("{\"a\": ".into()),
            "state_json",
            "INVALID_STATE_JSON",
        ),
        (
            Update::StateJson(r#"{"a": "\u0000"}"#.into()),
            "state_json",
            "INVALID_STATE_JSON",
        ),
        (
            Update::StateJson(json!({"a": "x".repeat(300)}).to_string()),
            "state_json",
            "STATE_TOO_LARGE",
        ),
        // The patch's result is no object: refused by the writing statement.
        (
            Update::MergePatchJson("[1]".into()),
            "merge_patch_json",
            "INVALID_STATE_JSON",
        ),
        (
            Update::MergePatchJson("null".into()),
            "merge_patch_json",
            "INVALID_STATE_JSON",
        ),
        // Each patch fits, the merged state does not (as stored).
        (
            Update::MergePatchJson(json!({"b": "y".repeat(190)}).to_string()),
            "merge_patch_json",
            "STATE_TOO_LARGE",
        ),
        // Numbers jsonb would write out in thousands of digits.
        (
            Update::StateJson(r#"{"n": 1e-16383}"#.into()),
            "state_json",
            "INVALID_STATE_JSON",
        ),
        (
            Update::MergePatchJson(r#"{"n": [0e-16383]}"#.into()),
            "merge_patch_json",
            "INVALID_STATE_JSON",
        ),
        // 161 bytes as sent, 220 as stored: jsonb's text adds a space after
        // each colon and comma.
        (
            Update::StateJson(format!(
                "{{{}}}",
                (0..21)
                    .map(|i| format!("\"k{i:02}\":1"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            "state_json",
            "STATE_TOO_LARGE",
        ),
    ];
    for (change, field, expected_reason) in cases {
        let status = update(&app, &id, 1, change.clone())
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{change:?}: {status:?}"
        );
        assert_eq!(
            violation(&status),
            Some((field.to_owned(), expected_reason.to_owned())),
            "{change:?}: {status:?}"
        );
    }
    let state = get_state(&app, &id).await.expect("read");
    assert_eq!((state.version, parsed(&state)), (1, json!({"keep": true})));

    // Missing oneof, negative version, bad id.
    let status = app
        .client
        .clone()
        .update_conversation_state(pb::UpdateConversationStateRequest {
            conversation_id: "not-a-uuid".into(),
            expected_version: -1,
            update: None,
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(fields, ["conversation_id", "expected_version", "update"]);
}

#[tokio::test]
async fn numbers_are_kept_exactly() {
    let app = spawn_app().await;
    let id = conversation(&app, "eve").await;
    let exact = r#"{"big": 123456789012345678901234567890, "price": 0.1}"#;
    update(&app, &id, 0, Update::StateJson(exact.into()))
        .await
        .expect("written");
    let read = get_state(&app, &id).await.expect("read");
    assert!(
        read.state_json.contains("123456789012345678901234567890"),
        "{}",
        read.state_json
    );
    let patched = update(
        &app,
        &id,
        1,
        Update::MergePatchJson(r#"{"n": 98765432109876543210987}"#.into()),
    )
    .await
    .expect("patched");
    assert!(
        patched
            .state_json
            .contains("123456789012345678901234567890")
    );
    assert!(patched.state_json.contains("98765432109876543210987"));
}

#[tokio::test]
async fn unknown_and_erased_conversations_have_no_state_and_erasure_deletes_it() {
    let app = spawn_app().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = get_state(&app, &unknown).await.expect_err("unknown");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "CONVERSATION_NOT_FOUND")
    );
    let status = update(&app, &unknown, 0, replace(json!({})))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    // No state row was made for it.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM memory.conversation_states")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(rows, 0);

    let id = conversation(&app, "fay").await;
    update(&app, &id, 0, replace(json!({"allergy": "peanuts"})))
        .await
        .expect("written");
    app.client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "fay".into(),
        })
        .await
        .expect("erased");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM memory.conversation_states")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "the erased conversation's state is still stored");
    for status in [
        get_state(&app, &id).await.expect_err("erased"),
        update(&app, &id, 1, replace(json!({"back": true})))
            .await
            .expect_err("erased"),
        update(&app, &id, 0, replace(json!({"back": true})))
            .await
            .expect_err("erased"),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
}

#[tokio::test]
async fn merge_patches_follow_rfc_7396() {
    let app = spawn_app().await;
    let id = conversation(&app, "gil").await;
    // The examples of RFC 7396, section 3 and appendix A, applied in turn
    // to a state that starts as the example's target.
    let cases = [
        (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
        (
            json!({"a": "b"}),
            json!({"b": "c"}),
            json!({"a": "b", "b": "c"}),
        ),
        (json!({"a": "b"}), json!({"a": null}), json!({})),
        (
            json!({"a": "b", "b": "c"}),
            json!({"a": null}),
            json!({"b": "c"}),
        ),
        (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
        (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
        (
            json!({"a": {"b": "c"}}),
            json!({"a": {"b": "d", "c": null}}),
            json!({"a": {"b": "d"}}),
        ),
        (
            json!({"a": [{"b": "c"}]}),
            json!({"a": [1]}),
            json!({"a": [1]}),
        ),
        (
            json!({"e": null}),
            json!({"a": 1}),
            json!({"e": null, "a": 1}),
        ),
        (
            json!({}),
            json!({"a": {"bb": {"ccc": null}}}),
            json!({"a": {"bb": {}}}),
        ),
        (
            json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"}),
            json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": null}, "tags": ["example"]}),
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"], "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"}),
        ),
    ];
    let mut version = 0;
    for (target, patch_value, expected) in cases {
        version = update(&app, &id, version, replace(target.clone()))
            .await
            .expect("target")
            .version;
        let patched = update(&app, &id, version, patch(patch_value.clone()))
            .await
            .unwrap_or_else(|status| panic!("{target} + {patch_value}: {status:?}"));
        version = patched.version;
        assert_eq!(parsed(&patched), expected, "{target} + {patch_value}");
    }
    // A patch of many members at once.
    let many: serde_json::Map<String, Value> =
        (0..2_000).map(|i| (format!("k{i}"), json!(i))).collect();
    let patched = update(&app, &id, version, patch(Value::Object(many)))
        .await
        .expect("many");
    assert_eq!(parsed(&patched)["k1999"], json!(1999));
}
