//! Retention against a real PostgreSQL and a broker (src/store/retention.rs): the history
//! stays bounded while events flow, its dropped periods' ledger carried forward as balances;
//! migration 8 converts a database that holds data; and the dedupe horizon must cover the
//! topic's own retention. Time is moved on by moving the periods' timestamps back
//! (`support::history`), or by periods of seconds, so nothing here waits for a day to pass.

use std::time::Duration;

use crate::support::history::{maintain, pass_days, restock};
use crate::support::{TestDb, TestEnv, batch, terminate_all, wait_until};
use inventory_consumer::store::{self, Guards, apply_batch, audit};
use inventory_devtools::history;

/// Migration 8 converts a database that holds data: 20,000 events of history, their ledger and
/// dead letters, and an order with its reservation, reply and queued reply, written on the
/// schema of migration 7. Every row is kept, every invariant and the expectation hold, new
/// batches go to the new period, and once the old rows are past their retention they are
/// dropped with the ledger's balances carried forward (after the queued reply is published).
#[tokio::test(flavor = "multi_thread")]
async fn migrating_a_filled_database_keeps_every_row_and_every_invariant() {
    const EVENTS: i64 = 20_000;
    let db = TestDb::new().await;
    store::migrate::migrate_to(&db.url, Some(7))
        .await
        .expect("migrating to 7");
    let client = db.client().await;
    history::fill(&client, EVENTS, 30, None, |_| {})
        .await
        .expect("filling");
    client
        .batch_execute(
            "INSERT INTO products (sku, current_stock, version, reserved_stock)
                 VALUES ('O-1', 10, 2, 3);
             INSERT INTO processed_events (event_id, event_type, outcome, line_count, topic,
                 partition, \"offset\", payload_digest)
                 VALUES ('o-restock', 'restock', 'applied', 1, 't', 0, 0, '\\x00'),
                        ('o-reserve', 'reserve', 'applied', 1, 't', 0, 1, '\\x01');
             INSERT INTO stock_movements (event_id, sku, delta, stock_after, reserved_delta,
                 reserved_after)
                 VALUES ('o-restock', 'O-1', 10, 10, 0, 0), ('o-reserve', 'O-1', 0, 10, 3, 3);
             INSERT INTO reservations (order_id, event_id, status, expires_at)
                 VALUES ('order-1', 'o-reserve', 'active', now() + interval '1 day');
             INSERT INTO reservation_lines VALUES ('order-1', 1, 'O-1', 3);
             INSERT INTO replies (event_id, order_id, reply_key, payload)
                 VALUES ('o-reserve', 'order-1', 'order-1', '{}');
             INSERT INTO reply_outbox (event_id) VALUES ('o-reserve');",
        )
        .await
        .expect("an order on the old schema");
    let mut expected = history::expectation(EVENTS);
    expected.stock.insert("O-1".into(), 10);
    expected.reserved.insert("O-1".into(), 3);
    expected.reservations.insert("active".into(), 1);
    expected.events += 2;
    expected.applied += 2;
    expected.replies = 1;

    const TABLES: [&str; 7] = [
        "products",
        "processed_events",
        "stock_movements",
        "dead_letters",
        "reservations",
        "replies",
        "reply_outbox",
    ];
    let mut before = Vec::new();
    for table in TABLES {
        before.push(db.scalar(&format!("SELECT count(*) FROM {table}")).await);
    }
    // Every migration after 7 (8 partitions the history; later ones must keep it whole too).
    let after_7 = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("the migrations directory")
        .filter_map(|f| {
            let name = f.ok()?.file_name().into_string().ok()?;
            name.strip_prefix('V')?
                .split("__")
                .next()?
                .parse::<u32>()
                .ok()
        })
        .filter(|v| *v > 7)
        .count();
    assert!(after_7 >= 1);
    assert_eq!(
        store::migrate::migrate(&db.url).await.expect("migrating"),
        after_7
    );
    for (table, rows) in TABLES.iter().zip(&before) {
        assert_eq!(
            db.scalar(&format!("SELECT count(*) FROM {table}")).await,
            *rows,
            "{table} lost or gained rows"
        );
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM processed_events WHERE period <> 0")
            .await,
        0,
        "the old rows are period 0"
    );
    let report = audit::audit(&client, Some(&expected))
        .await
        .expect("auditing");
    assert!(report.passed(), "{:?}", report.checks);

    // New rows take their ids and period from the converted tables.
    let mut db_settings = inventory_consumer::config::Settings::default().database;
    db_settings.url = db.url.clone();
    let pool = store::pool(&db_settings).await.expect("pool");
    let source = crate::support::source();
    let epoch = store::claim(&pool, &source, "a", &[0])
        .await
        .expect("claim")[&0]
        .epoch;
    let applied = apply_batch(
        &pool,
        &source,
        &batch(0, &[restock("new-1", 4), "{bad".to_owned()]),
        Guards::On,
        epoch,
    )
    .await
    .expect("a batch on the converted schema");
    assert_eq!((applied.applied, applied.dead_letters), (1, 1));
    assert_eq!(
        db.scalar("SELECT count(*) FROM stock_movements WHERE period = 1 AND id > 20002")
            .await,
        1,
        "the ledger's ids go on from the old identity"
    );
    expected.stock.insert("S-1".into(), 4);
    expected.events += 1;
    expected.applied += 1;
    expected.dead_letters += 1;

    // Period 0 ended at the migration; 31 days on, every table's retention has passed. The
    // queued reply keeps its period's events and replies until it is published.
    pass_days(&client, 31).await;
    let m = maintain(&db).await;
    assert!(
        m.dropped.iter().any(|d| d == "stock_movements_p0")
            && !m.dropped.iter().any(|d| d == "processed_events_p0"),
        "{m:?}"
    );
    client
        .execute("DELETE FROM reply_outbox", &[])
        .await
        .expect("the relay publishes");
    let m = maintain(&db).await;
    assert!(
        m.dropped.iter().any(|d| d == "processed_events_p0"),
        "{m:?}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM ledger_openings").await,
        10_001,
        "every SKU of period 0 has its balance carried forward"
    );
    let report = audit::audit(&client, Some(&expected))
        .await
        .expect("auditing");
    assert!(report.passed(), "{:?}", report.checks);
}

