//! Order sagas (docs/contract.md section 7) through real replicas: reservations compete for stock
//! across partitions and replicas, commits and releases settle them, expiries release them on
//! their own; the audit behind `verify` checks the reserved stock against the reservations and
//! the ledger.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::oracle::{assert_database_matches, truth_of};
use crate::support::orders::{
    PARTITIONS, Replies, outcomes, published, replies, send_events, stock_of, three_replicas,
    wait_for_events, wait_for_replies,
};
use crate::support::{EXIT, SETTLE};
use crate::support::{TestEnv, http_get, metric, terminate_all, wait_until};

/// 1,000 orders of one unit each for a SKU with 100 in stock, over 12 partitions and 3
/// replicas: exactly 100 reservations are applied and 900 rejected `insufficient_stock`; a sale
/// of the SKU meanwhile is rejected (every unit is reserved); 60 commits and 40 releases leave
/// 40 in stock, none reserved; the audit holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_orders_compete_for_a_hundred_units() {
    let env = TestEnv::new(PARTITIONS).await;
    let mut replicas = three_replicas(&env, &[]).await;
    send_events(
        &env,
        &[(
            0,
            "HOT".into(),
            json!({"event_id": "hot-restock", "type": "restock", "sku": "HOT", "quantity": 100}),
        )],
    );
    wait_for_events(&env, 1).await;

    let reserves: Vec<(i32, String, serde_json::Value)> = (0..1000)
        .map(|i| {
            let order = format!("order-{i:04}");
            let event = json!({"event_id": format!("{order}-r"), "type": "reserve",
                "order_id": order, "sku": "HOT", "quantity": 1, "ttl_seconds": 3600});
            (i % PARTITIONS, order, event)
        })
        .collect();
    send_events(&env, &reserves);
    wait_for_events(&env, 1001).await;
    assert_eq!(outcomes(&env, "reserve", "applied", "").await, 100);
    assert_eq!(
        outcomes(&env, "reserve", "rejected", "insufficient_stock").await,
        900
    );
    assert_eq!(stock_of(&env, "HOT").await, (100, 100));

    send_events(
        &env,
        &[(
            0,
            "HOT".into(),
            json!({"event_id": "hot-sale", "type": "sale", "sku": "HOT", "quantity": 1}),
        )],
    );
    wait_for_events(&env, 1002).await;
    assert_eq!(
        outcomes(&env, "sale", "rejected", "insufficient_stock").await,
        1,
        "every unit is reserved"
    );

    let client = env.db.client().await;
    let active: Vec<String> = client
        .query(
            "SELECT order_id FROM reservations WHERE status = 'active' ORDER BY order_id",
            &[],
        )
        .await
        .expect("reservations")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(active.len(), 100);
    let settle: Vec<(i32, String, serde_json::Value)> = active
        .iter()
        .enumerate()
        .map(|(n, order)| {
            let i: i32 = order["order-".len()..].parse().expect("order number");
            let (kind, suffix) = if n < 60 {
                ("commit", "c")
            } else {
                ("release", "x")
            };
            let event =
                json!({"event_id": format!("{order}-{suffix}"), "type": kind, "order_id": order});
            (i % PARTITIONS, order.clone(), event)
        })
        .collect();
    send_events(&env, &settle);
    wait_for_events(&env, 1102).await;
    assert_eq!(outcomes(&env, "commit", "applied", "").await, 60);
    assert_eq!(outcomes(&env, "release", "applied", "").await, 40);
    assert_eq!(stock_of(&env, "HOT").await, (40, 0));

    // One reply per request, read back from the results topic.
    wait_for_replies(&env, 1100).await;
    terminate_all(&mut replicas, EXIT);
    let replies = replies(&env).by_request;
    assert_eq!(replies.len(), 1100, "one distinct reply per order step");
    let count = |kind: &str, outcome: &str| {
        replies
            .iter()
            .filter(|(id, (o, _))| id.ends_with(kind) && o == outcome)
            .count()
    };
    assert_eq!(count("-r", "applied"), 100);
    assert_eq!(count("-r", "rejected"), 900);
    assert!(
        replies
            .iter()
            .filter(|(id, (o, _))| id.ends_with("-r") && o == "rejected")
            .all(|(_, (_, reason))| reason.as_deref() == Some("insufficient_stock"))
    );
    assert_eq!(count("-c", "applied"), 60);
    assert_eq!(count("-x", "applied"), 40);

    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// A reservation with a 2-second TTL expires on its own (the sweeper, by the database clock);
