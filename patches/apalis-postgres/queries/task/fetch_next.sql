-- maitre patch: the body of apalis.get_jobs inlined. Called through the
-- SQL function, PostgreSQL plans the function body on every call (a
-- non-inlinable set-returning SQL function); as a prepared statement of its
-- own it is planned once per connection. And due jobs in due order only
-- (PATCHES.md, 3): read through maitre's (job_type, run_at) index, the scan
-- stops after the due jobs it takes, however many are due or ahead.
WITH next AS (
    SELECT id
    FROM apalis.jobs
    WHERE
        (
            status = 'Pending'
            OR (
                status = 'Failed'
                AND attempts < max_attempts
            )
        )
        AND run_at < now()
        AND job_type = $2
    ORDER BY run_at ASC
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE apalis.jobs AS jobs
SET
    status = 'Queued',
    lock_by = $1,
    lock_at = now()
FROM next
WHERE jobs.id = next.id
RETURNING jobs.*
