//! Writing and reading messages.

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use maitre_runtime::otel;
use sqlx::{PgPool, types::Json};
use uuid::Uuid;

use super::rows::{EmotionPointRow, MessageRow};
use crate::domain::{
    NewMessage,
    emotion::{OVERFLOW_LABEL, TREND_WINDOW},
    queries::{HistoryQuery, MessagePage, Order},
};

/// What StoreMessage did.
#[derive(Debug, Clone)]
pub enum StoreOutcome {
    /// The message was inserted.
    Stored {
        message_id: Uuid,
        sequence: i64,
        created_at: DateTime<Utc>,
        message_count: i64,
        conversation_created: bool,
    },
    /// The key was seen before with the same request: the original message,
    /// nothing written.
    Replayed {
        message: Box<MessageRow>,
        message_count: i64,
    },
    /// The key was seen before with another request: nothing written.
    KeyReused,
    /// The conversation was erased (DeleteUserData): nothing written.
    ConversationErased,
    /// The conversation exists and belongs to another user: nothing written.
    OtherUsersConversation,
}

/// The whole write path in one statement:
/// 1. `replay`: the message stored earlier under this key, if any. A key is
///    (caller `$20`, user `$2`, request id `$15`); keys stored before keys
///    had callers (NULL) match any caller. `same` compares the request's
///    fingerprint `$21` (NULL before fingerprints: taken as the same).
/// 2. `erased`: the tombstone of conversation `$1`, by primary key.
/// 3. Only when neither exists: upsert the conversation (creating it, or
///    bumping its counters and emotion aggregates under its row lock), then
///    insert the message with the sequence number the upsert returned. The
///    upsert does not touch a row marked erased (`erased_at`): a call that
///    waited for the row lock while an erasure committed re-reads the row it
///    is about to update and finds the mark, though its snapshot predates
///    the tombstone; it then returns no row, like another user's
///    conversation, and [`store`] tells the two apart.
///
/// The answer's first column says which: `stored`, `replayed`, `reused`
/// (same key, other request) or `erased`. A replayed key whose message lies
/// in an erased conversation (not yet purged) answers `erased`, never the
/// erased message.
///
/// `label_counts` holds at most `$18` distinct labels plus the overflow key
/// `$19`: a label already counted keeps counting, a new one is counted under
/// `$19` once the cap is reached. The message row keeps the caller's label.
/// Counting the keys on every scored write costs microseconds because the cap
/// keeps the document small (measured: 0.12 ms for the whole UPDATE at 33
/// keys); a separate counter column would save nothing worth a migration and
/// a second value to keep in step.
///
/// A `pub const` run with `sqlx::query_as`, not a macro: the bench runs this
/// very text.
pub const STORE_MESSAGE: &str = r#"
WITH replay AS (
    SELECT m.seq,
           (m.request_fingerprint IS NULL OR m.request_fingerprint = $21) AS same,
           EXISTS (SELECT 1 FROM memory.erased_conversations e
                   WHERE e.conversation_id = m.conversation_id) AS erased
    FROM memory.messages m
    WHERE $15::text IS NOT NULL AND m.user_id = $2 AND m.request_id = $15
      AND (m.request_caller = $20 OR m.request_caller IS NULL)
    LIMIT 1
),
erased AS (
    SELECT 1 FROM memory.erased_conversations WHERE conversation_id = $1
),
conv AS (
    INSERT INTO memory.conversations AS c
        (id, user_id, channel, created_at, last_message_at, message_count,
         scored_count, score_sum, label_counts, recent_scores, last_score)
    SELECT $1, $2, $3, $16, $16, 1,
           CASE WHEN $7::float8 IS NULL THEN 0 ELSE 1 END,
           COALESCE($7::float8, 0),
           CASE WHEN $7::float8 IS NULL THEN '{}'::jsonb ELSE jsonb_build_object($8::text, 1) END,
           CASE WHEN $7::float8 IS NULL THEN '{}'::float8[] ELSE ARRAY[$7::float8] END,
           $7::float8
    WHERE NOT EXISTS (SELECT 1 FROM replay) AND NOT EXISTS (SELECT 1 FROM erased)
    ON CONFLICT (id) DO UPDATE SET
        last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
        closed_at = NULL,
        message_count = c.message_count + 1,
        scored_count = c.scored_count + EXCLUDED.scored_count,
        score_sum = c.score_sum + EXCLUDED.score_sum,
        label_counts = CASE WHEN $7::float8 IS NULL THEN c.label_counts
            ELSE (SELECT jsonb_set(c.label_counts, ARRAY[k.key],
                         to_jsonb(COALESCE((c.label_counts ->> k.key)::bigint, 0) + 1))
                  FROM (SELECT CASE WHEN c.label_counts ? $8::text
                                      OR (SELECT count(*) FROM jsonb_object_keys(c.label_counts) AS key
                                          WHERE key <> $19::text) < $18::int
                                    THEN $8::text ELSE $19::text END AS key) k) END,
        recent_scores = CASE WHEN $7::float8 IS NULL THEN c.recent_scores
            ELSE (c.recent_scores || $7::float8)[GREATEST(1, cardinality(c.recent_scores) + 2 - $17::int):] END,
        last_score = COALESCE($7::float8, c.last_score)
    WHERE c.user_id = EXCLUDED.user_id AND c.erased_at IS NULL
    RETURNING c.id, c.message_count, (c.xmax = 0) AS created
),
msg AS (
    INSERT INTO memory.messages
        (conversation_id, seq, id, user_id, role, content, emotion_score, emotion_label,
         emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
         request_id, created_at, request_caller, request_fingerprint)
    SELECT conv.id, conv.message_count, $4, $2, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
           CASE WHEN $15::text IS NULL THEN NULL ELSE $20 END,
           CASE WHEN $15::text IS NULL THEN NULL ELSE $21 END
    FROM conv
    RETURNING seq
)
SELECT 'stored' AS outcome, msg.seq, conv.message_count, conv.created
FROM msg CROSS JOIN conv
UNION ALL
SELECT CASE WHEN replay.erased THEN 'erased' WHEN replay.same THEN 'replayed' ELSE 'reused' END,
       replay.seq, 0, false
