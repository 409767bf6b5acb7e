-- EraseCustomer: what accounting keeps of an erased customer is
-- pseudonymised with a keyed hash of the customer id (HMAC-SHA-256), so the
-- same id always gives the same pseudonym and the rows alone never give the
-- id back. The key is this database's own random salt, made once here:
-- 32 bytes holding the 244 random bits of two gen_random_uuid() values
-- (pg_strong_random). Anyone who can read it can test guessed ids against
-- pseudonyms, so it is readable only where bookings are.
CREATE TABLE booking.erasure_salt (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    salt     bytea   NOT NULL CHECK (length(salt) = 32)
);
INSERT INTO booking.erasure_salt (salt)
VALUES (decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- When the booking's customer was erased (NULL: never).
ALTER TABLE booking.bookings ADD COLUMN erased_at timestamptz;

-- A follow-up planned for an erased booking is born cancelled and empty, so
-- a plan job still queued or running when its customer was erased cannot
-- bring the text, the name or the conversation back, whatever the job does.
-- FOR SHARE waits for an erasure in progress on the booking and then reads
-- what it committed; EraseCustomer locks the bookings first for the same
-- reason (a plan that got here first commits before the erasure reads the
-- follow-ups).
CREATE FUNCTION booking.followup_of_erased_booking() RETURNS trigger
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
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER scheduled_followups_of_erased_booking
    BEFORE INSERT ON booking.scheduled_followups
    FOR EACH ROW EXECUTE FUNCTION booking.followup_of_erased_booking();
