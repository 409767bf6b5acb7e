//! Both services through a real PgBouncer 1.18 in transaction mode
//! (`DB_POOLER=transaction`, 3 server connections for everything: both
//! API pools and the workers), with `DATABASE_DIRECT_URL` straight to
//! PostgreSQL for migrations and the workers' LISTEN: concurrent journeys
//! (messages, bookings into one slot, GetContext) all succeed and every
//! follow-up is planned and delivered through the apalis queue.
//!
//! Without pgbouncer installed the test is skipped, except under CI (`CI`
//! set), where it fails saying how to install it.

use std::time::Duration;

use maitre_api::{booking::v1::FollowUpState, memory::v1 as memory};
use maitre_runtime::{
    config::CommonArgs,
    db::Pooler,
    testkit::{pgbouncer, wait_for},
};

use crate::stack::{Stack, WITHIN, spawn_stack_with_memory};

/// Concurrent customers, each with a conversation, a booking and a follow-up.
const CUSTOMERS: usize = 40;

#[tokio::test]
async fn both_services_work_through_pgbouncer_in_transaction_mode() {
    let Some(binary) = pgbouncer::require("services through pgbouncer") else {
        return;
    };
    let bouncer = pgbouncer::PgBouncer::start(&binary, 3);
    let through_pooler = |common: &mut CommonArgs| {
        let direct = common.database_url.clone();
        common.database_url = bouncer.url(&direct);
        common.database_direct_url = Some(direct);
        common.db_pooler = Pooler::Transaction;
    };
    let stack = spawn_stack_with_memory(
        |memory| through_pooler(&mut memory.common),
        |booking| through_pooler(&mut booking.common),
        None,
        None,
    )
    .await;

    // Far enough ahead that 40 journeys through 3 server connections on a
    // busy machine book before it starts (else SLOT_STARTED).
    let slot = stack
        .slot(Duration::from_secs(12), Duration::from_secs(1), 1000)
        .await;
    let journeys = (0..CUSTOMERS).map(|n| {
        let (stack, slot) = (&stack, &slot);
        async move {
            let customer = format!("pooled-{n}");
            let conversation = stack
                .conversation(&customer, &[(-0.5, "anger"), (0.4, "joy"), (0.9, "joy")])
                .await;
            let booked = stack
                .book(Stack::booking_request(slot, &customer, &conversation, 2))
                .await
                .expect("booked through the pooler");
            let context = stack
                .memory
                .clone()
                .get_context(memory::GetContextRequest {
                    conversation_id: conversation.clone(),
                    token_budget: 2000,
                    ..Default::default()
                })
                .await
                .expect("GetContext through the pooler")
                .into_inner();
            assert_eq!(context.messages.len(), 3, "{context:?}");
            booked.booking_id
        }
    });
    let bookings = futures::future::join_all(journeys).await;

    for booking_id in &bookings {
        stack
            .wait_follow_up(booking_id, "the follow-up SENT through the pooler", |f| {
                f.state == FollowUpState::Sent as i32
            })
            .await;
    }
    // The workers listen for wake-ups on a direct connection of their own.
    wait_for("the LISTEN on the direct connection", WITHIN, || async {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'booking-service-listener' AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&stack.db)
        .await
        .expect("pg_stat_activity");
        (listening == 1).then_some(())
    })
    .await;
    stack.assert_queues_clean().await;
    stack.shutdown().await;
    drop(bouncer);
}
