//! Choosing and rendering a follow-up's wording from the customer's emotion.
//!
//! The rule is data (`booking.followup_templates`, seeded by a migration);
//! this module only applies it: the matching template with the lowest
//! priority number wins.

use chrono::{DateTime, Utc};

/// One row of `booking.followup_templates`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Template {
    pub key: String,
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

/// The template for `summary`: the lowest priority number among matches.
pub fn choose<'a>(templates: &'a [Template], summary: &EmotionSummary) -> Option<&'a Template> {
    templates
        .iter()
        .filter(|t| t.matches(summary))
        .min_by_key(|t| (t.priority, t.key.as_str()))
}

/// The fields a template may use.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderContext<'a> {
    pub customer_name: &'a str,
    pub party_size: i32,
    pub slot_label: &'a str,
    pub event_start: DateTime<Utc>,
}

/// Fills `{customer_name}`, `{party_size}`, `{slot_label}`, `{event_date}`.
/// Unknown placeholders stay as written, so a typo shows instead of vanishing.
pub fn render(body: &str, ctx: &RenderContext<'_>) -> String {
    let label = if ctx.slot_label.is_empty() {
        "our place"
    } else {
        ctx.slot_label
    };
    body.replace("{customer_name}", ctx.customer_name)
        .replace("{party_size}", &ctx.party_size.to_string())
        .replace("{slot_label}", label)
        .replace(
            "{event_date}",
            &ctx.event_start.format("%A %-d %B %Y").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> Vec<Template> {
        let t = |key: &str, priority, min_score, max_score, requires_history| Template {
            key: key.into(),
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
        ]
    }

    fn key(scores: &[f64]) -> String {
        let templates = seeded();
        choose(
            &templates,
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

    #[test]
    fn render_fills_every_placeholder() {
        let ctx = RenderContext {
            customer_name: "Ada",
            party_size: 3,
            slot_label: "Chef's table",
            event_start: DateTime::parse_from_rfc3339("2026-12-04T19:30:00Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        assert_eq!(
            render(
                "{customer_name},{party_size},{slot_label},{event_date},{other}",
                &ctx
            ),
            "Ada,3,Chef's table,Friday 4 December 2026,{other}"
        );
    }
}
