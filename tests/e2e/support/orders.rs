//! Order sagas' tests share these: events sent to the partitions they name, waits for them to
//! be decided, their outcomes and stock read back, and the results topic read back by a
//! consumer of the test's own.

use std::collections::BTreeMap;

use super::{
    RESULTS_TOPIC, Replica, SETTLE, TestEnv, read_whole_topic, send, wait_for_group, wait_until,
    watermarks,
};

pub const PARTITIONS: i32 = 12;

/// Sends events, each to the partition of its index (keyed by its order, or SKU).
pub fn send_events(env: &TestEnv, events: &[(i32, String, serde_json::Value)]) {
    send(
        &env.broker.bootstrap,
        events
            .iter()
            .map(|(p, key, e)| (*p, key.clone(), e.to_string().into_bytes())),
    );
}

pub async fn wait_for_events(env: &TestEnv, count: i64) {
    wait_until(&format!("{count} events decided"), SETTLE, || async {
        env.db.scalar("SELECT count(*) FROM processed_events").await >= count
    })
    .await;
}

pub async fn outcomes(env: &TestEnv, kind: &str, outcome: &str, reason: &str) -> i64 {
    env.db
        .scalar(&format!(
            "SELECT count(*) FROM processed_events WHERE event_type = '{kind}'
             AND outcome = '{outcome}' AND coalesce(reason, '') = '{reason}'"
        ))
        .await
}

pub async fn stock_of(env: &TestEnv, sku: &str) -> (i64, i64) {
    let client = env.db.client().await;
    let row = client
        .query_one(
            "SELECT current_stock, reserved_stock FROM products WHERE sku = $1",
            &[&sku],
        )
        .await
        .expect("the product");
    (row.get(0), row.get(1))
}

/// What the results topic holds, read back by a consumer of the test's own.
pub struct Replies {
    /// Event id -> (outcome, reason).
    pub by_request: BTreeMap<String, (String, Option<String>)>,
    /// Order -> its replies' event ids in the order published (first occurrences).
    pub by_order: BTreeMap<String, Vec<String>>,
}

/// Reads every reply back; fails on two different replies to one request.
pub fn replies(env: &TestEnv) -> Replies {
    let (messages, _) = read_whole_topic(&env.broker.bootstrap, RESULTS_TOPIC);
    let mut seen: BTreeMap<String, (String, Option<String>, String)> = BTreeMap::new();
    let mut by_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in messages {
        let text =
            String::from_utf8_lossy(message.payload.as_deref().unwrap_or_default()).into_owned();
        let reply: serde_json::Value = serde_json::from_str(&text).expect("a JSON reply");
        let key = String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()).into_owned();
        assert_eq!(reply["order_id"], key.as_str(), "keyed by order");
        let id = reply["event_id"].as_str().expect("event_id").to_owned();
        let entry = (
            reply["outcome"].as_str().unwrap_or_default().to_owned(),
            reply["reason"].as_str().map(str::to_owned),
            text.clone(),
        );
        match seen.insert(id.clone(), entry.clone()) {
            Some(earlier) => assert_eq!(earlier, entry, "two different replies to {id}"),
            None => by_order.entry(key).or_default().push(id),
        }
    }
    Replies {
        by_request: seen
            .into_iter()
            .map(|(id, (outcome, reason, _))| (id, (outcome, reason)))
            .collect(),
        by_order,
    }
}

/// How many messages the results topic holds.
pub fn published(env: &TestEnv) -> i64 {
    watermarks(&env.broker.bootstrap, RESULTS_TOPIC)
        .values()
        .map(|(low, high)| high - low)
        .sum()
}

/// Waits until every reply recorded so far (at least `count`) has left the outbox.
pub async fn wait_for_replies(env: &TestEnv, count: i64) {
    let published = inventory_devtools::embedded::wait::wait_until(
        &format!("{count} replies published"),
        SETTLE,
        || async {
            env.db.scalar("SELECT count(*) FROM reply_outbox").await == 0
                && env.db.scalar("SELECT count(*) FROM replies").await >= count
        },
    )
    .await;
    if let Err(e) = published {
        panic!(
            "{e}: {} replies recorded, {} still in the outbox",
            env.db.scalar("SELECT count(*) FROM replies").await,
            env.db.scalar("SELECT count(*) FROM reply_outbox").await
        );
    }
}

/// Three replicas of `settings`, once each owns some of the [`PARTITIONS`]: a replica the test
/// kills then has work to lose, and the others' events are decided as they arrive.
pub async fn three_replicas(env: &TestEnv, settings: &[(&str, &str)]) -> Vec<Replica> {
    let replicas: Vec<Replica> = ["r1", "r2", "r3"]
        .iter()
        .map(|name| env.replica(name, settings))
        .collect();
    let all: Vec<&Replica> = replicas.iter().collect();
    wait_for_group(&all, PARTITIONS as usize, SETTLE).await;
    replicas
}

/// Restocks each of `skus` with `quantity` (the i-th through partition i) and waits until all
/// are decided.
pub async fn restock_each(env: &TestEnv, skus: &[&str], quantity: i64) {
    let restocks: Vec<(i32, String, serde_json::Value)> = skus
        .iter()
        .enumerate()
        .map(|(i, sku)| {
            let event = serde_json::json!({"event_id": format!("{sku}-restock"),
                "type": "restock", "sku": sku, "quantity": quantity});
            (i as i32, (*sku).to_owned(), event)
        })
        .collect();
    send_events(env, &restocks);
    wait_for_events(env, skus.len() as i64).await;
}
