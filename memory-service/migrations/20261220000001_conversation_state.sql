-- Conversation state (store/state.rs): one versioned JSON object per
-- conversation that an assistant keeps between turns. Written only by
-- test-and-set on `version` (UpdateConversationState), never blindly.
--
-- A table of its own, not columns on memory.conversations: StoreMessage
-- updates the conversation row on every message, and a state write must
-- neither wait for that row lock nor make every message rewrite the state.
-- Erasure deletes the state with the conversation's tombstone; the cascade
-- removes any state written in the instant before (with the purged row).

CREATE TABLE memory.conversation_states (
    conversation_id uuid        PRIMARY KEY
                                REFERENCES memory.conversations (id) ON DELETE CASCADE,
    -- 1 on the first write; each write adds one. Version 0 = no row.
    version         bigint      NOT NULL CHECK (version > 0),
    state           jsonb       NOT NULL CHECK (jsonb_typeof(state) = 'object'),
    updated_at      timestamptz NOT NULL
);

-- RFC 7396 JSON merge patch, computed where the state is, so that a patch
-- is applied to exactly the version it was sent for, in the statement that
-- writes it, and numbers keep jsonb's exact precision. Members set to null
-- are removed, objects merge recursively, anything else replaces. One
-- aggregate per level of nesting (the service bounds the nesting), not one
-- copy of the object per member: a patch of many members costs about what
-- reading it does.
CREATE FUNCTION memory.jsonb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN
        RETURN patch;
    END IF;
    -- p.value IS NULL: the member is not in the patch (kept as it is);
    -- a JSON null in the patch removes it.
    RETURN COALESCE((
        SELECT jsonb_object_agg(key, CASE WHEN p.value IS NULL THEN t.value
                                          ELSE memory.jsonb_merge_patch(t.value, p.value) END)
        FROM jsonb_each(CASE WHEN jsonb_typeof(target) = 'object' THEN target
                             ELSE '{}'::jsonb END) AS t
        FULL JOIN jsonb_each(patch) AS p USING (key)
        WHERE p.value IS NULL OR jsonb_typeof(p.value) <> 'null'
    ), '{}'::jsonb);
END
$fn$;

-- GetContext's measures of a message (store/context.rs). Its size: the
-- bytes of what a model reads of it, content and tool JSON.
CREATE FUNCTION memory.message_bytes(m memory.messages) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT octet_length(m.content)::bigint
           + COALESCE(octet_length(m.tool_calls::text), 0)
           + COALESCE(octet_length(m.tool_results::text), 0)
$fn$;

-- Its tokens: the stored usage of the message itself (`output_tokens` of an
-- assistant message, `input_tokens` of any other) when set, else an
-- estimate of 4 + ceil(bytes / 4).
CREATE FUNCTION memory.message_tokens(m memory.messages, assistant_role smallint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN m.role = assistant_role AND m.output_tokens > 0 THEN m.output_tokens::bigint
                WHEN m.role <> assistant_role AND m.input_tokens > 0 THEN m.input_tokens::bigint
                ELSE 4 + (memory.message_bytes(m) + 3) / 4 END
$fn$;

-- What a message weighs in GetContext's answer, for its byte budget: its
-- size above plus metadata, emotion and request id, and 200 bytes of ids,
-- numbers and protobuf tags.
CREATE FUNCTION memory.message_answer_bytes(m memory.messages) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT memory.message_bytes(m) + octet_length(m.metadata::text)
           + COALESCE(octet_length(m.emotion_scores::text), 0)
           + COALESCE(octet_length(m.emotion_label), 0)
           + COALESCE(octet_length(m.request_id), 0) + 200
$fn$;
