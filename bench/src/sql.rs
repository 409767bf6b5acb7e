//! The SQL the services run, taken from their own sources so that the floor
//! (pgbench) can never drift from it.
//!
//! `STORE_MESSAGE` and `CREATE` are private constants of the services'
//! `store` modules, so their source files are embedded at compile time and
//! the constants' string literals are read out of them. apalis's insert is a
//! `.sql` file of a registry crate, copied here; a test compares the copy
//! with the crate's file when the cargo registry is on the machine.

use anyhow::{Context, Result, bail};

const MESSAGES_RS: &str = include_str!("../../memory-service/src/store/messages.rs");
const BOOKINGS_RS: &str = include_str!("../../booking-service/src/store/bookings.rs");
const JOBS_RS: &str = include_str!("../../booking-service/src/store/jobs.rs");

/// `apalis-postgres-1.0.0/queries/task/sink.sql`: what
/// `apalis_postgres::queries::push_tasks` runs (booking-service pushes the
/// plan job with it inside CreateBooking's transaction).
pub const APALIS_SINK: &str = r#"INSERT INTO apalis.jobs (
    id,
    job_type,
    job,
    status,
    attempts,
    max_attempts,
    run_at,
    priority,
    metadata,
    idempotency_key
)
SELECT
    unnest($1::text[]) AS id,
    $2::text AS job_type,
    unnest($3::bytea[]) AS job,
    'Pending' AS status,
    0 AS attempts,
    unnest($4::integer[]) AS max_attempts,
    to_timestamp(unnest($5::bigint[])) AS run_at,
    unnest($6::integer[]) AS priority,
    unnest($7::hstore[]) AS metadata,
    unnest($8::text[]) AS idempotency_key
"#;

/// memory-service's StoreMessage statement (`store::messages::STORE_MESSAGE`).
pub fn store_message() -> Result<String> {
    rust_str_const(MESSAGES_RS, "STORE_MESSAGE")
}

/// booking-service's CreateBooking statement (`store::bookings::CREATE`).
pub fn create_booking() -> Result<String> {
    rust_str_const(BOOKINGS_RS, "CREATE")
}

/// `max_attempts` booking-service gives its jobs (`store::jobs::APALIS_MAX_ATTEMPTS`).
pub fn apalis_max_attempts() -> Result<u32> {
    let text = rust_const_text(JOBS_RS, "APALIS_MAX_ATTEMPTS", "usize")?;
    let literal = text.split(';').next().unwrap_or_default().trim();
    literal
        .replace('_', "")
        .parse()
        .with_context(|| format!("APALIS_MAX_ATTEMPTS is not a plain number: {literal:?}"))
}

/// What follows `const NAME: TYPE =` in `source`.
fn rust_const_text<'a>(source: &'a str, name: &str, ty: &str) -> Result<&'a str> {
    let needle = format!("const {name}: {ty} =");
    let start = source
        .find(&needle)
        .with_context(|| format!("`{needle}` not found in the service's source"))?;
    Ok(source[start + needle.len()..].trim_start())
}

/// The value of `const NAME: &str = <string literal>;` in Rust `source`.
/// Raw strings (`r#"..."#`) and plain strings with the common escapes are
/// understood; anything else (a `concat!`, say) is an error, not a guess.
pub fn rust_str_const(source: &str, name: &str) -> Result<String> {
    let rest = rust_const_text(source, name, "&str")?;
    if let Some(raw) = rest.strip_prefix('r') {
        let hashes = raw.chars().take_while(|&c| c == '#').count();
        let body = raw[hashes..]
            .strip_prefix('"')
            .with_context(|| format!("{name}: malformed raw string"))?;
        let close = format!("\"{}", "#".repeat(hashes));
        let end = body
            .find(&close)
            .with_context(|| format!("{name}: unterminated raw string"))?;
        return Ok(body[..end].to_owned());
    }
    let body = rest
        .strip_prefix('"')
        .with_context(|| format!("{name} is not a string literal; the bench cannot read it"))?;
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Ok(out),
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some('\'') => out.push('\''),
                // A line continuation: the newline and the next line's indent go.
                Some('\n') => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                other => bail!("{name}: unsupported escape \\{other:?}"),
            },
            c => out.push(c),
        }
    }
    bail!("{name}: unterminated string literal")
}

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

    /// The version of apalis-postgres [`APALIS_SINK`] was copied from.
    const APALIS_POSTGRES_VERSION: &str = "1.0.0";

    #[test]
    fn reads_raw_and_plain_string_constants() {
        let source =
            "const A: &str = r#\"x \"$1\" y\"#;\nconst B: &str = \"a\\\n    b \\\"c\\\"\";";
        assert_eq!(rust_str_const(source, "A").unwrap(), "x \"$1\" y");
        assert_eq!(rust_str_const(source, "B").unwrap(), "ab \"c\"");
        assert!(rust_str_const(source, "C").is_err());
        assert!(rust_str_const("const D: &str = concat!(\"a\");", "D").is_err());
    }

    #[test]
    fn the_services_statements_are_found_with_their_placeholders() {
        let store = store_message().unwrap();
        assert!(store.contains("INSERT INTO memory.messages"));
        assert_eq!(placeholders(&store), 21);
        let create = create_booking().unwrap();
        assert!(create.contains("UPDATE booking.slots SET booked = booked + $6"));
        // 16 once CREATE enqueues the plan job itself, 17 with the
        // request's fingerprint.
        assert!(matches!(placeholders(&create), 11 | 16 | 17), "{create}");
        assert_eq!(placeholders(APALIS_SINK), 8);
        assert_eq!(apalis_max_attempts().unwrap(), 3);
    }

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
    fn literal_doubles_quotes() {
        assert_eq!(literal("Chef's table"), "'Chef''s table'");
    }

    /// The copy of apalis's insert must equal the crate's own file.
    #[test]
    fn apalis_sink_copy_matches_the_crate() {
        let lock = include_str!("../../Cargo.lock");
        let locked = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"apalis-postgres\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"').to_owned())
            .expect("apalis-postgres in Cargo.lock");
        assert_eq!(
            locked, APALIS_POSTGRES_VERSION,
            "apalis-postgres was upgraded: re-copy queries/task/sink.sql into bench/src/sql.rs"
        );
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        let Ok(registries) = std::fs::read_dir(format!("{home}/registry/src")) else {
            eprintln!("no cargo registry sources under {home}; skipping the comparison");
            return;
        };
        let mut compared = false;
        for registry in registries.flatten() {
            let path = registry.path().join(format!(
                "apalis-postgres-{APALIS_POSTGRES_VERSION}/queries/task/sink.sql"
            ));
            if let Ok(text) = std::fs::read_to_string(&path) {
                assert_eq!(
                    text.trim(),
                    APALIS_SINK.trim(),
                    "{} changed",
                    path.display()
                );
                compared = true;
            }
        }
        if !compared {
            eprintln!("apalis-postgres sources not found; skipping the comparison");
        }
    }
}
