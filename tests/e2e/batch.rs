//! The batch transaction driven directly (no Kafka) against a real PostgreSQL, where what it
//! sends the server matters beyond its effect.

use serde_json::json;

use crate::support::{batch, connect, source};
use inventory_consumer::config::Settings;
use inventory_consumer::store::{self, Guards, apply_batch};
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