FROM replay
UNION ALL
SELECT 'erased', 0, 0, false FROM erased WHERE NOT EXISTS (SELECT 1 FROM replay)
"#;

/// The message stored under a key (see [`STORE_MESSAGE`]), with its
/// conversation's count, whether the request matches it and whether its
/// conversation was erased since. Raw, read by hand: the message's JSON
/// columns decode through [`MessageRow`]'s `FromRow`.
const REPLAY: &str = r#"
SELECT conversation_id, seq, id, role, content, emotion_score, emotion_label,
       emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
       request_id, created_at,
       (SELECT message_count FROM memory.conversations c
        WHERE c.id = m.conversation_id) AS message_count,
       (m.request_fingerprint IS NULL OR m.request_fingerprint = $4) AS same,
       EXISTS (SELECT 1 FROM memory.erased_conversations e
               WHERE e.conversation_id = m.conversation_id) AS erased
FROM memory.messages m
WHERE user_id = $1 AND request_id = $2 AND (request_caller = $3 OR request_caller IS NULL)
LIMIT 1
"#;

// The two listings leave out the messages of an erased conversation (not
// yet purged): one primary-key probe of the tombstones, evaluated once per
// statement. Raw strings: `list` streams [`MessageRow`]s (JSON columns).
const LIST_OLDEST_FIRST: &str = r#"
SELECT conversation_id, seq, id, role, content, emotion_score, emotion_label,
       emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
       request_id, created_at
FROM memory.messages
WHERE conversation_id = $1 AND seq > $2
  AND NOT EXISTS (SELECT 1 FROM memory.erased_conversations e WHERE e.conversation_id = $1)
ORDER BY seq ASC
LIMIT $3
"#;

