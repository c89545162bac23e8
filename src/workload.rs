//! Workloads and their oracle. A [`Generator`] makes a reproducible stream of messages (valid
//! events over a SKU population with optional skew, re-sent duplicates, malformed messages);
//! the [`Oracle`] runs every message through the same decoder and rules as the consumer and so
//! knows the final stock and the outcome counts a correct consumer must reach.
//!
//! The oracle assumes what the product guarantees for single-SKU events keyed by SKU: each
//! SKU's events are applied in the order they were produced. Multi-SKU events across
//! partitions have no such order, so their tests check invariants instead of an oracle.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

use crate::domain::{Outcome, StockBook, apply_event, decode};

/// What a correct consumer must end with; written by `produce`, read by `verify`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    /// Final stock of every SKU that was ever restocked.
    pub stock: BTreeMap<String, i64>,
    /// Distinct valid events: rows expected in `processed_events`.
    pub events: u64,
    pub applied: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    /// Messages that repeat an already-sent event (same id, same body).
    pub duplicates: u64,
    pub messages: u64,
}

/// Folds messages, in per-SKU order, into the [`Expectation`].
#[derive(Debug, Default)]
pub struct Oracle {
    book: StockBook,
    digests: HashMap<String, Vec<u8>>,
    expected: Expectation,
}

impl Oracle {
    pub fn observe(&mut self, payload: Option<&[u8]>) {
        self.expected.messages += 1;
        let Ok(event) = decode(payload) else {
            self.expected.dead_letters += 1;
            return;
        };
        let digest = event.digest();
        match self.digests.get(&event.id) {
            Some(d) if *d == digest => self.expected.duplicates += 1,
            Some(_) => self.expected.dead_letters += 1,
            None => {
                let outcome = match apply_event(&event, &mut self.book) {
                    Ok(_) => Outcome::Applied,
                    Err(reason) => Outcome::Rejected(reason),
                };
                match outcome {
                    Outcome::Applied => self.expected.applied += 1,
                    Outcome::Rejected(_) => self.expected.rejected += 1,
                }
                self.expected.events += 1;
                self.digests.insert(event.id, digest);
            }
        }
    }

    pub fn finish(mut self) -> Expectation {
        self.expected.stock = self
            .book
            .into_iter()
            .map(|(sku, s)| (sku, s.on_hand))
            .collect();
        self.expected
    }
}

/// Parameters of a generated workload.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Distinct valid events.
    pub events: u64,
    pub skus: u64,
    /// Zipf exponent over SKU ranks; 0 is uniform.
    pub skew: f64,
    /// Share of events on the first SKU (a hot SKU), on top of the skew.
    pub hot_share: f64,
    /// Chance, after each event, of re-sending an earlier one unchanged.
    pub duplicate_share: f64,
    /// Chance, after each event, of sending a malformed message.
    pub invalid_share: f64,
    pub seed: u64,
    /// Prefix of event ids, so that runs into one database do not collide.
    pub id_prefix: String,
}

/// One message to send: key (the SKU for valid events) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub key: Option<String>,
    pub value: Vec<u8>,
}

/// The message stream of a [`WorkloadSpec`], reproducible from its seed.
pub struct Generator {
    spec: WorkloadSpec,
    rng: StdRng,
    zipf: Option<Zipf<f64>>,
    next_event: u64,
    recent: Vec<Message>,
    pending: Vec<Message>,
}

/// How many earlier events a duplicate is drawn from.
const DUPLICATE_WINDOW: usize = 1_000;

impl Generator {
    pub fn new(spec: WorkloadSpec) -> Self {
        let zipf = (spec.skew > 0.0)
            .then(|| Zipf::new(spec.skus.max(1) as f64, spec.skew).ok())
            .flatten();
        Generator {
            rng: StdRng::seed_from_u64(spec.seed),
            spec,
            zipf,
            next_event: 0,
            recent: Vec::new(),
            pending: Vec::new(),
        }
    }

