//! pgbench scripts that run exactly the services' statements (their
//! exported `store` constants, bound by [`crate::sql`]), with each bound parameter turned into a pgbench variable
//! or a SQL expression of the same type, in the same transaction shape:
//!
//! - store-message: the one `STORE_MESSAGE` statement, autocommit;
//! - create-booking: the `CREATE` statement, which also enqueues the plan
//!   job, autocommit;
//! - journey: three store-messages, then the create-booking transaction;
//! - get-context-*: the one `GET_CONTEXT` statement on the scenario's
//!   conversation, with the request's budgets (read only);
//! - single-write: one durable single-row INSERT, the reference line.
//!
//! Ids are UUIDv7 like the services' (time-ordered B-tree inserts), made by
//! `bench.uuid7(now(), a, b)` from random pgbench variables, so both
//! statements of one transaction compute the same booking id. The plan job
//! goes to queue [`FLOOR_QUEUE`], which no worker reads: the floor measures
//! the hot path only.

use anyhow::{Context, Result};
use booking_service::{
    jobs::{DeliverFollowUp, PlanFollowUp},
    store::{bookings::CREATE, jobs::APALIS_MAX_ATTEMPTS},
};
use memory_service::{
    domain::{
        Limits, Role,
        emotion::{OVERFLOW_LABEL, TREND_WINDOW},
        state::DEFAULT_CONTEXT_MESSAGES,
    },
    startup::MAX_RESPONSE_BYTES,
    store::{context::GET_CONTEXT, messages::STORE_MESSAGE},
};
use uuid::Uuid;

use crate::sql::{bind, literal};

/// The apalis queue the floor's jobs go to (never worked on).
pub const FLOOR_QUEUE: &str = "maitre.bench.floor";
/// Message text of every stored message, service and floor alike.
pub const CONTENT: &str =
    "Hello! We would like a table for two on Friday evening, somewhere quiet if possible.";
/// Emotion labels picked at random.
pub const LABELS: [&str; 4] = ["joy", "neutral", "anger", "sadness"];
pub const CUSTOMER_NAME: &str = "Bench Customer";
pub const CURRENCY: &str = "EUR";
pub const DEPOSIT_MINOR: i64 = 2500;
/// A W3C traceparent of the usual size, for the plan job's payload.
const TRACE_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// GetContext's token budget: 40 messages of [`CONTENT`] (25 tokens each
/// by the service's estimate), so the token budget, not the 100-message
/// default, ends the window.
pub const CONTEXT_TOKEN_BUDGET: i32 = 1_000;
/// Seats per slot (the API's maximum).
pub const SLOT_CAPACITY: i64 = 10_000;
/// Slots created per pgbench client: room for 200,000 bookings each.
pub const SLOTS_PER_CLIENT: i64 = 20;

/// Schema `bench` in the bench database: id helpers and the reference table.
pub const SETUP: &str = r#"
CREATE SCHEMA IF NOT EXISTS bench;
-- A UUIDv7 at time ts, with 12 random bits from a and 62 from b.
CREATE OR REPLACE FUNCTION bench.uuid7(ts timestamptz, a bigint, b bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '7' || lpad(to_hex(a & 4095), 3, '0')
            || to_hex(8 | ((b >> 60) & 3))
            || lpad(to_hex(b & 1152921504606846975), 15, '0'))::uuid
