//! End-to-end tests: the real binary as separate processes, a broker (Apache Kafka for the
//! group scenarios and broker failures, the embedded one elsewhere), a real PostgreSQL, and the
//! database checked against an oracle of what was produced.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario reads top to bottom as the story it checks, and the reference model as the contract it follows"
)]

mod batch;
mod dead_letters;
mod faults;
mod group;
mod kafka_security;
mod operations;
mod oracle;
mod pauses;
mod periods;
mod recovery;
mod replay;
mod replies;
mod reservations;
mod retention;
mod settings;
mod stall;
mod standing;
mod support;
mod tls;
mod traces;
mod upgrade;

use crate::support::{EXIT, SETTLE};
use serde_json::json;
use support::{TestEnv, wait_for_group, wait_until};

/// One replica, a workload of 20,000 events over 1,000 SKUs with 5% re-sent duplicates and
/// 1% malformed messages: the database ends equal to the oracle, and the duplicates the
/// replica skipped are exactly the ones the producer injected (no redelivery).
#[tokio::test(flavor = "multi_thread")]
async fn single_replica_applies_a_workload_exactly_once() {
    let env = TestEnv::new(12).await;
    let mut replica = env.replica("r1", &[]);
    let expected = env.produce(&[
        "--events",
        "20000",
        "--skus",
        "1000",
        "--duplicates",
        "0.05",
        "--invalid",
        "0.01",
        "--seed",
        "42",
    ]);
    assert_eq!(expected.events, 20_000);
    assert!(
        expected.duplicates > 500 && expected.dead_letters > 100,
        "{expected:?}"
    );

    env.wait_processed((expected.events + expected.dead_letters) as i64, SETTLE)
        .await;
    let (status, stats) = replica.terminate(EXIT);
    assert!(status.success(), "replica exit: {status}");

    assert_eq!(stats.applied, expected.applied);
    assert_eq!(stats.rejected, expected.rejected);
    assert_eq!(stats.dead_letters, expected.dead_letters);
    assert_eq!(
        stats.duplicates, expected.duplicates,
        "skipped duplicates must equal injected duplicates: nothing redelivered"
    );
    assert_eq!(
        env.db.scalar("SELECT count(*) FROM processed_events").await,
        expected.events as i64
    );
    assert_eq!(
        env.db.scalar("SELECT count(DISTINCT (partition, \"offset\")) FROM dead_letters WHERE payload IS NOT NULL").await,
        expected.dead_letters as i64,
        "every malformed message kept with its payload and position"
    );
    assert_eq!(env.db.stock().await, expected.stock);
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// Stock 10, then 200 sales of one unit with random keys over 12 partitions, consumed by two
/// processes at once: the advisory lock serializes the SKU across processes, so exactly 10
/// sales are applied and 190 rejected.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_never_oversell() {
    let env = TestEnv::new(12).await;
    let mut r1 = env.replica("r1", &[]);
    let mut r2 = env.replica("r2", &[]);
    // Both must own partitions before the sales are sent, or one could do all the work.
    wait_for_group(&[&r1, &r2], 12, SETTLE).await;

    env.produce_json(
        &[json!({"event_id": "restock-1", "type": "restock", "sku": "HOT-1", "quantity": 10})],
        false,
    );
    wait_until("the restock", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await == 1
    })
    .await;
    let sales: Vec<_> = (0..200)
        .map(|i| json!({"event_id": format!("sale-{i}"), "type": "sale", "sku": "HOT-1", "quantity": 1}))
        .collect();
    env.produce_json(&sales, true);
    wait_until("all sales to settle", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await == 201
    })
    .await;

    let applied = env
        .db
        .scalar("SELECT count(*) FROM processed_events WHERE event_type = 'sale' AND outcome = 'applied'")
        .await;
    let rejected = env
        .db
        .scalar("SELECT count(*) FROM processed_events WHERE outcome = 'rejected' AND reason = 'insufficient_stock'")
        .await;
    assert_eq!((applied, rejected), (10, 190));
    assert_eq!(env.db.stock().await["HOT-1"], 0);

    let (s1, a) = r1.terminate(EXIT);
    let (s2, b) = r2.terminate(EXIT);
    assert!(s1.success() && s2.success());
    assert!(
        a.applied + a.rejected > 0 && b.applied + b.rejected > 0,
        "both processes must have decided sales: {a:?} {b:?}"
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// Multi-line sales over SKUs that live in different partitions, consumed concurrently by two
/// processes: locks in sorted order mean no deadlock, and every event is all-or-nothing.
#[tokio::test(flavor = "multi_thread")]
async fn multi_line_events_across_partitions_are_atomic_without_deadlock() {
    let env = TestEnv::new(12).await;
    let mut r1 = env.replica("r1", &[("processing.batch_max_events", "20")]);
    let mut r2 = env.replica("r2", &[("processing.batch_max_events", "20")]);
    // Both must own partitions before the events are sent, or one could do all the work.
    wait_for_group(&[&r1, &r2], 12, SETTLE).await;
    let skus: Vec<String> = (0..12).map(|i| format!("M-{i}")).collect();
    let restocks: Vec<_> = skus
        .iter()
        .map(|s| json!({"event_id": format!("seed-{s}"), "type": "restock", "sku": s, "quantity": 150}))
        .collect();
    env.produce_json(&restocks, false);
    wait_until("the restocks", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM products").await == 12
    })
    .await;

    // Each sale takes 1-3 units from 2-5 distinct SKUs, in varying order: demand exceeds
    // supply, so many are rejected, and a partial application would show in the ledger.
    let mut rng_state = 7u64;
    let mut next = move |n: u64| {
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng_state >> 33) % n
    };
    let sales: Vec<_> = (0..1_500)
        .map(|i| {
            let count = 2 + next(4) as usize;
            // A partial Fisher-Yates shuffle: `count` distinct SKUs in random order.
            let mut order: Vec<usize> = (0..12).collect();
            for k in 0..count {
                let j = k + next((12 - k) as u64) as usize;
                order.swap(k, j);
            }
            let chosen = &order[..count];
            let lines: Vec<_> = chosen
                .iter()
                .map(|&s| json!({"sku": skus[s], "quantity": 1 + next(3)}))
                .collect();
            json!({"event_id": format!("order-{i}"), "type": "sale", "lines": lines})
        })
        .collect();
    env.produce_json(&sales, true);
    wait_until("all orders to settle", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await == 1_512
    })
    .await;

    let partial = env
        .db
        .scalar(
            "SELECT count(*) FROM processed_events e
             WHERE e.outcome = 'applied' AND e.line_count <>
                   (SELECT count(*) FROM stock_movements m WHERE m.event_id = e.event_id)
                OR e.outcome = 'rejected' AND EXISTS
                   (SELECT 1 FROM stock_movements m WHERE m.event_id = e.event_id)",
        )
        .await;
    assert_eq!(partial, 0, "an order was partly applied");
    let rejected = env
        .db
        .scalar("SELECT count(*) FROM processed_events WHERE outcome = 'rejected'")
        .await;
    assert!(rejected > 0, "the workload must exhaust some stock");
    let sold = env
        .db
        .scalar("SELECT coalesce(-sum(delta), 0)::bigint FROM stock_movements WHERE delta < 0")
        .await;
    let left = env
        .db
        .scalar("SELECT sum(current_stock)::bigint FROM products")
        .await;
    assert_eq!(sold + left, 12 * 150);

    let (s1, a) = r1.terminate(EXIT);
    let (s2, b) = r2.terminate(EXIT);
    assert!(s1.success() && s2.success());
    assert!(
        a.batches > 0 && b.batches > 0,
        "both processes worked: {a:?} {b:?}"
    );
    for r in [&a, &b] {
        assert_eq!(
            r.retries, 0,
            "no transaction needed a retry (no deadlock): {r:?}"
        );
    }
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// A replica that dies after its transactions committed but before any Kafka offset commit:
/// its successor resumes where the database says each partition stands (the offset recorded
/// in the batch's own transaction), so nothing is redelivered and nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn crash_between_database_commit_and_offset_commit_changes_nothing() {
    let env = TestEnv::new(6).await;
    // Kafka offsets would be committed only after ten minutes: the kill always comes first.
    let mut first = env.replica("first", &[("processing.commit_interval_ms", "600000")]);
    let expected = env.produce(&["--events", "3000", "--skus", "200", "--seed", "9"]);
    wait_until("the workload to be applied", SETTLE, || async {
        env.db.settled().await == expected.events as i64
    })
    .await;
    assert_eq!(
        env.lag(),
        expected.messages as i64,
        "no Kafka offset committed yet"
    );
    let stock_before = env.db.stock().await;
    first.kill();

    let mut second = env.replica("second", &[]);
    wait_until(
        "the successor to commit the recorded offsets",
        SETTLE,
        || async { env.lag() == 0 },
    )
    .await;
    let (status, stats) = second.terminate(EXIT);
    assert!(status.success());
    assert_eq!(
        (stats.applied, stats.rejected, stats.duplicates),
        (0, 0, 0),
        "the successor resumed exactly where the database stood"
    );
    assert_eq!(env.db.stock().await, stock_before);
    assert_eq!(env.db.stock().await, expected.stock);
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// Every message delivered again (a new consumer group replays the topic into the same
/// database, as after an offset reset): each redelivered event is recognised as a duplicate
/// and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_topic_changes_nothing() {
    let env = TestEnv::new(6).await;
    let mut first = env.replica("first", &[]);
    let expected = env.produce(&[
        "--events",
        "3000",
        "--skus",
        "200",
        "--invalid",
        "0.02",
        "--seed",
        "11",
    ]);
    wait_until("the workload to be applied", SETTLE, || async {
        env.db.settled().await == (expected.events + expected.dead_letters) as i64
    })
    .await;
    first.terminate(EXIT);
    let stock_before = env.db.stock().await;

    let mut replay = env.replica("replay", &[("kafka.group_id", "replay-group")]);
    wait_until("the replay to be consumed", SETTLE, || async {
        env.broker.lag("replay-group") == 0
    })
    .await;
    let (status, stats) = replay.terminate(EXIT);
    assert!(status.success());
    assert_eq!((stats.applied, stats.rejected), (0, 0));
    assert_eq!(
        stats.duplicates, expected.events,
        "every event was redelivered and skipped"
    );
    assert_eq!(
        env.db.scalar("SELECT count(*) FROM dead_letters").await,
        expected.dead_letters as i64,
        "a redelivered bad message is kept once"
    );
    assert_eq!(env.db.stock().await, stock_before);
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// A migrated database holding one applied restock of one unit of SKU `S` (event `e`), written
/// directly: the audit tests below then break it.
async fn one_restock_applied() -> (support::TestEnv, tokio_postgres::Client) {
    let env = support::TestEnv::new(1).await;
    inventory_consumer::store::migrate::migrate(&env.db.url)
        .await
        .expect("migrating");
    let db = env.db.client().await;
    db.batch_execute(
        "INSERT INTO products (sku, current_stock, version) VALUES ('S', 1, 1);
         INSERT INTO processed_events (event_id, event_type, outcome, line_count, topic,
             partition, \"offset\", payload_digest, period)
         VALUES ('e', 'restock', 'applied', 1, 't', 0, 0, '\\x00', current_history_period());
         INSERT INTO stock_movements (event_id, sku, delta, stock_after, period)
             VALUES ('e', 'S', 1, 1, current_history_period());",
    )
    .await
    .expect("a consistent ledger");
    (env, db)
}

/// The ledger's foreign keys are gone (they cost most of the server's time per event): the
/// audit behind `verify` is what catches a ledger row naming an unknown event or product.
#[tokio::test(flavor = "multi_thread")]
async fn verify_catches_ledger_rows_without_their_event_or_product() {
    let (env, db) = one_restock_applied().await;
    let (ok, report) = env.verify(None);
    assert!(ok, "a consistent ledger passes:\n{report}");
    for stray in [
        "UPDATE stock_movements SET event_id = 'nobody'",
        "UPDATE stock_movements SET event_id = 'e', sku = 'NOPE'",
    ] {
        db.batch_execute(stray).await.expect("a stray ledger row");
        let (ok, report) = env.verify(None);
        assert!(
            !ok && report.contains("FAIL ledger rows name recorded events and known products"),
            "{stray}:\n{report}"
        );
    }
}

/// The CHECK constraints of `processed_events` are gone too (migration 14: they cost about a
/// tenth of the row's insert): the audit catches a row that breaks one of their rules.
#[tokio::test(flavor = "multi_thread")]
async fn verify_catches_event_rows_that_break_the_rules_the_table_no_longer_checks() {
    let (env, db) = one_restock_applied().await;
    let (ok, report) = env.verify(None);
    assert!(ok, "a consistent database passes:\n{report}");
    // Each rule broken on its own, then mended.
    for (broken, mended) in [
        ("event_type = 'gift'", "event_type = 'restock'"),
        ("outcome = 'maybe'", "outcome = 'applied'"),
        ("reason = 'insufficient_stock'", "reason = NULL"),
        ("line_count = 101", "line_count = 1"),
        (
            "partition = NULL, \"offset\" = NULL",
            "partition = 0, \"offset\" = 0",
        ),
        ("event_type = 'expire'", "event_type = 'restock'"),
    ] {
        db.batch_execute(&format!("UPDATE processed_events SET {broken}"))
            .await
            .expect("breaking a rule");
        let (ok, report) = env.verify(None);
        assert!(
            !ok && report.contains("FAIL event rows as recorded"),
            "{broken}:\n{report}"
        );
        db.batch_execute(&format!("UPDATE processed_events SET {mended}"))
            .await
            .expect("mending it");
    }
    let (ok, report) = env.verify(None);
    assert!(ok, "mended, the database passes again:\n{report}");
}
