//! The tests' own reference model of the contract, written apart from `src/domain` so that a
//! bug in the product's rules cannot agree with itself: it reads back every message in the
//! topic (not what `produce` says it sent), decides each one from the contract's text
//! (README "Events") with plain `serde_json` values, and folds them into the state a correct
//! consumer must end with.
//!
//! Events of different partitions may be applied in any interleaving, so the model is exact
//! only when every SKU that a sale or an adjustment touches lives in one partition (events keyed
//! by SKU; restocks alone commute): it refuses to answer otherwise rather than guess.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::support::{TOPIC, read_whole_topic};

const MAX_PAYLOAD: usize = 1024 * 1024;
const MAX_QUANTITY: i64 = 1_000_000_000;

/// One message as it sits in the topic.
pub struct Record {
    pub partition: i32,
    pub payload: Option<Vec<u8>>,
}

/// What a correct consumer ends with, according to the model.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Truth {
    pub stock: BTreeMap<String, i64>,
    /// Distinct valid events (rows of `processed_events`).
    pub events: u64,
    pub applied: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    /// Messages repeating an event already seen with the same meaning.
    pub duplicates: u64,
    pub messages: u64,
}

/// Reads every message of the topic, partition by partition in offset order.
pub fn read_topic(bootstrap: &str) -> Vec<Record> {
    let (messages, marks) = read_whole_topic(bootstrap, TOPIC);
    assert!(
        marks.values().any(|&(_, high)| high > 0),
        "the topic is empty: nothing to check"
    );
    for (p, (low, high)) in marks {
        assert_eq!(low, 0, "the oracle needs the whole partition {p}");
        let offsets: Vec<i64> = messages
            .iter()
            .filter(|m| m.partition == p)
            .map(|m| m.offset)
            .collect();
        assert_eq!(
            offsets,
            (0..high).collect::<Vec<_>>(),
            "partition {p} read back whole"
        );
    }
    messages
        .into_iter()
        .map(|m| Record {
            partition: m.partition,
            payload: m.payload,
        })
        .collect()
}

/// A valid event as the contract defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    kind: String,
    lines: Vec<(String, i64)>,
    reason: Option<String>,
    occurred_at: Option<String>,
    source: Option<String>,
}

/// Folds the topic's messages into what the database must hold.
pub fn expected_state(records: &[Record]) -> Truth {
    let mut truth = Truth::default();
    let mut seen: HashMap<String, Event> = HashMap::new();
    let mut partitions_of: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut order_matters: HashSet<String> = HashSet::new();
    for record in records {
        truth.messages += 1;
        let Some((id, event)) = decide(record.payload.as_deref()) else {
            truth.dead_letters += 1;
            continue;
        };
        match seen.get(&id) {
            Some(first) if *first == event => truth.duplicates += 1,
            Some(_) => truth.dead_letters += 1, // the same id, another meaning
            None => {
                for (sku, _) in &event.lines {
                    partitions_of
                        .entry(sku.clone())
                        .or_default()
                        .insert(record.partition);
                    if event.kind != "restock" {
                        order_matters.insert(sku.clone());
                    }
                }
                if apply(&event, &mut truth.stock) {
                    truth.applied += 1;
                } else {
                    truth.rejected += 1;
                }
                truth.events += 1;
                seen.insert(id, event);
            }
        }
    }
    let spread: Vec<_> = partitions_of
        .iter()
        .filter(|(sku, p)| p.len() > 1 && order_matters.contains(*sku))
        .collect();
    assert!(
        spread.is_empty(),
        "the oracle is exact only for sold or adjusted SKUs in one partition: {:?}",
        spread.first()
    );
    truth
}

