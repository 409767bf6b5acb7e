//! GetContext: the newest messages within a token budget, the conversation
//! and its state, in one statement.

use maitre_runtime::otel;
use sqlx::PgPool;

use super::rows::ContextRow;
use crate::domain::{Role, state::ContextQuery};

/// `$1` conversation, `$2` token budget, `$3` most messages, `$4` byte
/// budget, `$5` the assistant's and `$6` the tool's role number.
///
/// `walk` goes back from the newest message (`seq = message_count`:
/// sequences are gapless) one primary-key probe at a time, adding up tokens
/// and bytes, and stops after the first message that passes a budget or at
/// `$3` messages: its cost follows the window, never the conversation's
/// length. A message's tokens and its weight in the answer are the SQL
/// functions `memory.message_tokens` and `memory.message_answer_bytes` (the
/// migration that adds conversation state). `fits`
/// drops the message that passed a budget (the newest one stays whatever
/// its bytes, like a listing page's first item: the byte budget leaves room
/// for it); `chosen` also drops tool results at the
/// window's start, whose tool call lies outside it.
///
/// One row: the conversation, its state, and the window as one array per
/// column, oldest first (NULL when empty), so nothing is sent or decoded
/// twice; no row for an unknown or erased conversation.
pub const GET_CONTEXT: &str = r#"
WITH RECURSIVE conv AS (
    SELECT id, seq, user_id, channel, created_at, last_message_at, closed_at,
           message_count, scored_count, score_sum, label_counts, recent_scores, last_score
    FROM memory.conversations
    WHERE id = $1 AND erased_at IS NULL
),
walk AS (
    SELECT m.seq, m.id, m.role, m.content, m.emotion_score, m.emotion_label, m.emotion_scores,
           m.metadata, m.input_tokens, m.output_tokens, m.tool_calls, m.tool_results,
           m.request_id, m.created_at, size.tokens, size.tokens AS total_tokens,
           size.bytes AS total_bytes, 1 AS n
    FROM conv
    JOIN memory.messages m ON m.conversation_id = conv.id AND m.seq = conv.message_count
    CROSS JOIN LATERAL (
        SELECT memory.message_tokens(m, $5) AS tokens, memory.message_answer_bytes(m) AS bytes
    ) size
    UNION ALL
    SELECT m.seq, m.id, m.role, m.content, m.emotion_score, m.emotion_label, m.emotion_scores,
           m.metadata, m.input_tokens, m.output_tokens, m.tool_calls, m.tool_results,
           m.request_id, m.created_at, size.tokens, w.total_tokens + size.tokens,
           w.total_bytes + size.bytes, w.n + 1
    FROM walk w
    JOIN memory.messages m ON m.conversation_id = $1 AND m.seq = w.seq - 1
    CROSS JOIN LATERAL (
        SELECT memory.message_tokens(m, $5) AS tokens, memory.message_answer_bytes(m) AS bytes
    ) size
    WHERE w.total_tokens <= $2 AND w.total_bytes <= $4 AND w.n < $3
),
fits AS (
    SELECT * FROM walk WHERE total_tokens <= $2 AND (n = 1 OR total_bytes <= $4)
),
chosen AS (
    SELECT * FROM fits
    WHERE seq >= (SELECT min(seq) FROM fits WHERE role <> $6 AND tool_results IS NULL)
)
SELECT conv.id, conv.seq, conv.user_id, conv.channel, conv.created_at, conv.last_message_at,
       conv.closed_at, conv.message_count, conv.scored_count, conv.score_sum, conv.label_counts,
       conv.recent_scores, conv.last_score,
       s.version AS state_version, s.state::text AS state_json, s.updated_at AS state_updated_at,
       w.*
FROM conv
LEFT JOIN memory.conversation_states s ON s.conversation_id = conv.id
CROSS JOIN (
    SELECT array_agg(seq ORDER BY seq) AS m_seq, array_agg(id ORDER BY seq) AS m_id,
           array_agg(role ORDER BY seq) AS m_role, array_agg(content ORDER BY seq) AS m_content,
           array_agg(emotion_score ORDER BY seq) AS m_emotion_score,
           array_agg(emotion_label ORDER BY seq) AS m_emotion_label,
           array_agg(emotion_scores::text ORDER BY seq) AS m_emotion_scores,
           array_agg(metadata::text ORDER BY seq) AS m_metadata,
           array_agg(input_tokens ORDER BY seq) AS m_input_tokens,
           array_agg(output_tokens ORDER BY seq) AS m_output_tokens,
           array_agg(tool_calls::text ORDER BY seq) AS m_tool_calls,
           array_agg(tool_results::text ORDER BY seq) AS m_tool_results,
           array_agg(request_id ORDER BY seq) AS m_request_id,
           array_agg(created_at ORDER BY seq) AS m_created_at,
           COALESCE(sum(tokens), 0)::bigint AS m_token_count
    FROM chosen
) w
"#;

#[tracing::instrument(skip(pool))]
pub async fn get(
    pool: &PgPool,
    query: &ContextQuery,
    byte_budget: usize,
) -> Result<Option<ContextRow>, sqlx::Error> {
    let statement = sqlx::query_as::<_, ContextRow>(GET_CONTEXT)
        .bind(query.conversation_id)
        .bind(i64::from(query.token_budget))
        .bind(i32::try_from(query.max_messages).unwrap_or(i32::MAX))
        .bind(i64::try_from(byte_budget).unwrap_or(i64::MAX))
        .bind(Role::Assistant.as_i16())
        .bind(Role::Tool.as_i16())
        .fetch_optional(pool);
    otel::sql("context::GET_CONTEXT", statement).await
}
