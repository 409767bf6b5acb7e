-- The booking lifecycle: holds, moves and recorded payments.
--
-- Seats. A slot's seats are taken by confirmed bookings (`slots.booked`,
-- kept by conditional UPDATEs and the slot_never_overbooked CHECK) and by
-- live holds: rows of `booking.holds` not confirmed, not released and not
-- yet expired. A hold expires by the clock alone: no job frees its seats,
-- every seat check simply stops counting it. So what is free is
--   capacity - booked - booking.held_seats(slot)
-- and every statement that takes seats checks that against the slot row it
-- is updating.
--
-- (ConfirmHold takes no new seats: the hold's are already counted; it only
-- has to find the hold still live, with the same care.)
--
-- Why a function, and why every seat taker UPDATEs the slot row: a
-- statement's subquery reads the holds as of the statement's snapshot, so a
-- hold committed while the statement waited for the slot row's lock would
-- be missed, and its seats sold twice. Every statement that adds a hold or
-- takes seats therefore updates the slot row (a hold writes `booked =
-- booked`), which serialises them on that row's lock; the one that waited
-- re-checks its WHERE on the new row version (PostgreSQL's EvalPlanQual),
-- and `held_seats`, a VOLATILE PL/pgSQL function, reads the holds with a
-- fresh snapshot each time it runs, so the re-check sees the hold that was
-- just committed. Expiry is read from the database's clock
-- (clock_timestamp(), one clock for every replica), so a hold that one
-- statement saw expired can never be confirmed by a later one.

CREATE TABLE booking.holds (
    id                  uuid        PRIMARY KEY,
    slot_id             uuid        NOT NULL REFERENCES booking.slots (id),
    customer_id         text        NOT NULL,
    party_size          integer     NOT NULL CHECK (party_size > 0),
    request_id          text        NOT NULL,
    request_fingerprint bytea,
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    -- Set by ConfirmHold: the booking the hold became.
    booking_id          uuid        UNIQUE REFERENCES booking.bookings (id),
    -- Set by ReleaseHold.
    released_at         timestamptz,
    erased_at           timestamptz
);

-- Idempotency: one hold per customer and request_id; also EraseCustomer's
-- way to a customer's holds.
CREATE UNIQUE INDEX holds_request_id_key ON booking.holds (customer_id, request_id);
-- A slot's live holds: a range scan from now on, so holds that expired
-- unconfirmed are skipped, not read, however many there are.
CREATE INDEX holds_live_idx ON booking.holds (slot_id, expires_at) INCLUDE (party_size)
    WHERE booking_id IS NULL AND released_at IS NULL;

-- Seats held by live holds of a slot, read with a fresh snapshot (see the
-- header: VOLATILE and PL/pgSQL, so never inlined into the caller's
-- snapshot). The clock is read into a variable first: a volatile call in
-- the WHERE could not bound the index scan, which would then read every
-- expired hold of the slot; a variable is a parameter, so the scan starts
-- at now.
CREATE FUNCTION booking.held_seats(slot uuid) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    read_at timestamptz := clock_timestamp();
BEGIN
    RETURN (SELECT COALESCE(sum(h.party_size), 0)::integer
            FROM booking.holds h
            WHERE h.slot_id = slot AND h.booking_id IS NULL AND h.released_at IS NULL
              AND h.expires_at > read_at);
END
$$;

-- Whether a hold of this customer is live now, read with a fresh snapshot
-- (ConfirmHold's check, re-run after it waited for the slot row).
CREATE FUNCTION booking.hold_is_live(hold uuid, customer text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM booking.holds h
                   WHERE h.id = hold AND h.customer_id = customer
                     AND h.booking_id IS NULL AND h.released_at IS NULL
                     AND h.expires_at > clock_timestamp());
END
$$;

-- ConfirmHold's last word: the booking statement marks the hold confirmed
-- only if it is still the customer's, unconfirmed and unreleased, and calls
-- this for the booking it made with how many holds it marked; none (an
-- EraseCustomer released the hold after the seat check) fails the whole
-- statement, so no booking is left behind. (`booking` ties the call to the
-- booking's row, so it runs only when one was made.)
CREATE FUNCTION booking.hold_confirmed(hold uuid, marked bigint, booking uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF hold IS NOT NULL AND marked = 0 THEN
        RAISE EXCEPTION 'hold % is no longer live; booking % not made', hold, booking
            USING ERRCODE = 'MH001';
    END IF;
    RETURN true;
END
$$;

-- MoveBooking's idempotency keys: one per booking and request_id, with where
-- the move went, so a retry answers the same and a reuse is refused.
CREATE TABLE booking.moves (
    booking_id          uuid        NOT NULL REFERENCES booking.bookings (id),
    request_id          text        NOT NULL,
    from_slot_id        uuid        NOT NULL,
    to_slot_id          uuid        NOT NULL,
    request_fingerprint bytea       NOT NULL,
    moved_at            timestamptz NOT NULL,
    PRIMARY KEY (booking_id, request_id)
);

-- RecordPayment: the provider's reference, unique (one payment at the
-- provider pays one deposit), and when it was recorded. Payment states
-- are the proto enum's numbers: 1 pending, 2 paid, 3 voided, 4 refund
-- pending.
ALTER TABLE booking.payments
    ADD COLUMN provider_reference text,
    ADD COLUMN paid_at timestamptz;
CREATE UNIQUE INDEX payments_provider_reference_key ON booking.payments (provider_reference)
    WHERE provider_reference IS NOT NULL;

-- Pre-event reminders. A reminder is a follow-up with trigger 'pre_event',
-- written with the booking (CreateBooking, ConfirmHold, MoveBooking) when
-- the event starts more than BOOKING_REMINDER_LEAD ahead, due that long
-- before the start, and delivered by a deliver job like any follow-up.
-- Its text is rendered when it is first claimed for delivery, from the
-- booking as it is then (a move changes its date), with a template of its
-- own trigger: templates are chosen per trigger.
-- Priority 1000, behind every post-event template: a binary of the
-- previous version (a rolling deploy, a rollback) reads every template
-- without looking at the trigger, and must never choose this one.
ALTER TABLE booking.followup_templates ADD COLUMN trigger text NOT NULL DEFAULT 'post_event';
INSERT INTO booking.followup_templates (key, trigger, priority, min_score, max_score, requires_history, body) VALUES
    ('event_reminder', 'pre_event', 1000, NULL, NULL, false,
     'Hi {customer_name}, a reminder of your booking for {party_size} at {slot_label} on {event_date} at {event_time}. We look forward to seeing you!');
