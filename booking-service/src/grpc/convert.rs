//! Rows to proto messages.

use maitre_api::booking::v1 as pb;
use maitre_runtime::fields::to_timestamp;

use crate::{
    domain::hold,
    store::rows::{BookingRow, FollowUpRow, HoldRow, SlotRow},
};

pub fn slot(row: SlotRow) -> pb::Slot {
    pb::Slot {
        slot_id: row.id.to_string(),
        start_time: Some(to_timestamp(row.starts_at)),
        end_time: Some(to_timestamp(row.ends_at)),
        capacity: row.capacity,
        booked_seats: row.booked,
        // Never negative, even if holds and bookings were read apart.
        available_seats: (row.capacity - row.booked - row.held).max(0),
        held_seats: row.held,
        label: row.label,
        create_time: Some(to_timestamp(row.created_at)),
        time_zone: row.time_zone,
    }
}

pub fn booking(row: BookingRow) -> pb::Booking {
    pb::Booking {
        booking_id: row.id.to_string(),
        slot_id: row.slot_id.to_string(),
        customer_id: row.customer_id,
        customer_name: row.customer_name,
        conversation_id: row
            .conversation_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        party_size: row.party_size,
        state: i32::from(row.state),
        deposit: Some(pb::Payment {
            payment_id: row.payment_id.to_string(),
            state: i32::from(row.payment_state),
            amount: Some(pb::Money {
                currency_code: row.currency,
                amount_minor: row.amount_minor,
            }),
            provider_reference: row.provider_reference.unwrap_or_default(),
            paid_time: row.paid_at.map(to_timestamp),
        }),
        slot_start_time: Some(to_timestamp(row.slot_starts_at.to_utc())),
        slot_end_time: Some(to_timestamp(row.slot_ends_at)),
        create_time: Some(to_timestamp(row.created_at)),
        cancel_time: row.cancelled_at.map(to_timestamp),
        request_id: row.request_id,
    }
}

pub fn follow_up(row: FollowUpRow) -> pb::FollowUp {
    pb::FollowUp {
        follow_up_id: row.id.to_string(),
        booking_id: row.booking_id.to_string(),
        conversation_id: row
            .conversation_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        trigger: row.trigger,
        template_key: row.template_key,
        rendered_text: row.rendered_text,
        state: i32::from(row.state),
        scheduled_time: Some(to_timestamp(row.scheduled_at)),
        attempts: row.attempts,
        last_error: row.last_error.unwrap_or_default(),
        message_id: row.message_id.map(|m| m.to_string()).unwrap_or_default(),
        create_time: Some(to_timestamp(row.created_at)),
        sent_time: row.sent_at.map(to_timestamp),
    }
}

pub fn hold(row: HoldRow) -> pb::Hold {
    pb::Hold {
        hold_id: row.id.to_string(),
        slot_id: row.slot_id.to_string(),
        state: hold::state(row.booking_id, row.released_at, row.expires_at, row.read_at) as i32,
        customer_id: row.customer_id,
        party_size: row.party_size,
        expire_time: Some(to_timestamp(row.expires_at)),
        create_time: Some(to_timestamp(row.created_at)),
        booking_id: row.booking_id.map(|id| id.to_string()).unwrap_or_default(),
    }
}
