-- The message feed behind WatchMessages (store/feed.rs): every committed
-- message gets a position, 1, 2, 3, ... without gaps, in the order the
-- messages became visible, so that a watcher reading "positions after my
-- cursor" never skips a message that committed late.
--
-- Why not a sequence or a timestamp on the message: two writers take 41 and
-- 42, 42 commits first, a watcher reads 42 and moves its cursor past 41,
-- which then commits and is never seen. Instead, each message records its
-- transaction id (`tx_id`), and a sequencer (any replica, one at a time)
-- repeatedly numbers the messages that became visible since the snapshot it
-- numbered last: those whose transaction is at or above that snapshot's xmax
-- or was in progress in it (its xip list). Every committed message falls in
-- exactly one such round; positions are taken under the sequencer's lock and
-- committed together, so readers always see a prefix of the positions.
-- Within a round, positions follow (conversation, sequence): a conversation's
-- messages commit one after another under its row lock, so a later message
-- is never in an earlier round.

-- Nullable and with no default in the table rewrite: instant on a large
-- table. Messages stored before this migration keep NULL and are not fed.
ALTER TABLE memory.messages ADD COLUMN tx_id xid8;
ALTER TABLE memory.messages ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id();

-- The sequencer's two reads: transactions at or above a snapshot's xmax, and
-- the few that were in progress in it. Only new messages have a tx_id, but
-- the build still reads the table once, while StoreMessage waits (about a
-- tenth of a second per million messages, measured warm): not CONCURRENTLY,
-- which cannot run inside a migration's transaction, and whose failure
-- halfway would leave an invalid index behind. No statement timeout for
-- it: it runs once.
SET LOCAL statement_timeout = 0;
CREATE INDEX messages_tx_idx ON memory.messages (tx_id) WHERE tx_id IS NOT NULL;

CREATE TABLE memory.message_feed (
    pos             bigint      PRIMARY KEY,
    conversation_id uuid        NOT NULL,
    seq             bigint      NOT NULL,
    -- When the sequencer numbered it: what retention counts from.
    fed_at          timestamptz NOT NULL
);

-- One row: the last position given, the snapshot the last round saw, and
-- the last position retention dropped (a cursor before it has expired).
CREATE TABLE memory.feed_state (
    id        boolean     PRIMARY KEY DEFAULT true CHECK (id),
    last_pos  bigint      NOT NULL,
    snapshot  pg_snapshot NOT NULL,
    pruned_to bigint      NOT NULL
);

-- The feed starts here: messages visible now are not in it.
INSERT INTO memory.feed_state (last_pos, snapshot, pruned_to)
VALUES (0, pg_current_snapshot(), 0);
