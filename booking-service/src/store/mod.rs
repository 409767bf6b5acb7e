//! All SQL of booking-service: one function per statement (or transaction).

pub mod bookings;
pub mod erasure;
pub mod followups;
pub mod holds;
pub mod jobs;
pub mod moves;
pub mod payments;
pub mod planning;
pub mod poison;
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

/// States in SQL are literals (the partial indexes and the ON CONFLICT
/// arbiter match literals only), each marked with the constant it stands
/// for: `1 /* followups::PENDING */`. These tests hold every marker to its
/// constant, every state comparison to a marker, and every copy of the
/// live-job predicate to [`sweeps::LIVE_JOB`].
#[cfg(test)]
mod sql_literals {
    use std::{fs, path::Path};

    use crate::domain::booking;

    use super::{followups, sweeps::LIVE_JOB};

    fn constant(name: &str) -> Option<i16> {
        Some(match name {
            "followups::PENDING" => followups::PENDING,
            "followups::SENT" => followups::SENT,
            "followups::CANCELLED" => followups::CANCELLED,
            "followups::FAILED" => followups::FAILED,
            "booking::CONFIRMED" => booking::CONFIRMED,
            "booking::CANCELLED" => booking::CANCELLED,
            "booking::PAYMENT_PENDING" => booking::PAYMENT_PENDING,
            "booking::PAYMENT_VOIDED" => booking::PAYMENT_VOIDED,
            "booking::PAYMENT_PAID" => booking::PAYMENT_PAID,
            "booking::PAYMENT_REFUND_PENDING" => booking::PAYMENT_REFUND_PENDING,
            _ => return None,
        })
    }

    fn sources() -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
        let mut sources: Vec<(String, String)> = fs::read_dir(&dir)
            .expect("store/")
            .flatten()
            .map(|entry| entry.path())
            // This file holds only these tests, whose needles would match.
            .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
            .filter(|path| !path.ends_with("mod.rs"))
            .map(|path| {
                let text = fs::read_to_string(&path).expect("source");
                (path.display().to_string(), text)
            })
            .collect();
        sources.sort();
        sources
    }

    /// `(number, marker)` for every `N /* marker */` in `text`.
    fn markers(text: &str) -> Vec<(String, String)> {
        text.match_indices("/* ")
            .filter_map(|(at, _)| {
                let marker = text[at + 3..].split(" */").next()?.to_owned();
                let number: String = text[..at]
                    .trim_end()
                    .chars()
                    .rev()
                    .take_while(char::is_ascii_digit)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Some((number, marker))
            })
            .filter(|(number, marker)| !number.is_empty() && marker.contains("::"))
            .collect()
    }

    #[test]
    fn every_state_marker_names_its_constant() {
        let mut seen = 0;
        for (file, text) in sources() {
            for (number, marker) in markers(&text) {
                let value = constant(&marker).unwrap_or_else(|| panic!("{file}: unknown {marker}"));
                assert_eq!(number, value.to_string(), "{file}: {number} /* {marker} */");
                seen += 1;
            }
        }
        assert!(seen > 20, "only {seen} markers found");
    }

    #[test]
    fn every_state_comparison_is_marked() {
        for (file, text) in sources() {
            let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            for (at, _) in compact.match_indices("state ") {
                let rest = &compact[at + "state ".len()..];
                let Some(after_op) = ["= ", "<> ", "IN ("]
                    .iter()
                    .find_map(|op| rest.strip_prefix(op))
                else {
                    continue;
                };
                if after_op.starts_with(|c: char| c.is_ascii_digit()) {
                    let tail = after_op.trim_start_matches(|c: char| c.is_ascii_digit());
                    assert!(
                        tail.starts_with(" /* "),
                        "{file}: unmarked state literal in `state {}`",
                        &rest[..rest.len().min(30)]
                    );
                }
            }
        }
    }

    #[test]
    fn every_live_job_predicate_is_the_same() {
        let normal = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let live_job = normal(LIVE_JOB);
        let mut seen = 0;
        for (file, text) in sources() {
            let compact = normal(&text);
            for (at, _) in compact.match_indices("(j.status IN ('Pending'") {
                assert!(
                    compact[at..].starts_with(&live_job),
                    "{file}: {}",
                    &compact[at..at + 120]
                );
                seen += 1;
            }
        }
        // One in LIVE_JOB itself, four in statements.
        assert_eq!(seen, 5);
    }

    #[test]
    fn a_delivery_after_cancel_is_recorded_under_its_prefix() {
        assert!(followups::SENT_AFTER_CANCEL_NOTE.starts_with(followups::SENT_AFTER_CANCEL));
    }
}
