//! get-context-10, -1k, -100k: every client calls GetContext, one call after
//! another, on one conversation of 10, 1,000 or 100,000 messages, with a
//! budget of [`CONTEXT_TOKEN_BUDGET`] tokens and `max_messages` 0 (the
//! default, 100). The answer is the newest 40 messages (all 10 of the short
//! conversation), the conversation and its state; its cost must follow that
//! window, not the conversation's length.
//!
//! The conversation is made before the scenario's first point (unmeasured)
//! straight in the database, as StoreMessage would have left it: messages
//! of [`CONTENT`] with seq 1..n gapless, user and assistant alternating,
//! every user message with an emotion score and label, the conversation's
//! count and emotion aggregates matching its messages, a state document;
//! then ANALYZE. The conversation id is fixed per length, so the floor's
//! script can be written before anything runs.

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use memory_service::domain::{Role, emotion::TREND_WINDOW};
use sqlx::{AssertSqlSafe, PgPool, Row};
use tonic::{Status, transport::Channel};
use uuid::Uuid;

use super::{Endpoints, memory_client};
use crate::floor::scripts::{self, CONTENT, CONTEXT_TOKEN_BUDGET, LABELS};

/// The conversation GetContext reads in the scenario of `length` messages
/// (a UUIDv7 of a fixed time, the length in its last digits).
pub fn conversation_id(length: i64) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 | u128::from(length.unsigned_abs()))
}

/// Tokens of one bench message by the service's estimate (no stored token
/// usage): 4 + ceil(bytes / 4).
fn tokens_per_message() -> i64 {
    4 + (CONTENT.len() as i64 + 3) / 4
}

/// The messages GetContext answers for a conversation of `length`: as many
/// of the newest as fit the token budget (the walk stops at the first that
/// passes it), at most the default 100.
pub fn window(length: i64) -> i64 {
    let default_cap = i64::from(memory_service::domain::state::DEFAULT_CONTEXT_MESSAGES);
    length
        .min(i64::from(CONTEXT_TOKEN_BUDGET) / tokens_per_message())
        .min(default_cap)
}

/// The conversation row, empty; its count and aggregates come from its
/// messages below. Created `length` × 10 s ago, one message every 10 s.
const CONVERSATION: &str = r#"
INSERT INTO memory.conversations (id, user_id, channel, created_at, last_message_at)
VALUES ($1, $2, 'web', now() - make_interval(secs => $3 * 10), now())
"#;

/// Messages 1..n: odd seq from the user with a score in [-1, 1] and one of
/// the labels, even seq from the assistant without; UUIDv7 ids and request
/// ids at each message's time; the request key scoped to the anonymous
/// caller with a SHA-256-sized fingerprint, as StoreMessage stores them.
const MESSAGES: &str = r#"
INSERT INTO memory.messages
    (conversation_id, seq, id, user_id, role, content, emotion_score, emotion_label,
     emotion_scores, metadata, input_tokens, output_tokens, tool_calls, tool_results,
     request_id, created_at, request_caller, request_fingerprint)
SELECT c.id, g, bench.uuid7(t.at, g, g * 2 + 1), c.user_id,
       CASE WHEN g % 2 = 1 THEN $3::int2 ELSE $4::int2 END,
       $5,
       CASE WHEN g % 2 = 1 THEN ((g * 37) % 201 - 100) / 100.0 END,
       CASE WHEN g % 2 = 1 THEN ($6::text[])[(g / 2) % cardinality($6::text[]) + 1] END,
       NULL, '{}'::jsonb, NULL, NULL, NULL, NULL,
       bench.uuid7(t.at, g, g * 2 + 2)::text, t.at, '', $7
FROM memory.conversations c
CROSS JOIN generate_series(1, $2::int8) AS g
CROSS JOIN LATERAL (SELECT c.created_at + make_interval(secs => g * 10) AS at) t
WHERE c.id = $1
"#;

/// The conversation's count and emotion aggregates, as StoreMessage keeps
/// them: scored count and sum, counts by label, the last `$2` scores
/// (oldest first), the last score.
const AGGREGATES: &str = r#"
UPDATE memory.conversations c
SET message_count = a.n, scored_count = a.scored, score_sum = a.score_sum,
    label_counts = a.labels, recent_scores = a.recent, last_score = a.recent[cardinality(a.recent)],
    last_message_at = a.last_at
FROM (
    SELECT count(*) AS n, count(emotion_score) AS scored,
           COALESCE(sum(emotion_score), 0) AS score_sum, max(created_at) AS last_at,
           (SELECT COALESCE(jsonb_object_agg(label, k), '{}'::jsonb)
            FROM (SELECT emotion_label AS label, count(*) AS k
                  FROM memory.messages
                  WHERE conversation_id = $1 AND emotion_label IS NOT NULL
                  GROUP BY 1) l) AS labels,
           (SELECT COALESCE(array_agg(score ORDER BY seq), '{}'::float8[])
            FROM (SELECT seq, emotion_score AS score
                  FROM memory.messages
                  WHERE conversation_id = $1 AND emotion_score IS NOT NULL
                  ORDER BY seq DESC
                  LIMIT $2) r) AS recent
    FROM memory.messages
    WHERE conversation_id = $1
) a
WHERE c.id = $1
"#;

