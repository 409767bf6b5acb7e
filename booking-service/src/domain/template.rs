//! Choosing and rendering a follow-up's wording from the customer's emotion.
//!
//! The rule is data (`booking.followup_templates`, seeded by a migration);
//! this module only applies it: the matching template with the lowest
//! priority number wins.

use chrono::DateTime;
use chrono_tz::Tz;

/// One row of `booking.followup_templates`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub key: String,
    /// What the template is for: `post_event` (the follow-up after the
    /// event) or `pre_event` (the reminder before it).
    pub trigger: String,
    pub priority: i32,
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    pub requires_history: bool,
    pub body: String,
}

/// What the planner knows of the customer's emotion: the scores of the last
/// scored messages (oldest first); empty when there is no history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmotionSummary {
    pub scores: Vec<f64>,
}

impl EmotionSummary {
    /// Mean score, or `None` without history.
    pub fn average(&self) -> Option<f64> {
        (!self.scores.is_empty())
            .then(|| self.scores.iter().sum::<f64>() / self.scores.len() as f64)
    }
}

impl Template {
    fn matches(&self, summary: &EmotionSummary) -> bool {
        match summary.average() {
            None => !self.requires_history,
            Some(average) => {
                self.min_score.is_none_or(|min| average >= min)
                    && self.max_score.is_none_or(|max| average <= max)
            }
        }
    }
}

/// The template of `trigger` for `summary`: the lowest priority number
/// among matches.
pub fn choose<'a>(
    templates: &'a [Template],
    trigger: &str,
    summary: &EmotionSummary,
) -> Option<&'a Template> {
    templates
        .iter()
        .filter(|t| t.trigger == trigger && t.matches(summary))
        .min_by_key(|t| (t.priority, t.key.as_str()))
}

/// The fields a template may use.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderContext<'a> {
    pub customer_name: &'a str,
    pub party_size: i32,
    pub slot_label: &'a str,
    /// The event's start in the slot's own time zone: `{event_date}` is the
    /// calendar date where the event happens, not in UTC.
    pub event_start: DateTime<Tz>,
}

/// The placeholders a template may use.
const PLACEHOLDERS: [&str; 5] = [
    "{customer_name}",
    "{party_size}",
    "{slot_label}",
    "{event_date}",
    "{event_time}",
];

