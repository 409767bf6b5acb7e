-- booking-service owns schema `booking`. Seats are taken by a conditional
-- UPDATE (`booked + n <= capacity`), and the CHECK below makes overbooking
-- impossible even for a statement that forgot the condition.

CREATE TABLE booking.slots (
    id         uuid        PRIMARY KEY,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    capacity   integer     NOT NULL,
    booked     integer     NOT NULL DEFAULT 0,
    label      text        NOT NULL DEFAULT '',
    request_id text,
    created_at timestamptz NOT NULL,
    CONSTRAINT slot_time_order CHECK (ends_at > starts_at),
    CONSTRAINT slot_capacity_positive CHECK (capacity > 0),
    CONSTRAINT slot_never_overbooked CHECK (booked >= 0 AND booked <= capacity)
);

-- ListAvailability: slots by start time, seats readable from the index.
CREATE INDEX slots_starts_at_idx ON booking.slots (starts_at, id) INCLUDE (capacity, booked);
CREATE UNIQUE INDEX slots_request_id_key ON booking.slots (request_id) WHERE request_id IS NOT NULL;

CREATE TABLE booking.bookings (
    id               uuid        PRIMARY KEY,
    slot_id          uuid        NOT NULL REFERENCES booking.slots (id),
    customer_id      text        NOT NULL,
    customer_name    text        NOT NULL,
    -- memory-service conversation (not a foreign key: another service's data).
    conversation_id  uuid,
    party_size       integer     NOT NULL CHECK (party_size > 0),
    -- 1 confirmed, 2 cancelled (the proto enum's numbers).
    state            smallint    NOT NULL DEFAULT 1,
    request_id       text        NOT NULL,
    created_at       timestamptz NOT NULL,
    cancelled_at     timestamptz,
    cancel_reason    text
);

-- Idempotency: one booking per customer and request_id.
CREATE UNIQUE INDEX bookings_request_id_key ON booking.bookings (customer_id, request_id);
-- ListBookings: a customer's bookings, newest first.
CREATE INDEX bookings_customer_idx ON booking.bookings (customer_id, id DESC);
CREATE INDEX bookings_slot_idx ON booking.bookings (slot_id);

CREATE TABLE booking.payments (
    id           uuid        PRIMARY KEY,
    booking_id   uuid        NOT NULL UNIQUE REFERENCES booking.bookings (id),
    -- 1 pending, 2 paid, 3 voided (the proto enum's numbers).
    state        smallint    NOT NULL DEFAULT 1,
    currency     text        NOT NULL,
    amount_minor bigint      NOT NULL CHECK (amount_minor >= 0),
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
