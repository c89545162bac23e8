//! The batch transaction driven directly (no Kafka) against a real PostgreSQL: the fence, and
//! what it sends the server beyond its effect.

use serde_json::json;

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{TestDb, batch, connect, migrated_store, partition_batch, source, wait_until};
use inventory_consumer::config::Settings;
use inventory_consumer::domain::{Batch, Delivery};
use inventory_consumer::store::{self, Claim, Failure, Guards, Part, apply_batch};
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
        trace: None,
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
        || async { waiting_on_owner_rows(&db).await == 1 },
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
        async move { waiting_on_owner_rows(db).await == sessions }
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

/// Three partitions' batches in one transaction (`apply_parts`) do exactly what their own
/// transactions back to back do: a reserve in one part and its commit in the next, an event id
/// recorded by one part and sent again (a duplicate) or changed (a conflict) in a later one, a
/// dead letter, each partition's offset. Every table is compared with a second database fed the
/// same batches one transaction each; the rows' transaction ids show one transaction, not three.
#[tokio::test(flavor = "multi_thread")]
async fn parts_of_several_partitions_apply_in_one_transaction_as_back_to_back_batches() {
    let restock = |id: &str, sku: &str, n: i64| {
        json!({"event_id": id, "type": "restock", "sku": sku, "quantity": n}).to_string()
    };
    let sale = |id: &str, sku: &str, n: i64| {
        json!({"event_id": id, "type": "sale", "sku": sku, "quantity": n}).to_string()
    };
    let reserve = json!({"event_id": "o1", "type": "reserve", "order_id": "order-1",
                         "lines": [{"sku": "A", "quantity": 3}]})
    .to_string();
    let commit = json!({"event_id": "o2", "type": "commit", "order_id": "order-1"}).to_string();
    let parts = [
        partition_batch(
            0,
            0,
            &[
                restock("r1", "A", 10),
                reserve,
                sale("s1", "B", 1),
                "garbage".into(),
            ],
        ),
        partition_batch(
            1,
            5,
            &[
                commit,
                restock("r1", "A", 10),
                sale("s2", "A", 20),
                restock("r2", "B", 4),
                sale("s3", "B", 1),
            ],
        ),
        partition_batch(2, 9, &[restock("r2", "B", 5), sale("s4", "A", 1)]),
    ];

    let (combined_db, combined_pool, source) = migrated_store().await;
    let epochs = store::claim(&combined_pool, &source, "a", &[0, 1, 2])
        .await
        .expect("claim");
    let combined = claimed_parts(&parts, &epochs);
    let outcomes = store::apply_parts(&combined_pool, &source, &combined, Guards::On, None)
        .await
        .expect("the combined transaction");

    let (serial_db, serial_pool, _) = migrated_store().await;
    let epochs = store::claim(&serial_pool, &source, "a", &[0, 1, 2])
        .await
        .expect("claim");
    let mut serial = Vec::new();
    for (p, batch) in parts.iter().enumerate() {
        let epoch = epochs[&(p as i32)].epoch;
        serial.push(
            apply_batch(&serial_pool, &source, batch, Guards::On, epoch)
                .await
                .expect("a batch of its own"),
        );
    }

    assert_eq!(outcomes, serial, "each part's outcome");
    assert_eq!(
        (outcomes[1].duplicates, outcomes[2].dead_letters),
        (1, 1),
        "r1 again in partition 1 is a duplicate, r2 changed in partition 2 a conflict: {outcomes:?}"
    );
    let (combined_rows, serial_rows) =
        (table_rows(&combined_db).await, table_rows(&serial_db).await);
    assert!(
        combined_rows.iter().all(|(_, rows)| !rows.is_empty()),
        "{combined_rows:?}"
    );
    assert_eq!(combined_rows, serial_rows);
    let transactions = "SELECT count(DISTINCT xmin::text) FROM processed_events";
    assert_eq!(combined_db.scalar(transactions).await, 1);
    assert_eq!(serial_db.scalar(transactions).await, 3);
}

/// A combined transaction is all or nothing: one part of a partition claimed again since, or
/// paused, and nothing of any part is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_or_paused_part_fails_the_whole_combined_transaction() {
    let (db, pool, source) = migrated_store().await;
    let first = store::claim(&pool, &source, "a", &[0, 1])
        .await
        .expect("claim");
    let again = store::claim(&pool, &source, "b", &[1])
        .await
        .expect("claim");
    let event = |id: &str| {
        json!({"event_id": id, "type": "restock", "sku": "A", "quantity": 1}).to_string()
    };
    let parts = [
        partition_batch(0, 0, &[event("e0")]),
        partition_batch(1, 0, &[event("e1")]),
    ];
    let with_epochs = |e0: i64, e1: i64| {
        vec![
            Part {
                batch: &parts[0],
                epoch: e0,
            },
            Part {
                batch: &parts[1],
                epoch: e1,
            },
        ]
    };
    let written = "SELECT (SELECT count(*) FROM processed_events)
                          + (SELECT count(*) FROM partition_offsets)";

    let stale = with_epochs(first[&0].epoch, first[&1].epoch);
    let refused = store::apply_parts(&pool, &source, &stale, Guards::On, None).await;
    assert!(matches!(refused, Err(Failure::Fenced(_))), "{refused:?}");
    assert_eq!(db.scalar(written).await, 0);

    let current = with_epochs(first[&0].epoch, again[&1].epoch);
    let mut admin = db.client().await;
    store::pauses::pause(&mut admin, &source.group, &source.topic, &[1], "test", None)
        .await
        .expect("pause");
    let refused = store::apply_parts(&pool, &source, &current, Guards::On, None).await;
    assert!(matches!(refused, Err(Failure::Paused(1))), "{refused:?}");
    assert_eq!(db.scalar(written).await, 0);

    store::pauses::resume(&admin, &source.group, &source.topic, None)
        .await
        .expect("resume");
    store::apply_parts(&pool, &source, &current, Guards::On, None)
        .await
        .expect("both parts once nothing stands in the way");
    assert_eq!(db.scalar(written).await, 4);
}

