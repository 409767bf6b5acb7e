-- Idempotency keys bound to their request and to their caller
-- (store/messages.rs).
--
-- A key is (caller, user_id, request_id): the caller is the authenticated
-- name ('' with AUTH_MODE=none), so no client can claim the key another will
-- use (booking-service delivers follow-ups with request_id = follow_up_id,
-- which ListFollowUps shows). With the key, the SHA-256 of the request
-- (everything that decides what is written): a reuse with another request is
-- refused (REQUEST_ID_REUSED) instead of answered with the first result.
--
-- Messages stored before this migration keep NULL in both: their keys stay
-- unscoped (any caller replays them, as before) and unverified, so a retry
-- that spans the upgrade is still answered with the first result.

ALTER TABLE memory.messages ADD COLUMN request_caller text;
ALTER TABLE memory.messages ADD COLUMN request_fingerprint bytea;

DROP INDEX memory.messages_request_id_key;
CREATE UNIQUE INDEX messages_request_key
    ON memory.messages (user_id, request_id, request_caller)
    WHERE request_id IS NOT NULL;
