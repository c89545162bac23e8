//! How a batch of deliveries from one partition is decided, given what the database already
//! holds. The store takes the locks and reads [`Batch::lock_keys`], [`Batch::event_ids`] and
//! [`Batch::skus`] ask for, calls [`Batch::plan`], and writes the plan; every decision
//! (dead letter, duplicate, conflict, applied, rejected) is made here, in offset order.
//!
//! One transaction may also carry the batches of several partitions ([`Parts`]): they are
//! decided one after the other, each seeing what the ones before it did, exactly as their own
//! transactions run back to back would.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::EventKind;
use super::event::{Event, InvalidEvent, decode};
use super::lock_key::lock_key;
use super::orders::{Clock, OrderBook, Reservation, ReservationStatus, apply_order_step};
use super::replies::{Reply, reply_to};
use super::rules::{Movement, Outcome, StockBook, apply_event};

/// One Kafka message as the pipeline sees it: where it was and its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// When the producer created it (Kafka CreateTime, ms since the epoch), for latency.
    pub timestamp_ms: Option<i64>,
    /// Its W3C Trace Context headers, if it has a `traceparent` (boxed: most have none).
    pub trace: Option<Box<TraceHeaders>>,
}

/// A message's W3C Trace Context headers as received (`traceparent`, `tracestate`), checked
/// only where a span links to them ([`crate::traces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl Delivery {
    /// Bytes of its key and payload.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// Deliveries of one partition in offset order, each decoded once on arrival.
#[derive(Debug, Default)]
pub struct Batch {
    items: Vec<(Delivery, Result<Event, InvalidEvent>)>,
    lines: usize,
    /// Bytes of the deliveries' keys and payloads.
    bytes: usize,
}

/// A bad message to keep in `dead_letters`.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    pub delivery: &'a Delivery,
    pub error: &'static str,
    pub detail: String,
}

/// A new event and what became of it.
#[derive(Debug)]
pub struct PlannedEvent<'a> {
    pub event: &'a Event,
    pub partition: i32,
    pub offset: i64,
    pub outcome: Outcome,
    pub digest: [u8; 32],
    /// Its lines; for a commit or release, those of its order's reservation (0 if none).
    pub line_count: i32,
}

/// A reservation the batch makes.
#[derive(Debug, PartialEq, Eq)]
pub struct NewReservation {
    pub order_id: String,
    pub event_id: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub lines: Vec<super::Line>,
}

/// A reservation the batch ends (commit or release), and by which event.
#[derive(Debug, PartialEq, Eq)]
pub struct EndedReservation {
    pub order_id: String,
    pub status: ReservationStatus,
    pub by: String,
}

/// The net change of one product over the batch: one row update however hot the SKU.
#[derive(Debug, PartialEq, Eq)]
pub struct ProductChange {
    pub sku: String,
    pub delta: i64,
    /// The net change of `reserved_stock`.
    pub reserved_delta: i64,
    /// How many movements the batch made; `products.version` grows by this much.
    pub changes: i64,
    /// The batch restocked a SKU that did not exist: insert it rather than update it.
    pub created: bool,
}

/// What a partition's batch did, for counters and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    /// Replies queued in the outbox, for the relay to publish.
    pub replies: u64,
}

#[derive(Debug, Default)]
pub struct BatchPlan<'a> {
    pub events: Vec<PlannedEvent<'a>>,
    /// Ledger rows in the order they happened: (event id, movement).
    pub movements: Vec<(&'a str, Movement)>,
    /// Sorted by SKU.
    pub products: Vec<ProductChange>,
    pub dead_letters: Vec<DeadLetter<'a>>,
    /// What each partition's deliveries came to.
    pub outcomes: BTreeMap<i32, BatchOutcome>,
    /// Reservations made, in order; then those ended (possibly the same, later in the batch).
    pub reservations: Vec<NewReservation>,
    pub ended: Vec<EndedReservation>,
    /// The replies to the batch's order steps, in order.
    pub replies: Vec<Reply>,
    /// The replies to publish, in the batch's order: the new replies, and the recorded ones of
    /// order steps sent again.
    pub queued: Vec<Queued<'a>>,
}