const LIST_NEWEST_FIRST: &str = r#"
SELECT conversation_id, seq, id, role, content, emotion_score, emotion_label,
       emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
       request_id, created_at
FROM memory.messages
WHERE conversation_id = $1 AND seq < $2
  AND NOT EXISTS (SELECT 1 FROM memory.erased_conversations e WHERE e.conversation_id = $1)
ORDER BY seq DESC
LIMIT $3
"#;

/// Who stores a message under which key: the key is scoped by `caller` (the
/// authenticated name, "" without authentication) and bound to
/// `fingerprint` (see [`NewMessage::fingerprint`]).
#[derive(Debug, Clone, Copy)]
pub struct KeyScope<'a> {
    pub caller: &'a str,
    pub fingerprint: &'a [u8],
}

/// Stores a message; see [`STORE_MESSAGE`].
#[tracing::instrument(skip_all, fields(conversation_id = %message.conversation_id))]
pub async fn store(
    pool: &PgPool,
    message_id: Uuid,
    message: &NewMessage,
    key: KeyScope<'_>,
    now: DateTime<Utc>,
    max_distinct_labels: u32,
) -> Result<StoreOutcome, sqlx::Error> {
    let emotion = message.emotion.as_ref();
    let result = sqlx::query_as::<_, (String, i64, i64, bool)>(STORE_MESSAGE)
        .bind(message.conversation_id)
        .bind(&message.user_id)
        .bind(&message.channel)
        .bind(message_id)
        .bind(message.role.as_i16())
        .bind(&message.content)
        .bind(emotion.map(|e| e.score))
        .bind(emotion.map(|e| e.label.as_str()))
        .bind(
            emotion
                .filter(|e| !e.scores.is_empty())
                .map(|e| Json(&e.scores)),
        )
        .bind(Json(&message.metadata))
        .bind(message.input_tokens)
        .bind(message.output_tokens)
        .bind((!message.tool_calls.is_empty()).then_some(Json(&message.tool_calls)))
        .bind((!message.tool_results.is_empty()).then_some(Json(&message.tool_results)))
        .bind(message.request_id.as_deref())
        .bind(now)
        .bind(TREND_WINDOW as i32)
        .bind(i32::try_from(max_distinct_labels).unwrap_or(i32::MAX))
        .bind(OVERFLOW_LABEL)
        .bind(key.caller)
        .bind(key.fingerprint)
        .fetch_optional(pool);
    let result = otel::sql("messages::STORE_MESSAGE", result).await;
    match result {
        Ok(row) => {
            let row =
                row.map(
                    |(outcome, sequence, message_count, conversation_created)| StoredRow {
                        outcome,
                        sequence,
                        message_count,
                        conversation_created,
                    },
                );
            resolve(pool, row, message_id, message, key, now).await
        }
        // Two concurrent calls with one key: the loser's statement rolled
        // back whole (counters included); answer with the winner's, if the
        // requests are the same.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("messages_request_key") => {
            replay(pool, message, key).await
        }
        Err(e) => Err(e),
    }
}

/// A message's answer row of [`STORE_MESSAGE`] (or of the batch statement,
/// `super::message_batch::STORE_MESSAGES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// `stored`, `replayed`, `reused` or `erased`.
    pub outcome: String,
    pub sequence: i64,
    pub message_count: i64,
    pub conversation_created: bool,
}

