//! Emotion scores and the statistics kept per conversation.

use std::collections::BTreeMap;

/// How many recent scores the trend is read from (kept on the conversation).
pub const TREND_WINDOW: usize = 10;

/// Smallest change in mean score, newer half vs. older half of the window,
/// that counts as improving or declining rather than stable.
pub const TREND_THRESHOLD: f64 = 0.15;

/// The `label_counts` key that counts scores whose label arrived after the
/// conversation already held `max_distinct_labels` labels. `~` is outside the
/// label alphabet (a-z, 0-9, `_`, `-`), so no caller's label can collide with
/// it, whatever its case or surrounding spaces.
pub const OVERFLOW_LABEL: &str = "~other";

/// The emotion detected in one message, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Emotion {
    /// Valence in [-1, 1].
    pub score: f64,
    /// Dominant emotion, lower-cased.
    pub label: String,
    /// Per-emotion intensities in [0, 1].
    pub scores: BTreeMap<String, f64>,
}

/// Direction of a conversation's recent emotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trend {
    InsufficientData,
    Improving,
    Stable,
    Declining,
}

/// Compares the mean of the newer half of `recent` (oldest first) with the
/// older half. The window is bounded, so this never reads the full history.
pub fn trend(recent: &[f64]) -> Trend {
    if recent.len() < 2 {
        return Trend::InsufficientData;
    }
    let (older, newer) = recent.split_at(recent.len() / 2);
    let delta = mean(newer) - mean(older);
    if delta > TREND_THRESHOLD {
        Trend::Improving
    } else if delta < -TREND_THRESHOLD {
        Trend::Declining
    } else {
        Trend::Stable
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// A conversation's emotion statistics, derived from the aggregates the
/// write path maintains.
#[derive(Debug, Clone, PartialEq)]
pub struct EmotionStats {
    pub scored_count: i64,
    pub average: f64,
    pub label_counts: BTreeMap<String, i64>,
    pub trend: Trend,
    pub recent_average: f64,
    pub last_score: f64,
}

impl EmotionStats {
    /// From the stored aggregates: count, sum, label counts, recent window.
    pub fn from_aggregates(
        scored_count: i64,
        score_sum: f64,
        label_counts: BTreeMap<String, i64>,
        recent_scores: &[f64],
        last_score: Option<f64>,
    ) -> Self {
        let average = if scored_count > 0 {
            score_sum / scored_count as f64
        } else {
            0.0
        };
        Self {
            scored_count,
            average,
            label_counts,
            trend: trend(recent_scores),
            recent_average: mean(recent_scores),
            last_score: last_score.unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_than_two_scores_is_insufficient() {
        assert_eq!(trend(&[]), Trend::InsufficientData);
        assert_eq!(trend(&[0.5]), Trend::InsufficientData);
    }

    #[test]
    fn rising_scores_improve_falling_decline_flat_is_stable() {
        assert_eq!(trend(&[-0.8, -0.6, 0.2, 0.6]), Trend::Improving);
        assert_eq!(trend(&[0.7, 0.5, -0.1, -0.6]), Trend::Declining);
        assert_eq!(trend(&[0.1, 0.2, 0.15, 0.1]), Trend::Stable);
    }

    #[test]
    fn odd_window_puts_the_extra_score_in_the_newer_half() {
        // older = [0.0], newer = [0.0, 0.9]: mean 0.45 > 0.15
        assert_eq!(trend(&[0.0, 0.0, 0.9]), Trend::Improving);
    }

    #[test]
    fn stats_average_over_all_scored_messages() {
        let stats = EmotionStats::from_aggregates(4, 1.0, BTreeMap::new(), &[0.5, 0.5], Some(0.5));
        assert_eq!(stats.average, 0.25);
        assert_eq!(stats.recent_average, 0.5);
        assert_eq!(stats.trend, Trend::Stable);
    }
}
