//! Many StoreMessage calls in one statement (group commit): one plan, one
//! round trip and one commit for the calls that arrive together, each still
//! answered with its own outcome. [`super::group_commit`] decides what goes
//! in a batch; this module only writes one.

use chrono::{DateTime, Utc};
use maitre_runtime::otel;
use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::messages::{KeyScope, StoredRow};
use crate::domain::{
    NewMessage,
    emotion::{OVERFLOW_LABEL, TREND_WINDOW},
};

/// [`super::messages::STORE_MESSAGE`] for a batch, one array per column
/// (`$1`–`$18`, element `i` is message `i`), answering one row per message
/// with its ordinal (1-based) and the same outcome columns. A message with
/// no answer row met another user's conversation, or an erasure that
/// committed while the upsert waited for the row lock, exactly as in the
/// one-message statement.
///
/// A batch never holds two messages of one conversation or two with one
/// request key (the caller splits them): `ON CONFLICT DO UPDATE` may touch a
/// row once per statement, and a key's replay check must see the other's
/// row. The upsert locks conversations in id order, so two batches that
/// share conversations wait for each other instead of deadlocking.
///
/// The upsert's `DO UPDATE` sees a message's score and label only through
/// `EXCLUDED`, the row it would have inserted: `last_score` is the score
/// (NULL when unscored) and `label_counts` holds exactly one key, the label,
/// when scored. The label cap (`$19` distinct labels, overflow key `$20`)
/// and the trend window (`$21` scores) work as in the one-message statement.
pub const STORE_MESSAGES: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int2[], $6::text[],
                $7::float8[], $8::text[], $9::jsonb[], $10::jsonb[], $11::int4[], $12::int4[],
                $13::jsonb[], $14::jsonb[], $15::text[], $16::timestamptz[], $17::text[],
                $18::bytea[])
         WITH ORDINALITY
         AS i(conversation_id, user_id, channel, id, role, content, score, label, scores,
              metadata, input_tokens, output_tokens, tool_calls, tool_results, request_id,
              created_at, caller, fingerprint, ord)
),
replay AS (
    SELECT i.ord, r.seq, r.same, r.erased
    FROM input i
    CROSS JOIN LATERAL (
        SELECT m.seq,
               (m.request_fingerprint IS NULL OR m.request_fingerprint = i.fingerprint) AS same,
               EXISTS (SELECT 1 FROM memory.erased_conversations e
                       WHERE e.conversation_id = m.conversation_id) AS erased
        FROM memory.messages m
        WHERE i.request_id IS NOT NULL AND m.user_id = i.user_id AND m.request_id = i.request_id
          AND (m.request_caller = i.caller OR m.request_caller IS NULL)
        LIMIT 1
    ) r
),
erased AS (
    SELECT i.ord
    FROM input i
    WHERE EXISTS (SELECT 1 FROM memory.erased_conversations e
                  WHERE e.conversation_id = i.conversation_id)
      AND NOT EXISTS (SELECT 1 FROM replay r WHERE r.ord = i.ord)
),
fresh AS (
    SELECT i.*
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM replay r WHERE r.ord = i.ord)
      AND NOT EXISTS (SELECT 1 FROM erased e WHERE e.ord = i.ord)
),
conv AS (
    INSERT INTO memory.conversations AS c
        (id, user_id, channel, created_at, last_message_at, message_count,
         scored_count, score_sum, label_counts, recent_scores, last_score)
    SELECT f.conversation_id, f.user_id, f.channel, f.created_at, f.created_at, 1,
           CASE WHEN f.score IS NULL THEN 0 ELSE 1 END,
           COALESCE(f.score, 0),
           CASE WHEN f.score IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(f.label, 1) END,
           CASE WHEN f.score IS NULL THEN '{}'::float8[] ELSE ARRAY[f.score] END,
           f.score
    FROM fresh f
    ORDER BY f.conversation_id
    ON CONFLICT (id) DO UPDATE SET
        last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
        closed_at = NULL,
        message_count = c.message_count + 1,
        scored_count = c.scored_count + EXCLUDED.scored_count,
        score_sum = c.score_sum + EXCLUDED.score_sum,
        label_counts = CASE WHEN EXCLUDED.last_score IS NULL THEN c.label_counts
            ELSE (SELECT jsonb_set(c.label_counts, ARRAY[k.key],
                         to_jsonb(COALESCE((c.label_counts ->> k.key)::bigint, 0) + 1))
                  FROM (SELECT CASE WHEN c.label_counts ? l.label
                                      OR (SELECT count(*) FROM jsonb_object_keys(c.label_counts) AS key
                                          WHERE key <> $20::text) < $19::int
                                    THEN l.label ELSE $20::text END AS key
                        FROM jsonb_object_keys(EXCLUDED.label_counts) AS l(label)) k) END,
        recent_scores = CASE WHEN EXCLUDED.last_score IS NULL THEN c.recent_scores
            ELSE (c.recent_scores || EXCLUDED.last_score)[GREATEST(1, cardinality(c.recent_scores) + 2 - $21::int):] END,
        last_score = COALESCE(EXCLUDED.last_score, c.last_score)
    WHERE c.user_id = EXCLUDED.user_id AND c.erased_at IS NULL
    RETURNING c.id, c.message_count, (c.xmax = 0) AS created
),
msg AS (
    INSERT INTO memory.messages
        (conversation_id, seq, id, user_id, role, content, emotion_score, emotion_label,
         emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
         request_id, created_at, request_caller, request_fingerprint)
    SELECT conv.id, conv.message_count, f.id, f.user_id, f.role, f.content, f.score, f.label,
           f.scores, f.metadata, f.input_tokens, f.output_tokens, f.tool_calls, f.tool_results,
           f.request_id, f.created_at,
           CASE WHEN f.request_id IS NULL THEN NULL ELSE f.caller END,
           CASE WHEN f.request_id IS NULL THEN NULL ELSE f.fingerprint END
    FROM fresh f JOIN conv ON conv.id = f.conversation_id
    RETURNING id, seq
)
SELECT f.ord, 'stored' AS outcome, msg.seq, conv.message_count, conv.created
FROM fresh f
JOIN conv ON conv.id = f.conversation_id
JOIN msg ON msg.id = f.id
UNION ALL
SELECT r.ord, CASE WHEN r.erased THEN 'erased' WHEN r.same THEN 'replayed' ELSE 'reused' END,
       r.seq, 0, false
