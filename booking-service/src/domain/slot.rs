//! Slots: creating them and asking for availability.

use chrono::{DateTime, Duration, Utc};
use maitre::{api::booking::v1 as pb, fields, pagination, status::FieldViolations};
use uuid::Uuid;

/// Most seats in one slot.
pub const MAX_CAPACITY: i32 = 10_000;
/// Longest slot label, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// Longest slot.
pub const MAX_SLOT_LENGTH: Duration = Duration::days(7);
/// Slots may be created this far ahead at most.
pub const MAX_DAYS_AHEAD: i64 = 2 * 366;
/// Default page size of ListAvailability.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// A validated CreateSlot request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSlot {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub capacity: i32,
    pub label: String,
    pub request_id: Option<String>,
}

impl NewSlot {
    pub fn parse(
        request: pb::CreateSlotRequest,
        now: DateTime<Utc>,
    ) -> Result<Self, FieldViolations> {
        let pb::CreateSlotRequest {
            start_time,
            end_time,
            capacity,
            label,
            request_id,
        } = request;
        let mut v = FieldViolations::new();
        let earliest = now - Duration::hours(1);
        let latest = now + Duration::days(MAX_DAYS_AHEAD);
        let starts_at =
            fields::timestamp(&mut v, "start_time", start_time.as_ref(), earliest, latest);
        let ends_at = fields::timestamp(
            &mut v,
            "end_time",
            end_time.as_ref(),
            earliest,
            latest + MAX_SLOT_LENGTH,
        );
        if let (Some(start), Some(end)) = (starts_at, ends_at) {
            if end <= start {
                v.add("end_time", "END_BEFORE_START", "must be after start_time");
            } else if end - start > MAX_SLOT_LENGTH {
                v.add("end_time", "SLOT_TOO_LONG", "a slot lasts at most 7 days");
            }
        }
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            v.add(
                "capacity",
                "OUT_OF_RANGE",
                format!("must be between 1 and {MAX_CAPACITY}"),
            );
        }
        if label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
            v.add(
                "label",
                "INVALID_LABEL",
                format!("must be at most {MAX_LABEL_CHARS} printable characters"),
            );
        }
        let request_id = fields::optional_identifier(&mut v, "request_id", &request_id);
        v.into_result()?;
        match (starts_at, ends_at) {
            (Some(starts_at), Some(ends_at)) => Ok(Self {
                starts_at,
                ends_at,
                capacity,
                label,
                request_id,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// Where an availability page resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotCursor {
    pub starts_at: DateTime<Utc>,
    pub id: Uuid,
}

/// A validated ListAvailability request.
#[derive(Debug, Clone, PartialEq)]
pub struct AvailabilityQuery {
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub min_seats: i32,
    pub page_size: u32,
    pub after: Option<SlotCursor>,
}

impl AvailabilityQuery {
    pub fn token_query(from: DateTime<Utc>, until: DateTime<Utc>, min_seats: i32) -> String {
        format!(
            "ListAvailability|{}|{}|{min_seats}",
            from.timestamp_micros(),
            until.timestamp_micros()
        )
    }

    pub fn parse(
        request: pb::ListAvailabilityRequest,
        max_page_size: u32,
    ) -> Result<Self, FieldViolations> {
        let pb::ListAvailabilityRequest {
            start_time,
            end_time,
            min_available_seats,
            page_size,
            page_token,
        } = request;
        let mut v = FieldViolations::new();
        let earliest = DateTime::<Utc>::from_timestamp(0, 0).unwrap_or_default();
        let latest = Utc::now() + Duration::days(MAX_DAYS_AHEAD + 7);
        let from = fields::timestamp(&mut v, "start_time", start_time.as_ref(), earliest, latest);
        let until = fields::timestamp(&mut v, "end_time", end_time.as_ref(), earliest, latest);
        if let (Some(from), Some(until)) = (from, until)
            && until <= from
        {
            v.add("end_time", "END_BEFORE_START", "must be after start_time");
        }
        if !(0..=MAX_CAPACITY).contains(&min_available_seats) {
            v.add(
                "min_available_seats",
                "OUT_OF_RANGE",
                format!("must be between 0 and {MAX_CAPACITY}"),
            );
        }
        let page_size = fields::page_size(
            &mut v,
            "page_size",
            page_size,
            DEFAULT_PAGE_SIZE,
            max_page_size,
        );
        let min_seats = min_available_seats.max(1);
        let after = match (from, until, page_token.is_empty()) {
            (Some(from), Some(until), false) => {
                match pagination::decode(&Self::token_query(from, until, min_seats), &page_token) {
                    Ok(cursor) => Some(cursor),
                    Err(e) => {
                        v.add("page_token", "INVALID_PAGE_TOKEN", e.to_string());
                        None
                    }
                }
            }
            _ => None,
        };
        v.into_result()?;
        match (from, until) {
            (Some(from), Some(until)) => Ok(Self {
                from,
                until,
                min_seats,
                page_size,
                after,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}
