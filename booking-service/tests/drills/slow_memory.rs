//! Drill 6: memory-service answers in 3 s (a proxy holds every byte
//! booking-service sends it for 3 s) while 500 follow-ups come due in the
//! same second, bookings keep coming and some of the 500 bookings are
//! cancelled mid-burst. Delivery claims, calls and finishes without holding
//! a lock or a pooled connection across the call, so: every follow-up is
//! delivered exactly once (or cancelled, with any message already on its
//! way recorded), no delivery fails for want of a connection, CreateBooking
//! keeps its latency, and no cancel waits for a delivery.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use uuid::Uuid;

use crate::{
    client::{Answer, Client, Ledger, SlotInfo, SlotPlan},
    harness::{Options, Stack},
};

/// How long memory-service takes to see each request.
const MEMORY_DELAY: Duration = Duration::from_secs(3);
/// Follow-ups due in the same second.
const BURST: usize = 500;
/// Bookings of the burst cancelled while their follow-ups are delivered.
const CANCELS: usize = 50;
/// Seats of each load slot (the largest capacity a slot may have), and so
/// the most bookings each load phase makes.
const LOAD_SLOT_SEATS: i32 = booking_service::domain::slot::MAX_CAPACITY;

/// A TCP forwarder that delays everything the client sends by `delay`
/// (order kept, throughput not), so every gRPC call through it takes at
/// least that long. Its target is set once known (booking-service connects
/// to memory-service lazily, at its first call).
struct DelayProxy {
    addr: SocketAddr,
    target: Arc<OnceLock<SocketAddr>>,
}

impl DelayProxy {
    async fn start(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let target = Arc::new(OnceLock::<SocketAddr>::new());
        let cell = target.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Some(&target) = cell.get() {
                    tokio::spawn(forward(client, target, delay));
                }
            }
        });
        Self { addr, target }
    }
}

async fn forward(client: TcpStream, target: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from_client.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to_server.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let back = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    tokio::join!(read, write, back);
}

/// (booking id, follow-up id, state, attempts, message id, last error).
type FollowUpOutcome = (Uuid, Uuid, i16, i32, Option<Uuid>, Option<String>);

/// The `q` quantile of `values` (sorted in place).
fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[rank]
}

/// CreateBooking latencies of calls that started in [from, until).
fn booking_latencies(client: &Client, from: Instant, until: Instant) -> Vec<Duration> {
    client
        .journal
        .attempts()
        .into_iter()
        .filter(|a| a.rpc == "CreateBooking" && a.started >= from && a.started < until)
        .map(|a| a.took)
        .collect()
}

