//! Conversation state: read, and written by test-and-set on its version.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::rows::StateRow;
use crate::domain::state::StateUpdate;

/// The state of a conversation that exists and is not erased (no state row:
/// version 0). No row at all: no such conversation.
pub const GET_STATE: &str = r#"
SELECT c.id AS conversation_id, s.version, s.state::text AS state_json, s.updated_at
FROM memory.conversations c
LEFT JOIN memory.conversation_states s ON s.conversation_id = c.id
WHERE c.id = $1 AND c.erased_at IS NULL
"#;

/// UpdateConversationState in one statement. `$1` conversation, `$2`
/// expected version (0 = never written), `$3` the JSON text, `$4` true when
/// `$3` is a merge patch, `$5` the time, `$6` the largest stored state in
/// bytes of jsonb text.
///
/// The new state is computed from the state this statement's snapshot sees
/// (`current`), and written only if that state has the expected version and
/// the row still has it when locked: the UPDATE re-checks `version` on the
/// newest row version after waiting for a concurrent writer, so of two
/// writers from the same version exactly one wins. A first write inserts;
/// a concurrent first write makes the other's INSERT do nothing. The key
/// share lock on the conversation (what the foreign key check takes anyway,
/// taken first) keeps a purge from deleting the row in between: the write
/// then finds no conversation instead of failing on the foreign key. Returns
/// whether the conversation exists, the version the snapshot saw, the new
/// state's JSON type and stored size (to explain a refusal), and the new
/// version and state (jsonb's text form) when written.
pub const WRITE_STATE: &str = r#"
WITH conv AS (
    SELECT id FROM memory.conversations WHERE id = $1 AND erased_at IS NULL
    FOR KEY SHARE
),
current AS (
    SELECT version, state FROM memory.conversation_states WHERE conversation_id = $1
),
merged AS (
    SELECT CASE WHEN $4 THEN memory.jsonb_merge_patch((SELECT state FROM current), $3::text::jsonb)
                ELSE $3::text::jsonb END AS state
),
next AS (
    SELECT state, jsonb_typeof(state) AS json_type, octet_length(state::text) AS bytes FROM merged
),
checked AS (
    SELECT state FROM next
    WHERE json_type = 'object' AND bytes <= $6
      AND COALESCE((SELECT version FROM current), 0) = $2
),
created AS (
    INSERT INTO memory.conversation_states (conversation_id, version, state, updated_at)
    SELECT conv.id, 1, checked.state, $5 FROM conv, checked WHERE $2 = 0
    ON CONFLICT (conversation_id) DO NOTHING
    RETURNING version, state::text AS state_json
),
updated AS (
    UPDATE memory.conversation_states s
    SET version = s.version + 1, state = checked.state, updated_at = $5
    FROM conv, checked
    WHERE s.conversation_id = conv.id AND s.version = $2 AND $2 > 0
    RETURNING s.version, s.state::text AS state_json
)
SELECT EXISTS (SELECT 1 FROM conv) AS found,
       COALESCE((SELECT version FROM current), 0) AS seen_version,
       (SELECT json_type FROM next) AS new_type,
       (SELECT bytes FROM next) AS new_bytes,
       COALESCE((SELECT version FROM created), (SELECT version FROM updated)) AS written_version,
       COALESCE((SELECT state_json FROM created), (SELECT state_json FROM updated)) AS written_json
"#;

/// What an UpdateConversationState did.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    Written {
        version: i64,
        state_json: String,
    },
    NotFound,
    /// Another writer came first: the version now, as far as known.
    VersionMismatch {
        current: i64,
    },
    /// The new state (a merge patch's result) is not a JSON object.
    NotAnObject {
        json_type: String,
    },
    /// The new state, as stored, passes the size limit.
    TooLarge {
        bytes: i64,
    },
}

#[tracing::instrument(skip(pool))]
pub async fn get(pool: &PgPool, conversation_id: Uuid) -> Result<Option<StateRow>, sqlx::Error> {
    sqlx::query_as::<_, StateRow>(GET_STATE)
        .bind(conversation_id)
        .fetch_optional(pool)
        .await
}

#[tracing::instrument(skip_all, fields(conversation_id = %update.conversation_id, expected_version = update.expected_version))]
pub async fn write(
    pool: &PgPool,
    update: &StateUpdate,
    now: DateTime<Utc>,
    max_bytes: usize,
) -> Result<WriteOutcome, sqlx::Error> {
    type Row = (
        bool,
        i64,
        Option<String>,
        Option<i32>,
        Option<i64>,
        Option<String>,
    );
    let (found, seen, json_type, bytes, written, written_json) =
        sqlx::query_as::<_, Row>(WRITE_STATE)
            .bind(update.conversation_id)
            .bind(update.expected_version)
            .bind(update.change.json())
            .bind(update.change.is_patch())
            .bind(now)
            .bind(i32::try_from(max_bytes).unwrap_or(i32::MAX))
            .fetch_one(pool)
            .await?;
    Ok(if !found {
        WriteOutcome::NotFound
    } else if let (Some(version), Some(state_json)) = (written, written_json) {
        WriteOutcome::Written {
            version,
            state_json,
        }
    } else if seen != update.expected_version {
        WriteOutcome::VersionMismatch { current: seen }
    } else if json_type.as_deref() != Some("object") {
        WriteOutcome::NotAnObject {
            json_type: json_type.unwrap_or_else(|| "null".into()),
        }
    } else if bytes.is_some_and(|b| usize::try_from(b).unwrap_or(usize::MAX) > max_bytes) {
        WriteOutcome::TooLarge {
            bytes: bytes.map(i64::from).unwrap_or_default(),
        }
    } else {
        // Valid and from the expected version, yet not written: a concurrent
        // writer moved the version after this statement's snapshot.
        // Gone meanwhile (erased): not found, whatever the version.
        match get(pool, update.conversation_id).await? {
            None => WriteOutcome::NotFound,
            Some(row) => WriteOutcome::VersionMismatch {
                current: row.version.unwrap_or(0),
            },
        }
    })
}
