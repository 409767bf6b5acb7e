//! Turning the services' SQL (their exported `store` constants) into plain
//! statements pgbench can run: each `$n` placeholder bound to an expression.

use anyhow::{Context, Result, bail};

/// `sql` with each placeholder `$n` replaced by `(args[n - 1])`. Fails when
/// the statement has a placeholder without an argument or an argument is
/// never used: either means the service's SQL changed and the floor's
/// argument list must follow.
pub fn bind(sql: &str, args: &[String]) -> Result<String> {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut used = vec![false; args.len()];
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            out.push('$');
            rest = after;
            continue;
        }
        let n: usize = after[..digits].parse()?;
        let arg = n
            .checked_sub(1)
            .and_then(|i| args.get(i))
            .with_context(|| format!("placeholder ${n} has no argument ({} given)", args.len()))?;
        used[n - 1] = true;
        out.push('(');
        out.push_str(arg);
        out.push(')');
        rest = &after[digits..];
    }
    out.push_str(rest);
    if let Some(unused) = used.iter().position(|u| !u) {
        bail!(
            "argument ${} is never used: the statement changed",
            unused + 1
        );
    }
    Ok(out)
}

/// A SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The number of distinct `$n` placeholders (the highest n).
#[cfg(test)]
pub fn placeholders(sql: &str) -> usize {
    let mut highest = 0;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        if let Ok(n) = after[..digits].parse::<usize>() {
            highest = highest.max(n);
        }
        rest = after;
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_every_placeholder_and_checks_arity() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            bind("SELECT $1::int, $2, $1", &args(&["a", "b"])).unwrap(),
            "SELECT (a)::int, (b), (a)"
        );
        assert!(bind("SELECT $1, $3", &args(&["a", "b", "c"])).is_err());
        assert!(bind("SELECT $2", &args(&["a"])).is_err());
        // $12 is not $1 followed by a 2.
        assert!(bind("SELECT $12", &args(&["a"])).is_err());
        assert_eq!(bind("SELECT '$'", &[]).unwrap(), "SELECT '$'");
    }

    #[test]
    fn the_services_statements_have_their_placeholders() {
        assert_eq!(
            placeholders(memory_service::store::messages::STORE_MESSAGE),
            21
        );
        assert_eq!(placeholders(booking_service::store::bookings::CREATE), 26);
    }

    #[test]
    fn literal_doubles_quotes() {
        assert_eq!(literal("Chef's table"), "'Chef''s table'");
    }
}