/// A reply to publish: its event's id, and the trace context of the message that asked for it
/// now (a request sent again is answered in its own trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued<'a> {
    pub event_id: &'a str,
    pub trace: Option<&'a TraceHeaders>,
}

impl<'a> Queued<'a> {
    fn of(event: &'a Event, delivery: &'a Delivery) -> Self {
        Queued {
            event_id: &event.id,
            trace: delivery.trace.as_deref(),
        }
    }
}

impl BatchPlan<'_> {
    /// What the deliveries of `partition` came to.
    pub fn outcome(&self, partition: i32) -> BatchOutcome {
        self.outcomes.get(&partition).copied().unwrap_or_default()
    }
}

/// Each distinct SKU of a batch holds one advisory lock until commit, and PostgreSQL's shared
/// lock table holds `max_locks_per_transaction × max_connections` locks in all (6,400 with
/// defaults). Capping a batch's lines bounds what one transaction can take; a replica's lock
/// budget may cap it lower (`crate::store::lock_budget`).
pub const MAX_LINES_PER_BATCH: usize = 500;

/// The most SKU locks one batch transaction takes, as the line cap above promises. A commit or
/// release counts as one line there but locks its reservation's SKUs (up to
/// [`crate::domain::event::MAX_LINES`]), known only once the database is read: a batch past
/// this is split in halves; one event (at most 200 SKUs with its order's reservation) never is.
pub const MAX_LOCKS_PER_BATCH: usize = MAX_LINES_PER_BATCH;

/// A batch takes no more once its messages hold this many bytes (so it holds at most this plus
/// one message): with messages of up to 1 MiB, a count of events alone would let one batch
/// hold hundreds of MiB. 500 typical events are about 100 KB.
pub const MAX_BYTES_PER_BATCH: usize = 512 << 10;

impl Batch {
    /// The batching rule, shared by the worker and the benchmark's database-only run: a batch
    /// takes no more once it holds `max_events` deliveries, `max_lines` lines (at most
    /// [`MAX_LINES_PER_BATCH`]: the replica's lock budget may set fewer) or
    /// [`MAX_BYTES_PER_BATCH`] bytes.
    pub fn is_full(&self, max_events: usize, max_lines: usize) -> bool {
        self.len() >= max_events
            || self.line_count() >= max_lines.min(MAX_LINES_PER_BATCH)
            || self.bytes >= MAX_BYTES_PER_BATCH
    }

    pub fn push(&mut self, delivery: Delivery) {
        self.bytes += delivery.size();
        let decoded = decode(delivery.payload.as_deref());
        if let Ok(event) = &decoded {
            self.lines += counted_lines(event);
        }
        self.items.push((delivery, decoded));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Keeps the first `len` deliveries.
    pub fn truncate(&mut self, len: usize) {
        self.items.truncate(len);
        self.recount();
    }

    /// Marks every delivery as a bad message the database cannot store, with its words `why`:
    /// applied then, the batch dead-letters them. For a batch of one, which alone failed so.
    pub fn unstorable(mut self, why: &str) -> Batch {
        for (_, decoded) in &mut self.items {
            *decoded = Err(InvalidEvent::Unstorable(why.to_owned()));
        }
        self.recount();
        self
    }

    /// Splits the batch in two halves, in offset order: (first, second).
    pub fn halves(mut self) -> (Batch, Batch) {
        let second = self.items.split_off(self.items.len() / 2);
        let mut second = Batch {
            items: second,
            ..Batch::default()
        };
        self.recount();
        second.recount();
        (self, second)
    }

    fn recount(&mut self) {
        self.bytes = self.items.iter().map(|(d, _)| d.size()).sum();
        self.lines = self
            .items
            .iter()
            .filter_map(|(_, decoded)| decoded.as_ref().ok())
            .map(counted_lines)
            .sum();
    }

    /// The offset of the `i`-th delivery.
    pub fn offset_at(&self, i: usize) -> Option<i64> {
        self.items.get(i).map(|(d, _)| d.offset)
    }

    /// For each delivery in order, whether it is malformed (it will be dead-lettered).
    pub fn malformed(&self) -> impl Iterator<Item = bool> + '_ {
        self.items.iter().map(|(_, decoded)| decoded.is_err())
    }

