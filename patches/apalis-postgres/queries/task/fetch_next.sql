-- maitre patch: the body of apalis.get_jobs inlined. Called through the
-- SQL function, PostgreSQL plans the function body on every call (a
-- non-inlinable set-returning SQL function); as a prepared statement of its
-- own it is planned once per connection.
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
    ORDER BY priority DESC, run_at ASC
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
