//! What a scenario costs PostgreSQL, from `pg_stat_statements`: reset before
//! each service segment, read once the follow-up workers have drained what
//! the segment enqueued, and split into the scenario's own statement(s) and
//! everything else the services ran meanwhile (the follow-up pipeline,
//! health checks, gauges).
//!
//! The bench's own connections set `pg_stat_statements.track = none`
//! (`db::connect`), so its polling is not counted; pgbench runs after the
//! reading. Utility statements (BEGIN, COMMIT, LISTEN) are not tracked:
//! PostgreSQL does not time an autocommit statement's commit either, so
//! both sides leave the commit out.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;

/// Statements listed per point, the costliest first.
const LISTED: usize = 12;

/// Creates the extension in the bench database; false (with the reason on
/// stderr) when the server was not started with it preloaded.
pub async fn enable(pool: &PgPool) -> bool {
    let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await;
    let readable = match created {
        Ok(_) => sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
            .fetch_optional(pool)
            .await
            .map(|_| ()),
        Err(error) => Err(error),
    };
    match readable {
        Ok(()) => true,
        Err(error) => {
            eprintln!(
                "maitre-bench: warning: no per-statement costs ({error}); scripts/bench.sh \
                 starts a private PostgreSQL with shared_preload_libraries = 'pg_stat_statements'"
            );
            false
        }
    }
}

pub async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .context("resetting pg_stat_statements")?;
    Ok(())
}

/// Calls and execution time of each statement, summed over readings.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    by_query: BTreeMap<String, (i64, f64)>,
}

impl Tally {
    /// Adds what the services ran in this database since the last reset.
    pub async fn add_reading(&mut self, pool: &PgPool) -> Result<()> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            r#"
SELECT s.query, s.calls, s.total_exec_time
FROM pg_stat_statements s
JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database()
"#,
        )
        .fetch_all(pool)
        .await
        .context("reading pg_stat_statements")?;
        for (query, calls, total_ms) in rows {
            let entry = self.by_query.entry(shape(&query)).or_default();
            entry.0 += calls;
            entry.1 += total_ms;
        }
        Ok(())
    }

    /// The cost per operation: `own` are the scenario's own statements (as
    /// the services define them), the last of which runs once per
    /// operation and so counts the operations.
    pub fn cost(&self, own: &[&str]) -> Option<PgCost> {
        let own: Vec<String> = own.iter().map(|sql| shape(sql)).collect();
        let Some(&(operations, _)) = self.by_query.get(own.last()?) else {
            if !self.by_query.is_empty() {
                eprintln!(
                    "maitre-bench: warning: the scenario's statement is not among the {} \
                     pg_stat_statements saw (pg_cost::shape no longer matches its text?)",
                    self.by_query.len()
                );
            }
            return None;
        };
        if operations == 0 {
            return None;
        }
        let per_op = |ms: f64| ms / operations as f64;
        let (mut own_ms, mut other_ms) = (0.0, 0.0);
        let mut statements: Vec<StatementCost> = self
            .by_query
            .iter()
            .map(|(query, &(calls, total_ms))| {
                let is_own = own.contains(query);
                if is_own {
                    own_ms += total_ms;
                } else {
                    other_ms += total_ms;
                }
                StatementCost {
                    statement: query.chars().take(110).collect(),
                    own: is_own,
                    calls,
                    ms_per_call: total_ms / calls.max(1) as f64,
                    ms_per_operation: per_op(total_ms),
                }
            })
            .collect();
        statements.sort_by(|a, b| b.ms_per_operation.total_cmp(&a.ms_per_operation));
        statements.truncate(LISTED);
        Some(PgCost {
            operations,
            own_ms_per_operation: per_op(own_ms),
            others_ms_per_operation: per_op(other_ms),
            others_over_own: (own_ms > 0.0).then(|| other_ms / own_ms),
            statements,
        })
    }
}

