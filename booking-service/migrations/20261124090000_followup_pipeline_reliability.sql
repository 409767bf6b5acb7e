-- Issue 9, "nothing lost, nothing resurrected": planning progress on the
-- booking, delivery claims with a lease, re-drive bookkeeping, and pruning
-- of every kind of dead job row.

-- Planning progress. `followup_planned_at` is set in the transaction that
-- inserts the follow-up (or finds one already planned); `plan_attempt` is
-- the number of the newest plan attempt enqueued: only the run holding it
-- may enqueue the next (compare-and-set), and its job's idempotency key is
-- `<booking id>/<plan_attempt>`, never reused.
ALTER TABLE booking.bookings
    ADD COLUMN followup_planned_at timestamptz,
    ADD COLUMN plan_attempt integer NOT NULL DEFAULT 1;

-- Bookings planned before this migration.
UPDATE booking.bookings b SET followup_planned_at = f.created_at
FROM booking.scheduled_followups f
WHERE f.booking_id = b.id AND b.followup_planned_at IS NULL;

-- The stranded-planning sweep reads only confirmed bookings not yet planned:
-- a handful at any time, whatever the age of the oldest and the size of the
-- history (ids are UUIDv7, so the index also orders them by creation time).
CREATE INDEX bookings_unplanned_idx ON booking.bookings (id)
    WHERE state = 1 AND followup_planned_at IS NULL;

-- Delivery claims: a delivery claims its follow-up in a short transaction
-- (`claim_token`, valid until `claimed_until`), calls memory-service holding
-- no lock and no connection, and finishes in another short transaction that
-- applies only while its token is still on the row.
-- `retry_from`: the attempt count when the follow-up was last re-driven
-- (RetryFollowUp); the attempt budget counts from there.
ALTER TABLE booking.scheduled_followups
    ADD COLUMN claim_token uuid,
    ADD COLUMN claimed_until timestamptz,
    ADD COLUMN retry_from integer NOT NULL DEFAULT 0,
    ADD COLUMN redriven_at timestamptz,
    ADD COLUMN redrives integer NOT NULL DEFAULT 0;

-- Pruning reads every dead job row past retention, Failed ones included
-- (the old index covered Done and Killed only).
DROP INDEX IF EXISTS apalis.maitre_jobs_done_at_idx;
CREATE INDEX IF NOT EXISTS maitre_jobs_finished_idx ON apalis.jobs (done_at)
    WHERE status IN ('Done', 'Killed', 'Failed');
