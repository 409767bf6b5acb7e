//! All SQL of memory-service: migrations and one function per statement.

pub mod context;
pub mod conversations;
pub mod erasure;
pub mod feed;
pub mod group_commit;
pub mod message_batch;
pub mod messages;
pub mod rows;
pub mod state;

use sqlx::migrate::Migrator;

/// memory-service's migrations, tracked in `memory._sqlx_migrations` so they
/// never mix with booking-service's or apalis's history in the same database.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.create_schema("memory");
    migrator.dangerous_set_table_name("memory._sqlx_migrations");
    migrator
}