$fn$;
-- A fixed id made of two numbers (per-client conversations and slots).
CREATE OR REPLACE FUNCTION bench.key_uuid(a bigint, b bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT (lpad(to_hex(a), 16, '0') || lpad(to_hex(b), 16, '0'))::uuid
$fn$;
CREATE TABLE IF NOT EXISTS bench.single_write (
    id         uuid        PRIMARY KEY,
    v          integer     NOT NULL,
    created_at timestamptz NOT NULL
);
"#;

/// Slots for one pgbench run: `SLOTS_PER_CLIENT` per client, keyed
/// `bench.key_uuid(run, client * 1000 + i)`, starting in a day.
/// Parameters: run, clients, slots per client, capacity.
pub const FLOOR_SLOTS: &str = "
INSERT INTO booking.slots (id, starts_at, ends_at, capacity, booked, label, created_at)
SELECT bench.key_uuid($1, c * 1000 + i), now() + interval '1 day',
       now() + interval '1 day 2 hours', $4, 0, 'Chef''s table', now()
FROM generate_series(0, $2 - 1) AS c, generate_series(0, $3 - 1) AS i";

/// `bench.uuid7` from the per-transaction random variable `var`.
fn id7(var: &str) -> String {
    format!("bench.uuid7(now(), :a::int8, :{var}::int8)")
}

/// `\set` lines: `a` (12 bits) and 62 random bits for each of `vars`.
fn randoms(vars: &[&str]) -> String {
    let mut out = String::from("\\set a random(0, 4095)\n");
    for var in vars {
        out.push_str(&format!("\\set {var} random(0, 4611686018427387903)\n"));
    }
    out
}

/// A message of a StoreMessage call, as SQL expressions.
struct Message<'a> {
    conversation: &'a str,
    user: &'a str,
    /// memory-service's Role as stored (1 user, 2 assistant).
    role: i16,
    /// `(score, label)` variables (score in hundredths), or no emotion.
    emotion: Option<(&'a str, &'a str)>,
    /// Random variables of the message id and the request id.
    id_var: &'a str,
    request_var: &'a str,
}

fn store_message(m: &Message) -> Result<String> {
    let labels = LABELS.map(literal).join(", ");
    let (score, label) = match m.emotion {
        Some((score, label)) => (
            format!("(:{score}::int8 / 100.0)::float8"),
            format!("(ARRAY[{labels}])[:{label}::int4 + 1]"),
        ),
        None => ("NULL::float8".into(), "NULL::text".into()),
    };
    let args = [
        m.conversation.to_owned(),
        m.user.to_owned(),
        "'web'::text".into(),
        id7(m.id_var),
        format!("{}::int2", m.role),
        format!("{}::text", literal(CONTENT)),
        score,
        label,
        // No per-emotion scores, empty metadata, no tokens, tool calls or results.
        "NULL::jsonb".into(),
        "'{}'::jsonb".into(),
        "NULL::int4".into(),
        "NULL::int4".into(),
        "NULL::jsonb".into(),
        "NULL::jsonb".into(),
        format!("{}::text", id7(m.request_var)),
        "now()".into(),
        format!("{TREND_WINDOW}::int4"),
        // The default cap on distinct labels and its overflow key.
        format!(
            "{}::int4",
            memory_service::domain::Limits::default().max_distinct_labels
        ),
        format!("{}::text", literal(OVERFLOW_LABEL)),
        // An anonymous caller (auth off, as in the bench) and a SHA-256-sized
        // fingerprint, as the service binds them.
        "''::text".into(),
        format!("'\\x{}'::bytea", "ab".repeat(32)),
    ];
    Ok(format!(
        "{};\n",
        bind(STORE_MESSAGE, &args).context("binding STORE_MESSAGE")?
    ))
}