/// Fills `{customer_name}`, `{party_size}`, `{slot_label}`, `{event_date}`,
/// `{event_time}` in one pass over the template: a substituted value is never scanned
/// again, so a customer named `{event_date}` is greeted by that name, not by
/// a date. Unknown placeholders stay as written, so a typo shows instead of
/// vanishing.
pub fn render(body: &str, ctx: &RenderContext<'_>) -> String {
    let mut out = String::with_capacity(body.len() + ctx.customer_name.len() + 64);
    let mut rest = body;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let at = &rest[open..];
        match PLACEHOLDERS.iter().find(|p| at.starts_with(**p)) {
            Some(placeholder) => {
                push_value(&mut out, placeholder, ctx);
                rest = &at[placeholder.len()..];
            }
            None => {
                out.push('{');
                rest = &at[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn push_value(out: &mut String, placeholder: &str, ctx: &RenderContext<'_>) {
    use std::fmt::Write;
    match placeholder {
        "{customer_name}" => out.push_str(ctx.customer_name),
        "{party_size}" => {
            let _ = write!(out, "{}", ctx.party_size);
        }
        "{slot_label}" if ctx.slot_label.is_empty() => out.push_str("our place"),
        "{slot_label}" => out.push_str(ctx.slot_label),
        "{event_date}" => {
            let _ = write!(out, "{}", ctx.event_start.format("%A %-d %B %Y"));
        }
        "{event_time}" => {
            let _ = write!(out, "{}", ctx.event_start.format("%H:%M"));
        }
        // PLACEHOLDERS holds only the names above.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> Vec<Template> {
        let t = |key: &str, priority, min_score, max_score, requires_history| Template {
            key: key.into(),
            trigger: "post_event".into(),
            priority,
            min_score,
            max_score,
            requires_history,
            body: String::new(),
        };
        vec![
            t("service_recovery", 10, None, Some(-0.25), true),
            t("review_request", 20, Some(0.35), None, true),
            t("thank_you", 100, None, None, false),
            Template {
                trigger: "pre_event".into(),
                ..t("event_reminder", 1, None, None, false)
            },
        ]
    }

    #[test]
    fn each_trigger_chooses_among_its_own_templates() {
        let templates = seeded();
        let reminder = choose(
            &templates,
            "pre_event",
            &EmotionSummary { scores: vec![0.9] },
        );
        assert_eq!(reminder.map(|t| t.key.as_str()), Some("event_reminder"));
        assert!(choose(&templates, "no_such_trigger", &EmotionSummary::default()).is_none());
    }

    fn key(scores: &[f64]) -> String {
        let templates = seeded();
        choose(
            &templates,
            "post_event",
            &EmotionSummary {
                scores: scores.to_vec(),
            },
        )
        .map(|t| t.key.clone())
        .unwrap_or_default()
    }

    #[test]
    fn negative_history_gets_service_recovery() {
        assert_eq!(key(&[-0.8, -0.4, 0.1]), "service_recovery");
    }

    #[test]
    fn happy_history_gets_a_review_request() {
        assert_eq!(key(&[0.6, 0.9]), "review_request");
    }

    #[test]
    fn mild_or_missing_history_gets_a_thank_you() {
        assert_eq!(key(&[0.1, -0.1]), "thank_you");
        assert_eq!(key(&[]), "thank_you");
    }

    #[test]
    fn boundaries_are_inclusive() {
        assert_eq!(key(&[-0.25]), "service_recovery");
        assert_eq!(key(&[0.35]), "review_request");
    }

    fn at(rfc3339: &str, zone: Tz) -> DateTime<Tz> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&zone)
    }

    fn ctx(customer_name: &str) -> RenderContext<'_> {
        RenderContext {
            customer_name,
            party_size: 3,
            slot_label: "Chef's table",
            event_start: at("2026-12-04T19:30:00Z", Tz::UTC),
        }
    }

    #[test]
    fn render_fills_every_placeholder() {
        assert_eq!(
            render(
                "{customer_name},{party_size},{slot_label},{event_date},{event_time},{other}",
                &ctx("Ada")
            ),
            "Ada,3,Chef's table,Friday 4 December 2026,19:30,{other}"
        );
    }

    #[test]
    fn the_event_date_is_read_in_the_slots_time_zone() {
        // 01:00 UTC on Friday is 20:00 on Thursday in New York.
        let dinner = RenderContext {
            event_start: at("2026-12-04T01:00:00Z", Tz::America__New_York),
            ..ctx("Ada")
        };
        assert_eq!(render("{event_date}", &dinner), "Thursday 3 December 2026");
        let in_utc = RenderContext {
            event_start: at("2026-12-04T01:00:00Z", Tz::UTC),
            ..ctx("Ada")
        };
        assert_eq!(render("{event_date}", &in_utc), "Friday 4 December 2026");
        // And east of UTC the date moves forward: 23:30 UTC is 08:30 next day in Tokyo.
        let tokyo = RenderContext {
            event_start: at("2026-12-03T23:30:00Z", Tz::Asia__Tokyo),
            ..ctx("Ada")
        };
        assert_eq!(render("{event_date}", &tokyo), "Friday 4 December 2026");
    }

    #[test]
    fn substituted_values_are_never_expanded_again() {
        let body = "Hi {customer_name}, {slot_label} on {event_date}.";
        for hostile in [
            "{slot_label}",
            "{event_date}",
            "{customer_name}",
            "{party_size}",
            "{{customer_name}}",
            "{event_date}{slot_label}{party_size}",
        ] {
            assert_eq!(
                render(body, &ctx(hostile)),
                format!("Hi {hostile}, Chef's table on Friday 4 December 2026."),
                "{hostile}"
            );
        }
        let braces = "{}".repeat(100);
        assert_eq!(braces.chars().count(), 200);
        assert_eq!(
            render("{customer_name}!", &ctx(&braces)),
            format!("{braces}!")
        );
        let opening = "{".repeat(200);
        assert_eq!(
            render("{customer_name}{event_date}", &ctx(&opening)),
            format!("{opening}Friday 4 December 2026")
        );
    }

    #[test]
    fn a_label_cannot_expand_either() {
        let labelled = RenderContext {
            slot_label: "{customer_name} {event_date}",
            ..ctx("Ada")
        };
        assert_eq!(
            render("{slot_label} for {customer_name}", &labelled),
            "{customer_name} {event_date} for Ada"
        );
    }

    #[test]
    fn braces_around_and_between_placeholders_stay() {
        assert_eq!(
            render("{{customer_name}} {party_size}} {{ {", &ctx("Ada")),
            "{Ada} 3} {{ {"
        );
        assert_eq!(render("", &ctx("Ada")), "");
        assert_eq!(render("{customer_name", &ctx("Ada")), "{customer_name");
        assert_eq!(render("é{customer_name}ü", &ctx("Zoë")), "éZoëü");
    }
}
