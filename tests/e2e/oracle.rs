//! The tests' own reference model of the contract, written apart from `src/domain` so that a
//! bug in the product's rules cannot agree with itself: it reads back every message in the
//! topic (not what `produce` says it sent), decides each one from the contract's text
//! (docs/contract.md section 1) with plain `serde_json` values, and folds them into the state a correct
//! consumer must end with.
//!
//! Events of different partitions may be applied in any interleaving, so the model is exact
//! only when every SKU that a sale, an adjustment or an order touches lives in one partition
//! (events keyed by SKU; restocks alone commute): it refuses to answer otherwise rather than
//! guess. Orders (docs/contract.md section 7) are decided as if no reservation expired during the
//! stream; afterwards those of at most a minute (`ttl_seconds` <= 60) have expired and the
//! others are still active. A commit or release of a short one would depend on the clock: the
//! model refuses that too.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::support::{TOPIC, read_whole_topic};

const MAX_PAYLOAD: usize = 1024 * 1024;
const MAX_QUANTITY: i64 = 1_000_000_000;
/// Reservations this short expire before the end of a test; longer ones outlive it.
const SHORT_TTL: i64 = 60;
/// The contract's default `reservations.default_ttl_s`, for a reserve that gives none.
const DEFAULT_TTL: i64 = 900;

/// One message as it sits in the topic.
pub struct Record {
    pub partition: i32,
    pub payload: Option<Vec<u8>>,
}

/// What a correct consumer ends with, according to the model.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Truth {
    pub stock: BTreeMap<String, i64>,
    /// Reserved stock of the SKUs that have some.
    pub reserved: BTreeMap<String, i64>,
    /// Reservations by final status.
    pub reservations: BTreeMap<String, u64>,
    /// The reply to each order step and expiry: event id -> (outcome, reason).
    pub replies: BTreeMap<String, (String, Option<String>)>,
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
    /// The order of a reserve, commit or release.
    order: Option<String>,
    /// A reserve's `ttl_seconds`, or its `expires_at` as sent.
    ttl: Option<i64>,
    expires_at: Option<String>,
}

/// One order's reservation in the model.
struct Held {
    lines: Vec<(String, i64)>,
    status: &'static str,
    ttl: i64,
}

/// Stock and reservations, as the model folds them.
#[derive(Default)]
struct Books {
    stock: BTreeMap<String, i64>,
    reserved: BTreeMap<String, i64>,
    orders: HashMap<String, Held>,
}

/// Folds the topic's messages into what the database must hold.
pub fn expected_state(records: &[Record]) -> Truth {
    let mut truth = Truth::default();
    let mut books = Books::default();
    let mut seen: HashMap<String, Event> = HashMap::new();
    let mut partitions_of: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut order_matters: HashSet<String> = HashSet::new();
    // SKUs held by a reservation that may expire at any moment of the stream.
    let mut held_briefly: HashSet<String> = HashSet::new();
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
                // What the event touches: its lines, or its order's reserved lines.
                let touched: Vec<String> = match event.order.as_ref().map(|o| books.orders.get(o)) {
                    Some(Some(held)) if event.kind != "reserve" => {
                        assert!(
                            held.ttl > SHORT_TTL,
                            "the model cannot tell whether {id} comes before its order's expiry"
                        );
                        held.lines.iter().map(|(sku, _)| sku.clone()).collect()
                    }
                    _ => event.lines.iter().map(|(sku, _)| sku.clone()).collect(),
                };
                assert!(
                    event.kind == "restock" || touched.iter().all(|s| !held_briefly.contains(s)),
                    "the model cannot tell whether {id} comes before the expiry of a \
                     reservation on its SKUs"
                );
                for sku in touched {
                    partitions_of
                        .entry(sku.clone())
                        .or_default()
                        .insert(record.partition);
                    if event.kind != "restock" {
                        order_matters.insert(sku);
                    }
                }
                let verdict = apply(&event, &mut books);
                if event.kind == "reserve"
                    && verdict.is_ok()
                    && event.ttl.is_some_and(|t| t <= SHORT_TTL)
                {
                    held_briefly.extend(event.lines.iter().map(|(sku, _)| sku.clone()));
                }
                match &verdict {
                    Ok(()) => truth.applied += 1,
                    Err(_) => truth.rejected += 1,
                }
                if event.order.is_some() {
                    truth.replies.insert(id.clone(), reply(verdict));
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
        "the oracle is exact only for sold, adjusted or ordered SKUs in one partition: {:?}",
        spread.first()
    );
    // After the stream: the short reservations expire, the others stay.
    for (order, held) in &mut books.orders {
        if held.status == "active" && held.ttl <= SHORT_TTL {
            for (sku, quantity) in &held.lines {
                *books.reserved.entry(sku.clone()).or_default() -= quantity;
            }
            held.status = "expired";
            truth
                .replies
                .insert(format!("expire:{order}"), reply(Ok(())));
        }
    }
    for held in books.orders.values() {
        *truth
            .reservations
            .entry(held.status.to_owned())
            .or_default() += 1;
    }
    truth.reserved = books
        .reserved
        .into_iter()
        .filter(|(_, r)| *r != 0)
        .collect();
    truth.stock = books.stock;
    truth
}

