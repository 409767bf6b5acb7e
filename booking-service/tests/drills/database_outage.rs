//! Drill 4: PostgreSQL "goes away" for 3 s (a TCP proxy between the
//! services' processes and the shared server cuts every connection and
//! refuses new ones) during a steady stream of StoreMessage and
//! CreateBooking. Readiness follows the database, liveness does not, calls
//! fail fast with UNAVAILABLE, and once the database is back both services
//! recover on their own and every follow-up is delivered exactly once.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    checks,
    client::{Answer, Ledger, Load, SlotPlan, run_load},
    harness::{BOOKING_GRPC_NAME, LIVENESS, MEMORY_GRPC_NAME, Options, Stack, health, wait_health},
};

const OUTAGE: Duration = Duration::from_secs(3);
/// A call failing because the database is away must fail within this.
const FAIL_FAST: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart() {
    let drill_started = Instant::now();
    let stack = Stack::start(
        "database_outage",
        Options {
            via_proxy: true,
            // Calls waiting for a connection give up after 0.5 s.
            db_acquire_timeout: Some("500ms"),
            ..Options::default()
        },
    )
    .await;
    let proxy = stack.proxy.as_ref().expect("proxy");
    let client = stack.client(0);
    let slots = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(2),
            every: Duration::from_secs(1),
            count: 20,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await;
    let slots_for_probes = slots.clone();
    let load_started = Instant::now();
    let load = run_load(
        "outage",
        vec![client.clone()],
        slots,
        Load {
            tasks: 2,
            pause: Duration::from_millis(30),
            run_for: Duration::from_secs(10),
            // Longer than the outage: every booking retried through it
            // still finds its slot open.
            margin: Duration::from_secs(5),
            limit: None,
        },
    );
    let services = [
        (stack.memory.port(), MEMORY_GRPC_NAME),
        (stack.booking[0].port(), BOOKING_GRPC_NAME),
    ];

    tokio::time::sleep_until((load_started + Duration::from_secs(2)).into()).await;
    let down_at = Instant::now();
    proxy.take_down();
    // Besides the stream (whose tasks may all be stuck retrying one kind of
    // call), one call of each kind starts during the outage and is retried
    // until it succeeds.
    let probe_slot = slots_for_probes
        .iter()
        .find(|s| s.starts_at > chrono::Utc::now() + chrono::Duration::seconds(6))
        .expect("a slot starting after the outage")
        .clone();
    let probes = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ledger = Ledger::default();
            let conversation = uuid::Uuid::now_v7().to_string();
            let stored = client.conversation("outage-probe-message");
            let booked = client.book(
                "outage-probe-booking",
                conversation,
                &probe_slot,
                2,
                &mut ledger,
            );
            let (stored, ()) = tokio::join!(stored, booked);
            assert!(
                matches!(stored, Answer::Ok(_)),
                "probe StoreMessage: {stored:?}"
            );
            ledger
        })
    };
    for (port, name) in services {
        for health_name in ["", name] {
            wait_health(port, health_name, ServingStatus::NotServing, OUTAGE).await;
        }
        assert_eq!(
            health(port, LIVENESS).await,
            Ok(ServingStatus::Serving as i32),
            "{name}: liveness while the database is down"
        );
    }
    let not_serving_after = down_at.elapsed();
    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    proxy.bring_up();
    let up_at = Instant::now();
    for (port, name) in services {
        for health_name in ["", name] {
            wait_health(
                port,
                health_name,
                ServingStatus::Serving,
                Duration::from_secs(15),
            )
            .await;
        }
    }
    let serving_after = up_at.elapsed();
    let mut ledger = load.await.expect("load");
    ledger.merge(probes.await.expect("probes"));

    let failures = client.journal.failures();
    let slow: Vec<_> = failures
        .iter()
        .filter(|a| {
            let failure = a.outcome.as_ref().expect_err("a failure");
            failure.hung
                || failure.code != Code::Unavailable
                || failure.reason != "DATABASE_UNAVAILABLE"
                || a.took >= FAIL_FAST
        })
        .collect();
    assert!(
        slow.is_empty(),
        "calls must fail fast with UNAVAILABLE (DATABASE_UNAVAILABLE) while the database is down: {slow:#?}"
    );
    for rpc in ["StoreMessage", "CreateBooking"] {
        assert!(
            failures.iter().any(|a| a.rpc == rpc),
            "no {rpc} failed: the outage never hit it"
        );
    }
    let slowest = failures.iter().map(|a| a.took).max().unwrap_or_default();

    let waited = checks::wait_all_sent(&stack.db, &ledger, Duration::from_secs(60)).await;
    let totals = checks::assert_nothing_lost(&stack.db, &ledger).await;
    assert!(
        ledger.refused.is_empty(),
        "retried bookings refused: {:#?}",
        ledger.refused
    );
    checks::report(
        "database_restart",
        &totals,
        &format!(
            "outage={OUTAGE:?} not-serving-after={:.2}s serving-again-after={:.2}s failed-attempts={} \
             (StoreMessage={}, CreateBooking={}) slowest-failure={:.0}ms refused={} jobs=[{}] \
             waited-for-delivery={:.1}s runtime={:.1}s",
            not_serving_after.as_secs_f64(),
            serving_after.as_secs_f64(),
            failures.len(),
            failures.iter().filter(|a| a.rpc == "StoreMessage").count(),
            failures.iter().filter(|a| a.rpc == "CreateBooking").count(),
            slowest.as_secs_f64() * 1000.0,
            ledger.refused.len(),
            checks::job_statuses(&stack.db).await,
            waited.as_secs_f64(),
            drill_started.elapsed().as_secs_f64(),
        ),
    );
}
