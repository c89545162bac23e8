//! Replies to order steps (docs/contract.md section 7) through real replicas: published at
//! least once and in order per order, across a replica killed mid-stream, and stock events'
//! outcomes too when `results.all_events` asks for them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::support::orders::{
    PARTITIONS, Replies, published, replies, restock_each, send_events, three_replicas,
    wait_for_events, wait_for_replies,
};
use crate::support::{
    EXIT, RESULTS_TOPIC, SETTLE, TestEnv, read_whole_topic, terminate_all, wait_until,
};

/// Replies survive a replica killed mid-stream: 600 orders over 12 partitions and 3 replicas,
/// each reserved, then committed or released (some for orders never reserved, some reserved
/// twice), while one replica is SIGKILLed. Every order step in the database has a reply in the
/// results topic with the outcome and reason the database recorded: duplicates are allowed,
/// missing replies and wrong outcomes are not.
#[tokio::test(flavor = "multi_thread")]
async fn replies_survive_a_replica_killed_mid_stream() {
    let env = TestEnv::new(PARTITIONS).await;
    let mut replicas = three_replicas(&env, &[]).await;
    let skus = ["K0", "K1", "K2", "K3"];
    restock_each(&env, &skus, 150).await;

    let mut steps = Vec::new();
    for i in 0..600 {
        let order = format!("kill-{i:04}");
        let p = i % PARTITIONS;
        let sku = skus[i as usize % skus.len()];
        if i % 10 != 9 {
            steps.push((p, order.clone(), json!({"event_id": format!("{order}-r"), "type": "reserve",
                "order_id": order, "lines": [{"sku": sku, "quantity": 1 + i % 3}], "ttl_seconds": 3600})));
        }
        if i % 15 == 0 {
            steps.push((
                p,
                order.clone(),
                json!({"event_id": format!("{order}-r2"), "type": "reserve",
                "order_id": order, "sku": sku, "quantity": 1}),
            ));
        }
        let (kind, suffix) = if i % 2 == 0 {
            ("commit", "c")
        } else {
            ("release", "x")
        };
        steps.push((
            p,
            order.clone(),
            json!({"event_id": format!("{order}-{suffix}"), "type": kind, "order_id": order}),
        ));
    }
    let (first, second) = steps.split_at(steps.len() / 2);
    send_events(&env, first);
    wait_until("some order steps to be decided", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await >= 200
    })
    .await;
    replicas[1].kill();
    send_events(&env, second);
    let total = 4 + steps.len() as i64;
    wait_for_events(&env, total).await;
    wait_for_replies(&env, steps.len() as i64).await;
    terminate_all(&mut replicas[..1], EXIT);
    terminate_all(&mut replicas[2..], EXIT);

    let recorded: BTreeMap<String, (String, Option<String>)> = env
        .db
        .client()
        .await
        .query(
            "SELECT event_id, outcome, reason FROM processed_events
             WHERE event_type IN ('reserve', 'commit', 'release', 'expire')",
            &[],
        )
        .await
        .expect("order steps")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(recorded.len(), steps.len(), "every order step decided once");
    let replies = replies(&env).by_request;
    assert_eq!(
        replies, recorded,
        "one reply per step, as the database decided it"
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// `results.all_events`: the outcomes of stock events are published too, keyed by their first
/// SKU, with a null `order_id`; a stock event sent again publishes its reply again.
#[tokio::test(flavor = "multi_thread")]
async fn all_events_publishes_stock_outcomes_too() {
    let env = TestEnv::new(PARTITIONS).await;
    let mut replica = env.replica("r1", &[("results.all_events", "true")]);
    let sale = json!({"event_id": "all-s1", "type": "sale", "sku": "ALL", "quantity": 4});
    send_events(
        &env,
        &[
            (
                0,
                "ALL".into(),
                json!({"event_id": "all-r", "type": "restock", "sku": "ALL", "quantity": 5}),
            ),
            (0, "ALL".into(), sale.clone()),
            (
                0,
                "ALL".into(),
                json!({"event_id": "all-s2", "type": "sale", "sku": "ALL", "quantity": 4}),
            ),
            (0, "ALL".into(), sale),
            // After the sales in the same partition: one unit is left for it.
            (
                0,
                "o-all".into(),
                json!({"event_id": "all-o", "type": "reserve", "order_id": "o-all",
                "sku": "ALL", "quantity": 1}),
            ),
        ],
    );
    wait_for_events(&env, 4).await;
    wait_until("five replies published", SETTLE, || async {
        published(&env) >= 5
    })
    .await;
    replica.terminate(EXIT);

    let (messages, _) = read_whole_topic(&env.broker.bootstrap, RESULTS_TOPIC);
    let mut found: Vec<(String, String, String, serde_json::Value)> = messages
        .iter()
        .map(|m| {
            let reply: serde_json::Value =
                serde_json::from_slice(m.payload.as_deref().unwrap_or_default()).expect("JSON");
            (
                String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                reply["event_id"].as_str().unwrap_or_default().to_owned(),
                reply["outcome"].as_str().unwrap_or_default().to_owned(),
                reply["order_id"].clone(),
            )
        })
        .collect();
    found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let stock = |id: &str, outcome: &str| {
        (
            "ALL".to_owned(),
            id.to_owned(),
            outcome.to_owned(),
            serde_json::Value::Null,
        )
    };
    assert_eq!(
        found,
        [
            stock("all-r", "applied"),
            stock("all-s1", "applied"),
            stock("all-s1", "applied"),
            stock("all-s2", "rejected"),
            (
                "o-all".to_owned(),
                "all-o".to_owned(),
                "applied".to_owned(),
                json!("o-all")
            ),
        ],
        "every outcome, the re-sent sale's twice"
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// An order's replies arrive in the order of its steps, across expiries and a replica killed
/// mid-stream: 240 orders over 12 partitions and 3 replicas (sweeping every 200 ms), half of
/// them reserved for a second, each committed or released after its expiry or before it, while
/// one replica is SIGKILLed. Read back from the results topic, every order's replies (first
/// occurrences) must be a history its reservation could have had: an expiry, commit or
/// release applied only while it was active, a commit or release rejected for want of an
/// active reservation only while it was not. The oracle is that state machine, not the
/// outbox's order the relay follows.
#[tokio::test(flavor = "multi_thread")]
async fn an_orders_replies_arrive_in_order_across_expiries_and_a_replica_crash() {
    let env = TestEnv::new(PARTITIONS).await;
    let mut replicas = three_replicas(&env, &[("reservations.sweep_interval_ms", "200")]).await;
    let skus = ["E0", "E1", "E2", "E3"];
    restock_each(&env, &skus, 10_000).await;

    let orders = 240;
    let step = |i: i32, kind: &str, suffix: &str| {
        let order = format!("exp-{i:04}");
        let event = match kind {
            "reserve" => json!({"event_id": format!("{order}-{suffix}"), "type": "reserve",
                "order_id": order, "lines": [{"sku": skus[i as usize % skus.len()], "quantity": 1}],
                "ttl_seconds": if i % 2 == 0 { 1 } else { 3600 }}),
            _ => json!({"event_id": format!("{order}-{suffix}"), "type": kind, "order_id": order}),
        };
        (i % PARTITIONS, order, event)
    };
    let reserves: Vec<_> = (0..orders).map(|i| step(i, "reserve", "r")).collect();
    // A third of the orders are ended at once, before any expiry; the rest after it.
    let ending = |i: i32| {
        if i % 4 == 3 {
            step(i, "release", "x")
        } else {
            step(i, "commit", "c")
        }
    };
    let (early, late): (Vec<i32>, Vec<i32>) = (0..orders).partition(|i| i % 3 == 0);
    send_events(&env, &reserves);
    send_events(&env, &early.iter().map(|&i| ending(i)).collect::<Vec<_>>());
    wait_until("some order steps to be decided", SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await >= 100
    })
    .await;
    replicas[1].kill();
    // Past the one-second reservations' expiry: some are swept first, some found expired by
    // the commit or release that comes for them.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let late: Vec<_> = late.iter().map(|&i| ending(i)).collect();
    let (before_sweep, after_sweep) = late.split_at(late.len() / 2);
    send_events(&env, before_sweep);
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_events(&env, after_sweep);
    let steps = 2 * orders as i64;
    let expired = wait_for_every_step(&env, 4 + steps).await;
    wait_for_replies(&env, steps + expired).await;
    terminate_all(&mut replicas[..1], EXIT);
    terminate_all(&mut replicas[2..], EXIT);

    let Replies {
        by_request,
        by_order,
    } = replies(&env);
    assert_eq!(by_order.len(), orders as usize, "every order has replies");
    let mut expired_then_refused = 0;
    for (order, ids) in &by_order {
        let history: Vec<(&str, &str, Option<&str>)> = ids
            .iter()
            .map(|id| {
                let (outcome, reason) = &by_request[id];
                (step_kind(id), outcome.as_str(), reason.as_deref())
            })
            .collect();
        if let Err(why) = follows_a_reservation(&history) {
            panic!("{order}: replies {ids:?} ({history:?}) out of order: {why}");
        }
        expired_then_refused += usize::from(
            history
                .windows(2)
                .any(|w| w[0].0 == "expire" && w[1].2 == Some("no_active_reservation")),
        );
    }
    assert!(
        expired_then_refused > 0,
        "no order had its expiry's reply before a refused commit or release"
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// Waits until the `events` sent are decided, which ends every reservation (each order's last
/// step is its commit or release); returns how many expired.
async fn wait_for_every_step(env: &TestEnv, events: i64) -> i64 {
    wait_until("every order step decided", SETTLE, || async {
        env.db
            .scalar("SELECT count(*) FROM processed_events WHERE event_type <> 'expire'")
            .await
            >= events
            && env
                .db
                .scalar("SELECT count(*) FROM reservations WHERE status = 'active'")
                .await
                == 0
    })
    .await;
    env.db
        .scalar("SELECT count(*) FROM processed_events WHERE event_type = 'expire'")
        .await
}

/// What an order step is, by its event id.
fn step_kind(id: &str) -> &'static str {
    if id.starts_with("expire:") {
        "expire"
    } else if id.ends_with("-r") {
        "reserve"
    } else if id.ends_with("-c") {
        "commit"
    } else {
        "release"
    }
}

/// Whether replies (kind, outcome, reason), in the order read, are a history a reservation can
/// have: it is active from an applied reserve until an applied expiry, commit or release.
fn follows_a_reservation(history: &[(&str, &str, Option<&str>)]) -> Result<(), String> {
    let mut active = false;
    for (n, &(kind, outcome, reason)) in history.iter().enumerate() {
        match (kind, outcome) {
            ("reserve", "applied") if active => return Err(format!("#{n}: reserved twice")),
            ("reserve", "applied") => active = true,
            ("expire" | "commit" | "release", "applied") if !active => {
                return Err(format!("#{n}: {kind} applied with no active reservation"));
            }
            ("expire" | "commit" | "release", "applied") => active = false,
            ("commit" | "release", "rejected")
                if active && reason == Some("no_active_reservation") =>
            {
                return Err(format!(
                    "#{n}: {kind} refused while the reservation was active"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}
