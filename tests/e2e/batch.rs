//! The batch transaction driven directly (no Kafka) against a real PostgreSQL: the fence, and
//! what it sends the server beyond its effect.

use serde_json::json;

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{batch, connect, migrated_store, source, wait_until};
use inventory_consumer::config::Settings;
use inventory_consumer::domain::{Batch, Delivery};
use inventory_consumer::store::{self, Claim, Failure, Guards, apply_batch};
use inventory_devtools::embedded::postgres::{PostgresOptions, ThrowawayPostgres};

/// Every batch transaction first plans by key (`KEYED_PLANS` in src/store/apply/sql.rs), once,
/// whether it has orders (then in its first round trip) or not: the statements' generic plans,
/// made while `products` is small, would otherwise scan whole tables for every batch. A
/// restructuring once sent it only for batches with orders (twice), and bench's database-only
/// run fell to a sixth of its throughput; the server's own statement counts catch that.
#[tokio::test(flavor = "multi_thread")]
async fn every_batch_transaction_plans_by_key_exactly_once() {
    let server = tokio::task::spawn_blocking(|| {
        ThrowawayPostgres::start(PostgresOptions {
            statement_stats: true,
            ..PostgresOptions::default()
        })
    })
    .await
    .expect("joining")
    .expect("starting PostgreSQL with pg_stat_statements");
    let admin_url = server.url("postgres");
    let admin = connect(&admin_url).await;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .expect("pg_stat_statements");
    let url = store::create_database(&admin_url, "keyed_plans")
        .await
        .expect("a database");
    store::migrate::migrate(&url).await.expect("migrations");
    let mut settings = Settings::default().database;
    settings.url = url;
    let pool = store::pool(&settings).await.expect("pool");
    let source = source();
    let epoch = store::claim(&pool, &source, "a", &[0])
        .await
        .expect("claim")[&0]
        .epoch;
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .expect("resetting the statement counts");

    let restock = |id: &str, sku: &str| {
        json!({"event_id": id, "type": "restock", "sku": sku, "quantity": 10}).to_string()
    };
    let order = |id: &str, kind: &str, order_id: &str| {
        let mut event = json!({"event_id": id, "type": kind, "order_id": order_id});
        if kind == "reserve" {
            event["lines"] = json!([{"sku": "A", "quantity": 1}]);
        }
        event.to_string()
    };
    let batches = [
        // Without orders.
        vec![restock("r1", "A"), restock("r2", "B")],
        vec![restock("r3", "C")],
        // With orders: a reserve, then its commit beside a stock event.
        vec![order("o1", "reserve", "order-1")],
        vec![order("o2", "commit", "order-1"), restock("r4", "A")],
        // Without orders again, once the plans exist.
        vec![restock("r5", "B")],
    ];
    let mut offset = 0;
    for events in &batches {
        let outcome = apply_batch(&pool, &source, &batch(offset, events), Guards::On, epoch)
            .await
            .expect("applying a batch");
        assert_eq!(outcome.applied, events.len() as u64, "{events:?}");
        offset += events.len() as i64;
    }

    // pg_stat_statements keeps the statement's text with its constants as $n.
    let calls: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s
             JOIN pg_database d ON d.oid = s.dbid
             WHERE d.datname = 'keyed_plans' AND s.query ~ '^\\s*SELECT set_config\\(\\$1'",
            &[],
        )
        .await
        .expect("reading the statement counts")
        .get(0);
    assert_eq!(
        calls,
        batches.len() as i64,
        "one KEYED_PLANS per batch transaction"
    );
}