/// The CreateBooking transaction for `customer` (and `conversation`, a
/// uuid expression or `NULL::uuid`) on the client's current slot, in the
/// service's shape: the one `CREATE` statement, which inserts the plan job
/// itself, autocommit (as `store::bookings::create` runs it).
fn booking_transaction(customer: &str, conversation: &str) -> Result<String> {
    let booking_id = id7("bk");
    let args = [
        booking_id.clone(),
        customer.to_owned(),
        format!("{}::text", literal(CUSTOMER_NAME)),
        conversation.to_owned(),
        "bench.key_uuid(:run::int8, :slot::int8)".into(),
        "1::int4".into(),
        format!("{}::text", literal(CURRENCY)),
        format!("{DEPOSIT_MINOR}::int8"),
        format!("{}::text", id7("rq")),
        "now()".into(),
        id7("pay"),
        format!("{}::text", id7("job")),
        format!("{}::text", literal(FLOOR_QUEUE)),
        plan_payload(&booking_id)?,
        format!("{APALIS_MAX_ATTEMPTS}::int4"),
        format!("{booking_id}::text || '/1'"),
        // The request's fingerprint: 32 bytes, like the service's SHA-256.
        format!("sha256(convert_to({}::text, 'UTF8'))", id7("rq")),
        // The follow-up delay after the event, seconds: the bench's
        // booking-service runs with BOOKING_FOLLOWUP_DELAY=0s.
        "0::float8".into(),
        // No hold: a plain CreateBooking.
        "NULL::uuid".into(),
        // The reminder (written only for events further ahead than the
        // lead; the bench's are not), as the service binds it with
        // BOOKING_REMINDER_LEAD's default of 24 h.
        id7("rm"),
        "86400::float8".into(),
        format!("{}::text", id7("rmjob")),
        reminder_payload(&id7("rm"))?,
        format!("{}::text || '/1'", id7("rm")),
        format!("{}::text", literal(booking_service::jobs::DELIVER_QUEUE)),
        format!(
            "{}::text",
            literal(booking_service::domain::PRE_EVENT_TRIGGER)
        ),
    ];
    let counter = format!("\\set n :n + 1\n\\set slot :client_id * 1000 + :n / {SLOT_CAPACITY}\n");
    let create = bind(CREATE, &args).context("binding CREATE")?;
    Ok(format!("{counter}{create};\n"))
}

/// The plan job's payload as booking-service serialises it (a bytea
/// expression), with a trace context like the one every CreateBooking
/// passes on.
fn plan_payload(booking_id: &str) -> Result<String> {
    job_payload::<PlanFollowUp>("booking_id", booking_id)
}

/// The reminder's first deliver job payload, likewise.
fn reminder_payload(reminder_id: &str) -> Result<String> {
    job_payload::<DeliverFollowUp>("follow_up_id", reminder_id)
}

/// A job payload of type `J` (attempt 1, with a trace context) whose `field`
/// is the uuid SQL expression `id`: built through serde, so fields added
/// later keep this compiling.
fn job_payload<J: serde::Serialize + serde::de::DeserializeOwned>(
    field: &str,
    id: &str,
) -> Result<String> {
    let nil = Uuid::nil().to_string();
    let job: J = serde_json::from_value(serde_json::json!({
        field: nil,
        "attempt": 1,
        "trace_parent": TRACE_PARENT,
    }))?;
    let payload = serde_json::to_string(&job)?;
    let (before, after) = payload
        .split_once(&nil)
        .with_context(|| format!("the job's JSON has no {field}"))?;
    Ok(format!(
        "convert_to({} || {id}::text || {}, 'UTF8')",
        literal(before),
        literal(after)
    ))
}

/// One StoreMessage per transaction, each client in its own conversation.
pub fn store_message_script() -> Result<String> {
    let user = "('floor-' || :run::text || '-' || :client_id::text)";
    Ok(format!(
        "{}\\set s random(-100, 100)\n\\set l random(0, {})\n{}",
        randoms(&["m", "r"]),
        LABELS.len() - 1,
        store_message(&Message {
            conversation: "bench.key_uuid(:run::int8, :client_id::int8)",
            user,
            role: 1,
            emotion: Some(("s", "l")),
            id_var: "m",
            request_var: "r",
        })?
    ))
}

/// One CreateBooking per transaction, party of one, no conversation.
pub fn create_booking_script() -> Result<String> {
    Ok(format!(
        "{}{}",
        randoms(&["bk", "rq", "pay", "job", "rm", "rmjob"]),
        booking_transaction(
            "('floor-' || :run::text || '-' || :client_id::text)",
            "NULL::uuid"
        )?
    ))
}