fn reply(verdict: Result<(), &'static str>) -> (String, Option<String>) {
    match verdict {
        Ok(()) => ("applied".to_owned(), None),
        Err(reason) => ("rejected".to_owned(), Some(reason.to_owned())),
    }
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
    if id.starts_with("expire:") {
        return None; // the service's own ids for expiries
    }
    let kind = object.get("type")?.as_str()?;
    let order_step = ["reserve", "commit", "release"].contains(&kind);
    if !order_step && !["restock", "sale", "adjustment"].contains(&kind) {
        return None;
    }
    let present = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
    let order = if order_step {
        let order = object.get("order_id")?.as_str()?;
        if order.is_empty() || order.chars().count() > 128 {
            return None;
        }
        Some(order.to_owned())
    } else {
        None
    };
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
        _ if kind == "commit" || kind == "release" => {
            if present("lines") || present("sku") || present("quantity") {
                return None; // they carry no lines
            }
            Vec::new()
        }
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
    let (ttl, expires_at) = if kind == "reserve" {
        let ttl = match object.get("ttl_seconds") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_i64().filter(|t| (1..=31_536_000).contains(t))?),
        };
        let at = optional_text("expires_at", usize::MAX)?;
        if let Some(at) = &at {
            chrono::DateTime::parse_from_rfc3339(at).ok()?;
        }
        if ttl.is_some() && at.is_some() {
            return None; // at most one of them
        }
        (ttl, at)
    } else {
        (None, None)
    };
    let event = Event {
        kind: kind.to_owned(),
        lines,
        reason,
        occurred_at,
        source,
        order,
        ttl,
        expires_at,
    };
    Some((id.to_owned(), event))
}

/// Applies an event, all lines or none; the reason when it is rejected.
fn apply(event: &Event, books: &mut Books) -> Result<(), &'static str> {
    let order = event.order.as_deref().unwrap_or_default();
    match event.kind.as_str() {
        "reserve" => {
            if books.orders.contains_key(order) {
                return Err("order_exists");
            }
            assert!(
                event.expires_at.is_none(),
                "the model does not predict expires_at"
            );
            // `reservations.max_ttl_s`, default a week.
            if event.ttl.is_some_and(|t| t > 604_800) {
                return Err("invalid_ttl");
            }
            move_lines(books, &event.lines, 0, 1, false)?;
            let held = Held {
                lines: event.lines.clone(),
                status: "active",
                ttl: event.ttl.unwrap_or(DEFAULT_TTL),
            };
            books.orders.insert(order.to_owned(), held);
            Ok(())
        }
        "commit" | "release" => {
            let lines = match books.orders.get(order) {
                Some(held) if held.status == "active" => held.lines.clone(),
                _ => return Err("no_active_reservation"),
            };
            let (on_hand, status) = if event.kind == "commit" {
                (-1, "committed")
            } else {
                (0, "released")
            };
            move_lines(books, &lines, on_hand, -1, false)?;
            if let Some(held) = books.orders.get_mut(order) {
                held.status = status;
            }
            Ok(())
        }
        "restock" => move_lines(books, &event.lines, 1, 0, true),
        "sale" => move_lines(books, &event.lines, -1, 0, false),
        _ => move_lines(books, &event.lines, 1, 0, false), // adjustment: its quantity's sign
    }
}