    /// Bytes of the deliveries' keys and payloads.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines of the valid events: each may take an advisory lock, so batches are capped by it.
    pub fn line_count(&self) -> usize {
        self.lines
    }

    pub fn partition(&self) -> Option<i32> {
        self.items.first().map(|(d, _)| d.partition)
    }

    /// Producer timestamps of the deliveries that have one.
    pub fn timestamps(&self) -> impl Iterator<Item = i64> + '_ {
        self.items.iter().filter_map(|(d, _)| d.timestamp_ms)
    }

    /// The trace headers of the deliveries that carry them, in offset order.
    pub fn traces(&self) -> impl Iterator<Item = &TraceHeaders> + '_ {
        self.items.iter().filter_map(|(d, _)| d.trace.as_deref())
    }

    /// First and last offset of the batch.
    pub fn offsets(&self) -> Option<(i64, i64)> {
        Some((self.items.first()?.0.offset, self.items.last()?.0.offset))
    }

    /// Advisory-lock keys of every SKU the batch names, ascending and distinct: taking them in
    /// this one global order is what keeps multi-SKU transactions from deadlocking.
    pub fn lock_keys(&self) -> Vec<i64> {
        Parts(std::slice::from_ref(&self)).lock_keys()
    }

    /// The event ids of the batch, distinct (borrowed: a batch of 500 makes no copies).
    pub fn event_ids(&self) -> Vec<&str> {
        Parts(std::slice::from_ref(&self)).event_ids()
    }

    /// The orders the batch's commits, releases and reserves name, distinct.
    pub fn order_ids(&self) -> Vec<&str> {
        Parts(std::slice::from_ref(&self)).order_ids()
    }

    /// The SKUs the batch's lines name, distinct.
    pub fn skus(&self) -> Vec<&str> {
        Parts(std::slice::from_ref(&self)).skus()
    }

    /// [`Parts::plan`] of this batch alone.
    pub fn plan<'a>(
        &'a self,
        recorded: &HashMap<String, Vec<u8>>,
        stock: StockBook,
        orders: OrderBook,
        clock: Clock,
        reply_all: bool,
    ) -> BatchPlan<'a> {
        Parts(std::slice::from_ref(&self)).plan(recorded, stock, orders, clock, reply_all)
    }
}

/// The batches of one transaction, each of another partition, in the order they are decided.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'s, 'a>(pub &'s [&'a Batch]);

