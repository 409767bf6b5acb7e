//! Rows as read from the `booking` schema.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::{Row, postgres::PgRow};
use uuid::Uuid;

use crate::domain::slot::stored_time_zone;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SlotRow {
    pub id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub capacity: i32,
    pub booked: i32,
    /// Seats of live holds when read.
    pub held: i32,
    pub label: String,
    pub created_at: DateTime<Utc>,
    /// IANA name of the slot's time zone.
    pub time_zone: String,
}

/// A booking joined with its slot's times and its payment.
#[derive(Debug, Clone)]
pub struct BookingRow {
    pub id: Uuid,
    pub slot_id: Uuid,
    pub customer_id: String,
    pub customer_name: String,
    pub conversation_id: Option<Uuid>,
    pub party_size: i32,
    pub state: i16,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The event's start in the slot's own time zone (the instant is the
    /// same; its calendar date is the one where the event happens).
    pub slot_starts_at: DateTime<Tz>,
    pub slot_ends_at: DateTime<Utc>,
    pub slot_label: String,
    pub payment_id: Uuid,
    pub payment_state: i16,
    pub currency: String,
    pub amount_minor: i64,
    pub provider_reference: Option<String>,
    pub paid_at: Option<DateTime<Utc>>,
}

/// By hand, to read `slot_starts_at` in the zone of `slot_time_zone`.
impl<'r> sqlx::FromRow<'r, PgRow> for BookingRow {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let zone = stored_time_zone(row.try_get::<&str, _>("slot_time_zone")?);
        Ok(Self {
            id: row.try_get("id")?,
            slot_id: row.try_get("slot_id")?,
            customer_id: row.try_get("customer_id")?,
            customer_name: row.try_get("customer_name")?,
            conversation_id: row.try_get("conversation_id")?,
            party_size: row.try_get("party_size")?,
            state: row.try_get("state")?,
            request_id: row.try_get("request_id")?,
            created_at: row.try_get("created_at")?,
            cancelled_at: row.try_get("cancelled_at")?,
            slot_starts_at: row
                .try_get::<DateTime<Utc>, _>("slot_starts_at")?
                .with_timezone(&zone),
            slot_ends_at: row.try_get("slot_ends_at")?,
            slot_label: row.try_get("slot_label")?,
            payment_id: row.try_get("payment_id")?,
            payment_state: row.try_get("payment_state")?,
            currency: row.try_get("currency")?,
            amount_minor: row.try_get("amount_minor")?,
            provider_reference: row.try_get("provider_reference")?,
            paid_at: row.try_get("paid_at")?,
        })
    }
}

/// A hold, with the database's clock when it was read (its state depends
/// on it: see `domain::hold::state`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HoldRow {
    pub id: Uuid,
    pub slot_id: Uuid,
    pub customer_id: String,
    pub party_size: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub booking_id: Option<Uuid>,
    pub released_at: Option<DateTime<Utc>>,
    pub read_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FollowUpRow {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub customer_id: String,
    pub conversation_id: Option<Uuid>,
    pub trigger: String,
    pub template_key: String,
    pub rendered_text: String,
    pub state: i16,
    pub scheduled_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub message_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}