/// The soak, shortened: two replicas with periods of 2 s, a dedupe horizon of 20 s and the
/// ledger and dead letters kept 4 s, while events with duplicates and bad messages flow for
/// about a minute. The history tables stay flat (bounded by what the retentions hold) while
/// their partitions are dropped, `verify` passes throughout, and at the end the stock and
/// every count equal the oracle: no event applied twice within the horizon, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn history_stays_bounded_while_events_flow_and_verify_holds_throughout() {
    let env = TestEnv::new(4).await;
    let settings = [
        ("history.period_s", "2"),
        ("history.dedupe_horizon_s", "20"),
        ("history.ledger_retention_s", "4"),
        ("history.dead_letter_retention_s", "4"),
    ];
    let mut replicas = vec![env.replica("r1", &settings), env.replica("r2", &settings)];
    wait_until("the group to form", Duration::from_secs(120), || async {
        replicas.iter().all(|r| !r.owned().is_empty())
    })
    .await;
    // 150 events/s for 60 s; a duplicate repeats one of the last 1,000 events (under 7 s
    // back), well inside the horizon.
    let producer = env.produce_in_background(&[
        "--events",
        "9000",
        "--skus",
        "300",
        "--duplicates",
        "0.05",
        "--invalid",
        "0.01",
        "--seed",
        "14",
        "--rate",
        "150",
    ]);
    let started = std::time::Instant::now();
    let mut samples: Vec<(f64, i64, i64)> = Vec::new();
    let mut verified = 0;
    // A sample every 5 s from the start, however long each `verify` takes (under 5 s): 11 in
    // all, the last 5 past 30 s.
    let every = Duration::from_secs(5);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while started.elapsed() < Duration::from_secs(55) {
        ticks.tick().await;
        let events = env.db.scalar("SELECT count(*) FROM processed_events").await;
        let movements = env.db.scalar("SELECT count(*) FROM stock_movements").await;
        samples.push((started.elapsed().as_secs_f64(), events, movements));
        let (ok, report) = env.verify(None);
        assert!(ok, "verify failed while events flowed:\n{report}");
        verified += 1;
    }
    let expected = producer.finish();
    env.wait_processed(
        (expected.events + expected.dead_letters) as i64,
        Duration::from_secs(120),
    )
    .await;
    let (ok, report) = env.verify(Some(&expected));
    let total = terminate_all(&mut replicas, Duration::from_secs(30));
    println!("samples (s, processed_events, stock_movements): {samples:?}; {total:?}");
    assert!(ok, "verify against the oracle failed:\n{report}");
    assert!(
        verified >= 8,
        "verify ran {verified} times while events flowed"
    );

    // Rows a retention may hold: its span plus a period and the maintenance interval, at 150
    // events/s (and at most one movement per event here: one-line events).
    let bound = |retention_s: f64| ((retention_s + 2.0 + 1.0 + 2.0) * 150.0 * 1.2) as i64;
    let late: Vec<_> = samples.iter().filter(|(t, _, _)| *t > 30.0).collect();
    assert!(late.len() >= 4, "{samples:?}");
    for (t, events, movements) in &late {
        assert!(
            *events <= bound(20.0) && *movements <= bound(4.0),
            "history grew at {t:.0} s: {events} events, {movements} movements (bounds {}, {})",
            bound(20.0),
            bound(4.0)
        );
    }
    for (what, column) in [
        ("events", "events_dropped"),
        ("movements", "movements_dropped"),
        ("dead letters", "dead_letters_dropped"),
    ] {
        let dropped = env
            .db
            .scalar(&format!(
                "SELECT sum({column})::bigint FROM history_periods"
            ))
            .await;
        assert!(dropped > 0, "no {what} were dropped");
    }
    assert!(
        env.db.scalar("SELECT count(*) FROM ledger_openings").await > 0,
        "no balance was carried forward"
    );
}

/// On Apache Kafka the replica reads the topic's retention at start-up: a dedupe horizon
/// shorter than `retention.ms` plus `segment.ms` (Kafka's defaults: 7 days each) plus an
/// hour's margin is refused with exit 2 naming the key, and the default horizon (15 days) is
/// accepted as covering it.
#[tokio::test(flavor = "multi_thread")]
async fn a_dedupe_horizon_shorter_than_the_topics_retention_is_refused() {
    let env = TestEnv::on_apache(2, 1).await;
    let mut short = env.replica(
        "short",
        &[
            ("history.period_s", "3600"),
            ("history.dedupe_horizon_s", "1209600"),
        ],
    );
    let (status, _) = short.wait_exit(Duration::from_secs(60));
    let log = short.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("history.dedupe_horizon_s") && log.contains("1213200 s"),
        "the refusal names the key and the topic's span:\n{log}"
    );

    let default = env.replica("default", &[]);
    wait_until(
        "the default replica to join",
        Duration::from_secs(120),
        || async { !default.owned().is_empty() },
    )
    .await;
    // The check runs beside the start-up (src/cli/run.rs), not before the join: its answer may
    // come after the first assignment, within the broker's answer time.
    wait_until(
        "the default replica to find the horizon covers the retention",
        Duration::from_secs(60),
        || async { default.has_event("horizon_covered") },
    )
    .await;
}
