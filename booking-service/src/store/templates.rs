//! Follow-up templates, read from the table a migration seeds.

use sqlx::PgPool;

use crate::domain::template::Template;

pub async fn all(pool: &PgPool) -> Result<Vec<Template>, sqlx::Error> {
    sqlx::query_as!(
        Template,
        r#"
SELECT key, trigger, priority, min_score, max_score, requires_history, body
FROM booking.followup_templates
ORDER BY priority, key
"#
    )
    .fetch_all(pool)
    .await
}
