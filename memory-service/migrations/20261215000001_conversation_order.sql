-- ListConversations pages on a server-assigned key, not on the client-chosen
-- conversation id: ids need not be UUIDv7 (a v4 id or ffffffff-… sorted
-- anywhere, and the largest id could never follow the "start below the
-- largest UUID" cursor). `seq` is taken from an identity sequence when the
-- conversation is created, so it orders conversations by creation.

ALTER TABLE memory.conversations ADD COLUMN seq bigint;

-- Existing conversations keep their creation order (ties by id).
UPDATE memory.conversations c
SET seq = o.n
FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n
      FROM memory.conversations) o
WHERE c.id = o.id;

ALTER TABLE memory.conversations ALTER COLUMN seq SET NOT NULL;
-- ALWAYS: no statement can choose (and so collide with) a position.
ALTER TABLE memory.conversations ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('memory.conversations', 'seq'),
              COALESCE(max(seq), 0) + 1, false)
FROM memory.conversations;

-- The listing's indexes move to `seq` in the next migration, which adds
-- the `erased_at` column they filter on.
