//! Workloads and their oracle. A [`Generator`] makes a reproducible stream of messages (valid
//! events over a SKU population with optional skew, re-sent duplicates, malformed messages);
//! the [`Oracle`] runs every message through the same decoder and rules as the consumer and so
//! knows the final stock and the outcome counts a correct consumer must reach.
//!
//! The oracle assumes what the product guarantees for single-SKU events keyed by SKU: each
//! SKU's events are applied in the order they were produced. Multi-SKU events across
//! partitions have no such order, so their tests check invariants instead of an oracle.
//!
//! Order traffic (`orders` share) keeps that assumption: every generated order has one line
//! and all its events are keyed by that SKU, so they stay in order with the SKU's stock events
//! (and one order's events in one partition, as docs/contract.md section 7 asks of an order id key).
//! Expiry depends on the clock, not on the stream: an expiring order reserves a SKU of its own
//! (restocked just before) with a 1-second TTL, so when it expires changes no other outcome;
//! every other order's reservation lasts a day, so its commit is never late.

use std::collections::{HashMap, VecDeque};

use chrono::{TimeDelta, Utc};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use inventory_consumer::domain::orders::{Clock, OrderBook, apply_order_step, expire};
use inventory_consumer::domain::{Outcome, StockBook, apply_event, decode};
pub use inventory_consumer::expectation::Expectation;

/// A reservation whose expiry is at most this far from its reserve is expected to have expired
/// by the time the run is verified; a longer one to be still active (verify within its life).
pub const EXPIRES_DURING_RUN: TimeDelta = TimeDelta::seconds(60);
/// The contract's default TTL (`reservations.default_ttl_s`), for reserves that give none.
const DEFAULT_TTL: TimeDelta = TimeDelta::seconds(900);
/// `reservations.max_ttl_s`'s default: the runs this oracle checks keep it.
const MAX_TTL: TimeDelta = TimeDelta::days(7);

/// Folds messages, in per-SKU order, into the [`Expectation`].
#[derive(Debug)]
pub struct Oracle {
    book: StockBook,
    orders: OrderBook,
    digests: HashMap<String, [u8; 32]>,
    expected: Expectation,
    /// The stream is decided at one instant (when the oracle was made): no reservation
    /// expires while it is read. Exact for generated traffic; a file whose later events touch
    /// a SKU held by a reservation of a minute or less depends on when that one expires.
    clock: Clock,
}

impl Default for Oracle {
    fn default() -> Self {
        Oracle {
            book: StockBook::default(),
            orders: OrderBook::default(),
            digests: HashMap::new(),
            expected: Expectation::default(),
            clock: Clock {
                now: Utc::now(),
                default_ttl: DEFAULT_TTL,
                max_ttl: MAX_TTL,
            },
        }
    }
}

impl Oracle {
    /// The expectation over messages already made, in the order they are sent.
    pub fn over<'a>(messages: impl IntoIterator<Item = &'a Message>) -> Expectation {
        let mut oracle = Oracle::default();
        for m in messages {
            oracle.observe(Some(&m.value));
        }
        oracle.finish()
    }

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
                let applied = if event.kind.is_order_step() {
                    self.expected.replies += 1;
                    apply_order_step(&event, &mut self.book, &mut self.orders, self.clock)
                } else {
                    apply_event(&event, &mut self.book)
                };
                let outcome = match applied {
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

    /// The end state once the short reservations have expired ([`EXPIRES_DURING_RUN`]).
    pub fn finish(mut self) -> Expectation {
        let later = self.clock.now + EXPIRES_DURING_RUN;
        let order_ids: Vec<String> = self.orders.keys().cloned().collect();
        for order_id in order_ids {
            if expire(&order_id, &mut self.book, &mut self.orders, later).is_some() {
                self.expected.replies += 1;
            }
        }
        for reservation in self.orders.values() {
            *self
                .expected
                .reservations
                .entry(reservation.status.as_str().to_owned())
                .or_default() += 1;
        }
        self.expected.reserved = self
            .book
            .iter()
            .filter(|(_, s)| s.reserved != 0)
            .map(|(sku, s)| (sku.clone(), s.reserved))
            .collect();
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
    /// Share of events that start an order: a reserve, then (later) its commit or release,
    /// or nothing; some orders expire instead (see the module doc).
    pub order_share: f64,
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
    recent: VecDeque<Message>,
    pending: Vec<Message>,
    /// Order steps still to send, each after the event count it is due at. Their ids are
    /// taken when the order starts, so the stream holds exactly `events` valid events.
    scheduled: Vec<(u64, Message)>,
    /// Valid events sent so far (the clock of `scheduled`).
    sent: u64,
}

/// How many of the latest events a duplicate (or a reused id) is drawn from.
const DUPLICATE_WINDOW: usize = 1_000;
/// A commit or release follows its reserve after up to this many other events.
const ORDER_SPAN: u64 = 50;
/// Reservations of orders that do not expire last a day: never late within a run.
const ORDER_TTL_SECONDS: i64 = 86_400;

/// What becomes of a generated order, by share in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OrderFate {
    Commit,
    Release,
    /// Left active: stock stays reserved.
    Abandon,
    /// Reserves a SKU of its own for one second and is released by the service.
    Expire,
}

