-- maitre patch: the rows to acknowledge are found by primary key
-- (`id = ANY(ARRAY(...))`). The published query joined the payload to
-- `jobs.lock_by = $2`, which the planner answered through
-- idx_apalis_jobs_lock_by: every job this worker ever locked (all retained
-- history), hash-joined to the handful being acknowledged. The worker check
-- is written IS NOT DISTINCT FROM (the same test for a non-null $2) so
-- that it cannot be answered from that index.
WITH j AS (
    SELECT
        (value ->> 'task_id')::text AS task_id,
        (value ->> 'attempt')::integer AS attempt,
        value -> 'result' AS result,
        value ->> 'status' AS status
    FROM jsonb_array_elements($1::jsonb) AS value
),
locked AS (
    SELECT jobs.id
    FROM apalis.jobs AS jobs
    WHERE
        jobs.id = ANY (ARRAY(SELECT task_id FROM j))
        AND jobs.lock_by IS NOT DISTINCT FROM $2
    ORDER BY jobs.id
    FOR UPDATE
)
UPDATE apalis.jobs AS jobs
SET
    status = j.status,
    attempts = j.attempt,
    last_result = j.result,
    done_at = NOW()
FROM j
INNER JOIN locked ON locked.id = j.task_id
WHERE jobs.id = locked.id