/// Books `slot` with `tasks` concurrent clients, `count` bookings in all (or
/// until `until`), new customers without a conversation.
async fn book_many(
    client: &Client,
    slot: &SlotInfo,
    prefix: &str,
    tasks: usize,
    count: usize,
    until: Instant,
) -> Ledger {
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (client, slot, counter) = (client.clone(), slot.clone(), counter.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut ledger = Ledger::default();
                loop {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count || Instant::now() >= until {
                        return ledger;
                    }
                    client
                        .book(
                            &format!("{prefix}-{n}"),
                            String::new(),
                            &slot,
                            1,
                            &mut ledger,
                        )
                        .await;
                }
            })
        })
        .collect();
    let mut ledger = Ledger::default();
    for handle in handles {
        ledger.merge(handle.await.expect("booking task"));
    }
    ledger
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_memory_service_burst_delivers_once_without_blocking_bookings() {
    let drill_started = Instant::now();
    let proxy = DelayProxy::start(MEMORY_DELAY).await;
    let stack = Stack::start(
        "slow_memory",
        Options {
            booking_env: vec![
                ("BOOKING_MEMORY_URL", format!("http://{}", proxy.addr)),
                // Each call takes 3 s: a deadline well above it.
                ("BOOKING_MEMORY_CALL_TIMEOUT", "10s".into()),
                // 100 deliveries in flight at once, on the default 12
                // worker connections: only possible if no delivery holds a
                // connection across its call.
                ("BOOKING_WORKER_CONCURRENCY", "100".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    proxy
        .target
        .set(SocketAddr::from(([127, 0, 0, 1], stack.memory.port())))
        .expect("target set once");
    let client = stack.client(0);

    // The burst slot ends in ~10 s; the load slot is far away (its
    // follow-ups are not due during the drill).
    let burst_slot = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(9),
            every: Duration::from_secs(1),
            count: 1,
            lasts: Duration::from_secs(1),
            capacity: 10_000,
        })
        .await
        .remove(0);
    // Two load slots, one for the baseline and one for the burst, each
    // booked at most to its capacity: a fast machine books more than 10,000
    // seats in the drill's 13 s, and a full slot would fail the load's calls.
    let mut load_slots = client
        .create_slots(SlotPlan {
            first_in: Duration::from_secs(3600),
            every: Duration::from_secs(1),
            count: 2,
            lasts: Duration::from_secs(1),
            capacity: LOAD_SLOT_SEATS,
        })
        .await;
    let (baseline_slot, burst_load_slot) = (load_slots.remove(0), load_slots.remove(0));
    let due_at = Instant::now()
        + (burst_slot.starts_at + chrono::Duration::seconds(1) - chrono::Utc::now())
            .to_std()
            .expect("the burst slot ends in the future");

    // 500 bookings of the burst slot: their follow-ups all come due at its end.
    let booking_started = Instant::now();
    let burst = book_many(
        &client,
        &burst_slot,
        "burst",
        16,
        BURST,
        due_at - Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        burst.confirmed.len(),
        BURST,
        "refused: {:?}, gave up: {:?}",
        burst.refused,
        burst.gave_up
    );
    let booked_in = booking_started.elapsed();

    // Baseline: CreateBooking latency before the burst (planning done).
    let baseline_from = Instant::now();
    let baseline_until = due_at - Duration::from_millis(500);
    let mut baseline_ledger = book_many(
        &client,
        &baseline_slot,
        "base",
        4,
        LOAD_SLOT_SEATS as usize,
        baseline_until,
    )
    .await;

    // The burst: deliveries due now; the same booking load, plus cancels.
    tokio::time::sleep_until(due_at.into()).await;
    let burst_from = Instant::now();
    let burst_until = burst_from + Duration::from_secs(8);
    let load = {
        let client = client.clone();
        let slot = burst_load_slot.clone();
        tokio::spawn(async move {
            book_many(
                &client,
                &slot,
                "during",
                4,
                LOAD_SLOT_SEATS as usize,
                burst_until,
            )
            .await
        })
    };
    // Cancels run meanwhile, one after another. A booking cannot be
    // cancelled once its slot has started (SLOT_STARTED), so they cancel
    // bookings of the later slot: they must never wait for the burst's
    // deliveries (no delivery holds a lock or a connection across its call).
    // A cancel racing its own follow-up's delivery is covered in-process
    // (tests/e2e/pipeline.rs, through EraseCustomer).
    let cancelled: Vec<Uuid> = baseline_ledger
        .confirmed
        .iter()
        .take(CANCELS)
        .map(|c| c.booking_id)
        .collect();
    assert!(!cancelled.is_empty(), "bookings to cancel");
    let mut cancel_latency = Vec::new();
    // Per cancelled booking: did the cancel find its follow-up PENDING (1),
    // or already SENT (0)?
    let mut cancel_found: HashMap<Uuid, i32> = HashMap::new();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in &cancelled {
        let started = Instant::now();
        match client.cancel(*id).await {
            Answer::Ok(n) => cancel_found.insert(*id, n),
            other => panic!("cancel {id}: {other:?}"),
        };
        cancel_latency.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baseline_ledger.merge(load.await.expect("load"));

    // Every follow-up of the burst ends: SENT, or CANCELLED with no call in flight.
    let burst_ids: Vec<Uuid> = burst.confirmed.iter().map(|c| c.booking_id).collect();
    let drained = maitre_runtime::testkit::wait_for(
        "every burst follow-up SENT or CANCELLED, no claim left",
        // ~15 s of calls (500 × 3 s, 100 at once); the rest is room for a
        // loaded CI machine. The drained time is reported below.
        Duration::from_secs(90),
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM booking.scheduled_followups \
                 WHERE booking_id = ANY($1) AND (state = 1 OR claim_token IS NOT NULL)",
            )
            .bind(&burst_ids)
            .fetch_one(&stack.db)
            .await
            .ok()?;
            (open == 0).then(|| burst_from.elapsed())
        },
    )
    .await;

    // Exactly once: one follow-up per booking; each SENT one stored once
    // under its id; each CANCELLED one stored at most once, and then
    // recorded (SENT_AFTER_CANCEL); no other assistant message exists.
    let rows: Vec<FollowUpOutcome> = sqlx::query_as(
        "SELECT booking_id, id, state, attempts, message_id, last_error \
         FROM booking.scheduled_followups WHERE booking_id = ANY($1)",
    )
    .bind(&burst_ids)
    .fetch_all(&stack.db)
    .await
    .expect("follow-ups");
    assert_eq!(rows.len(), BURST, "one follow-up per booking");
    let stored: HashMap<String, (i64, Option<Uuid>)> =
        sqlx::query_as::<_, (String, i64, Option<Uuid>)>(
            "SELECT request_id, count(*), min(id::text)::uuid FROM memory.messages \
         WHERE role = 2 AND request_id IS NOT NULL GROUP BY 1",
        )
        .fetch_all(&stack.db)
        .await
        .expect("assistant messages")
        .into_iter()
        .map(|(request_id, n, id)| (request_id, (n, id)))
        .collect();
    let duplicated: Vec<_> = stored.iter().filter(|(_, (n, _))| *n > 1).collect();
    assert!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    let (mut sent, mut sent_after_cancel, mut cancelled_unsent, mut retried) = (0, 0, 0, 0);
    for (booking_id, id, state, attempts, message_id, last_error) in &rows {
        let message = stored.get(&id.to_string()).and_then(|(_, m)| *m);
        if *attempts > 1 {
            retried += 1;
        }
        match state {
            2 => {
                sent += 1;
                assert_ne!(
                    cancel_found.get(booking_id),
                    Some(&1),
                    "{booking_id}: the cancel cancelled its follow-up, yet it is SENT"
                );
                assert_eq!(
                    message, *message_id,
                    "{id}: the stored message is the one recorded"
                );
            }
            3 if message_id.is_some() => {
                sent_after_cancel += 1;
                assert_eq!(cancel_found.get(booking_id), Some(&1));
                assert_eq!(
                    message, *message_id,
                    "{id}: the stored message is the one recorded"
                );
                assert!(
                    last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("SENT_AFTER_CANCEL")),
                    "{id}: {last_error:?}"
                );
            }
            3 => {
                cancelled_unsent += 1;
                assert_eq!(cancel_found.get(booking_id), Some(&1));
                assert_eq!(
                    message, None,
                    "{id}: cancelled, nothing stored, nothing recorded"
                );
            }
            other => panic!("{id}: state {other} after the burst"),
        }
    }
    assert_eq!(sent + sent_after_cancel + cancelled_unsent, BURST);
    let follow_ups_cancelled = cancel_found
        .iter()
        .filter(|(id, n)| burst_ids.contains(id) && **n == 1)
        .count();
    // The cancelled bookings' own follow-ups (if planned yet) are CANCELLED.
    let not_cancelled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM booking.scheduled_followups \
         WHERE booking_id = ANY($1) AND state <> 3",
    )
    .bind(&cancelled)
    .fetch_one(&stack.db)
    .await
    .expect("cancelled follow-ups");
    assert_eq!(
        not_cancelled, 0,
        "a cancelled booking kept a live follow-up"
    );
    assert_eq!(sent_after_cancel + cancelled_unsent, follow_ups_cancelled);
    assert_eq!(
        stored.len(),
        sent + sent_after_cancel,
        "no assistant message unaccounted for"
    );
    assert_eq!(
        retried, 0,
        "no delivery failed (a pool run dry would have timed deliveries out)"
    );
    let dead_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status IN ('Failed', 'Killed')")
            .fetch_one(&stack.db)
            .await
            .expect("jobs");
    assert_eq!(dead_jobs, 0, "no job died");

    // Latency: bookings keep their pace, cancels never wait for a delivery.
    let mut baseline = booking_latencies(&client, baseline_from, baseline_until);
    let mut during = booking_latencies(&client, burst_from, burst_until);
    let (base_p50, base_p99) = (quantile(&mut baseline, 0.5), quantile(&mut baseline, 0.99));
    let (burst_p50, burst_p99) = (quantile(&mut during, 0.5), quantile(&mut during, 0.99));
    let cancel_p99 = quantile(&mut cancel_latency, 0.99);
    let cancel_max = cancel_latency.last().copied().unwrap_or_default();
    let failures = client.journal.failures();
    println!(
        "DRILL slow_memory_service_burst: follow-ups={BURST} sent={sent} cancelled={} \
         (found-pending={follow_ups_cancelled}: sent-after-cancel={sent_after_cancel}, unsent={cancelled_unsent}) \
         duplicates=0 retried=0 memory-delay={MEMORY_DELAY:?} burst-drained-in={:.1}s \
         bookings-made={} (500 in {:.1}s) CreateBooking p50/p99 baseline={:.1}/{:.1}ms (n={}) \
         during-burst={:.1}/{:.1}ms (n={}) CancelBooking p99={:.1}ms max={:.1}ms failed-calls={} runtime={:.1}s",
        cancelled.len(),
        drained.as_secs_f64(),
        burst.confirmed.len() + baseline_ledger.confirmed.len(),
        booked_in.as_secs_f64(),
        base_p50.as_secs_f64() * 1e3,
        base_p99.as_secs_f64() * 1e3,
        baseline.len(),
        burst_p50.as_secs_f64() * 1e3,
        burst_p99.as_secs_f64() * 1e3,
        during.len(),
        cancel_p99.as_secs_f64() * 1e3,
        cancel_max.as_secs_f64() * 1e3,
        failures.len(),
        drill_started.elapsed().as_secs_f64(),
    );
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    assert!(
        during.len() >= 20,
        "the load ran during the burst: {}",
        during.len()
    );
    assert!(
        burst_p99 < Duration::from_millis(250),
        "CreateBooking p99 during the burst {burst_p99:?} (baseline {base_p99:?})"
    );
    assert!(
        cancel_max < Duration::from_secs(1),
        "a cancel waited {cancel_max:?}: blocked behind a delivery (which takes {MEMORY_DELAY:?})"
    );
}