    pub fn sku_name(index: u64) -> String {
        format!("SKU-{index:06}")
    }

    fn pick_sku(&mut self) -> String {
        let skus = self.spec.skus.max(1);
        let index = if self.rng.random_bool(self.spec.hot_share.clamp(0.0, 1.0)) {
            0
        } else if let Some(zipf) = &self.zipf {
            (zipf.sample(&mut self.rng) as u64).saturating_sub(1) % skus
        } else {
            self.rng.random_range(0..skus)
        };
        Self::sku_name(index)
    }

    fn event(&mut self) -> Message {
        let sku = self.pick_sku();
        let id = format!("{}-{:08}", self.spec.id_prefix, self.next_event);
        self.next_event += 1;
        let roll = self.rng.random_range(0..100);
        let (kind, quantity) = match roll {
            0..35 => ("restock", self.rng.random_range(1..=50)),
            35..85 => ("sale", self.rng.random_range(1..=10)),
            _ => {
                let q: i64 = self.rng.random_range(1..=5);
                ("adjustment", if self.rng.random_bool(0.7) { -q } else { q })
            }
        };
        let value = serde_json::json!({
            "event_id": id, "type": kind, "sku": sku, "quantity": quantity, "source": "produce"
        });
        Message {
            key: Some(sku),
            value: value.to_string().into_bytes(),
        }
    }

    /// A bad message: one of the ways producers get it wrong, or hostile input. Each one is
    /// dead-lettered by a correct consumer (the oracle decodes it with the same decoder).
    fn malformed(&mut self) -> Message {
        let sku = self.pick_sku();
        let tag: u32 = self.rng.random();
        // Rare, because one is 2 MiB: the broker keeps a few MiB per partition in tests.
        if self.rng.random_ratio(1, 2_000) {
            let pad = "x".repeat(2 * 1024 * 1024);
            return keyed(
                &sku,
                format!(
                    r#"{{"event_id":"huge-{tag}","type":"restock","sku":"{sku}","quantity":1,"pad":"{pad}"}}"#
                ),
            );
        }
        let value = match self.rng.random_range(0..20) {
            0 => "{not json".to_owned(),
            1 => {
                return Message {
                    key: Some(sku),
                    value: vec![0xff, 0xfe, b'{', 0x80],
                };
            }
            2 => format!(r#"{{"type":"sale","sku":"{sku}","quantity":1}}"#),
            3 => format!(r#"{{"event_id":"bad-{tag}","type":"sale","sku":"{sku}","quantity":-4}}"#),
            4 => format!(r#"{{"event_id":"bad-{tag}","type":"gift","sku":"{sku}","quantity":1}}"#),
            5 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"'; DROP TABLE products; --","quantity":1}}"#
            ),
            6 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{sku}","quantity":"ten"}}"#
            ),
            // Valid JSON that PostgreSQL text could not store.
            7 => format!(
                r#"{{"event_id":"nul\u0000{tag}","type":"restock","sku":"{sku}","quantity":1}}"#
            ),
            8 => "[]".to_owned(),
            // Overflows i64, and beyond the contract's bound.
            9 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{sku}","quantity":92233720368547758070}}"#
            ),
            10 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{sku}","quantity":1000000001}}"#
            ),
            11 => {
                let line = format!(r#"{{"sku":"{sku}","quantity":1}}"#);
                let lines = vec![line; 101].join(",");
                format!(r#"{{"event_id":"bad-{tag}","type":"restock","lines":[{lines}]}}"#)
            }
            12 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{}","quantity":1}}"#,
                "S".repeat(65)
            ),
            13 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"SKU-ü-🙂","quantity":1}}"#
            ),
            14 => format!(r#"{{"event_id":{tag},"type":"restock","sku":"{sku}","quantity":1}}"#),
            15 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{sku}","quantity":1.5}}"#
            ),
            // Nested deeper than the JSON parser's recursion limit.
            16 => format!("{}{}", "[".repeat(200), "]".repeat(200)),
            17 => format!(
                r#"{{"event_id":"bad-{tag}","type":"restock","sku":"{sku}","quantity":1,"reason":"{}"}}"#,
                "r".repeat(300)
            ),
            // No key at all (keys are optional; this body is bad anyway).
            18 => {
                return Message {
                    key: None,
                    value: format!(r#"{{"event_id":"bad-{tag}","type":"sale"}}"#).into_bytes(),
                };
            }
            // A recent event id again with a different body: `event_id_conflict`. Same key,
            // sent after the original, so it reaches the consumer after it.
            _ => match self.conflicting_copy() {
                Some(m) => return m,
                None => "{}".to_owned(),
            },
        };
        keyed(&sku, value)
    }

    /// A recent event with its quantity changed.
    fn conflicting_copy(&mut self) -> Option<Message> {
        let i = self.rng.random_range(0..self.recent.len().max(1));
        let original = self.recent.get(i)?;
        let mut value: serde_json::Value = serde_json::from_slice(&original.value).ok()?;
        let quantity = value.get("quantity")?.as_i64()?;
        value["quantity"] = serde_json::json!(quantity + 1);
        Some(Message {
            key: original.key.clone(),
            value: value.to_string().into_bytes(),
        })
    }
}

