-- label_counts is bounded from now on: StoreMessage counts at most
-- --max-distinct-labels labels per conversation (default 32) and counts any
-- further label under the overflow key "~other" (store/messages.rs). Before
-- that bound, one conversation could hold any number of labels (100k labels:
-- a 3 MB document, a 4 MB GetConversation over the response limit, ~250 ms
-- per scored write). Fold such conversations once: keep the 32 most counted
-- labels (ties by label) and add every other count to "~other", so the sum of
-- the counts stays the number of scored messages. 32 is the default cap; a
-- deployment with a larger cap keeps only 32 of an old conversation's labels.

-- One statement over every conversation; it may outlast the service's
-- statement_timeout on a large table, and runs once.
SET LOCAL statement_timeout = 0;

WITH over_cap AS (
    SELECT id, label_counts
    FROM memory.conversations
    WHERE (SELECT count(*) FROM jsonb_object_keys(label_counts)) > 32
),
ranked AS (
    SELECT o.id, e.key, e.value::bigint AS n,
           -- "~other" (if present) last, so it never takes a label's place.
           row_number() OVER (PARTITION BY o.id
                              ORDER BY e.key = '~other', e.value::bigint DESC, e.key) AS rank
    FROM over_cap o, jsonb_each_text(o.label_counts) e
),
folded AS (
    SELECT id, jsonb_object_agg(key, n) AS label_counts
    FROM (SELECT id, CASE WHEN rank <= 32 THEN key ELSE '~other' END AS key,
                 sum(n)::bigint AS n
          FROM ranked
          GROUP BY 1, 2) kept
    GROUP BY id
)
UPDATE memory.conversations c
SET label_counts = folded.label_counts
FROM folded
WHERE c.id = folded.id;
