//! Slots: creating them and asking for availability.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use maitre_api::booking::v1 as pb;
use maitre_runtime::{fields, pagination, status::FieldViolations};
use uuid::Uuid;

use super::idempotency;

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
/// Longest time zone name accepted (the longest IANA name has 32).
pub const MAX_TIME_ZONE_CHARS: usize = 64;

/// A validated CreateSlot request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSlot {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub capacity: i32,
    pub label: String,
    /// Where the event happens; its date is read there.
    pub time_zone: Tz,
    pub request_id: Option<String>,
    /// The request's fingerprint, stored with `request_id`.
    pub fingerprint: Vec<u8>,
}

impl NewSlot {
    pub fn parse(
        request: pb::CreateSlotRequest,
        now: DateTime<Utc>,
    ) -> Result<Self, FieldViolations> {
        let fingerprint = idempotency::fingerprint(&request, |r| r.request_id.clear());
        let pb::CreateSlotRequest {
            start_time,
            end_time,
            capacity,
            label,
            request_id,
            time_zone,
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
        let time_zone = parse_time_zone(&mut v, "time_zone", &time_zone);
        let request_id = fields::optional_identifier(&mut v, "request_id", &request_id);
        v.into_result()?;
        match (starts_at, ends_at) {
            (Some(starts_at), Some(ends_at)) => Ok(Self {
                starts_at,
                ends_at,
                capacity,
                label,
                time_zone,
                request_id,
                fingerprint,
            }),
            _ => Err(FieldViolations::new()),
        }
    }
}

/// An IANA time zone name; empty means UTC. Names are matched exactly (as
/// the tz database spells them), so what is stored reads back the same.
fn parse_time_zone(v: &mut FieldViolations, field: &str, value: &str) -> Tz {
    if value.is_empty() {
        return Tz::UTC;
    }
    let known = (value.chars().count() <= MAX_TIME_ZONE_CHARS)
        .then(|| value.parse::<Tz>().ok())
        .flatten();
    known.unwrap_or_else(|| {
        v.add(
            field,
            "UNKNOWN_TIME_ZONE",
            "must be an IANA time zone name such as America/New_York, or empty for UTC",
        );
        Tz::UTC
    })
}

/// A slot's stored zone name as a zone. A name the tz database no longer
/// knows (zones are only ever renamed into links, so this should not
/// happen) reads as UTC rather than making the slot unreadable.
pub fn stored_time_zone(name: &str) -> Tz {
    name.parse().unwrap_or(Tz::UTC)
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
        let after = match (from, until) {
            (Some(from), Some(until)) => pagination::decode_field(
                &mut v,
                "page_token",
                &Self::token_query(from, until, min_seats),
                &page_token,
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// "Now" in these tests: fixed, so that two requests can be equal.
    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).unwrap()
    }

    fn request(time_zone: &str) -> pb::CreateSlotRequest {
        pb::CreateSlotRequest {
            start_time: Some(fields::to_timestamp(now() + Duration::hours(1))),
            end_time: Some(fields::to_timestamp(now() + Duration::hours(2))),
            capacity: 4,
            label: "table".into(),
            request_id: "s-1".into(),
            time_zone: time_zone.into(),
        }
    }

    fn zone(name: &str) -> Result<Tz, Vec<String>> {
        NewSlot::parse(request(name), now())
            .map(|s| s.time_zone)
            .map_err(|v| v.fields().into_iter().map(String::from).collect())
    }

    #[test]
    fn time_zones_are_iana_names_and_default_to_utc() {
        assert_eq!(zone(""), Ok(Tz::UTC));
        assert_eq!(zone("America/New_York"), Ok(Tz::America__New_York));
        assert_eq!(zone("Europe/Paris"), Ok(Tz::Europe__Paris));
        assert_eq!(zone("UTC"), Ok(Tz::UTC));
        for bad in [
            "Mars/Olympus_Mons",
            "america/new_york",
            " Europe/Paris",
            "Europe/Paris\0",
            "+02:00",
            "EST5EDT,M3.2.0,M11.1.0",
            &"A".repeat(10_000),
        ] {
            assert_eq!(zone(bad), Err(vec!["time_zone".to_string()]), "{bad:?}");
        }
    }

    #[test]
    fn a_stored_zone_reads_back_and_an_unknown_one_reads_as_utc() {
        assert_eq!(stored_time_zone("America/New_York"), Tz::America__New_York);
        assert_eq!(stored_time_zone("Atlantis/Capital"), Tz::UTC);
    }

    #[test]
    fn the_fingerprint_ignores_the_key_and_sees_the_zone() {
        let a = NewSlot::parse(request("Europe/Paris"), now()).unwrap();
        let mut other_key = request("Europe/Paris");
        other_key.request_id = "s-2".into();
        let other_key = NewSlot::parse(other_key, now()).unwrap();
        let other_zone = NewSlot::parse(request("Europe/Berlin"), now()).unwrap();
        assert_eq!(a.fingerprint, other_key.fingerprint);
        assert_ne!(a.fingerprint, other_zone.fingerprint);
    }
}