impl<'a> Parts<'_, 'a> {
    fn items(self) -> impl Iterator<Item = &'a (Delivery, Result<Event, InvalidEvent>)> {
        self.0.iter().flat_map(|b| b.items.iter())
    }

    fn events(self) -> impl Iterator<Item = &'a Event> {
        self.items().filter_map(|(_, e)| e.as_ref().ok())
    }

    /// Deliveries of every part.
    pub fn len(self) -> usize {
        self.0.iter().map(|b| b.len()).sum()
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Advisory-lock keys of every SKU the parts name, ascending and distinct.
    pub fn lock_keys(self) -> Vec<i64> {
        let mut keys: Vec<i64> = self
            .events()
            .flat_map(|e| e.lines.iter().map(|l| lock_key(&l.sku)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The event ids of the parts, distinct.
    pub fn event_ids(self) -> Vec<&'a str> {
        let ids: HashSet<&str> = self.events().map(|e| e.id.as_str()).collect();
        ids.into_iter().collect()
    }

    /// The orders the parts' commits, releases and reserves name, distinct.
    pub fn order_ids(self) -> Vec<&'a str> {
        let orders: HashSet<&str> = self
            .events()
            .filter_map(|e| e.order_id.as_deref())
            .collect();
        orders.into_iter().collect()
    }

    /// The SKUs the parts' lines name, distinct.
    pub fn skus(self) -> Vec<&'a str> {
        let skus: HashSet<&str> = self
            .events()
            .flat_map(|e| e.lines.iter().map(|l| l.sku.as_str()))
            .collect();
        skus.into_iter().collect()
    }

    /// Decides every delivery, part after part and each part in offset order. `recorded` maps
    /// event ids already in `processed_events` to their digest; `stock` holds the current
    /// stock of the parts' SKUs and of their orders' reservations (absent: never restocked);
    /// `orders` the reservations of the orders they name (absent: none); `clock` the
    /// database's time; `reply_all`, whether stock events get a reply too
    /// (`results.all_events`). Must be called with the parts' locks held.
    pub fn plan(
        self,
        recorded: &HashMap<String, Vec<u8>>,
        mut stock: StockBook,
        mut orders: OrderBook,
        clock: Clock,
        reply_all: bool,
    ) -> BatchPlan<'a> {
        let mut plan = BatchPlan::default();
        let existing: HashSet<String> = stock.keys().cloned().collect();
        // Ids decided earlier in this transaction count as recorded for the deliveries after
        // them, in this partition and the next ones alike.
        let mut seen: HashMap<&str, [u8; 32]> = HashMap::new();
        for (delivery, decoded) in self.items() {
            let tally = plan.outcomes.entry(delivery.partition).or_default();
            let event = match decoded {
                Ok(event) => event,
                Err(invalid) => {
                    tally.dead_letters += 1;
                    plan.dead_letters.push(dead_letter(delivery, invalid));
                    continue;
                }
            };
            let digest = event.digest();
            let earlier = seen
                .get(event.id.as_str())
                .map(|d| d.as_slice())
                .or_else(|| recorded.get(&event.id).map(Vec::as_slice));
            match earlier {
                Some(d) if d == digest => {
                    tally.duplicates += 1;
                    // Its recorded reply, if it got one, is published again.
                    if reply_all || event.kind.is_order_step() {
                        plan.queued.push(Queued::of(event, delivery));
                    }
                    continue;
                }
                Some(_) => {
                    tally.dead_letters += 1;
                    let conflict = InvalidEvent::EventIdConflict(event.id.clone());
                    plan.dead_letters.push(dead_letter(delivery, &conflict));
                    continue;
                }
                None => {}
            }
            let order = event.order_id.as_deref();
            let applied = if event.kind.is_order_step() {
                apply_order_step(event, &mut stock, &mut orders, clock)
            } else {
                apply_event(event, &mut stock)
            };
            let reservation = order.and_then(|o| orders.get(o).map(|r| (o, r)));
            let outcome = match applied {
                Ok(movements) => {
                    plan.record_effects(event, movements, reservation);
                    Outcome::Applied
                }
                Err(reason) => Outcome::Rejected(reason),
            };
            let line_count = match event.kind {
                EventKind::Commit | EventKind::Release => {
                    reservation.map_or(0, |r| r.1.lines.len())
                }
                _ => event.lines.len(),
            } as i32;
            let tally = plan.outcomes.entry(delivery.partition).or_default();
            match outcome {
                Outcome::Applied => tally.applied += 1,
                Outcome::Rejected(_) => tally.rejected += 1,
            }
            if reply_all || event.kind.is_order_step() {
                tally.replies += 1;
                let reservation = order.and_then(|o| orders.get(o));
                plan.replies.push(reply_to(event, outcome, reservation));
                plan.queued.push(Queued::of(event, delivery));
            }
            seen.insert(&event.id, digest);
            plan.events.push(PlannedEvent {
                event,
                partition: delivery.partition,
                offset: delivery.offset,
                outcome,
                digest,
                line_count,
            });
        }
        plan.products = product_changes(plan.movements.iter().map(|(_, m)| m), &existing);
        plan
    }
}