/// Sessions of the test's database waiting for a lock on a `partition_owners` row.
async fn waiting_on_owner_rows(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE '%partition_owners%'
           AND datname = current_database()",
    )
    .await
}

/// Each batch as a part, with the epoch its partition was claimed at.
fn claimed_parts<'b>(batches: &'b [Batch], claims: &HashMap<i32, Claim>) -> Vec<Part<'b>> {
    batches
        .iter()
        .map(|batch| Part {
            batch,
            epoch: batch.partition().map_or(0, |p| claims[&p].epoch),
        })
        .collect()
}

/// What the batches wrote, table by table, each row as text, in a fixed order (the ledger and
/// the reply queue in the order written).
async fn table_rows(db: &TestDb) -> Vec<(&'static str, Vec<String>)> {
    let client = db.client().await;
    let queries = [
        (
            "products",
            "SELECT row(sku, current_stock, reserved_stock, version)::text FROM products ORDER BY sku",
        ),
        (
            "processed_events",
            "SELECT row(event_id, event_type, outcome, reason, line_count, partition, \"offset\",
                        payload_digest)::text
             FROM processed_events ORDER BY event_id",
        ),
        (
            "stock_movements",
            "SELECT row(event_id, sku, delta, stock_after, reserved_delta, reserved_after)::text
             FROM stock_movements ORDER BY id",
        ),
        (
            "dead_letters",
            "SELECT row(partition, \"offset\", error)::text FROM dead_letters
             ORDER BY partition, \"offset\"",
        ),
        (
            "reservations",
            "SELECT row(order_id, event_id, status, ended_by)::text FROM reservations ORDER BY order_id",
        ),
        (
            "reply_outbox",
            // Less the expiry, which the database's clock decides.
            "SELECT row(o.event_id, r.payload::jsonb - 'expires_at')::text FROM reply_outbox o
             JOIN replies r USING (event_id) ORDER BY o.id",
        ),
        (
            "partition_offsets",
            "SELECT row(partition, next_offset)::text FROM partition_offsets ORDER BY partition",
        ),
    ];
    let mut tables = Vec::new();
    for (table, sql) in queries {
        let rows = client.query(sql, &[]).await.expect(table);
        tables.push((table, rows.iter().map(|r| r.get::<_, String>(0)).collect()));
    }
    tables
}

/// A combined transaction waits for a lock held elsewhere at most its bound (`lock_wait`), not
/// `database.lock_timeout_ms` (10 s here), and then changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_combined_transaction_gives_up_a_held_lock_at_its_bound() {
    let (db, pool, source) = migrated_store().await;
    let epochs = store::claim(&pool, &source, "a", &[0, 1])
        .await
        .expect("claim");
    let event = |id: &str, sku: &str| {
        json!({"event_id": id, "type": "restock", "sku": sku, "quantity": 1}).to_string()
    };
    let parts = [
        partition_batch(0, 0, &[event("e0", "A")]),
        partition_batch(1, 0, &[event("e1", "B")]),
    ];
    let combined = claimed_parts(&parts, &epochs);
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&inventory_consumer::domain::lock_key("B")],
        )
        .await
        .expect("holding B's lock");

    let started = std::time::Instant::now();
    let bound = Duration::from_millis(200);
    let refused = store::apply_parts(&pool, &source, &combined, Guards::On, Some(bound)).await;
    let waited = started.elapsed();
    assert!(
        matches!(refused, Err(Failure::Transient(_)))
            && format!("{refused:?}").contains("lock timeout"),
        "{refused:?}"
    );
    assert!(
        waited >= bound && waited < Duration::from_secs(5),
        "gave up after {waited:?}, not at about {bound:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM processed_events").await, 0);

    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&inventory_consumer::domain::lock_key("B")],
        )
        .await
        .expect("releasing B's lock");
    store::apply_parts(&pool, &source, &combined, Guards::On, Some(bound))
        .await
        .expect("applied once the lock is free");
    assert_eq!(db.scalar("SELECT count(*) FROM processed_events").await, 2);
}
