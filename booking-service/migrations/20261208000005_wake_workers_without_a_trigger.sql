-- apalis-postgres's per-row trigger calls pg_notify inside every
-- transaction that inserts a due job, CreateBooking's included. PostgreSQL
-- serialises the commits of all transactions that notified (a global lock
-- taken at commit), which capped bookings at ~265/s (968/s without it).
-- booking-service wakes its workers itself after the commit instead, with
-- one coalesced NOTIFY on channel maitre_followup_jobs (jobs/wakeups.rs);
-- polling finds whatever nobody announced.
DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs;
