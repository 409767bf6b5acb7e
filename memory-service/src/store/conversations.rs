//! Reading and closing conversations. Erased conversations (`erased_at`
//! set, see [`super::erasure`]) are left out of every statement here: for
//! callers they are gone the moment the erasure starts.

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use sqlx::PgPool;
use uuid::Uuid;

use super::rows::ConversationRow;
use crate::domain::queries::ConversationPage;

// Raw strings run with `sqlx::query_as`, not macros: `label_counts` is read
// as `Json<BTreeMap<..>>`, which the macros only map with a per-column
// override, and `list_for_user` streams its rows.
const GET: &str = r#"
SELECT id, seq, user_id, channel, created_at, last_message_at, closed_at,
       message_count, scored_count, score_sum, label_counts, recent_scores, last_score
FROM memory.conversations
WHERE id = $1 AND erased_at IS NULL
"#;

/// Active conversations, newest first by creation (`seq`, server-assigned),
/// through the partial index `conversations_user_active_idx`, then, unless
/// `$4` (active only), closed ones through `conversations_user_closed_idx`.
/// `$2`: the cursor is already among the closed ones; `$3`: the cursor's
/// `seq`; `$6`: where the closed branch starts when the cursor is still among
/// the active ones. One statement: the UNION ALL stops once LIMIT rows are
/// found.
const LIST_FOR_USER: &str = r#"
SELECT * FROM (
    (SELECT id, seq, user_id, channel, created_at, last_message_at, closed_at,
            message_count, scored_count, score_sum, label_counts, recent_scores, last_score
     FROM memory.conversations
     WHERE user_id = $1 AND closed_at IS NULL AND erased_at IS NULL AND NOT $2 AND seq < $3
     ORDER BY seq DESC
     LIMIT $5)
    UNION ALL
    (SELECT id, seq, user_id, channel, created_at, last_message_at, closed_at,
            message_count, scored_count, score_sum, label_counts, recent_scores, last_score
     FROM memory.conversations
     WHERE user_id = $1 AND closed_at IS NOT NULL AND erased_at IS NULL AND NOT $4
       AND seq < CASE WHEN $2 THEN $3 ELSE $6 END
     ORDER BY seq DESC
     LIMIT $5)
) page
LIMIT $5
"#;

const CLOSE: &str = r#"
UPDATE memory.conversations SET closed_at = COALESCE(closed_at, $2)
WHERE id = $1 AND erased_at IS NULL
RETURNING id, seq, user_id, channel, created_at, last_message_at, closed_at,
          message_count, scored_count, score_sum, label_counts, recent_scores, last_score
"#;

#[tracing::instrument(skip(pool))]
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<ConversationRow>, sqlx::Error> {
    sqlx::query_as::<_, ConversationRow>(GET)
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn exists(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
SELECT EXISTS (SELECT 1 FROM memory.conversations WHERE id = $1 AND erased_at IS NULL)
    AS "exists!"
"#,
        id
    )
    .fetch_one(pool)
    .await
}

/// A page of a user's conversations (see [`LIST_FOR_USER`]), plus one extra
/// row when another page follows, as a stream that the caller stops reading
/// once the page's byte budget is spent (see [`super::messages::list`]).
pub fn list_for_user<'a>(
    pool: &'a PgPool,
    page: &ConversationPage,
) -> BoxStream<'a, Result<ConversationRow, sqlx::Error>> {
    // "Start from the newest" as a bound above every `seq`, without an
    // `IS NULL` branch that would keep the planner from using the index.
    let newest = i64::MAX;
    let (in_closed, last_seq) = page
        .after
        .map(|c| (c.in_closed, c.last_seq))
        .unwrap_or((false, newest));
    sqlx::query_as::<_, ConversationRow>(LIST_FOR_USER)
        .bind(page.user_id.clone())
        .bind(in_closed)
        .bind(last_seq)
        .bind(page.active_only)
        .bind(i64::from(page.page_size) + 1)
        .bind(newest)
        .fetch(pool)
}

/// Closes a conversation (idempotent: closing twice keeps the first time).
#[tracing::instrument(skip(pool))]
pub async fn close(
    pool: &PgPool,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<ConversationRow>, sqlx::Error> {
    sqlx::query_as::<_, ConversationRow>(CLOSE)
        .bind(id)
        .bind(now)
        .fetch_optional(pool)
        .await
}
