//! Follow-up templates, read from the table a migration seeds.

use sqlx::PgPool;

use crate::domain::template::Template;

const ALL: &str = "SELECT key, priority, min_score, max_score, requires_history, body \
    FROM booking.followup_templates ORDER BY priority, key";

pub async fn all(pool: &PgPool) -> Result<Vec<Template>, sqlx::Error> {
    sqlx::query_as::<_, Template>(ALL).fetch_all(pool).await
}