/// a commit arriving after that is rejected `no_active_reservation`; the expiry is recorded
/// once as `expire:<order_id>`, with its ledger rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_expires_on_its_own_and_a_late_commit_is_rejected() {
    let env = TestEnv::new(3).await;
    let mut replicas = vec![
        env.replica("r1", &[("reservations.sweep_interval_ms", "200")]),
        env.replica("r2", &[("reservations.sweep_interval_ms", "200")]),
    ];
    send_events(
        &env,
        &[
            (
                0,
                "A".into(),
                json!({"event_id": "a-restock", "type": "restock", "sku": "A", "quantity": 5}),
            ),
            (
                0,
                "o-late".into(),
                json!({"event_id": "late-r", "type": "reserve", "order_id": "o-late",
                       "lines": [{"sku": "A", "quantity": 3}], "ttl_seconds": 2}),
            ),
        ],
    );
    wait_for_events(&env, 2).await;
    assert_eq!(outcomes(&env, "reserve", "applied", "").await, 1);
    // Reserved, unless the sweeper was quicker than this read.
    let (on_hand, reserved) = stock_of(&env, "A").await;
    assert!(
        on_hand == 5 && (reserved == 3 || reserved == 0),
        "{on_hand} {reserved}"
    );
    wait_until("the reservation to expire", Duration::from_secs(15), || async {
        env.db
            .scalar("SELECT count(*) FROM reservations WHERE order_id = 'o-late' AND status = 'expired'")
            .await
            == 1
    })
    .await;
    assert_eq!(stock_of(&env, "A").await, (5, 0));
    send_events(
        &env,
        &[(
            0,
            "o-late".into(),
            json!({"event_id": "late-c", "type": "commit", "order_id": "o-late"}),
        )],
    );
    wait_for_events(&env, 4).await;
    assert_eq!(
        outcomes(&env, "commit", "rejected", "no_active_reservation").await,
        1
    );
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM processed_events WHERE event_id = 'expire:o-late'")
            .await,
        1
    );
    assert_eq!(stock_of(&env, "A").await, (5, 0));
    wait_for_replies(&env, 3).await;
    // The reserve sent again changes nothing and publishes its recorded reply again.
    send_events(
        &env,
        &[(
            0,
            "o-late".into(),
            json!({"event_id": "late-r", "type": "reserve", "order_id": "o-late",
                   "lines": [{"sku": "A", "quantity": 3}], "ttl_seconds": 2}),
        )],
    );
    wait_until(
        "the re-sent reserve to be published again",
        SETTLE,
        || async {
            published(&env) == 4 && env.db.scalar("SELECT count(*) FROM reply_outbox").await == 0
        },
    )
    .await;
    assert_eq!(stock_of(&env, "A").await, (5, 0));
    terminate_all(&mut replicas, EXIT);
    let Replies {
        by_request,
        by_order,
    } = replies(&env);
    assert_eq!(
        by_order["o-late"],
        ["late-r", "expire:o-late", "late-c"],
        "an order's replies in the order of its steps"
    );
    let expiry_rows = env
        .db
        .scalar("SELECT count(*) FROM stock_movements WHERE event_id = 'expire:o-late' AND reserved_delta = -3 AND delta = 0")
        .await;
    assert_eq!(expiry_rows, 1, "the expiry released the units once");
    assert_eq!(
        by_request,
        BTreeMap::from([
            ("late-r".to_owned(), ("applied".to_owned(), None)),
            ("expire:o-late".to_owned(), ("applied".to_owned(), None)),
            (
                "late-c".to_owned(),
                (
                    "rejected".to_owned(),
                    Some("no_active_reservation".to_owned())
                )
            ),
        ])
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// The commit's own check of the expiry, by the database clock, with no sweep to help: a
/// commit that arrives after its reservation's expiry is rejected even though the reservation
/// is still marked active (the sweeper runs hourly here).
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_after_the_expiry_is_rejected_before_any_sweep() {
    let env = TestEnv::new(3).await;
    let mut replica = env.replica("r1", &[("reservations.sweep_interval_ms", "3600000")]);
    send_events(
        &env,
        &[
            (
                0,
                "B".into(),
                json!({"event_id": "b-restock", "type": "restock", "sku": "B", "quantity": 2}),
            ),
            (
                0,
                "o-clock".into(),
                json!({"event_id": "clock-r", "type": "reserve", "order_id": "o-clock",
                       "sku": "B", "quantity": 2, "ttl_seconds": 1}),
            ),
        ],
    );
    wait_for_events(&env, 2).await;
    // The replica's hourly sweep ran once at start-up, before the reservation existed.
    wait_until("the expiry to pass by the database clock", SETTLE, || async {
        env.db
            .scalar("SELECT count(*) FROM reservations WHERE order_id = 'o-clock' AND expires_at < now()")
            .await
            == 1
    })
    .await;
    send_events(
        &env,
        &[(
            0,
            "o-clock".into(),
            json!({"event_id": "clock-c", "type": "commit", "order_id": "o-clock"}),
        )],
    );
    wait_for_events(&env, 3).await;
    assert_eq!(
        outcomes(&env, "commit", "rejected", "no_active_reservation").await,
        1
    );
    assert_eq!(
        env.db
            .scalar(
                "SELECT count(*) FROM reservations WHERE order_id = 'o-clock' AND status = 'active'"
            )
            .await,
        1,
        "no sweep yet: the commit decided by the clock alone"
    );
    assert_eq!(
        stock_of(&env, "B").await,
        (2, 2),
        "still reserved until the sweep"
    );
    assert!(replica.terminate(EXIT).0.success());
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// Generated order traffic (`produce --orders`: reserves, then commits, releases, nothing, or
/// an expiry) mixed with stock events, re-sent duplicates and bad messages, through 3 replicas
/// on Apache Kafka, one of them SIGKILLed mid-stream and replaced: the database and the results
/// topic match the tests' own model exactly (stock, reserved stock, reservations by status, one
/// reply per order step and per expiry, with its outcome), and `verify` agrees with the
/// expectation `produce` computed.
#[tokio::test(flavor = "multi_thread")]
async fn generated_order_traffic_matches_the_model() {
    let env = TestEnv::on_apache(PARTITIONS, 1).await;
    let mut replicas = three_replicas(&env, &[]).await;
    let producer = env.produce_in_background(&[
        "--events",
        "12000",
        "--skus",
        "300",
        "--orders",
        "0.4",
        "--duplicates",
        "0.05",
        "--invalid",
        "0.01",
        "--seed",
        "13",
        "--rate",
        "3000",
    ]);
    wait_until("a third of the events to settle", SETTLE, || async {
        env.db.settled().await >= 4_000
    })
    .await;
    replicas[1].kill();
    replicas.push(env.replica("r4", &[]));
    let expected = producer.finish();
    env.wait_processed((expected.events + expected.dead_letters) as i64, SETTLE)
        .await;
    let truth = truth_of(&env);
    let expiring = truth.reservations.get("expired").copied().unwrap_or(0) as i64;
    assert!(expiring > 0, "the workload has expiring orders");
    wait_until("the short reservations to expire", SETTLE, || async {
        env.db
            .scalar("SELECT count(*) FROM reservations WHERE status = 'expired'")
            .await
            >= expiring
    })
    .await;
    wait_for_replies(&env, truth.replies.len() as i64).await;
    terminate_all(&mut replicas[..1], EXIT);
    terminate_all(&mut replicas[2..], EXIT);

    assert_database_matches(&env.db, &truth).await;
    assert!(!truth.replies.is_empty(), "the model expects no reply");
    assert_eq!(
        replies(&env).by_request,
        truth.replies,
        "the replies published differ from the reference model"
    );
    println!(
        "generated orders: {} events, {} replies, reservations {:?}",
        truth.events,
        truth.replies.len(),
        truth.reservations
    );
    assert_eq!(
        (expected.replies, &expected.reservations),
        (truth.replies.len() as u64, &truth.reservations),
        "produce's expectation agrees with the model"
    );
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// 70 orders of 100 lines each, over 7,000 distinct SKUs, committed together in one partition:
/// one batch would take more SKU locks than PostgreSQL's default lock table holds in all
/// (6,400), so the replica applies it in parts (`inventory_batch_splits_total`), in order; every
/// commit applies and the audit holds.
#[tokio::test(flavor = "multi_thread")]
async fn commits_of_wide_reservations_are_applied_in_parts() {
    let env = TestEnv::new(PARTITIONS).await;
    // A long linger: the 70 commits meet in one batch.
    let mut replica = env.replica("r1", &[("processing.batch_linger_ms", "2000")]);
    const ORDERS: usize = 70;
    let lines = |order: usize| -> Vec<serde_json::Value> {
        (0..100)
            .map(|l| json!({"sku": format!("W{order:03}-{l:03}"), "quantity": 1}))
            .collect()
    };
    let mut setup = Vec::new();
    for order in 0..ORDERS {
        setup.push((
            0,
            "wide".to_owned(),
            json!({"event_id": format!("wide-{order}-stock"),
            "type": "restock", "lines": lines(order)}),
        ));
        setup.push((
            0,
            "wide".to_owned(),
            json!({"event_id": format!("wide-{order}-r"),
            "type": "reserve", "order_id": format!("wide-{order}"), "lines": lines(order),
            "ttl_seconds": 3600}),
        ));
    }
    send_events(&env, &setup);
    wait_for_events(&env, 2 * ORDERS as i64).await;
    assert_eq!(
        outcomes(&env, "reserve", "applied", "").await,
        ORDERS as i64,
        "every order reserved"
    );
    let commits: Vec<(i32, String, serde_json::Value)> = (0..ORDERS)
        .map(|order| {
            (
                0,
                "wide".to_owned(),
                json!({"event_id": format!("wide-{order}-c"),
                "type": "commit", "order_id": format!("wide-{order}")}),
            )
        })
        .collect();
    send_events(&env, &commits);
    wait_for_events(&env, 3 * ORDERS as i64).await;
    assert_eq!(
        outcomes(&env, "commit", "applied", "").await,
        ORDERS as i64,
        "every commit applied"
    );
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM products WHERE current_stock = 0 AND reserved_stock = 0")
            .await,
        (ORDERS * 100) as i64,
        "every unit sold"
    );
    let (_, metrics) = http_get(&replica.http_addr().await, "/metrics");
    let splits = metric(&metrics, "inventory_batch_splits_total", &[]);
    println!("wide commits: {splits} batch splits");
    assert!(splits >= 1.0, "the batch of commits was split: {splits}");
    replica.terminate(EXIT);
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// No reservation holds stock for longer than `reservations.max_ttl_s` (here set to a day, as
/// a user would): a reserve whose `expires_at` lies further ahead (`9999-12-31`), or whose
/// `ttl_seconds` is longer, is rejected (`invalid_expires_at`, `invalid_ttl`), holds nothing,
/// and its order gets the rejection as its reply; one within the day is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_past_the_maximum_ttl_is_rejected_with_a_reply() {
    let env = TestEnv::new(3).await;
    let mut replica = env.replica("r1", &[("reservations.max_ttl_s", "86400")]);
    let reserve = |order: &str, expiry: (&str, serde_json::Value)| {
        let mut event = json!({"event_id": format!("{order}-r"), "type": "reserve",
                               "order_id": order, "sku": "C", "quantity": 1});
        event[expiry.0] = expiry.1;
        (0, order.to_owned(), event)
    };
    send_events(
        &env,
        &[
            (
                0,
                "C".into(),
                json!({"event_id": "c-restock", "type": "restock", "sku": "C", "quantity": 5}),
            ),
            reserve("far", ("expires_at", json!("9999-12-31T00:00:00Z"))),
            reserve("long", ("ttl_seconds", json!(86_401))),
            reserve("day", ("ttl_seconds", json!(86_400))),
        ],
    );
    wait_for_events(&env, 4).await;
    wait_for_replies(&env, 3).await;
    assert_eq!(
        outcomes(&env, "reserve", "rejected", "invalid_expires_at").await,
        1
    );
    assert_eq!(
        outcomes(&env, "reserve", "rejected", "invalid_ttl").await,
        1
    );
    assert_eq!(outcomes(&env, "reserve", "applied", "").await, 1);
    assert_eq!(
        stock_of(&env, "C").await,
        (5, 1),
        "only the day's reservation holds"
    );
    let replies = replies(&env);
    for (request, outcome, reason) in [
        ("far-r", "rejected", Some("invalid_expires_at")),
        ("long-r", "rejected", Some("invalid_ttl")),
        ("day-r", "applied", None),
    ] {
        assert_eq!(
            replies.by_request.get(request),
            Some(&(outcome.to_owned(), reason.map(str::to_owned))),
            "{request}"
        );
    }
    assert!(replica.terminate(EXIT).0.success());
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}