fn keyed(sku: &str, value: String) -> Message {
    Message {
        key: Some(sku.to_owned()),
        value: value.into_bytes(),
    }
}

impl Iterator for Generator {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        if let Some(m) = self.pending.pop() {
            return Some(m);
        }
        if self.next_event >= self.spec.events {
            return None;
        }
        let event = self.event();
        if self
            .rng
            .random_bool(self.spec.invalid_share.clamp(0.0, 1.0))
        {
            let bad = self.malformed();
            self.pending.push(bad);
        }
        if !self.recent.is_empty()
            && self
                .rng
                .random_bool(self.spec.duplicate_share.clamp(0.0, 1.0))
        {
            let i = self.rng.random_range(0..self.recent.len());
            self.pending.push(self.recent[i].clone());
        }
        if self.recent.len() == DUPLICATE_WINDOW {
            let i = self.rng.random_range(0..DUPLICATE_WINDOW);
            self.recent.swap_remove(i);
        }
        self.recent.push(event.clone());
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            events: 5_000,
            skus: 50,
            skew: 0.0,
            hot_share: 0.0,
            duplicate_share: 0.05,
            invalid_share: 0.01,
            seed: 7,
            id_prefix: "t".into(),
        }
    }

    #[test]
    fn generates_what_was_asked_and_the_oracle_counts_it() {
        let mut oracle = Oracle::default();
        let messages: Vec<Message> = Generator::new(spec()).collect();
        for m in &messages {
            oracle.observe(Some(&m.value));
        }
        let e = oracle.finish();
        assert_eq!(e.events, 5_000);
        assert_eq!(e.messages as usize, messages.len());
        assert_eq!(e.events + e.duplicates + e.dead_letters, e.messages);
        assert_eq!(e.applied + e.rejected, e.events);
        // About 5% and 1%, with plenty of room for chance.
        assert!((150..350).contains(&e.duplicates), "{}", e.duplicates);
        assert!((20..100).contains(&e.dead_letters), "{}", e.dead_letters);
        assert!(e.rejected > 0 && e.applied > e.rejected);
        assert!(e.stock.values().all(|s| *s >= 0));
    }

    #[test]
    fn is_reproducible_from_its_seed() {
        let a: Vec<Message> = Generator::new(spec()).take(100).collect();
        let b: Vec<Message> = Generator::new(spec()).take(100).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn hot_share_concentrates_on_one_sku() {
        let mut s = spec();
        s.hot_share = 0.5;
        let hot = Generator::new(s)
            .filter(|m| m.key.as_deref() == Some("SKU-000000"))
            .count();
        assert!(hot > 2_000, "{hot}");
    }
}