/// The contract's validation: `Some((event_id, event))`, or `None` for a dead letter.
fn decide(payload: Option<&[u8]>) -> Option<(String, Event)> {
    let bytes = payload.filter(|b| !b.is_empty() && b.len() <= MAX_PAYLOAD)?;
    let text = std::str::from_utf8(bytes).ok()?;
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let object = value.as_object()?;
    let id = object.get("event_id")?.as_str()?;
    if id.is_empty() || id.chars().count() > 128 || id.contains('\0') {
        return None;
    }
    let kind = object.get("type")?.as_str()?;
    if !["restock", "sale", "adjustment"].contains(&kind) {
        return None;
    }
    let quantity = |v: &serde_json::Value| -> Option<i64> {
        let q = v.as_i64()?;
        let sign_ok = if kind == "adjustment" { q != 0 } else { q > 0 };
        (sign_ok && q.abs() <= MAX_QUANTITY).then_some(q)
    };
    let sku = |v: &serde_json::Value| -> Option<String> {
        let s = v.as_str()?;
        let ok = (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
        ok.then(|| s.to_owned())
    };
    let lines = match (object.get("lines"), object.get("sku")) {
        (Some(_), Some(_)) => return None,
        (Some(lines), None) => {
            let lines = lines.as_array()?;
            if !(1..=100).contains(&lines.len()) {
                return None;
            }
            lines
                .iter()
                .map(|l| Some((sku(l.get("sku")?)?, quantity(l.get("quantity")?)?)))
                .collect::<Option<Vec<_>>>()?
        }
        (None, Some(s)) => vec![(sku(s)?, quantity(object.get("quantity")?)?)],
        (None, None) => return None,
    };
    let optional_text = |key: &str, max: usize| -> Option<Option<String>> {
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Some(None),
            Some(v) => {
                let s = v.as_str()?;
                // PostgreSQL text cannot hold NUL.
                (s.chars().count() <= max && !s.contains('\0')).then(|| Some(s.to_owned()))
            }
        }
    };
    let reason = optional_text("reason", 256)?;
    let source = optional_text("source", usize::MAX)?;
    let occurred_at = optional_text("occurred_at", usize::MAX)?;
    if let Some(at) = &occurred_at {
        chrono::DateTime::parse_from_rfc3339(at).ok()?;
    }
    let event = Event {
        kind: kind.to_owned(),
        lines,
        reason,
        occurred_at,
        source,
    };
    Some((id.to_owned(), event))
}

/// Applies all lines or none; `false` when the event is rejected.
fn apply(event: &Event, stock: &mut BTreeMap<String, i64>) -> bool {
    // The lines' SKUs only, changed on the side and written back when every line fits.
    let mut after: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, quantity) in &event.lines {
        let current = after.get(sku.as_str()).or_else(|| stock.get(sku)).copied();
        let next = match (event.kind.as_str(), current) {
            ("restock", None) => *quantity,
            (_, None) => return false, // a SKU never restocked
            ("sale", Some(now)) => now - quantity,
            (_, Some(now)) => now + quantity,
        };
        if next < 0 {
            return false;
        }
        after.insert(sku, next);
    }
    for (sku, value) in after {
        stock.insert(sku.to_owned(), value);
    }
    true
}

/// The model's answer for everything in the topic of `env`.
pub fn truth_of(env: &crate::support::TestEnv) -> Truth {
    let truth = expected_state(&read_topic(&env.broker.bootstrap));
    assert!(truth.events > 0, "the model found no event to check");
    truth
}

/// Checks the database against the model: stock per SKU, one outcome per distinct event with
/// the right counts, every bad message dead-lettered.
pub async fn assert_database_matches(db: &crate::support::TestDb, truth: &Truth) {
    let outcome = |o: &str| format!("SELECT count(*) FROM processed_events WHERE outcome = '{o}'");
    let found = (
        db.scalar("SELECT count(*) FROM processed_events").await,
        db.scalar(&outcome("applied")).await,
        db.scalar(&outcome("rejected")).await,
        db.scalar("SELECT count(*) FROM dead_letters").await,
    );
    let wanted = (
        truth.events as i64,
        truth.applied as i64,
        truth.rejected as i64,
        truth.dead_letters as i64,
    );
    assert_eq!(
        found, wanted,
        "(events, applied, rejected, dead letters) differ from the reference model"
    );
    assert_eq!(
        db.stock().await,
        truth.stock,
        "stock differs from the reference model"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Record {
        Record {
            partition: 0,
            payload: Some(json.as_bytes().to_vec()),
        }
    }

    #[test]
    fn the_model_follows_the_contract() {
        let truth = expected_state(&[
            record(r#"{"event_id":"a","type":"restock","sku":"S-1","quantity":5}"#),
            record(r#"{"event_id":"b","type":"sale","sku":"S-1","quantity":6}"#),
            record(r#"{"event_id":"c","type":"sale","sku":"S-1","quantity":2}"#),
            record(r#"{"quantity":2,"sku":"S-1","type":"sale","event_id":"c"}"#),
            record(r#"{"event_id":"c","type":"sale","sku":"S-1","quantity":3}"#),
            record(r#"{"event_id":"d","type":"adjustment","sku":"S-2","quantity":-1}"#),
            record(r#"{"event_id":"e","type":"sale","sku":"S-1","quantity":1.5}"#),
            record("[]"),
        ]);
        assert_eq!(truth.stock, BTreeMap::from([("S-1".to_owned(), 3)]));
        assert_eq!(
            (truth.events, truth.applied, truth.rejected),
            (4, 2, 2),
            "b (too many) and d (unknown SKU) are rejected"
        );
        assert_eq!((truth.duplicates, truth.dead_letters), (1, 3));
    }
}
