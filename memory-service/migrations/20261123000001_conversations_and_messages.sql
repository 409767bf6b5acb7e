-- memory-service owns schema `memory`. Emotion statistics live on the
-- conversation row and are updated by the same statement that inserts a
-- message (see store/messages.rs), so they can never drift from the messages.

CREATE TABLE memory.conversations (
    id              uuid PRIMARY KEY,
    user_id         text             NOT NULL,
    channel         text             NOT NULL DEFAULT '',
    created_at      timestamptz      NOT NULL,
    last_message_at timestamptz      NOT NULL,
    -- NULL while active; a new message reopens a closed conversation.
    closed_at       timestamptz,
    message_count   bigint           NOT NULL DEFAULT 0,
    -- Emotion aggregates over messages that carried a score.
    scored_count    bigint           NOT NULL DEFAULT 0,
    score_sum       double precision NOT NULL DEFAULT 0,
    -- {"joy": 3, "anger": 1}
    label_counts    jsonb            NOT NULL DEFAULT '{}'::jsonb,
    -- The last 10 scores, oldest first: the window the trend is read from.
    recent_scores   double precision[] NOT NULL DEFAULT '{}',
    last_score      double precision
);

-- ListConversations: a user's conversations, newest first (uuidv7 ids are
-- time-ordered), and the active ones alone through the partial index.
CREATE INDEX conversations_user_idx
    ON memory.conversations (user_id, id DESC);
CREATE INDEX conversations_user_active_idx
    ON memory.conversations (user_id, id DESC) WHERE closed_at IS NULL;

CREATE TABLE memory.messages (
    conversation_id uuid        NOT NULL REFERENCES memory.conversations (id) ON DELETE CASCADE,
    -- Server-assigned position: the conversation's message_count after the
    -- insert, taken under the conversation's row lock, so 1, 2, 3, ... gapless.
    seq             bigint      NOT NULL,
    id              uuid        NOT NULL,
    -- The conversation's user (not the author: see role); scopes request_id.
    user_id         text        NOT NULL,
    role            smallint    NOT NULL,
    content         text        NOT NULL,
    emotion_score   double precision,
    emotion_label   text,
    emotion_scores  jsonb,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    input_tokens    integer,
    output_tokens   integer,
    tool_calls      jsonb,
    tool_results    jsonb,
    request_id      text,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    CONSTRAINT emotion_score_range CHECK (emotion_score BETWEEN -1 AND 1)
);

-- Idempotency: a request_id is stored at most once per user.
CREATE UNIQUE INDEX messages_request_id_key
    ON memory.messages (user_id, request_id) WHERE request_id IS NOT NULL;

-- GetEmotionHistory: the last N scored messages of a conversation, answered
-- from the index alone (index-only scan).
CREATE INDEX messages_emotion_history_idx
    ON memory.messages (conversation_id, seq DESC)
    INCLUDE (emotion_score, emotion_label, created_at, id)
    WHERE emotion_score IS NOT NULL;
