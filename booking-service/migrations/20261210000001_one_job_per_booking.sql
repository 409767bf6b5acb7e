-- One job per booking: CreateBooking enqueues the follow-up job due at the
-- event's end + BOOKING_FOLLOWUP_DELAY, and that job plans and delivers.
--
-- 1. The job's follow-up row is born claimed by the run that inserts it
--    (it delivers next). A row born cancelled, because the customer was
--    erased, must not carry that claim: EraseCustomer would count it as a
--    delivery in flight for the whole lease. The trigger decides after
--    waiting for an erasure in progress, so it clears the claim too.
CREATE OR REPLACE FUNCTION booking.followup_of_erased_booking() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    erased    timestamptz;
    pseudonym text;
BEGIN
    SELECT b.erased_at, b.customer_id INTO erased, pseudonym
    FROM booking.bookings b WHERE b.id = NEW.booking_id
    FOR SHARE;
    IF erased IS NOT NULL THEN
        NEW.state := 3;
        NEW.customer_id := pseudonym;
        NEW.conversation_id := NULL;
        NEW.rendered_text := '';
        NEW.last_error := 'customer erased';
        NEW.claim_token := NULL;
        NEW.claimed_until := NULL;
    END IF;
    RETURN NEW;
END
$$;

-- 2. Every booking ahead now has a job waiting in the queue until its
--    event ends. apalis's fetch index (job_type, priority DESC, run_at)
--    cannot stop at the first job not yet due, so a fetch that finds fewer
--    due jobs than it asks for (every idle poll) read every future job:
--    15 ms per poll with 200,000 bookings ahead. This index bounds the scan
--    by `run_at < now()`; the patched fetch orders by `run_at` alone
--    (patches/apalis-postgres/PATCHES.md, 3), so the scan stops after the
--    due jobs it takes (0.1 ms), however many are due or ahead. apalis's
--    index goes: with both, the planner chose by statistics, and a prepared
--    statement's generic plan keeps its choice for the connection's life.
CREATE INDEX IF NOT EXISTS maitre_jobs_due_idx ON apalis.jobs (job_type, run_at)
    WHERE status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts);
DROP INDEX IF EXISTS apalis.idx_apalis_jobs_fetch_partial;

-- 3. The stranded-planning sweep looked at every confirmed booking not yet
--    planned, which now includes every booking ahead (planned at its
--    event's end): one probe of the queue per booking ahead, each sweep.
--    Each booking records when its follow-up job comes due, and the sweep
--    reads, in due order, only the unplanned bookings already due (a job
--    that dies before its due time loses nothing by waiting for it).
--    Bookings made before this migration (and rows written by hand) have
--    no due time: their plan job was due when they were made.
ALTER TABLE booking.bookings ADD COLUMN followup_due_at timestamptz;
CREATE INDEX bookings_unplanned_due_idx
    ON booking.bookings ((COALESCE(followup_due_at, created_at)), id)
    WHERE state = 1 AND followup_planned_at IS NULL;
DROP INDEX IF EXISTS booking.bookings_unplanned_idx;