impl OrderFate {
    fn roll(roll: u32) -> Self {
        match roll {
            0..50 => OrderFate::Commit,
            50..75 => OrderFate::Release,
            75..85 => OrderFate::Abandon,
            _ => OrderFate::Expire,
        }
    }
}

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
            recent: VecDeque::new(),
            pending: Vec::new(),
            scheduled: Vec::new(),
            sent: 0,
        }
    }

    fn next_id(&mut self) -> String {
        let id = format!("{}-{:08}", self.spec.id_prefix, self.next_event);
        self.next_event += 1;
        id
    }

    /// A new valid event: an order's first step (when the budget has room for its second)
    /// or a stock event.
    fn fresh(&mut self) -> Message {
        let room = self.spec.events - self.next_event;
        if room >= 2 && self.rng.random_bool(self.spec.order_share.clamp(0.0, 1.0)) {
            self.order()
        } else {
            self.event()
        }
    }

    /// Starts an order: returns its first message and schedules the rest.
    fn order(&mut self) -> Message {
        let fate = OrderFate::roll(self.rng.random_range(0..100));
        let quantity: i64 = self.rng.random_range(1..=5);
        let (sku, ttl, restock) = if fate == OrderFate::Expire {
            // Its own SKU, restocked first: its expiry cannot change another outcome. Named
            // after the run's prefix (hashed: any prefix makes a valid, short SKU).
            let run = inventory_consumer::domain::lock_key(&self.spec.id_prefix) as u64;
            let sku = format!("EXP-{run:016x}-{:08}", self.next_event);
            let id = self.next_id();
            let restock = keyed(
                &sku,
                serde_json::json!({
                    "event_id": id, "type": "restock", "sku": sku, "quantity": quantity,
                    "source": "produce"
                })
                .to_string(),
            );
            (sku, 1, Some(restock))
        } else {
            (self.pick_sku(), ORDER_TTL_SECONDS, None)
        };
        let id = self.next_id();
        let order_id = format!("{id}-order");
        let reserve = keyed(
            &sku,
            serde_json::json!({
                "event_id": id, "type": "reserve", "order_id": order_id, "sku": sku,
                "quantity": quantity, "ttl_seconds": ttl, "source": "produce"
            })
            .to_string(),
        );
        let ending = match fate {
            OrderFate::Commit => Some("commit"),
            OrderFate::Release => Some("release"),
            OrderFate::Abandon | OrderFate::Expire => None,
        };
        if let Some(kind) = ending {
            let id = self.next_id();
            let due = self.sent + self.rng.random_range(1..=ORDER_SPAN);
            let step = keyed(
                &sku,
                serde_json::json!({
                    "event_id": id, "type": kind, "order_id": order_id, "source": "produce"
                })
                .to_string(),
            );
            self.scheduled.push((due, step));
        }
        match restock {
            Some(restock) => {
                self.scheduled.push((self.sent, reserve));
                restock
            }
            None => reserve,
        }
    }

    /// The scheduled step due first, if one is due by now (or any, once `events` are out).
    fn due_step(&mut self) -> Option<Message> {
        let out_of_events = self.next_event >= self.spec.events;
        let (i, _) = self
            .scheduled
            .iter()
            .enumerate()
            .filter(|(_, (due, _))| out_of_events || *due <= self.sent)
            .min_by_key(|(_, (due, _))| *due)?;
        Some(self.scheduled.remove(i).1)
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
        let id = self.next_id();
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
        let event = match self.due_step() {
            Some(step) => step,
            None if self.next_event < self.spec.events => self.fresh(),
            None => return None,
        };
        self.sent += 1;
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
        // The window slides (the oldest goes), so a duplicate is never more than
        // DUPLICATE_WINDOW events late: with history retention, a re-send later than the dedupe
        // horizon would rightly apply again.
        if self.recent.len() == DUPLICATE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
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
            order_share: 0.0,
            seed: 7,
            id_prefix: "t".into(),
        }
    }

    #[test]
    fn generates_what_was_asked_and_the_oracle_counts_it() {
        let messages: Vec<Message> = Generator::new(spec()).collect();
        let e = Oracle::over(&messages);
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
    fn order_traffic_ends_as_the_fates_say() {
        let mut s = spec();
        s.order_share = 0.3;
        let messages: Vec<Message> = Generator::new(s).collect();
        let e = Oracle::over(&messages);
        assert_eq!(
            e.events, 5_000,
            "order steps count towards the events asked for"
        );
        assert_eq!(e.events + e.duplicates + e.dead_letters, e.messages);

        // Counted from the messages themselves: the kinds sent, and each order's key.
        let mut steps = std::collections::BTreeSet::new();
        let mut keys: HashMap<String, std::collections::BTreeSet<Option<String>>> = HashMap::new();
        for m in &messages {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.value) else {
                continue;
            };
            if let (Some(order), Some(id)) = (v["order_id"].as_str(), v["event_id"].as_str()) {
                steps.insert(id.to_owned());
                keys.entry(order.to_owned())
                    .or_default()
                    .insert(m.key.clone());
            }
        }
        let expired = e.reservations.get("expired").copied().unwrap_or(0);
        let active = e.reservations.get("active").copied().unwrap_or(0);
        assert!(expired > 0 && active > 0, "{:?}", e.reservations);
        assert!(e.reservations.get("committed").copied().unwrap_or(0) > 0);
        assert!(e.reservations.get("released").copied().unwrap_or(0) > 0);
        // Malformed copies may carry an order id too: at least every valid step is replied.
        assert!(e.replies >= expired && e.replies - expired <= steps.len() as u64);
        assert!(
            keys.values().all(|k| k.len() == 1),
            "every order's events share one key"
        );
        assert!(e.reserved.values().all(|r| *r > 0));
        assert!(
            e.reserved.keys().all(|sku| !sku.starts_with("EXP-")),
            "expiring orders hold nothing at the end"
        );
        assert!(e.reserved.iter().all(|(sku, r)| e.stock[sku] >= *r));
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