FROM replay r
UNION ALL
SELECT e.ord, 'erased', 0, 0, false FROM erased e
"#;

/// One message of a batch: what [`super::messages::store`] takes for one.
#[derive(Debug, Clone, Copy)]
pub struct BatchMessage<'a> {
    pub message_id: Uuid,
    pub message: &'a NewMessage,
    pub key: KeyScope<'a>,
    pub now: DateTime<Utc>,
}

/// Writes `batch` in one statement ([`STORE_MESSAGES`]): the answer row of
/// each message, in `batch`'s order (`None`: no row, see the statement).
/// The statement is atomic: on an error nothing of the batch was written.
/// `recorders` are the recorded calls the statement's span belongs to.
pub async fn store_batch(
    executor: impl PgExecutor<'_>,
    batch: &[BatchMessage<'_>],
    max_distinct_labels: u32,
    recorders: &[otel::Recorder],
) -> Result<Vec<Option<StoredRow>>, sqlx::Error> {
    let statement = sqlx::query_as::<_, (i64, String, i64, i64, bool)>(STORE_MESSAGES)
        .bind(column(batch, |b| b.message.conversation_id))
        .bind(column(batch, |b| b.message.user_id.as_str()))
        .bind(column(batch, |b| b.message.channel.as_str()))
        .bind(column(batch, |b| b.message_id))
        .bind(column(batch, |b| b.message.role.as_i16()))
        .bind(column(batch, |b| b.message.content.as_str()))
        .bind(column(batch, |b| {
            b.message.emotion.as_ref().map(|e| e.score)
        }))
        .bind(column(batch, |b| {
            b.message.emotion.as_ref().map(|e| e.label.as_str())
        }))
        .bind(column(batch, |b| {
            b.message
                .emotion
                .as_ref()
                .filter(|e| !e.scores.is_empty())
                .map(|e| Json(&e.scores))
        }))
        .bind(column(batch, |b| Json(&b.message.metadata)))
        .bind(column(batch, |b| b.message.input_tokens))
        .bind(column(batch, |b| b.message.output_tokens))
        .bind(column(batch, |b| {
            (!b.message.tool_calls.is_empty()).then_some(Json(&b.message.tool_calls))
        }))
        .bind(column(batch, |b| {
            (!b.message.tool_results.is_empty()).then_some(Json(&b.message.tool_results))
        }))
        .bind(column(batch, |b| b.message.request_id.as_deref()))
        .bind(column(batch, |b| b.now))
        .bind(column(batch, |b| b.key.caller))
        .bind(column(batch, |b| b.key.fingerprint))
        .bind(i32::try_from(max_distinct_labels).unwrap_or(i32::MAX))
        .bind(OVERFLOW_LABEL)
        .bind(TREND_WINDOW as i32)
        .fetch_all(executor);
    let rows = otel::sql_batch(
        recorders,
        "message_batch::STORE_MESSAGES",
        batch.len(),
        statement,
    )
    .await?;
    let mut answers = vec![None; batch.len()];
    for (ordinal, outcome, sequence, message_count, created) in rows {
        let slot = usize::try_from(ordinal)
            .ok()
            .and_then(|o| o.checked_sub(1))
            .and_then(|i| answers.get_mut(i));
        if let Some(slot) = slot {
            *slot = Some(StoredRow {
                outcome,
                sequence,
                message_count,
                conversation_created: created,
            });
        }
    }
    Ok(answers)
}

/// One bound array: `f` of each message, in order.
fn column<'b, 'm, T>(
    batch: &'b [BatchMessage<'m>],
    f: impl Fn(&'b BatchMessage<'m>) -> T,
) -> Vec<T> {
    batch.iter().map(f).collect()
}
