//! StoreMessage's group commit: calls that queue up together are written in
//! one statement, and each still gets exactly the answer it would have got
//! alone. The tests make the grouping deterministic: with one writer, a call
//! held on a conversation's row lock keeps the writer busy while the others
//! queue (the `maitre_store_queued` gauge says when they all have); releasing
//! the lock lets the writer take them all at once.

use std::time::Duration;

use futures::future::join_all;
use maitre_api::memory::v1 as pb;
use maitre_runtime::testkit::{http_get, sample};
use tonic::{Code, Request};

use crate::support::{TestApp, lock_conversation, reason, spawn_app_with};

/// One writer, so that what queues behind a blocked call is one batch; it
/// waits up to a minute for a lone call held by a row lock (the gate), and
/// calls may take as long.
async fn one_writer() -> TestApp {
    spawn_app_with(|s| {
        s.store_writers = 1;
        s.store_lock_wait = Duration::from_secs(60);
        s.server.rpc_timeout = Duration::from_secs(60);
    })
    .await
}

async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = http_get(app.admin_addr.expect("admin port"), "/metrics").await;
    sample(&body, name, labels).unwrap_or(0.0)
}

/// Waits until `name` reads `want` (a gauge the writer moves).
async fn wait_for_metric(app: &TestApp, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = metric(app, name, &[]).await;
        if value == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` in a task of its own.
fn spawn_store(
    app: &TestApp,
    request: pb::StoreMessageRequest,
) -> tokio::task::JoinHandle<Result<pb::StoreMessageResponse, tonic::Status>> {
    let mut client = app.client.clone();
    tokio::spawn(async move { client.store_message(request).await.map(|r| r.into_inner()) })
}

/// A conversation of `user` with one message; its id.
async fn conversation_of(app: &TestApp, user: &str) -> String {
    app.store(TestApp::message("", user, "first", None))
        .await
        .expect("stored")
        .message
        .expect("message")
        .conversation_id
}

fn keyed(conversation: &str, user: &str, content: &str, key: &str) -> pb::StoreMessageRequest {
    let mut message = TestApp::message(conversation, user, content, Some((-0.4, "upset")));
    message.request_id = key.into();
    message
}

/// Blocks the one writer on `gate`'s row lock with a call of its own (a lone
/// call: the writer waits for it up to its lock wait), and waits until the
/// writer has taken that call (it counts a statement before writing it):
/// whatever is sent next queues.
/// Returns the lock and the blocked call.
async fn block_the_writer(
    app: &TestApp,
    gate: &str,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Result<pb::StoreMessageResponse, tonic::Status>>,
) {
    let lock = lock_conversation(app, gate).await;
    let taken = metric(app, "maitre_store_batch_size_count", &[]).await;
    let held = spawn_store(app, TestApp::message(gate, "gatekeeper", "held", None));
    wait_for_metric(app, "maitre_store_batch_size_count", taken + 1.0).await;
    (lock, held)
}

#[tokio::test]
async fn calls_queued_together_are_written_together_each_with_its_own_answer() {
    let app = one_writer().await;
    let gate = conversation_of(&app, "gatekeeper").await;
    let shared = conversation_of(&app, "sharer").await;
    let theirs = conversation_of(&app, "owner").await;
    let erased = conversation_of(&app, "leaver").await;
    app.client
        .clone()
        .delete_user_data(pb::DeleteUserDataRequest {
            user_id: "leaver".into(),
        })
        .await
        .expect("erased");
    let replayed = app
        .store(keyed(&shared, "sharer", "said once", "key-old"))
        .await
        .expect("stored");
    let batches_before = metric(&app, "maitre_store_batch_size_count", &[]).await;

    let (lock, held) = block_the_writer(&app, &gate).await;
    let mut requests = Vec::new();
    // 20 new conversations, each scored with its own label.
    for i in 0..20 {
        requests.push(TestApp::message(
            "",
            &format!("newcomer-{i}"),
            &format!("hello {i}"),
            Some((0.05 * f64::from(i) - 0.5, &format!("label-{i}"))),
        ));
    }
    // Three more in one conversation: never two in one statement.
    for i in 0..3 {
        requests.push(TestApp::message(
            &shared,
            "sharer",
            &format!("more {i}"),
            None,
        ));
    }
    // A replay, a reused key, a stranger, an erased conversation.
    requests.push(keyed(&shared, "sharer", "said once", "key-old"));
    requests.push(keyed(&shared, "sharer", "said otherwise", "key-old"));
    requests.push(TestApp::message(&theirs, "intruder", "let me in", None));
    requests.push(TestApp::message(&erased, "leaver", "I am back", None));
    // One new key sent twice at once, to a new conversation of its own.
    let twice = uuid::Uuid::now_v7().to_string();
    requests.push(keyed(&twice, "doubler", "once only", "key-new"));
    requests.push(keyed(&twice, "doubler", "once only", "key-new"));
    let sent = requests.len();

    let calls: Vec<_> = requests
        .into_iter()
        .map(|request| spawn_store(&app, request))
        .collect();
    wait_for_metric(&app, "maitre_store_queued", sent as f64).await;
    lock.rollback().await.expect("release");
    held.await.expect("task").expect("the held call is stored");
    let answers: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();

    // The new conversations: one message each, its own statistics.
    for (i, answer) in answers[..20].iter().enumerate() {
        let answer = answer.as_ref().expect("stored");
        let message = answer.message.as_ref().expect("message");
        assert!(answer.conversation_created && !answer.replayed);
        assert_eq!(
            (message.sequence, answer.conversation_message_count),
            (1, 1)
        );
        assert_eq!(message.content, format!("hello {i}"));
        let conversation = app
            .conversation(&message.conversation_id)
            .await
            .expect("conversation");
        assert_eq!(conversation.user_id, format!("newcomer-{i}"));
        let stats = conversation.emotion_stats.expect("statistics");
        assert_eq!(stats.scored_message_count, 1);
        assert_eq!(
            stats.label_counts.get(&format!("label-{i}")).copied(),
            Some(1),
            "{stats:?}"
        );
    }
    // The shared conversation: 2 before, 3 more, sequences 3, 4, 5.
    let mut sequences: Vec<i64> = answers[20..23]
        .iter()
        .map(|a| {
            a.as_ref()
                .expect("stored")
                .message
                .as_ref()
                .expect("m")
                .sequence
        })
        .collect();
    sequences.sort_unstable();
    assert_eq!(sequences, [3, 4, 5]);
    assert_eq!(app.conversation(&shared).await.expect("c").message_count, 5);
    let replay = answers[23].as_ref().expect("replayed");
    assert!(replay.replayed);
    assert_eq!(replay.message, replayed.message);
    let reused = answers[24].as_ref().expect_err("reused key");
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
    assert_eq!(reason(reused), "REQUEST_ID_REUSED");
    let stranger = answers[25].as_ref().expect_err("another user's");
    assert_eq!(stranger.code(), Code::FailedPrecondition);
    assert_eq!(reason(stranger), "CONVERSATION_USER_MISMATCH");
    let late = answers[26].as_ref().expect_err("erased");
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(reason(late), "CONVERSATION_ERASED");
    // The key sent twice: stored once, the other call answered with it.
    let (first, second) = (
        answers[27].as_ref().expect("stored"),
        answers[28].as_ref().expect("stored"),
    );
    assert_eq!(first.message, second.message);
    assert!(first.replayed != second.replayed, "{first:?} {second:?}");
    assert_eq!(app.conversation(&twice).await.expect("c").message_count, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'intruder'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE content = 'I am back'")
            .await,
        0
    );

    // They were grouped: fewer statements than calls, one of them large.
    let statements = metric(&app, "maitre_store_batch_size_count", &[]).await - batches_before;
    assert!(
        statements < (sent / 2) as f64,
        "{statements} statements for {sent} calls"
    );
    let at_most_8 = metric(&app, "maitre_store_batch_size_bucket", &[("le", "8.0")]).await;
    let all = metric(&app, "maitre_store_batch_size_count", &[]).await;
    assert!(at_most_8 < all, "no statement held more than 8 calls");
    assert_eq!(metric(&app, "maitre_store_queued", &[]).await, 0.0);
    assert_eq!(
        metric(&app, "maitre_store_batches_split_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn with_one_writer_a_conversations_queued_calls_keep_their_order() {
    let app = one_writer().await;
    let gate = conversation_of(&app, "gatekeeper").await;
    let talk = conversation_of(&app, "talker").await;
    let (lock, held) = block_the_writer(&app, &gate).await;
    let mut calls = Vec::new();
    for i in 1..=5 {
        let request = TestApp::message(&talk, "talker", &format!("turn {i}"), None);
        calls.push(spawn_store(&app, request));
        // Queued one after the other: their order is known.
        wait_for_metric(&app, "maitre_store_queued", f64::from(i)).await;
    }
    lock.rollback().await.expect("release");
    held.await.expect("task").expect("stored");
    for call in calls {
        call.await.expect("task").expect("stored");
    }
    let page = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: talk,
            ..Default::default()
        })
        .await
        .expect("listed");
    let contents: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        ["first", "turn 1", "turn 2", "turn 3", "turn 4", "turn 5"]
    );
}

#[tokio::test]
async fn a_call_whose_caller_gave_up_in_the_queue_is_never_written() {
    let app = one_writer().await;
    let gate = conversation_of(&app, "gatekeeper").await;
    let (lock, held) = block_the_writer(&app, &gate).await;

    let mut request = Request::new(TestApp::message("", "quitter", "never mind", None));
    request.set_timeout(Duration::from_millis(200));
    let status = app
        .client
        .clone()
        .store_message(request)
        .await
        .expect_err("gave up");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The server has let go of the call (its deadline or the client's
    // cancellation ended the handler) before the writer looks at it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut ended = 0.0;
        for code in ["DEADLINE_EXCEEDED", "CANCELLED"] {
            let labels = [
                ("method", "maitre.memory.v1.MemoryService/StoreMessage"),
                ("code", code),
            ];
            ended += metric(&app, "maitre_rpc_requests_total", &labels).await;
        }
        if ended >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A call behind it is still written.
    let behind = spawn_store(&app, TestApp::message("", "patient", "still here", None));
    wait_for_metric(&app, "maitre_store_queued", 2.0).await;
    lock.rollback().await.expect("release");
    held.await.expect("task").expect("stored");
    behind.await.expect("task").expect("stored");

    wait_for_metric(&app, "maitre_store_queued", 0.0).await;
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'quitter'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations WHERE user_id = 'quitter'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_batch_that_fails_is_written_again_so_only_the_bad_call_fails() {
    let app = one_writer().await;
    let gate = conversation_of(&app, "gatekeeper").await;
    // A value PostgreSQL refuses that validation lets through, stood in for
    // by a trigger: any message whose content is 'poison'.
    sqlx::raw_sql(
        r#"
CREATE FUNCTION memory.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON memory.messages
    FOR EACH ROW EXECUTE FUNCTION memory.refuse_poison();
"#,
    )
    .execute(&app.db)
    .await
    .expect("trigger");

    let (lock, held) = block_the_writer(&app, &gate).await;
    let contents = ["good 1", "poison", "good 2", "good 3"];
    let calls: Vec<_> = contents
        .iter()
        .map(|content| {
            spawn_store(
                &app,
                TestApp::message("", "mixed", content, Some((0.2, "fine"))),
            )
        })
        .collect();
    wait_for_metric(&app, "maitre_store_queued", contents.len() as f64).await;
    lock.rollback().await.expect("release");
    held.await.expect("task").expect("stored");

    for (content, call) in contents.iter().zip(calls) {
        let answer = call.await.expect("task");
        if *content == "poison" {
            let status = answer.expect_err("refused");
            assert_eq!(status.code(), Code::Internal, "{status:?}");
        } else {
            let answer = answer.expect("stored");
            assert_eq!(answer.message.expect("message").content, *content);
        }
    }
    assert_eq!(
        metric(&app, "maitre_store_batches_split_total", &[]).await,
        1.0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'mixed'")
            .await,
        3
    );
    // Statistics counted once per stored message, never for the refused one.
    assert_eq!(
        app.count(
            "SELECT sum(scored_count)::bigint FROM memory.conversations WHERE user_id = 'mixed'"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn with_no_writers_each_call_is_written_on_its_own() {
    let app = spawn_app_with(|s| s.store_writers = 0).await;
    let first = app
        .store(keyed("", "solo", "alone", "key-solo"))
        .await
        .expect("stored");
    let again = app
        .store(keyed("", "solo", "alone", "key-solo"))
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.message, first.message);
    assert_eq!(
        metric(&app, "maitre_store_batch_size_count", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn a_conversation_held_up_holds_up_its_own_calls_only() {
    // One writer: were it to wait for the held-up call, nothing else would
    // be written until the lock goes.
    let app = spawn_app_with(|s| s.store_writers = 1).await;
    let hot = conversation_of(&app, "hot").await;
    let lock = lock_conversation(&app, &hot).await;
    // Retries piling up on a conversation that cannot be written: the first
    // is written in a task of its own, the others wait behind it.
    let mut stuck = Vec::new();
    for i in 1..=4 {
        let request = TestApp::message(&hot, "hot", &format!("retry {i}"), None);
        stuck.push(spawn_store(&app, request));
    }
    // The first is in PostgreSQL, three wait for it.
    wait_for_metric(&app, "maitre_store_queued", 3.0).await;
    let others = join_all((0..30).map(|i| {
        app.store(TestApp::message(
            "",
            &format!("bystander-{i}"),
            "not held up",
            None,
        ))
    }))
    .await;
    for answer in others {
        answer.expect("written while the hot conversation is locked");
    }
    lock.rollback().await.expect("release");
    for call in stuck {
        call.await.expect("task").expect("stored once released");
    }
    let page = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: hot,
            ..Default::default()
        })
        .await
        .expect("listed");
    assert_eq!(page.messages.len(), 5);
}

#[tokio::test]
async fn a_batch_held_up_by_one_conversation_is_split_and_the_rest_answered() {
    // The writer waits 5 s for the gate, time enough to queue eleven calls
    // (milliseconds); the batch then waits 5 s for the held-up lock.
    let app = spawn_app_with(|s| {
        s.store_writers = 1;
        s.store_lock_wait = Duration::from_secs(5);
        // The held-up call outlives two lock waits.
        s.server.rpc_timeout = Duration::from_secs(60);
    })
    .await;
    let gate = conversation_of(&app, "gatekeeper").await;
    let held_up = conversation_of(&app, "held-up").await;
    let held_up_lock = lock_conversation(&app, &held_up).await;
    let (lock, held) = block_the_writer(&app, &gate).await;

    let stuck = spawn_store(&app, TestApp::message(&held_up, "held-up", "waiting", None));
    wait_for_metric(&app, "maitre_store_queued", 1.0).await;
    let others: Vec<_> = (0..10)
        .map(|i| {
            let request = TestApp::message("", &format!("free-{i}"), "not waiting", None);
            spawn_store(&app, request)
        })
        .collect();
    wait_for_metric(&app, "maitre_store_queued", 11.0).await;
    lock.rollback().await.expect("release the writer");
    held.await.expect("task").expect("stored");
    // The batch of eleven met the held-up conversation's lock: split after
    // the lock wait, the ten are written on their own while it stays held.
    for call in others {
        call.await.expect("task").expect("answered without waiting");
    }
    assert_eq!(
        metric(&app, "maitre_store_batches_split_total", &[]).await,
        1.0
    );
    assert!(!stuck.is_finished());
    held_up_lock.rollback().await.expect("release");
    let answer = stuck.await.expect("task").expect("stored once released");
    assert_eq!(answer.message.expect("message").sequence, 2);
}
