//! The message feed behind WatchMessages: the sequencer's round that numbers
//! newly committed messages, the watchers' page read, and retention. Why
//! positions come from snapshots and not from a sequence: the migration
//! `20261230000001_message_feed.sql`.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, postgres::PgConnection};

use super::rows::MessageRow;
use crate::domain::feed::WatchFilter;

/// Any replica may sequence, one at a time: the round holds this advisory
/// lock for its transaction (a lock, not a row lock: an idle round writes
/// nothing, so it costs no WAL and no dead tuple).
const SEQUENCER_LOCK: i64 = 0x6d61_6974_7265_0001;

/// Numbers the messages that became visible since the last round, in one
/// statement whose own snapshot is both what it reads and what it records,
/// so the next round starts exactly where this one saw. New messages are
/// those of transactions at or above the last snapshot's xmax, or in
/// progress in it (its xip list): two index reads, bounded by what is new
/// (not by history, nor by a long transaction holding xmin back; the list
/// as one array, so that it is probed in the index). Positions
/// follow (conversation, sequence) within the round. Returns the last
/// position (unchanged when nothing was new), how many were numbered, and
/// whether the server's transaction ids are behind the recorded snapshot
/// (a restored database): then nothing is read or written at all, since the
/// restored rows' ids mean nothing in the new id sequence.
pub const SEQUENCE_ROUND: &str = r#"
WITH state AS (
    SELECT last_pos, snapshot,
           pg_snapshot_xmax(pg_current_snapshot()) < pg_snapshot_xmax(snapshot) AS went_back
    FROM memory.feed_state
),
fresh AS (
    SELECT m.conversation_id, m.seq
    FROM memory.messages m
    WHERE m.tx_id >= (SELECT pg_snapshot_xmax(snapshot) FROM state WHERE NOT went_back)
    UNION ALL
    SELECT m.conversation_id, m.seq
    FROM memory.messages m
    WHERE m.tx_id = ANY ((SELECT array_agg(x) FROM state, pg_snapshot_xip(state.snapshot) x
                          WHERE NOT state.went_back)::xid8[])
),
numbered AS (
    SELECT conversation_id, seq,
           row_number() OVER (ORDER BY conversation_id, seq) AS n
    FROM fresh
),
fed AS (
    INSERT INTO memory.message_feed (pos, conversation_id, seq, fed_at)
    SELECT state.last_pos + numbered.n, numbered.conversation_id, numbered.seq, now()
    FROM numbered, state
    RETURNING pos
),
advanced AS (
    UPDATE memory.feed_state
    SET last_pos = last_pos + (SELECT count(*) FROM fed),
        snapshot = pg_current_snapshot()
    WHERE EXISTS (SELECT 1 FROM fed)
    RETURNING last_pos
)
SELECT COALESCE((SELECT last_pos FROM advanced), (SELECT last_pos FROM state)) AS last_pos,
       (SELECT count(*) FROM fed) AS numbered,
       (SELECT went_back FROM state) AS ids_went_back
"#;

/// What a round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Another replica's round was running: nothing done.
    Busy,
    /// The feed's last position after the round, and how many it numbered.
    Done { last_pos: i64, numbered: i64 },
    /// The server's transaction ids are behind the recorded snapshot: the
    /// database was restored or replaced (pg_dump into a new cluster), and
    /// no new message can be numbered until the feed is reset.
    IdsWentBack { last_pos: i64 },
}

/// A round numbers whatever became visible since the last one, which after
/// a long pause (rounds failing, or no replica running) may be a great deal:
/// it must not fail for good on the service's statement timeout.
///
/// And it reads the messages by `messages_tx_idx` whatever the statistics
/// say: its bound is a subquery's value, unknown when planning, so before
/// the tables are first analyzed (a new database, up to a minute of
/// autovacuum's nap) PostgreSQL picks a sequential scan of every message,
/// and the connection keeps that plan for each round until an analyze.
/// Without JIT: the cost that keeps sequential scans out (of the one-row
/// state table too) would otherwise compile the plan at every round, about
/// 350 ms each.
pub const BEGIN_ROUND: &str = "BEGIN; SET LOCAL statement_timeout = '10min'; \
                               SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// One sequencer round in its own transaction.
#[tracing::instrument(skip_all)]
pub async fn sequence(pool: &PgPool) -> Result<Round, sqlx::Error> {
    let mut tx = pool.begin_with(BEGIN_ROUND).await?;
    if !try_lock(&mut tx).await? {
        tx.rollback().await?;
        return Ok(Round::Busy);
    }
    // A statement after the lock: its snapshot sees every earlier round.
    let (last_pos, numbered, went_back) = sqlx::query_as::<_, (i64, i64, bool)>(SEQUENCE_ROUND)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(if went_back {
        Round::IdsWentBack { last_pos }
    } else {
        Round::Done { last_pos, numbered }
    })
}

