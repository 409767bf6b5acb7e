//! Erasure that erases, and stays erased: tombstones make a user's
//! conversations disappear at once and refuse late writes for good; the data
//! is purged in short batches, by the call and then by the service itself.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use maitre_api::memory::v1 as pb;
use tonic::{Code, Request};

use crate::support::{TestApp, reason, spawn_app, spawn_app_with};

fn erase(user: &str) -> pb::DeleteUserDataRequest {
    pb::DeleteUserDataRequest {
        user_id: user.into(),
    }
}

async fn delete_user_data(
    app: &TestApp,
    user: &str,
    timeout: Option<Duration>,
) -> Result<pb::DeleteUserDataResponse, tonic::Status> {
    let mut request = Request::new(erase(user));
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    app.client
        .clone()
        .delete_user_data(request)
        .await
        .map(|r| r.into_inner())
}

/// Every read RPC answers NOT_FOUND for `conversation`, and ListConversations
/// of `user` leaves it out.
async fn assert_invisible(app: &TestApp, conversation: &str, user: &str) {
    let status = app.conversation(conversation).await.expect_err("erased");
    assert_eq!(status.code(), Code::NotFound, "GetConversation {status:?}");
    let status = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: conversation.into(),
            ..Default::default()
        })
        .await
        .expect_err("erased");
    assert_eq!(status.code(), Code::NotFound, "ListMessages {status:?}");
    let status = app.history(conversation, 10).await.expect_err("erased");
    assert_eq!(
        status.code(),
        Code::NotFound,
        "GetEmotionHistory {status:?}"
    );
    let status = app
        .client
        .clone()
        .close_conversation(pb::CloseConversationRequest {
            conversation_id: conversation.into(),
        })
        .await
        .expect_err("erased");
    assert_eq!(
        status.code(),
        Code::NotFound,
        "CloseConversation {status:?}"
    );
    let listed = app
        .client
        .clone()
        .list_conversations(pb::ListConversationsRequest {
            user_id: user.into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .conversations;
    assert!(
        listed.iter().all(|c| c.conversation_id != conversation),
        "ListConversations shows an erased conversation"
    );
}

fn assert_erased(status: &tonic::Status) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(status), "CONVERSATION_ERASED");
}