/// A state document of the kind an assistant keeps (what it has collected
/// so far), written three times.
const STATE: &str = r#"
INSERT INTO memory.conversation_states (conversation_id, version, state, updated_at)
VALUES ($1, 3, '{"stage": "collecting", "party_size": 2, "date": "2026-12-04", "time": "19:30",
                 "preferences": ["quiet table", "window"], "customer_name": "Bench Customer",
                 "notes": "celebrating an anniversary"}'::jsonb, now())
"#;

/// Creates the conversation of `length` messages (see the module's doc),
/// runs ANALYZE, and checks that the floor's statement answers the window
/// the service must answer. Returns the seconds it took.
pub async fn set_up(pool: &PgPool, length: i64) -> Result<f64> {
    let started = Instant::now();
    let id = conversation_id(length);
    let mut tx = pool.begin().await?;
    sqlx::query(CONVERSATION)
        .bind(id)
        .bind(format!("bench-context-{length}"))
        .bind(length as f64)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("creating the conversation of {length} messages"))?;
    sqlx::query(MESSAGES)
        .bind(id)
        .bind(length)
        .bind(Role::User.as_i16())
        .bind(Role::Assistant.as_i16())
        .bind(CONTENT)
        .bind(LABELS.to_vec())
        .bind(vec![0xab_u8; 32])
        .execute(&mut *tx)
        .await
        .with_context(|| format!("inserting {length} messages"))?;
    sqlx::query(AGGREGATES)
        .bind(id)
        .bind(i64::try_from(TREND_WINDOW)?)
        .execute(&mut *tx)
        .await
        .context("setting the conversation's aggregates")?;
    sqlx::query(STATE)
        .bind(id)
        .execute(&mut *tx)
        .await
        .context("writing the conversation's state")?;
    tx.commit().await?;
    sqlx::query("ANALYZE memory.conversations, memory.messages, memory.conversation_states")
        .execute(pool)
        .await
        .context("ANALYZE")?;
    check_floor(pool, length).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Runs the floor's statement once: it must find the conversation with
/// `length` messages and answer [`window`] of them.
async fn check_floor(pool: &PgPool, length: i64) -> Result<()> {
    let sql = scripts::get_context_statement(conversation_id(length))?;
    let row = sqlx::query(AssertSqlSafe(sql))
        .fetch_optional(pool)
        .await
        .context("running the floor's GET_CONTEXT")?;
    let Some(row) = row else {
        bail!("the floor's GET_CONTEXT found no conversation of {length} messages");
    };
    let count: i64 = row.try_get("message_count")?;
    // The window is one array per column.
    let messages = row
        .try_get::<Option<Vec<i64>>, _>("m_seq")?
        .map_or(0, |seqs| seqs.len() as i64);
    ensure!(
        count == length && messages == window(length),
        "the floor's GET_CONTEXT answered {messages} messages of a conversation of {count}; \
         expected {} of {length}",
        window(length)
    );
    Ok(())
}

pub struct ContextClient {
    memory: MemoryServiceClient<Channel>,
    request: memory::GetContextRequest,
    length: i64,
    window: usize,
}

impl ContextClient {
    pub async fn new(endpoints: &Endpoints, length: i64) -> Result<Self> {
        Ok(Self {
            memory: memory_client(endpoints).await?,
            request: memory::GetContextRequest {
                conversation_id: conversation_id(length).to_string(),
                token_budget: CONTEXT_TOKEN_BUDGET,
                max_messages: 0,
            },
            length,
            window: usize::try_from(window(length))?,
        })
    }

    /// One GetContext; an answer with another window than the floor's
    /// counts as an error.
    pub async fn op(&mut self) -> Result<(), Status> {
        let answer = self
            .memory
            .get_context(self.request.clone())
            .await?
            .into_inner();
        let count = answer.conversation.as_ref().map(|c| c.message_count);
        if answer.messages.len() != self.window || count != Some(self.length) {
            return Err(Status::internal(format!(
                "GetContext answered {} messages of a conversation of {count:?}; expected {} of {}",
                answer.messages.len(),
                self.window,
                self.length
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_holds_forty_bench_messages() {
        assert_eq!(tokens_per_message(), 25);
        assert_eq!([window(10), window(1_000), window(100_000)], [10, 40, 40]);
    }

    #[test]
    fn each_length_has_its_own_version_7_conversation() {
        let ids = [10, 1_000, 100_000].map(conversation_id);
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert_ne!(ids[0], ids[1]);
        assert!(ids[2].to_string().ends_with("0186a0"));
    }
}