/// Moves each line's quantity times `on_hand` and `reserved` into the books, all lines or
/// none: stock never below zero, reserved never negative nor above stock (sales and negative
/// adjustments take available units only). Only a restock `creates` its SKU.
fn move_lines(
    books: &mut Books,
    lines: &[(String, i64)],
    on_hand: i64,
    reserved: i64,
    creates: bool,
) -> Result<(), &'static str> {
    let mut after: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (sku, quantity) in lines {
        let current = after.get(sku.as_str()).copied().or_else(|| {
            let stock = books.stock.get(sku)?;
            Some((*stock, books.reserved.get(sku).copied().unwrap_or(0)))
        });
        let (stock, held) = match current {
            Some(now) => now,
            None if creates => (0, 0),
            None => return Err("unknown_sku"),
        };
        let next = (stock + on_hand * quantity, held + reserved * quantity);
        if next.0 < 0 || next.1 < 0 || next.1 > next.0 {
            return Err("insufficient_stock");
        }
        after.insert(sku, next);
    }
    for (sku, (stock, held)) in after {
        books.stock.insert(sku.to_owned(), stock);
        books.reserved.insert(sku.to_owned(), held);
    }
    Ok(())
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
    // Expiries are recorded like events but come from no message: compared below.
    let outcome = |o: &str| {
        format!(
            "SELECT count(*) FROM processed_events WHERE outcome = '{o}' AND event_type <> 'expire'"
        )
    };
    let found = (
        db.scalar("SELECT count(*) FROM processed_events WHERE event_type <> 'expire'")
            .await,
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
    let client = db.client().await;
    let reserved: BTreeMap<String, i64> = client
        .query(
            "SELECT sku, reserved_stock FROM products WHERE reserved_stock <> 0",
            &[],
        )
        .await
        .expect("reserved stock")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        reserved, truth.reserved,
        "reserved stock differs from the reference model"
    );
    let reservations: BTreeMap<String, u64> = client
        .query(
            "SELECT status, count(*) FROM reservations GROUP BY status",
            &[],
        )
        .await
        .expect("reservations")
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect();
    assert_eq!(
        reservations, truth.reservations,
        "reservations differ from the reference model"
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

    #[test]
    fn the_model_follows_the_contract_for_orders() {
        let truth = expected_state(&[
            record(r#"{"event_id":"a","type":"restock","sku":"S-1","quantity":5}"#),
            record(r#"{"event_id":"a2","type":"restock","sku":"S-2","quantity":1}"#),
            record(
                r#"{"event_id":"r1","type":"reserve","order_id":"o1","sku":"S-1","quantity":3,"ttl_seconds":3600}"#,
            ),
            record(r#"{"event_id":"s","type":"sale","sku":"S-1","quantity":3}"#),
            record(
                r#"{"event_id":"r2","type":"reserve","order_id":"o2","sku":"S-1","quantity":3}"#,
            ),
            record(
                r#"{"event_id":"r3","type":"reserve","order_id":"o1","sku":"S-1","quantity":1}"#,
            ),
            record(r#"{"event_id":"c1","type":"commit","order_id":"o1"}"#),
            record(r#"{"event_id":"x1","type":"release","order_id":"o1"}"#),
            record(
                r#"{"event_id":"r4","type":"reserve","order_id":"o4","sku":"S-2","quantity":1,"ttl_seconds":1}"#,
            ),
            record(
                r#"{"event_id":"r5","type":"reserve","order_id":"o5","sku":"S-1","quantity":1}"#,
            ),
            record(r#"{"event_id":"bad","type":"commit","order_id":"o5","sku":"S-1"}"#),
            record(r#"{"event_id":"expire:o5","type":"release","order_id":"o5"}"#),
        ]);
        assert_eq!(
            truth.stock,
            BTreeMap::from([("S-1".to_owned(), 2), ("S-2".to_owned(), 1)])
        );
        assert_eq!(truth.reserved, BTreeMap::from([("S-1".to_owned(), 1)]));
        let status = |s: &str| truth.reservations.get(s).copied();
        assert_eq!(
            (status("committed"), status("expired"), status("active")),
            (Some(1), Some(1), Some(1))
        );
        let rejected = |reason: &str| ("rejected".to_owned(), Some(reason.to_owned()));
        let applied = ("applied".to_owned(), None);
        assert_eq!(
            truth.replies,
            BTreeMap::from([
                ("r1".to_owned(), applied.clone()),
                ("r2".to_owned(), rejected("insufficient_stock")),
                ("r3".to_owned(), rejected("order_exists")),
                ("c1".to_owned(), applied.clone()),
                ("x1".to_owned(), rejected("no_active_reservation")),
                ("r4".to_owned(), applied.clone()),
                ("r5".to_owned(), applied.clone()),
                ("expire:o4".to_owned(), applied),
            ])
        );
        assert_eq!(truth.dead_letters, 2, "lines on a commit; an expiry's id");
        assert_eq!(
            (truth.applied, truth.rejected),
            (6, 4),
            "s: the 3 reserved units are not for sale"
        );
    }

    #[test]
    #[should_panic(expected = "cannot tell whether s comes before the expiry")]
    fn the_model_refuses_a_sale_that_races_an_expiry() {
        expected_state(&[
            record(r#"{"event_id":"a","type":"restock","sku":"S-1","quantity":5}"#),
            record(
                r#"{"event_id":"r","type":"reserve","order_id":"o","sku":"S-1","quantity":5,"ttl_seconds":2}"#,
            ),
            record(r#"{"event_id":"s","type":"sale","sku":"S-1","quantity":1}"#),
        ]);
    }
}
