//! Replies to order steps (docs/contract.md section 7) through real replicas: published at
//! least once and in order per order, across a replica killed mid-stream, and stock events'
//! outcomes too when `results.all_events` asks for them.

use std::collections::BTreeMap;

use serde_json::json;

use crate::support::orders::{
    PARTITIONS, published, replies, send_events, three_replicas, wait_for_events, wait_for_replies,
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
    let mut replicas = three_replicas(&env);
    let skus = ["K0", "K1", "K2", "K3"];
    let restocks: Vec<(i32, String, serde_json::Value)> = skus
        .iter()
        .enumerate()
        .map(|(i, sku)| {
            let event = json!({"event_id": format!("{sku}-restock"), "type": "restock",
                               "sku": sku, "quantity": 150});
            (i as i32, (*sku).to_owned(), event)
        })
        .collect();
    send_events(&env, &restocks);
    wait_for_events(&env, 4).await;

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
