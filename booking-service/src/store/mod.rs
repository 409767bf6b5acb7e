//! All SQL of booking-service: one function per statement (or transaction).

pub mod bookings;
pub mod erasure;
pub mod followups;
pub mod jobs;
pub mod planning;
pub mod rows;
pub mod slots;
pub mod sweeps;
pub mod templates;

use sqlx::migrate::Migrator;

/// booking-service's migrations, tracked in `booking._sqlx_migrations`,
/// apart from memory-service's and apalis's histories.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.create_schema("booking");
    migrator.dangerous_set_table_name("booking._sqlx_migrations");
    migrator
}