impl<'a> BatchPlan<'a> {
    /// An applied event's movements, and the reservation it made or ended (`order`: its order
    /// and the reservation as it stands after the event).
    fn record_effects(
        &mut self,
        event: &'a Event,
        movements: Vec<Movement>,
        order: Option<(&str, &Reservation)>,
    ) {
        for m in movements {
            self.movements.push((&event.id, m));
        }
        let Some((order_id, r)) = order else {
            return;
        };
        match event.kind {
            EventKind::Reserve => self.reservations.push(NewReservation {
                order_id: order_id.to_owned(),
                event_id: event.id.clone(),
                expires_at: r.expires_at,
                lines: r.lines.clone(),
            }),
            _ => self.ended.push(EndedReservation {
                order_id: order_id.to_owned(),
                status: r.status,
                by: event.id.clone(),
            }),
        }
    }
}

/// An event's lines towards the batch's cap: a commit or release names none, but locks its
/// reservation's, so it counts at least one.
fn counted_lines(event: &Event) -> usize {
    event.lines.len().max(1)
}

/// The net change of each product over `movements`, sorted by SKU: one row update per product
/// however many movements touch it. `existing` are the SKUs that have a row already.
pub fn product_changes<'m>(
    movements: impl Iterator<Item = &'m Movement>,
    existing: &HashSet<String>,
) -> Vec<ProductChange> {
    // Per SKU: stock delta, reserved delta, movements.
    let mut products: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for m in movements {
        let entry = products.entry(m.sku.as_str()).or_default();
        entry.0 += m.delta;
        entry.1 += m.reserved_delta;
        entry.2 += 1;
    }
    products
        .into_iter()
        .map(|(sku, (delta, reserved_delta, changes))| ProductChange {
            created: !existing.contains(sku),
            sku: sku.to_owned(),
            delta,
            reserved_delta,
            changes,
        })
        .collect()
}