/// The fence itself, against a real PostgreSQL: a batch carrying an older epoch than the
/// partition's latest claim rolls back and changes nothing, the current owner's commits; and a
/// claim waits for a batch transaction in flight on the partition.
#[tokio::test(flavor = "multi_thread")]
async fn the_fence_refuses_a_stale_owner_and_a_claim_waits_for_the_batch_in_flight() {
    let (db, pool, source) = migrated_store().await;
    let epoch_of = |claims: HashMap<i32, Claim>| claims[&0].epoch;
    let stale = epoch_of(
        store::claim(&pool, &source, "a", &[0])
            .await
            .expect("claim"),
    );
    let current = epoch_of(
        store::claim(&pool, &source, "b", &[0])
            .await
            .expect("claim"),
    );
    assert!(current > stale);

    let mut batch = Batch::default();
    batch.push(Delivery {
        partition: 0,
        offset: 0,
        key: None,
        payload: Some(br#"{"event_id":"e1","type":"restock","sku":"S-1","quantity":5}"#.to_vec()),
        timestamp_ms: None,
    });
    let refused = apply_batch(&pool, &source, &batch, Guards::On, stale).await;
    assert!(matches!(refused, Err(Failure::Fenced(_))), "{refused:?}");
    assert_eq!(db.scalar("SELECT count(*) FROM processed_events").await, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM products").await, 0);
    apply_batch(&pool, &source, &batch, Guards::On, current)
        .await
        .expect("the current owner applies");
    assert_eq!(db.scalar("SELECT count(*) FROM processed_events").await, 1);

    // A batch in flight holds the partition's row; a claim waits for it to end.
    let mut in_flight = db.client().await;
    let tx = in_flight.transaction().await.expect("begin");
    tx.query(
        "SELECT epoch FROM partition_owners WHERE partition = 0 FOR UPDATE",
        &[],
    )
    .await
    .expect("the batch's fence");
    let claim = tokio::spawn({
        let (pool, source) = (pool.clone(), source.clone());
        async move { store::claim(&pool, &source, "c", &[0]).await }
    });
    // Observed, not slept on: the claim's session waits for the row lock the batch holds.
    wait_until(
        "the claim to wait on the batch's row lock",
        Duration::from_secs(30),
        || async {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%partition_owners%'
                   AND datname = current_database()",
            )
            .await
                == 1
        },
    )
    .await;
    assert!(
        !claim.is_finished(),
        "the claim did not wait for the batch in flight"
    );
    tx.commit().await.expect("commit");
    let claimed = claim.await.expect("join").expect("claim");
    assert_eq!(claimed[&0].epoch, current + 1);
    assert_eq!(
        claimed[&0].next_offset,
        Some(1),
        "resumes after the batch it waited for"
    );
}

/// `pause` returns only once no batch of the partition is in flight, and none commits after:
/// also a batch whose fence was already waiting when the pause took the partition's row. The
/// order is forced with a third session holding the row: the pause queues for it first, then
/// the batch, so the batch's fence starts before the pause commits and gets the row after.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_waited_behind_a_pause_sees_it() {
    let (db, pool, source) = migrated_store().await;
    let epoch = store::claim(&pool, &source, "a", &[0])
        .await
        .expect("claim")[&0]
        .epoch;
    let waiting = |sessions: i64| {
        let db = &db;
        async move {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%partition_owners%'
                   AND datname = current_database()",
            )
            .await
                == sessions
        }
    };

    let mut holder = db.client().await;
    let held = holder.transaction().await.expect("begin");
    held.query(
        "SELECT 1 FROM partition_owners WHERE partition = 0 FOR UPDATE",
        &[],
    )
    .await
    .expect("holding the partition's row");
    let pause = tokio::spawn({
        let mut client = db.client().await;
        let source = source.clone();
        async move {
            store::pauses::pause(
                &mut client,
                &source.group,
                &source.topic,
                &[0],
                "test",
                None,
            )
            .await
        }
    });
    wait_until(
        "the pause to wait for the row",
        Duration::from_secs(30),
        || waiting(1),
    )
    .await;
    let events =
        [json!({"event_id": "e1", "type": "restock", "sku": "S-1", "quantity": 5}).to_string()];
    let applying = tokio::spawn({
        let (pool, source) = (pool.clone(), source.clone());
        async move { apply_batch(&pool, &source, &batch(0, &events), Guards::On, epoch).await }
    });
    wait_until(
        "the batch's fence to wait behind the pause",
        Duration::from_secs(30),
        || waiting(2),
    )
    .await;

    held.commit().await.expect("releasing the row");
    pause.await.expect("join").expect("the pause");
    let applied = applying.await.expect("join");
    assert!(
        matches!(applied, Err(Failure::Paused(0))),
        "a batch committed after its partition's pause returned: {applied:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM processed_events").await, 0);
}