#[tokio::test]
async fn erased_conversations_stay_erased_and_a_returning_user_starts_anew() {
    let app = spawn_app().await;
    let old = uuid::Uuid::now_v7().to_string();
    let mut keyed = TestApp::message(&old, "rae", "my number is 555-0100", Some((0.3, "calm")));
    keyed.request_id = "k1".into();
    app.store(keyed.clone()).await.expect("stored");
    app.store(TestApp::message(&old, "rae", "second", None))
        .await
        .expect("stored");

    // A reader in the middle of paging when the erasure comes.
    let first_page = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: old.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("first page");
    assert!(!first_page.next_page_token.is_empty());

    let erased = delete_user_data(&app, "rae", None).await.expect("erased");
    assert_eq!(
        (
            erased.conversations_deleted,
            erased.messages_deleted,
            erased.complete,
            erased.messages_remaining,
            erased.conversations_remaining
        ),
        (1, 2, true, 0, 0)
    );
    assert_invisible(&app, &old, "rae").await;
    let status = app
        .list_messages(pb::ListMessagesRequest {
            conversation_id: old.clone(),
            page_size: 1,
            page_token: first_page.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("the next page of an erased conversation");
    assert_eq!(status.code(), Code::NotFound);

    // A follow-up still queued with the old conversation id, a retry of the
    // keyed message, and anyone else's write: refused, nothing re-created.
    let follow_up = TestApp::message(&old, "rae", "How was your dinner?", None);
    assert_erased(&app.store(follow_up).await.expect_err("erased"));
    assert_erased(&app.store(keyed).await.expect_err("erased"));
    assert_erased(
        &app.store(TestApp::message(&old, "someone-else", "hi", None))
            .await
            .expect_err("erased"),
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations").await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 0);
    // Only the random id and a time are kept.
    assert_eq!(
        app.count("SELECT count(*) FROM memory.erased_conversations")
            .await,
        1
    );

    // The same person comes back: new conversations are theirs as before.
    let new = app
        .store(TestApp::message("", "rae", "hello again", None))
        .await
        .expect("a returning user starts a new conversation");
    assert!(new.conversation_created);
    let new_id = new.message.expect("message").conversation_id;
    let listed = app
        .client
        .clone()
        .list_conversations(pb::ListConversationsRequest {
            user_id: "rae".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .conversations;
    assert_eq!(
        listed
            .iter()
            .map(|c| c.conversation_id.as_str())
            .collect::<Vec<_>>(),
        [new_id.as_str()]
    );

    // Erasing again is idempotent and reports what it did now.
    let again = delete_user_data(&app, "rae", None).await.expect("again");
    assert_eq!((again.conversations_deleted, again.complete), (1, true));
    let idle = delete_user_data(&app, "rae", None).await.expect("idle");
    assert_eq!(
        (
            idle.conversations_deleted,
            idle.messages_deleted,
            idle.complete
        ),
        (0, 0, true)
    );
    // A user with nothing stored: complete, nothing done.
    let nobody = delete_user_data(&app, "nobody", None)
        .await
        .expect("nobody");
    assert_eq!((nobody.conversations_deleted, nobody.complete), (0, true));
}

#[tokio::test]
async fn writes_racing_an_erasure_are_purged_or_refused_never_kept() {
    let app = spawn_app().await;
    let conversation = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&conversation, "sam", "first", None))
        .await
        .expect("stored");
    let writes = (0..40).map(|i| {
        app.store(TestApp::message(
            &conversation,
            "sam",
            &format!("m{i}"),
            Some((0.1, "calm")),
        ))
    });
    let erasures = (0..5).map(|_| delete_user_data(&app, "sam", None));
    let (writes, erasures) = tokio::join!(join_all(writes), join_all(erasures));
    for result in writes {
        if let Err(status) = result {
            assert_erased(&status);
        }
    }
    let mut erased_by_calls = 0;
    for result in erasures {
        erased_by_calls += result.expect("every erasure answers").conversations_deleted;
    }
    assert_eq!(erased_by_calls, 1, "one conversation, erased once");
    // Poll until complete: the data of every accepted write is gone too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !delete_user_data(&app, "sam", None)
        .await
        .expect("poll")
        .complete
    {
        assert!(Instant::now() < deadline, "erasure never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'sam'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.conversations WHERE user_id = 'sam'")
            .await,
        0
    );
    assert_erased(
        &app.store(TestApp::message(&conversation, "sam", "late", None))
            .await
            .expect_err("late write"),
    );
}

#[tokio::test]
async fn the_background_purger_finishes_an_erasure_nobody_calls_again() {
    let app = spawn_app_with(|s| s.purge_interval = Duration::from_millis(200)).await;
    let mut conversations = Vec::new();
    for c in 0..2 {
        let id = uuid::Uuid::now_v7().to_string();
        for i in 0..30 {
            app.store(TestApp::message(&id, "tia", &format!("{c}/{i}"), None))
                .await
                .expect("stored");
        }
        conversations.push(id);
    }
    app.store(TestApp::message("", "kept", "mine", None))
        .await
        .expect("stored");
    // As an erasure whose caller (and replica) went away right after the
    // tombstones were written: nothing purged yet.
    sqlx::query(memory_service::store::erasure::BEGIN)
        .bind("tia")
        .bind(chrono::Utc::now())
        .execute(&app.db)
        .await
        .expect("tombstoned");
    for id in &conversations {
        assert_invisible(&app, id, "tia").await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while app
        .count("SELECT count(*) FROM memory.conversations WHERE user_id = 'tia'")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "the purger never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'tia'")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM memory.messages").await, 1);
    let report = delete_user_data(&app, "tia", None).await.expect("report");
    assert_eq!((report.conversations_deleted, report.complete), (0, true));
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// Current-thread runtime (the default): the server's tasks run on this
// thread, under the capturing subscriber set here.
#[tokio::test]
async fn erasure_logs_counts_and_the_request_id_never_the_user_id() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = spawn_app().await;
    let user = "user-4f9c2e-secret";
    for i in 0..3 {
        app.store(TestApp::message("", user, &format!("m{i}"), None))
            .await
            .expect("stored");
    }
    let mut request = Request::new(erase(user));
    request
        .metadata_mut()
        .insert("x-request-id", "erase-7731".parse().expect("header"));
    app.client
        .clone()
        .delete_user_data(request)
        .await
        .expect("erased");
    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    let line = logs
        .lines()
        .find(|l| l.contains("user data erased"))
        .unwrap_or_else(|| panic!("no erasure line in:\n{logs}"));
    assert!(line.contains("erase-7731"), "{line}");
    assert!(line.contains("conversations_erased=3"), "{line}");
    assert!(!logs.contains(user), "the user id was logged:\n{logs}");
}

/// How many messages the heavy erasure test stores: 1,000,000 unless
/// `MEMORY_ERASURE_TEST_MESSAGES` says otherwise.
fn heavy_count() -> i64 {
    std::env::var("MEMORY_ERASURE_TEST_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Stores `count` messages in conversation `id` of `user` the way
/// StoreMessage leaves them (every one keyed and scored), in one statement.
async fn bulk_conversation(app: &TestApp, id: uuid::Uuid, user: &str, count: i64) {
    sqlx::query(
        "INSERT INTO memory.conversations \
           (id, user_id, channel, created_at, last_message_at, message_count, scored_count, \
            score_sum, label_counts, recent_scores, last_score) \
         VALUES ($1, $2, 'web', now(), now(), $3, $3, $3 * 0.25, jsonb_build_object('joy', $3), \
                 array_fill(0.25::float8, ARRAY[10]), 0.25)",
    )
    .bind(id)
    .bind(user)
    .bind(count)
    .execute(&app.db)
    .await
    .expect("conversation");
    sqlx::query(
        "INSERT INTO memory.messages \
           (conversation_id, seq, id, user_id, role, content, emotion_score, emotion_label, \
            metadata, request_id, created_at, request_caller, request_fingerprint) \
         SELECT $1, g, gen_random_uuid(), $2, 1 + g % 2, \
                'message ' || g || ' of a long conversation about a table for two', \
                0.25, 'joy', '{\"channel\": \"web\"}'::jsonb, 'req-' || $1 || '-' || g, now(), \
                '', sha256(g::text::bytea) \
         FROM generate_series(1, $3) g",
    )
    .bind(id)
    .bind(user)
    .bind(count)
    .execute(&app.db)
    .await
    .expect("messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_million_messages_is_quick_invisible_at_once_and_completes() {
    let app = spawn_app().await;
    let total = heavy_count();
    // Three conversations: a long one and two shorter ones.
    let sizes = [
        total / 2,
        total * 3 / 10,
        total - total / 2 - total * 3 / 10,
    ];
    let ids: Vec<uuid::Uuid> = sizes.iter().map(|_| uuid::Uuid::now_v7()).collect();
    let started = Instant::now();
    for (id, size) in ids.iter().zip(sizes) {
        bulk_conversation(&app, *id, "heavy", size).await;
    }
    sqlx::query("ANALYZE memory.messages")
        .execute(&app.db)
        .await
        .expect("analyze");
    let inserted_in = started.elapsed();
    let steady = uuid::Uuid::now_v7().to_string();
    app.store(TestApp::message(&steady, "steady", "hello", None))
        .await
        .expect("stored");

    // Another user keeps writing all along; every call's latency is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop, steady) = (app.client.clone(), stop.clone(), steady.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let call = Instant::now();
                client
                    .clone()
                    .store_message(TestApp::message(
                        &steady,
                        "steady",
                        &format!("still here {i}"),
                        Some((0.5, "joy")),
                    ))
                    .await
                    .expect("another user's writes keep succeeding");
                latencies.push(call.elapsed());
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        })
    };

    let erase_started = Instant::now();
    // A 1.5 s deadline, sent as the header alone (no client-side timer to
    // race the server's answer). The call purges until its deadline draws
    // near and answers with its progress; should a slow batch still be
    // running at the deadline (a loaded machine), the answer is
    // DEADLINE_EXCEEDED, and the erasure goes on in the background all the
    // same. Either way the data is invisible at once.
    let mut request = Request::new(erase("heavy"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "1500m".parse().expect("header"));
    let answer = crate::support::timerless_client(app.addr)
        .await
        .delete_user_data(request)
        .await;
    let first_call = erase_started.elapsed();
    assert!(first_call < Duration::from_secs(5), "{first_call:?}");
    let first = match answer {
        Ok(first) => {
            let first = first.into_inner();
            assert_eq!(first.conversations_deleted, 3);
            // The background purger may take batches of the same erasure
            // while the call runs; those are counted by no call (proto).
            assert!(
                first.messages_deleted + first.messages_remaining <= total,
                "{first:?}"
            );
            first
        }
        Err(status) => {
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
            pb::DeleteUserDataResponse::default()
        }
    };
    // Gone for every reader the moment the call returns.
    for id in &ids {
        assert_invisible(&app, &id.to_string(), "heavy").await;
        assert_erased(
            &app.store(TestApp::message(
                &id.to_string(),
                "heavy",
                "follow-up",
                None,
            ))
            .await
            .expect_err("erased"),
        );
    }

    // The service finishes without being asked again.
    let purge_deadline = Instant::now() + Duration::from_secs(120);
    let mut polls = 0;
    while app
        .count("SELECT count(*) FROM memory.conversations WHERE user_id = 'heavy'")
        .await
        > 0
    {
        assert!(Instant::now() < purge_deadline, "the purge never finished");
        tokio::time::sleep(Duration::from_millis(250)).await;
        polls += 1;
    }
    let purged_in = erase_started.elapsed();
    let report = delete_user_data(&app, "heavy", None).await.expect("report");
    assert!(report.complete, "{report:?}");
    assert_eq!(
        (report.conversations_deleted, report.messages_remaining),
        (0, 0)
    );

    stop.store(true, Ordering::Relaxed);
    let latencies = writer.await.expect("writer");
    let max = latencies.iter().max().copied().unwrap_or_default();
    assert_eq!(
        app.count("SELECT count(*) FROM memory.messages WHERE user_id = 'heavy'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM memory.erased_conversations")
            .await,
        3
    );
    assert_eq!(
        app.conversation(&steady).await.expect("kept").message_count,
        latencies.len() as i64 + 1
    );
    eprintln!(
        "ERASURE messages={total} inserted_in={inserted_in:?} first_call={first_call:?} \
         first_call_deleted={} remaining_after_first_call={} purged_in={purged_in:?} \
         polls={polls} other_writer_calls={} other_writer_max_latency={max:?}",
        first.messages_deleted,
        first.messages_remaining,
        latencies.len()
    );
    assert!(
        max < Duration::from_secs(1),
        "another user's StoreMessage took {max:?}"
    );
}