/// What a message's answer row says happened, reading what the row leaves
/// out: the replayed message, or (no row) whether the conversation was
/// erased or is another user's.
pub async fn resolve(
    pool: &PgPool,
    row: Option<StoredRow>,
    message_id: Uuid,
    message: &NewMessage,
    key: KeyScope<'_>,
    now: DateTime<Utc>,
) -> Result<StoreOutcome, sqlx::Error> {
    let Some(row) = row else {
        // The upsert skipped the row: another user's, or erased while this
        // call waited for its lock.
        let erased = sqlx::query_scalar!(
            r#"
SELECT EXISTS (SELECT 1 FROM memory.erased_conversations WHERE conversation_id = $1)
    AS "erased!"
"#,
            message.conversation_id
        )
        .fetch_one(pool);
        let erased = otel::sql("messages::erased", erased).await?;
        return Ok(if erased {
            StoreOutcome::ConversationErased
        } else {
            StoreOutcome::OtherUsersConversation
        });
    };
    match row.outcome.as_str() {
        "stored" => Ok(StoreOutcome::Stored {
            message_id,
            sequence: row.sequence,
            created_at: now,
            message_count: row.message_count,
            conversation_created: row.conversation_created,
        }),
        "replayed" => replay(pool, message, key).await,
        "reused" => Ok(StoreOutcome::KeyReused),
        _ => Ok(StoreOutcome::ConversationErased),
    }
}

async fn replay(
    pool: &PgPool,
    message: &NewMessage,
    key: KeyScope<'_>,
) -> Result<StoreOutcome, sqlx::Error> {
    use sqlx::{FromRow, Row};
    let row = sqlx::query(REPLAY)
        .bind(&message.user_id)
        .bind(message.request_id.as_deref())
        .bind(key.caller)
        .bind(key.fingerprint)
        .fetch_optional(pool);
    let row = otel::sql("messages::REPLAY", row).await?;
    let Some(row) = row else {
        // The message went between the two statements: only a purge removes
        // messages, so its conversation was erased.
        return Ok(StoreOutcome::ConversationErased);
    };
    if row.try_get::<bool, _>("erased")? {
        return Ok(StoreOutcome::ConversationErased);
    }
    if !row.try_get::<bool, _>("same")? {
        return Ok(StoreOutcome::KeyReused);
    }
    Ok(StoreOutcome::Replayed {
        message: Box::new(MessageRow::from_row(&row)?),
        message_count: row.try_get("message_count")?,
    })
}

/// One page of a conversation's messages, plus one extra row that tells
/// whether another page follows, as a stream: the caller stops reading once
/// the page's byte budget is spent, so the service holds the page and one
/// more row at most (read whole, 501 maximum-size rows are 37 MB). PostgreSQL
/// still sends the rows left unread; the pool reads and discards them one at
/// a time before it reuses the connection.
pub fn list<'a>(
    pool: &'a PgPool,
    page: &MessagePage,
) -> BoxStream<'a, Result<MessageRow, sqlx::Error>> {
    let (sql, start) = match page.order {
        Order::OldestFirst => (LIST_OLDEST_FIRST, 0),
        Order::NewestFirst => (LIST_NEWEST_FIRST, i64::MAX),
    };
    sqlx::query_as::<_, MessageRow>(sql)
        .bind(page.conversation_id)
        .bind(page.after.unwrap_or(start))
        .bind(i64::from(page.page_size) + 1)
        .fetch(pool)
}

/// The last `limit` scored messages, newest first, from the covering partial
/// index `messages_emotion_history_idx` (an index-only scan), none for an
/// erased conversation. A `pub const` run with `sqlx::query_as`: the API
/// tests EXPLAIN this very text.
pub const EMOTION_HISTORY: &str = r#"
SELECT id, seq, emotion_score, COALESCE(emotion_label, '') AS emotion_label, created_at
FROM memory.messages
WHERE conversation_id = $1 AND emotion_score IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM memory.erased_conversations e WHERE e.conversation_id = $1)
ORDER BY seq DESC
LIMIT $2
"#;

#[tracing::instrument(skip_all, fields(conversation_id = %query.conversation_id))]
pub async fn emotion_history(
    pool: &PgPool,
    query: &HistoryQuery,
) -> Result<Vec<EmotionPointRow>, sqlx::Error> {
    sqlx::query_as::<_, EmotionPointRow>(EMOTION_HISTORY)
        .bind(query.conversation_id)
        .bind(i64::from(query.limit))
        .fetch_all(pool)
        .await
}
