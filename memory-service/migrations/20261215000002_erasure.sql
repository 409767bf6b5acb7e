-- Erasure that erases, and stays erased (store/erasure.rs).
--
-- DeleteUserData marks the user's conversations erased and records their ids
-- in `erased_conversations` in one statement; from then on no RPC shows them
-- and StoreMessage refuses to write into them (CONVERSATION_ERASED), even
-- after the rows are gone. Their messages are then purged in short batches,
-- then the conversation rows. A tombstone holds a random conversation id and
-- a time, nothing about the person, and is kept for good: a conversation id
-- a follow-up still carries must never bring the conversation back.

CREATE TABLE memory.erased_conversations (
    conversation_id uuid        PRIMARY KEY,
    erased_at       timestamptz NOT NULL
);

-- Set in the same statement that writes the tombstone. On the row itself so
-- that StoreMessage's upsert, which may have waited for the row lock while
-- the erasure committed, re-checks it on the row version it is about to
-- update (a tombstone inserted after the statement's snapshot would not be
-- seen). While set, `message_count` counts the messages not yet purged.
ALTER TABLE memory.conversations ADD COLUMN erased_at timestamptz;

-- ListConversations: the two branches of the listing, newest first by
-- creation (`seq`), erased conversations left out.
DROP INDEX memory.conversations_user_idx;
DROP INDEX memory.conversations_user_active_idx;
CREATE INDEX conversations_user_active_idx
    ON memory.conversations (user_id, seq DESC)
    WHERE closed_at IS NULL AND erased_at IS NULL;
CREATE INDEX conversations_user_closed_idx
    ON memory.conversations (user_id, seq DESC)
    WHERE closed_at IS NOT NULL AND erased_at IS NULL;

-- Conversations erased but not yet purged: by user (DeleteUserData's
-- progress) and all of them (the background purger). Empty when idle.
CREATE INDEX conversations_erased_idx
    ON memory.conversations (user_id)
    WHERE erased_at IS NOT NULL;
