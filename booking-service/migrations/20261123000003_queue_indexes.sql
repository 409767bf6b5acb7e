-- Indexes booking-service needs on apalis's job table (created after
-- apalis's own migrations, see startup::migrate): queue depth by state for
-- /metrics, and pruning finished rows. apalis ships neither.
CREATE INDEX IF NOT EXISTS maitre_jobs_type_status_idx ON apalis.jobs (job_type, status);
CREATE INDEX IF NOT EXISTS maitre_jobs_done_at_idx ON apalis.jobs (done_at) WHERE status IN ('Done', 'Killed');

-- Planning attempts, kept beside delivery attempts for the operator.
ALTER TABLE booking.scheduled_followups ADD COLUMN plan_attempts integer NOT NULL DEFAULT 1;

-- Failed follow-ups (the dead letter) counted for /metrics and found by operators.
CREATE INDEX scheduled_followups_failed_idx
    ON booking.scheduled_followups (updated_at) WHERE state = 4;
