//! Rows as read from the `booking` schema.

use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SlotRow {
    pub id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub capacity: i32,
    pub booked: i32,
    pub label: String,
    pub created_at: DateTime<Utc>,
}

/// A booking joined with its slot's times and its payment.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    pub slot_starts_at: DateTime<Utc>,
    pub slot_ends_at: DateTime<Utc>,
    pub slot_label: String,
    pub payment_id: Uuid,
    pub payment_state: i16,
    pub currency: String,
    pub amount_minor: i64,
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