/// Where the feed stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct FeedState {
    /// The last position given: every position up to it is committed.
    pub last_pos: i64,
    /// Positions up to this one were dropped by retention.
    pub pruned_to: i64,
}

pub async fn state(pool: &PgPool) -> Result<FeedState, sqlx::Error> {
    sqlx::query_as::<_, FeedState>("SELECT last_pos, pruned_to FROM memory.feed_state")
        .fetch_one(pool)
        .await
}

/// A fed message with its position, its conversation's user and channel.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FeedRow {
    pub pos: i64,
    pub user_id: String,
    pub channel: String,
    #[sqlx(flatten)]
    pub message: MessageRow,
}

/// The fed messages in positions (`$1`, `$2`] that pass the filters, in
/// position order, at most `$7`; none of an erased conversation (hidden from
/// its erasure on, gone with the purge). A primary-key range on the feed,
/// then a primary-key probe per message: the cost is the window's, whatever
/// the history.
pub const PAGE: &str = r#"
SELECT f.pos, c.user_id, c.channel,
       m.conversation_id, m.seq, m.id, m.role, m.content, m.emotion_score, m.emotion_label,
       m.emotion_scores, m.metadata, m.input_tokens, m.output_tokens, m.tool_calls,
       m.tool_results, m.request_id, m.created_at
FROM memory.message_feed f
JOIN memory.messages m ON m.conversation_id = f.conversation_id AND m.seq = f.seq
JOIN memory.conversations c ON c.id = f.conversation_id
WHERE f.pos > $1 AND f.pos <= $2
  AND c.erased_at IS NULL
  AND ($3::smallint IS NULL OR m.role = $3)
  AND ($4::text IS NULL OR c.channel = $4)
  AND ($5::text IS NULL OR c.user_id = $5)
  AND ($6::uuid IS NULL OR f.conversation_id = $6)
ORDER BY f.pos
LIMIT $7
"#;

/// The messages after position `after` up to `until` that pass `filter`,
/// at most `limit`.
///
/// Planned at every read (an unnamed statement), never from a connection's
/// cached generic plan: one built while the tables were small (a new
/// database, before autovacuum first analyzes them) probes the messages by
/// a sequential scan per position, which took 1–3 s a page once the feed
/// drill had written 10,000 messages. Planning costs well under a
/// millisecond, once per page of up to 64 messages.
#[tracing::instrument(skip(db, filter))]
pub async fn page(
    db: impl PgExecutor<'_>,
    after: i64,
    until: i64,
    filter: &WatchFilter,
    limit: i64,
) -> Result<Vec<FeedRow>, sqlx::Error> {
    sqlx::query_as::<_, FeedRow>(PAGE)
        .persistent(false)
        .bind(after)
        .bind(until)
        .bind(filter.role.map(|r| r.as_i16()))
        .bind(filter.channel.as_deref())
        .bind(filter.user_id.as_deref())
        .bind(filter.conversation_id)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// Drops up to `batch` of the oldest positions numbered before `cutoff`,
/// and records how far it went; returns how many were dropped. Positions
/// grow with `fed_at`, so the old ones are a prefix: the read stops at the
/// batch, never walks the young rows.
const PRUNE: &str = r#"
WITH state AS (
    SELECT pruned_to FROM memory.feed_state
),
doomed AS (
    SELECT max(f.pos) AS upto
    FROM (SELECT pos, fed_at FROM memory.message_feed, state
          WHERE pos > state.pruned_to
          ORDER BY pos LIMIT $2) f
    WHERE f.fed_at < $1
),
dropped AS (
    DELETE FROM memory.message_feed
    WHERE pos <= (SELECT upto FROM doomed)
    RETURNING pos
),
advanced AS (
    UPDATE memory.feed_state SET pruned_to = (SELECT upto FROM doomed)
    WHERE (SELECT upto FROM doomed) IS NOT NULL
    RETURNING pruned_to
)
SELECT (SELECT count(*) FROM dropped) AS dropped
"#;

/// One retention batch, under the sequencer's lock (so it never races a
/// round or another replica's pruning); `Ok(None)` when another replica
/// holds the lock.
#[tracing::instrument(skip(pool))]
pub async fn prune(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !try_lock(&mut tx).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    let dropped: i64 = sqlx::query_scalar(PRUNE)
        .bind(cutoff)
        .bind(batch)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(dropped))
}

async fn try_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SEQUENCER_LOCK)
        .fetch_one(conn)
        .await
}
