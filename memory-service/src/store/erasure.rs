//! Erasing a user: tombstones first, then a batched purge.
//!
//! [`BEGIN`] makes a user's conversations invisible in one statement: it sets
//! `erased_at` on their rows and records their ids in
//! `memory.erased_conversations` (the tombstones, kept for good). Every read
//! leaves erased conversations out and StoreMessage refuses to write into
//! them. The data itself goes afterwards, in [`PURGE_BATCH`] statements of a
//! bounded number of messages, each its own short transaction, so that no
//! statement runs into the statement timeout however many messages a user
//! has, and no other writer waits long for a lock; then [`delete_purged`]
//! removes the empty conversation row. The tombstone stays.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Marks every not yet erased conversation of `$1` erased and tombstones it,
/// and deletes its state at once (small: one row each); returns how many. One statement, so a conversation is never visible
/// without its tombstone or the other way round. The UPDATE takes each row's
/// lock: a StoreMessage in flight on one of them finishes first (its message
/// is purged with the rest); one that comes after sees `erased_at`.
///
/// The OR of the two `closed_at` arms is always true; it is spelled out so
/// that the planner reads the two partial listing indexes (a BitmapOr)
/// instead of scanning the table.
///
/// A `pub const` run with `sqlx::query`, not a macro: an API test runs this
/// very text alone.
pub const BEGIN: &str = r#"
WITH marked AS (
    UPDATE memory.conversations SET erased_at = $2
    WHERE user_id = $1 AND erased_at IS NULL
      AND (closed_at IS NULL OR closed_at IS NOT NULL)
    RETURNING id
),
tombstones AS (
    INSERT INTO memory.erased_conversations (conversation_id, erased_at)
    SELECT id, $2 FROM marked
    ON CONFLICT (conversation_id) DO NOTHING
),
states AS (
    DELETE FROM memory.conversation_states s USING marked WHERE s.conversation_id = marked.id
)
SELECT count(*) FROM marked
"#;

/// Deletes up to `$3` messages of erased conversation `$1` after sequence
/// `$2`, in sequence order, and takes them off the conversation's count. The
/// batch is found as its last sequence and deleted as the primary-key range
/// (`$2`, last]: an index range scan whatever the plan, never a join over all
/// of the conversation's messages. The conversation row is locked first with SKIP
/// LOCKED: one purger (a DeleteUserData call or a replica's background task)
/// works on a conversation at a time, and the others move on instead of
/// waiting. Starting after the last deleted sequence keeps each batch from
/// walking over the index entries of the rows already deleted.
/// Returns (claimed, deleted, last deleted sequence). Raw, not a macro: the
/// aggregates over data-modifying CTEs infer as nullable.
pub const PURGE_BATCH: &str = r#"
WITH conv AS (
    SELECT id FROM memory.conversations
    WHERE id = $1 AND erased_at IS NOT NULL
    FOR UPDATE SKIP LOCKED
),
batch_end AS (
    SELECT max(seq) AS last FROM (
        SELECT seq FROM memory.messages
        WHERE conversation_id = $1 AND seq > $2 AND EXISTS (SELECT 1 FROM conv)
        ORDER BY seq LIMIT $3
    ) batch
),
gone AS (
    DELETE FROM memory.messages
    WHERE conversation_id = $1 AND seq > $2 AND seq <= (SELECT last FROM batch_end)
    RETURNING seq
),
counted AS (
    UPDATE memory.conversations c
    SET message_count = c.message_count - (SELECT count(*) FROM gone)
    FROM conv WHERE c.id = conv.id
)
SELECT EXISTS (SELECT 1 FROM conv), (SELECT count(*) FROM gone), (SELECT max(seq) FROM gone)
"#;

/// Tombstones the user's conversations; returns how many were newly erased.
pub async fn begin(pool: &PgPool, user_id: &str, now: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar::<_, i64>(BEGIN)
        .bind(user_id)
        .bind(now)
        .fetch_one(pool)
        .await
}

/// The user's conversations that are erased but not yet purged.
pub async fn pending_for_user(pool: &PgPool, user_id: &str) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
SELECT id FROM memory.conversations
WHERE user_id = $1 AND erased_at IS NOT NULL
ORDER BY erased_at, id
"#,
        user_id
    )
    .fetch_all(pool)
    .await
}

/// Erased conversations not yet purged, of any user, oldest erasure first
/// (the background purger's work list).
pub async fn pending(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
SELECT id FROM memory.conversations
WHERE erased_at IS NOT NULL
ORDER BY erased_at, id
LIMIT $1
"#,
        limit
    )
    .fetch_all(pool)
    .await
}

/// (conversations, messages) of the user still awaiting the purge
/// (`message_count` is decremented by each batch).
pub async fn progress(pool: &PgPool, user_id: &str) -> Result<(i64, i64), sqlx::Error> {
    let left = sqlx::query!(
        r#"
SELECT count(*) AS "conversations!", COALESCE(sum(message_count), 0)::bigint AS "messages!"
FROM memory.conversations
WHERE user_id = $1 AND erased_at IS NOT NULL
"#,
        user_id
    )
    .fetch_one(pool)
    .await?;
    Ok((left.conversations, left.messages))
}

/// One batch of [`PURGE_BATCH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// False when another purger holds the conversation (or it is gone).
    pub claimed: bool,
    pub deleted: i64,
    /// The last sequence deleted, where the next batch starts.
    pub last_seq: Option<i64>,
}

pub async fn purge_batch(
    pool: &PgPool,
    conversation_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Batch, sqlx::Error> {
    let (claimed, deleted, last_seq) = sqlx::query_as::<_, (bool, i64, Option<i64>)>(PURGE_BATCH)
        .bind(conversation_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_one(pool)
        .await?;
    Ok(Batch {
        claimed,
        deleted,
        last_seq,
    })
}

/// Removes an erased conversation's row once it holds no message; true when
/// it was removed. The check reads only past the last purged sequence
/// `after_seq` (no message is ever added to an erased conversation, and
/// sequences only grow), so it never walks the dead index entries the purge
/// left behind.
pub async fn delete_purged(
    pool: &PgPool,
    conversation_id: Uuid,
    after_seq: i64,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query!(
        r#"
DELETE FROM memory.conversations c
WHERE c.id = $1 AND c.erased_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM memory.messages m WHERE m.conversation_id = $1 AND m.seq > $2)
"#,
        conversation_id,
        after_seq
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}
