-- Which customer a memory-service conversation belongs to, as far as
-- booking-service knows: the customer of the first booking made with it.
-- CreateBooking claims an unowned conversation in its one statement and
-- refuses a conversation owned by another customer
-- (CONVERSATION_BELONGS_TO_ANOTHER_CUSTOMER); planning would otherwise read
-- another customer's emotion history. Asking memory-service instead would
-- add a gRPC hop to every booking.
CREATE TABLE booking.conversation_owners (
    conversation_id uuid        PRIMARY KEY,
    customer_id     text        NOT NULL,
    created_at      timestamptz NOT NULL,
    -- The target of the bookings' foreign key below.
    CONSTRAINT conversation_owners_pair_key UNIQUE (conversation_id, customer_id)
);

-- Conversations already booked: the first booking's customer owns them.
INSERT INTO booking.conversation_owners (conversation_id, customer_id, created_at)
SELECT DISTINCT ON (conversation_id) conversation_id, customer_id, created_at
FROM booking.bookings
WHERE conversation_id IS NOT NULL
ORDER BY conversation_id, created_at, id;

-- Every new booking's (conversation, customer) must be an owner row. The
-- statement's own checks refuse a known foreign conversation; this catches
-- the race they cannot see: two customers' first bookings of one
-- conversation at the same instant, where the loser's statement fails whole.
-- NOT VALID: bookings from before this migration that already shared a
-- conversation stay as they are. The check on erasure (deleting owner rows)
-- finds a customer's bookings through bookings_customer_idx.
ALTER TABLE booking.bookings
    ADD CONSTRAINT bookings_conversation_owner_fkey
    FOREIGN KEY (conversation_id, customer_id)
    REFERENCES booking.conversation_owners (conversation_id, customer_id)
    NOT VALID;