/// A journey: user message, assistant reply, user message (a new
/// conversation each time), then the booking tied to that conversation.
pub fn journey_script() -> Result<String> {
    let conversation = "bench.key_uuid(:run::int8, :client_id::int8 * 1000000000 + :j::int8)";
    let user = "('floor-' || :run::text || '-' || :client_id::text || '-' || :j::text)";
    let mut script = randoms(&[
        "m1", "r1", "m2", "r2", "m3", "r3", "bk", "rq", "pay", "job", "rm", "rmjob",
    ]);
    script.push_str("\\set j :j + 1\n");
    script.push_str(&format!(
        "\\set s1 random(-100, 100)\n\\set s2 random(-100, 100)\n\
         \\set l1 random(0, {n})\n\\set l2 random(0, {n})\n",
        n = LABELS.len() - 1
    ));
    let steps = [
        (1, Some(("s1", "l1")), "m1", "r1"),
        (2, None, "m2", "r2"),
        (1, Some(("s2", "l2")), "m3", "r3"),
    ];
    for (role, emotion, id_var, request_var) in steps {
        script.push_str(&store_message(&Message {
            conversation,
            user,
            role,
            emotion,
            id_var,
            request_var,
        })?);
    }
    script.push_str(&booking_transaction(user, conversation)?);
    Ok(script)
}

/// `GET_CONTEXT` as GetContext runs it for `conversation` with a budget of
/// [`CONTEXT_TOKEN_BUDGET`] tokens and `max_messages` 0 (the default), bound
/// as `store::context::get` binds it (the byte budget from the default
/// limits and the response limit).
pub fn get_context_statement(conversation: Uuid) -> Result<String> {
    let byte_budget = Limits::default().context_message_bytes(MAX_RESPONSE_BYTES);
    let args = [
        format!("{}::uuid", literal(&conversation.to_string())),
        format!("{CONTEXT_TOKEN_BUDGET}::int8"),
        format!("{DEFAULT_CONTEXT_MESSAGES}::int4"),
        format!("{byte_budget}::int8"),
        format!("{}::int2", Role::Assistant.as_i16()),
        format!("{}::int2", Role::Tool.as_i16()),
    ];
    bind(GET_CONTEXT, &args).context("binding GET_CONTEXT")
}

/// One GetContext per transaction, every client on the same conversation.
pub fn get_context_script(conversation: Uuid) -> Result<String> {
    Ok(format!("{};\n", get_context_statement(conversation)?))
}

/// The reference: one durable single-row INSERT per transaction.
pub fn single_write_script() -> String {
    format!(
        "{}\\set v random(1, 1000000)\n\
         INSERT INTO bench.single_write (id, v, created_at) VALUES ({}, :v::int4, now());\n",
        randoms(&["w"]),
        id7("w")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_have_no_placeholder_left() {
        for script in [
            store_message_script().unwrap(),
            create_booking_script().unwrap(),
            journey_script().unwrap(),
            get_context_script(Uuid::nil()).unwrap(),
            single_write_script(),
        ] {
            assert_eq!(crate::sql::placeholders(&script), 0, "{script}");
        }
    }

    #[test]
    fn booking_transaction_has_the_services_shape() {
        let script = create_booking_script().unwrap();
        let order = ["UPDATE booking.slots", "INSERT INTO apalis.jobs"];
        let mut at = 0;
        for part in order {
            let found = script[at..]
                .find(part)
                .unwrap_or_else(|| panic!("{part} missing in order"));
            at += found + part.len();
        }
        assert!(script.contains("'{\"booking_id\":\"' || bench.uuid7("));
        assert!(script.contains(FLOOR_QUEUE));
    }

    #[test]
    fn get_context_is_one_statement_with_the_requests_budgets() {
        let id = Uuid::now_v7();
        let script = get_context_script(id).unwrap();
        assert_eq!(script.matches(';').count(), 1, "{script}");
        assert!(script.contains(&format!("('{id}'::uuid)")));
        assert!(script.contains("(1000::int8)") && script.contains("(100::int4)"));
        // pgbench reads `:name` as a variable: only `::` casts may appear.
        assert!(!script.replace("::", "").contains(':'), "{script}");
    }

    #[test]
    fn journey_stores_three_messages_then_books() {
        let script = journey_script().unwrap();
        assert_eq!(script.matches("INSERT INTO memory.messages").count(), 3);
        assert_eq!(script.matches("INSERT INTO booking.bookings").count(), 1);
    }
}
