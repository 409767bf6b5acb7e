//! Recording a collected deposit (RecordPayment).

use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use sqlx::PgPool;

use crate::domain::booking::PaymentRecord;

/// PENDING → PAID, or VOIDED → REFUND_PENDING (collected after the cancel),
/// with the provider's reference, only for the deposit's exact amount and
/// only once: a deposit with a reference is never recorded again. A
/// concurrent cancel or record of the same payment waits for the row and
/// re-checks it.
const RECORD: &str = r#"
UPDATE booking.payments p
SET state = CASE WHEN p.state = 1 /* booking::PAYMENT_PENDING */
                 THEN 2 /* booking::PAYMENT_PAID */
                 ELSE 4 /* booking::PAYMENT_REFUND_PENDING */ END,
    provider_reference = $2, paid_at = $5, updated_at = $5
WHERE p.booking_id = $1 AND p.provider_reference IS NULL
  AND p.state IN (1 /* booking::PAYMENT_PENDING */, 3 /* booking::PAYMENT_VOIDED */)
  AND p.currency = $3 AND p.amount_minor = $4
"#;

/// Why nothing was recorded.
const PAYMENT: &str = r#"
SELECT currency, amount_minor, provider_reference FROM booking.payments WHERE booking_id = $1
"#;

/// What RecordPayment did.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    Recorded,
    /// This reference was recorded for this booking before.
    Replayed,
    BookingNotFound,
    /// The deposit is another amount: what it is.
    AmountMismatch {
        currency: String,
        amount_minor: i64,
    },
    /// The deposit was recorded under another reference.
    AlreadyRecorded,
    /// The reference paid another booking's deposit.
    ReferenceUsed,
}

#[tracing::instrument(skip_all, fields(booking_id = %record.booking_id))]
pub async fn record(
    pool: &PgPool,
    record: &PaymentRecord,
    now: DateTime<Utc>,
) -> Result<RecordOutcome, sqlx::Error> {
    let result = sqlx::query(RECORD)
        .bind(record.booking_id)
        .bind(&record.provider_reference)
        .bind(&record.currency)
        .bind(record.amount_minor)
        .bind(now)
        .execute(pool)
        .traced("payments::RECORD")
        .await;
    match result {
        Ok(done) if done.rows_affected() == 1 => return Ok(RecordOutcome::Recorded),
        Ok(_) => {}
        Err(sqlx::Error::Database(e))
            if e.constraint() == Some("payments_provider_reference_key") =>
        {
            // Another booking's, or this one's recorded meanwhile under it.
        }
        Err(e) => return Err(e),
    }
    let payment = sqlx::query_as::<_, (String, i64, Option<String>)>(PAYMENT)
        .bind(record.booking_id)
        .fetch_optional(pool)
        .traced("payments::PAYMENT")
        .await?;
    Ok(match payment {
        None => RecordOutcome::BookingNotFound,
        // The same delivery again: a replay, if it is the same payment.
        Some((currency, amount_minor, Some(reference)))
            if reference == record.provider_reference =>
        {
            if currency == record.currency && amount_minor == record.amount_minor {
                RecordOutcome::Replayed
            } else {
                RecordOutcome::AmountMismatch {
                    currency,
                    amount_minor,
                }
            }
        }
        Some((_, _, Some(_))) => RecordOutcome::AlreadyRecorded,
        Some((currency, amount_minor, None))
            if currency != record.currency || amount_minor != record.amount_minor =>
        {
            RecordOutcome::AmountMismatch {
                currency,
                amount_minor,
            }
        }
        // Unrecorded, the right amount, and still refused: the reference
        // is another booking's.
        Some((_, _, None)) => RecordOutcome::ReferenceUsed,
    })
}