fn dead_letter<'a>(delivery: &'a Delivery, invalid: &InvalidEvent) -> DeadLetter<'a> {
    DeadLetter {
        delivery,
        error: invalid.code(),
        detail: invalid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RejectReason;

    fn delivery(offset: i64, json: &str) -> Delivery {
        Delivery {
            partition: 3,
            offset,
            key: None,
            payload: Some(json.as_bytes().to_vec()),
            timestamp_ms: None,
            trace: None,
        }
    }

    fn batch(jsons: &[&str]) -> Batch {
        let mut b = Batch::default();
        for (i, j) in jsons.iter().enumerate() {
            b.push(delivery(i as i64 + 100, j));
        }
        b
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one batch, each of its deliveries checked in turn"
    )]
    fn decides_each_delivery_in_offset_order() {
        let b = batch(&[
            r#"{"event_id":"r1","type":"restock","sku":"A","quantity":2}"#,
            r#"{"event_id":"s1","type":"sale","sku":"A","quantity":1}"#,
            r#"{"event_id":"s1","type":"sale","sku":"A","quantity":1}"#,
            r#"{"event_id":"s1","type":"sale","sku":"A","quantity":9}"#,
            r#"{"event_id":"s2","type":"sale","sku":"A","quantity":5}"#,
            r#"{"event_id":"s3","type":"sale","sku":"B","quantity":1}"#,
            "garbage",
            r#"{"event_id":"old","type":"sale","sku":"A","quantity":1}"#,
            r#"{"event_id":"s4","type":"sale","sku":"A","quantity":1}"#,
        ]);
        assert_eq!(b.line_count(), 8);
        let old = decode(Some(
            br#"{"event_id":"old","type":"sale","sku":"A","quantity":1}"#,
        ))
        .unwrap();
        let recorded = HashMap::from([("old".to_owned(), old.digest().to_vec())]);
        let clock = Clock {
            now: chrono::DateTime::UNIX_EPOCH,
            default_ttl: chrono::TimeDelta::seconds(900),
            max_ttl: chrono::TimeDelta::days(7),
        };
        let plan = b.plan(&recorded, StockBook::new(), OrderBook::new(), clock, false);

        let outcomes: Vec<_> = plan
            .events
            .iter()
            .map(|e| (e.event.id.as_str(), e.offset, e.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("r1", 100, Outcome::Applied),
                ("s1", 101, Outcome::Applied),
                (
                    "s2",
                    104,
                    Outcome::Rejected(RejectReason::InsufficientStock)
                ),
                ("s3", 105, Outcome::Rejected(RejectReason::UnknownSku)),
                ("s4", 108, Outcome::Applied),
            ]
        );
        assert_eq!(
            plan.outcome(3),
            BatchOutcome {
                applied: 3,
                rejected: 2,
                duplicates: 2,
                dead_letters: 2,
                replies: 0,
            },
            "s1 again, and old: duplicates"
        );
        assert!(plan.replies.is_empty() && plan.queued.is_empty());
        let all = b.plan(&recorded, StockBook::new(), OrderBook::new(), clock, true);
        let replied: Vec<(&str, &str)> = all
            .replies
            .iter()
            .map(|r| (r.event_id.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            replied,
            [
                ("r1", "A"),
                ("s1", "A"),
                ("s2", "A"),
                ("s3", "B"),
                ("s4", "A")
            ],
            "results.all_events: every decided stock event, keyed by its SKU"
        );
        let queued: Vec<&str> = all.queued.iter().map(|q| q.event_id).collect();
        assert_eq!(
            queued,
            ["r1", "s1", "s1", "s2", "s3", "old", "s4"],
            "the duplicates' recorded replies are published again"
        );
        let dead: Vec<_> = plan
            .dead_letters
            .iter()
            .map(|d| (d.delivery.offset, d.error))
            .collect();
        assert_eq!(dead, [(103, "event_id_conflict"), (106, "invalid_json")]);
        assert_eq!(
            plan.products,
            [ProductChange {
                sku: "A".into(),
                delta: 0,
                reserved_delta: 0,
                changes: 3,
                created: true,
            }]
        );
        let stock_after: Vec<_> = plan.movements.iter().map(|(_, m)| m.stock_after).collect();
        assert_eq!(stock_after, [2, 1, 0]);
    }

    #[test]
    fn lock_keys_are_sorted_and_distinct() {
        let b = batch(&[
            r#"{"event_id":"a","type":"sale","lines":[{"sku":"Z","quantity":1},{"sku":"A","quantity":1}]}"#,
            r#"{"event_id":"b","type":"sale","sku":"A","quantity":1}"#,
        ]);
        let keys = b.lock_keys();
        assert_eq!(keys.len(), 2);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(b.skus().len(), 2);
        assert_eq!(b.event_ids().len(), 2);
    }

    #[test]
    fn a_batch_is_full_at_its_events_lines_or_bytes() {
        let sale = r#"{"event_id":"a","type":"sale","sku":"A","quantity":1}"#;
        assert!(batch(&[sale, sale]).is_full(2, MAX_LINES_PER_BATCH));
        assert!(!batch(&[sale, sale]).is_full(3, MAX_LINES_PER_BATCH));
        let mut big = Batch::default();
        big.push(Delivery {
            payload: Some(vec![b' '; MAX_BYTES_PER_BATCH - 10]),
            ..delivery(0, "")
        });
        assert!(!big.is_full(500, MAX_LINES_PER_BATCH));
        big.push(delivery(1, sale));
        assert!(
            big.is_full(500, MAX_LINES_PER_BATCH),
            "{} bytes",
            MAX_BYTES_PER_BATCH
        );
        big.truncate(1);
        assert!(
            !big.is_full(500, MAX_LINES_PER_BATCH),
            "truncate recounts the bytes"
        );
    }
}