/// PostgreSQL execution time per operation of one point.
#[derive(Debug, Clone, Serialize)]
pub struct PgCost {
    /// Calls of the scenario's own (last) statement: the operations.
    pub operations: i64,
    /// The scenario's own statement(s), ms per operation.
    pub own_ms_per_operation: f64,
    /// Everything else the services ran (the follow-up pipeline above
    /// all), ms per operation.
    pub others_ms_per_operation: f64,
    pub others_over_own: Option<f64>,
    pub statements: Vec<StatementCost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatementCost {
    /// The statement, shortened (literals and parameters as `?`).
    pub statement: String,
    /// One of the scenario's own statements.
    pub own: bool,
    pub calls: i64,
    pub ms_per_call: f64,
    pub ms_per_operation: f64,
}

/// A statement reduced to its shape, so that the services' SQL and
/// pg_stat_statements' normalised text (constants replaced by `$n`) compare
/// equal: comments dropped, whitespace collapsed, string and number
/// literals and parameters replaced by `?`.
pub fn shape(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut last_was_space = true;
    let push_space = |out: &mut String, last: &mut bool| {
        if !*last {
            out.push(' ');
            *last = true;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                push_space(&mut out, &mut last_was_space);
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                for c in chars.by_ref() {
                    if previous == '*' && c == '/' {
                        break;
                    }
                    previous = c;
                }
                push_space(&mut out, &mut last_was_space);
            }
            '\'' => {
                while let Some(c) = chars.next() {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
                out.push('?');
                last_was_space = false;
            }
            '$' if chars.peek().is_some_and(|c| c.is_ascii_digit()) => {
                while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                    chars.next();
                }
                out.push('?');
                last_was_space = false;
            }
            c if c.is_ascii_digit()
                && !out
                    .chars()
                    .last()
                    .is_some_and(|p| p.is_alphanumeric() || p == '_') =>
            {
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_digit() || *c == '.')
                {
                    chars.next();
                }
                out.push('?');
                last_was_space = false;
            }
            c if c.is_whitespace() => push_space(&mut out, &mut last_was_space),
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if !(next.is_alphanumeric() || next == '_') {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                // NULL, TRUE and FALSE are constants (normalised) except
                // after IS / IS NOT, where they are syntax (kept).
                let constant = ["NULL", "TRUE", "FALSE"]
                    .contains(&word.to_ascii_uppercase().as_str())
                    && !["IS", "NOT"].contains(&last_word(&out).to_ascii_uppercase().as_str());
                out.push_str(if constant { "?" } else { &word });
                last_was_space = false;
            }
            c => {
                out.push(c);
                last_was_space = false;
            }
        }
    }
    out.trim().trim_end_matches(';').trim_end().to_owned()
}

/// The last word of `text`.
fn last_word(text: &str) -> &str {
    text.trim_end()
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::shape;

    #[test]
    fn a_statement_and_its_normalised_text_have_one_shape() {
        let ours = "\nUPDATE apalis.jobs -- the lock\nSET status = 'Queued', attempts = 1 /* x */\nWHERE id = $1 AND v1 = 2\n";
        let normalised =
            "UPDATE apalis.jobs \nSET status = $2, attempts = $3 \nWHERE id = $1 AND v1 = $4";
        assert_eq!(shape(ours), shape(normalised));
        assert_eq!(
            shape(ours),
            "UPDATE apalis.jobs SET status = ?, attempts = ? WHERE id = ? AND v1 = ?"
        );
        assert_ne!(shape("SELECT a FROM t"), shape("SELECT b FROM t"));
        // NULL and booleans are constants, except in IS [NOT] NULL / TRUE.
        assert_eq!(
            shape("SELECT NULL, true WHERE a IS NULL AND b IS NOT NULL AND c IS TRUE"),
            shape("SELECT $1, $2 WHERE a IS NULL AND b IS NOT NULL AND c IS TRUE")
        );
        assert_eq!(shape("SELECT x1, y_2"), "SELECT x1, y_2");
    }
}
