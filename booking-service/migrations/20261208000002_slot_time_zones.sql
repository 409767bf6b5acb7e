-- Where a slot's event happens, as an IANA zone name (validated by
-- CreateSlot): follow-ups render the event's date in it, so a 20:00 dinner
-- in New York is not dated the next day. Existing slots are UTC, as they
-- were rendered until now.
ALTER TABLE booking.slots ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC';
