-- Follow-up templates: the rule that picks a wording from the customer's
-- emotion is data. The planner takes the matching template with the lowest
-- priority number; a template matches when the customer's recent average
-- emotion lies within [min_score, max_score] (NULL = unbounded) and, if
-- requires_history, when there is any scored history at all.
CREATE TABLE booking.followup_templates (
    key              text             PRIMARY KEY,
    priority         integer          NOT NULL,
    min_score        double precision,
    max_score        double precision,
    requires_history boolean          NOT NULL DEFAULT true,
    -- Placeholders: {customer_name}, {party_size}, {slot_label}, {event_date}.
    body             text             NOT NULL
);

INSERT INTO booking.followup_templates (key, priority, min_score, max_score, requires_history, body) VALUES
    ('service_recovery', 10, NULL, -0.25, true,
     'Hi {customer_name}, thank you for joining us at {slot_label} on {event_date}. We sensed things were not as good as they should have been, and we are sorry. Could you tell us what went wrong? We would like to make it right.'),
    ('review_request', 20, 0.35, NULL, true,
     'Hi {customer_name}, it was a pleasure hosting your party of {party_size} at {slot_label} on {event_date}! If you enjoyed it, would you leave us a short review?'),
    ('thank_you', 100, NULL, NULL, false,
     'Hi {customer_name}, thank you for visiting {slot_label} on {event_date}. We hope to see you again soon.');

-- One row per planned follow-up. State: 1 pending, 2 sent, 3 cancelled,
-- 4 failed (the proto enum's numbers).
CREATE TABLE booking.scheduled_followups (
    id              uuid        PRIMARY KEY,
    booking_id      uuid        NOT NULL REFERENCES booking.bookings (id),
    customer_id     text        NOT NULL,
    conversation_id uuid,
    trigger         text        NOT NULL,
    template_key    text        NOT NULL,
    rendered_text   text        NOT NULL,
    state           smallint    NOT NULL DEFAULT 1,
    scheduled_at    timestamptz NOT NULL,
    -- Delivery attempts made; guards retries: only the holder of the current
    -- count may schedule the next one.
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    message_id      uuid,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    updated_at      timestamptz NOT NULL
);

-- At most one live follow-up per booking and trigger, whatever the number of
-- plan jobs that race (jobs run at least once).
CREATE UNIQUE INDEX scheduled_followups_booking_trigger_key
    ON booking.scheduled_followups (booking_id, trigger) WHERE state <> 3;
CREATE INDEX scheduled_followups_booking_idx
    ON booking.scheduled_followups (booking_id, id);
CREATE INDEX scheduled_followups_conversation_idx
    ON booking.scheduled_followups (conversation_id, id) WHERE conversation_id IS NOT NULL;
CREATE INDEX scheduled_followups_pending_idx
    ON booking.scheduled_followups (scheduled_at) WHERE state = 1;
