-- Idempotency keys bound to the request they first answered. Each key keeps
-- a SHA-256 fingerprint of its request (see domain::idempotency); a reuse of
-- the key with another payload is refused (REQUEST_ID_REUSED) instead of
-- being answered with the first result. Rows written before this migration
-- have no fingerprint and replay as they always did.
ALTER TABLE booking.bookings ADD COLUMN request_fingerprint bytea;

-- CreateSlot keys belong to the authenticated caller ('' with AUTH_MODE=none):
-- one caller can neither replay another's slot nor block its keys.
ALTER TABLE booking.slots ADD COLUMN caller text NOT NULL DEFAULT '';
ALTER TABLE booking.slots ADD COLUMN request_fingerprint bytea;
CREATE UNIQUE INDEX slots_caller_request_id_key
    ON booking.slots (caller, request_id) WHERE request_id IS NOT NULL;
DROP INDEX booking.slots_request_id_key;
