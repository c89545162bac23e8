//! What a batch writes, by table, as the column arrays its statements take; and the reads of
//! its stock and reservations back into the domain's types.

use tokio_postgres::types::{ToSql, Type};

use super::sql::{
    END_RESERVATIONS, INSERT_DEAD_LETTERS, INSERT_EVENTS, INSERT_MOVEMENTS, INSERT_PRODUCTS,
    INSERT_REPLIES, INSERT_RESERVATION_LINES, INSERT_RESERVATIONS, QUEUE_REPLIES, RECORD_OFFSET,
    UPDATE_PRODUCTS,
};
use super::{Source, Write};
use crate::domain::batch::{BatchPlan, EndedReservation, ProductChange};
use crate::domain::{
    Line, Movement, OrderBook, Queued, Reply, Reservation, ReservationStatus, Stock, StockBook,
    lock_key,
};
use crate::store::Failure;

/// Everything the plan writes, by table, as the arrays the statements take.
pub(super) struct WriteRows<'a> {
    source: &'a Source,
    /// Each part's partition and the offset after its batch, in partition order.
    partitions: Vec<i32>,
    next_offsets: Vec<i64>,
    events: EventRows<'a>,
    updated: ProductRows<'a>,
    created: ProductRows<'a>,
    movements: MovementRows<'a>,
    made: ReservationRows<'a>,
    ended: EndedRows<'a>,
    replies: ReplyRows<'a>,
    queued: QueueRows<'a>,
    dead: DeadLetterRows<'a>,
}

impl<'a> WriteRows<'a> {
    /// `next_offsets`: each part's partition and the offset after its batch.
    pub(super) fn of(
        plan: &'a BatchPlan<'a>,
        source: &'a Source,
        mut next_offsets: Vec<(i32, i64)>,
    ) -> Self {
        next_offsets.sort_unstable();
        WriteRows {
            source,
            partitions: next_offsets.iter().map(|(p, _)| *p).collect(),
            next_offsets: next_offsets.iter().map(|(_, n)| *n).collect(),
            events: EventRows::of(plan),
            updated: ProductRows::of(plan.products.iter().filter(|p| !p.created)),
            created: ProductRows::of(plan.products.iter().filter(|p| p.created)),
            movements: MovementRows::of(plan.movements.iter().map(|(id, m)| (*id, m))),
            made: ReservationRows::of(plan),
            ended: EndedRows::of(&plan.ended),
            replies: ReplyRows::of(&plan.replies),
            queued: QueueRows::of(&plan.queued),
            dead: DeadLetterRows::of(plan),
        }
    }

    /// The writes, in the order they run.
    pub(super) fn writes(&self) -> Vec<Write<'_>> {
        let topic = &self.source.topic;
        let (updated, created, made) = (&self.updated, &self.created, &self.made);
        vec![
            Write::new(
                INSERT_EVENTS,
                &self.events.params(topic),
                !self.events.ids.is_empty(),
            ),
            Write::new(UPDATE_PRODUCTS, &updated.params(), !updated.skus.is_empty())
                .changing(updated.skus.len()),
            Write::new(INSERT_PRODUCTS, &created.params(), !created.skus.is_empty())
                .changing(created.skus.len()),
            Write::new(
                INSERT_MOVEMENTS,
                &self.movements.params(),
                !self.movements.is_empty(),
            ),
            Write::new(INSERT_RESERVATIONS, &made.params(), !made.orders.is_empty()),
            Write::new(
                INSERT_RESERVATION_LINES,
                &made.line_params(),
                !made.line_orders.is_empty(),
            ),
            Write::new(
                END_RESERVATIONS,
                &self.ended.params(),
                !self.ended.orders.is_empty(),
            ),
            Write::new(
                INSERT_REPLIES,
                &self.replies.params(),
                !self.replies.event_ids.is_empty(),
            ),
            Write::new(
                QUEUE_REPLIES,
                &self.queued.params(),
                !self.queued.event_ids.is_empty(),
            ),
            Write::new(
                INSERT_DEAD_LETTERS,
                &self.dead.params(topic),
                !self.dead.offsets.is_empty(),
            ),
            Write::new(
                RECORD_OFFSET,
                &[
                    (&self.source.group, Type::TEXT),
                    (topic, Type::TEXT),
                    (&self.partitions, Type::INT4_ARRAY),
                    (&self.next_offsets, Type::INT8_ARRAY),
                ],
                true,
            ),
        ]
    }
}

/// The columns of the plan's `processed_events` rows.
struct EventRows<'a> {
    partitions: Vec<i32>,
    ids: Vec<&'a str>,
    kinds: Vec<&'a str>,
    outcomes: Vec<&'a str>,
    reasons: Vec<Option<&'a str>>,
    lines: Vec<i32>,
    offsets: Vec<i64>,
    digests: Vec<&'a [u8]>,
}

impl<'a> EventRows<'a> {
    fn of(plan: &'a BatchPlan<'a>) -> Self {
        let e = &plan.events;
        EventRows {
            partitions: e.iter().map(|e| e.partition).collect(),
            ids: e.iter().map(|e| e.event.id.as_str()).collect(),
            kinds: e.iter().map(|e| e.event.kind.as_str()).collect(),
            outcomes: e.iter().map(|e| e.outcome.as_str()).collect(),
            reasons: e.iter().map(|e| e.outcome.reason()).collect(),
            lines: e.iter().map(|e| e.line_count).collect(),
            offsets: e.iter().map(|e| e.offset).collect(),
            digests: e.iter().map(|e| e.digest.as_slice()).collect(),
        }
    }

    /// For [`INSERT_EVENTS`].
    fn params<'s>(&'s self, topic: &'s String) -> [(&'s (dyn ToSql + Sync), Type); 9] {
        [
            (topic, Type::TEXT),
            (&self.partitions, Type::INT4_ARRAY),
            (&self.ids, Type::TEXT_ARRAY),
            (&self.kinds, Type::TEXT_ARRAY),
            (&self.outcomes, Type::TEXT_ARRAY),
            (&self.reasons, Type::TEXT_ARRAY),
            (&self.lines, Type::INT4_ARRAY),
            (&self.offsets, Type::INT8_ARRAY),
            (&self.digests, Type::BYTEA_ARRAY),
        ]
    }
}

/// Product changes of the plan: of existing SKUs, or (`created`) of first-restocked ones.
pub(in crate::store) struct ProductRows<'a> {
    skus: Vec<&'a str>,
    deltas: Vec<i64>,
    changes: Vec<i64>,
    reserved: Vec<i64>,
}

impl<'a> ProductRows<'a> {
    pub(in crate::store) fn of(changes: impl Iterator<Item = &'a ProductChange>) -> Self {
        let chosen: Vec<&ProductChange> = changes.collect();
        ProductRows {
            skus: chosen.iter().map(|p| p.sku.as_str()).collect(),
            deltas: chosen.iter().map(|p| p.delta).collect(),
            changes: chosen.iter().map(|p| p.changes).collect(),
            reserved: chosen.iter().map(|p| p.reserved_delta).collect(),
        }
    }

    /// For [`INSERT_PRODUCTS`] and [`UPDATE_PRODUCTS`] alike (a SKU first restocked may be
    /// reserved in the same batch).
    pub(in crate::store) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.skus, Type::TEXT_ARRAY),
            (&self.deltas, Type::INT8_ARRAY),
            (&self.changes, Type::INT8_ARRAY),
            (&self.reserved, Type::INT8_ARRAY),
        ]
    }
}

/// Ledger rows, each with the event that caused it.
pub(in crate::store) struct MovementRows<'a> {
    event_ids: Vec<&'a str>,
    skus: Vec<&'a str>,
    deltas: Vec<i64>,
    after: Vec<i64>,
    reserved_deltas: Vec<i64>,
    reserved_after: Vec<i64>,
}

impl<'a> MovementRows<'a> {
    pub(in crate::store) fn of(movements: impl Iterator<Item = (&'a str, &'a Movement)>) -> Self {
        let m: Vec<(&str, &Movement)> = movements.collect();
        MovementRows {
            event_ids: m.iter().map(|(id, _)| *id).collect(),
            skus: m.iter().map(|(_, m)| m.sku.as_str()).collect(),
            deltas: m.iter().map(|(_, m)| m.delta).collect(),
            after: m.iter().map(|(_, m)| m.stock_after).collect(),
            reserved_deltas: m.iter().map(|(_, m)| m.reserved_delta).collect(),
            reserved_after: m.iter().map(|(_, m)| m.reserved_after).collect(),
        }
    }

    pub(in crate::store) fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
    }

    pub(in crate::store) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 6] {
        [
            (&self.event_ids, Type::TEXT_ARRAY),
            (&self.skus, Type::TEXT_ARRAY),
            (&self.deltas, Type::INT8_ARRAY),
            (&self.after, Type::INT8_ARRAY),
            (&self.reserved_deltas, Type::INT8_ARRAY),
            (&self.reserved_after, Type::INT8_ARRAY),
        ]
    }
}

/// The reservations the plan makes, and their lines.
struct ReservationRows<'a> {
    orders: Vec<&'a str>,
    events: Vec<&'a str>,
    expires_ms: Vec<i64>,
    line_orders: Vec<&'a str>,
    line_numbers: Vec<i32>,
    line_skus: Vec<&'a str>,
    line_quantities: Vec<i64>,
}

impl<'a> ReservationRows<'a> {
    fn of(plan: &'a BatchPlan<'a>) -> Self {
        let made = &plan.reservations;
        let lines = || {
            made.iter().flat_map(|r| {
                r.lines
                    .iter()
                    .enumerate()
                    .map(move |(i, l)| (r.order_id.as_str(), i as i32 + 1, l))
            })
        };
        ReservationRows {
            orders: made.iter().map(|r| r.order_id.as_str()).collect(),
            events: made.iter().map(|r| r.event_id.as_str()).collect(),
            expires_ms: made
                .iter()
                .map(|r| r.expires_at.timestamp_millis())
                .collect(),
            line_orders: lines().map(|(o, _, _)| o).collect(),
            line_numbers: lines().map(|(_, n, _)| n).collect(),
            line_skus: lines().map(|(_, _, l)| l.sku.as_str()).collect(),
            line_quantities: lines().map(|(_, _, l)| l.quantity).collect(),
        }
    }

    /// For [`INSERT_RESERVATIONS`].
    fn params(&self) -> [(&(dyn ToSql + Sync), Type); 3] {
        [
            (&self.orders, Type::TEXT_ARRAY),
            (&self.events, Type::TEXT_ARRAY),
            (&self.expires_ms, Type::INT8_ARRAY),
        ]
    }

    /// For [`INSERT_RESERVATION_LINES`].
    fn line_params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.line_orders, Type::TEXT_ARRAY),
            (&self.line_numbers, Type::INT4_ARRAY),
            (&self.line_skus, Type::TEXT_ARRAY),
            (&self.line_quantities, Type::INT8_ARRAY),
        ]
    }
}

/// Replies to record and queue.
pub(in crate::store) struct ReplyRows<'a> {
    pub(in crate::store) event_ids: Vec<&'a str>,
    orders: Vec<Option<&'a str>>,
    keys: Vec<&'a str>,
    payloads: Vec<&'a str>,
}

impl<'a> ReplyRows<'a> {
    pub(in crate::store) fn of(replies: &'a [Reply]) -> Self {
        ReplyRows {
            event_ids: replies.iter().map(|r| r.event_id.as_str()).collect(),
            orders: replies.iter().map(|r| r.order_id.as_deref()).collect(),
            keys: replies.iter().map(|r| r.key.as_str()).collect(),
            payloads: replies.iter().map(|r| r.payload.as_str()).collect(),
        }
    }

    pub(in crate::store) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.event_ids, Type::TEXT_ARRAY),
            (&self.orders, Type::TEXT_ARRAY),
            (&self.keys, Type::TEXT_ARRAY),
            (&self.payloads, Type::TEXT_ARRAY),
        ]
    }
}

/// Replies to queue for the relay, in order, each with its request's trace context.
pub(in crate::store) struct QueueRows<'a> {
    event_ids: Vec<&'a str>,
    traceparents: Vec<Option<&'a str>>,
    tracestates: Vec<Option<&'a str>>,
}

impl<'a> QueueRows<'a> {
    pub(in crate::store) fn of(queued: &[Queued<'a>]) -> Self {
        QueueRows {
            event_ids: queued.iter().map(|q| q.event_id).collect(),
            traceparents: queued
                .iter()
                .map(|q| q.trace.map(|t| t.traceparent.as_str()))
                .collect(),
            tracestates: queued
                .iter()
                .map(|q| q.trace.and_then(|t| t.tracestate.as_deref()))
                .collect(),
        }
    }

    pub(in crate::store) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 3] {
        [
            (&self.event_ids, Type::TEXT_ARRAY),
            (&self.traceparents, Type::TEXT_ARRAY),
            (&self.tracestates, Type::TEXT_ARRAY),
        ]
    }
}

/// Reservations ended, and by which event.
pub(in crate::store) struct EndedRows<'a> {
    orders: Vec<&'a str>,
    statuses: Vec<&'static str>,
    by: Vec<&'a str>,
}

impl<'a> EndedRows<'a> {
    pub(in crate::store) fn of(ended: &'a [EndedReservation]) -> Self {
        EndedRows {
            orders: ended.iter().map(|e| e.order_id.as_str()).collect(),
            statuses: ended.iter().map(|e| e.status.as_str()).collect(),
            by: ended.iter().map(|e| e.by.as_str()).collect(),
        }
    }

    pub(in crate::store) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 3] {
        [
            (&self.orders, Type::TEXT_ARRAY),
            (&self.statuses, Type::TEXT_ARRAY),
            (&self.by, Type::TEXT_ARRAY),
        ]
    }
}

/// The stock of the SKUs a [`STOCK`] read found.
pub(in crate::store) fn read_stock(rows: &[tokio_postgres::Row]) -> Result<StockBook, Failure> {
    let mut stock = StockBook::with_capacity(rows.len());
    for row in rows {
        let sku: String = row.try_get(0)?;
        let (on_hand, reserved) = (row.try_get(1)?, row.try_get(2)?);
        stock.insert(sku, Stock { on_hand, reserved });
    }
    Ok(stock)
}

/// Advisory-lock keys of `skus`, ascending and distinct: taking them in this one global order
/// is what keeps multi-SKU transactions from deadlocking.
pub(in crate::store) fn lock_keys(skus: &[impl AsRef<str>]) -> Vec<i64> {
    let mut keys: Vec<i64> = skus.iter().map(|s| lock_key(s.as_ref())).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The reservations read under the locks, by order (lines in line order).
pub(in crate::store) fn read_reservations(
    rows: &[tokio_postgres::Row],
) -> Result<OrderBook, Failure> {
    let mut orders = OrderBook::new();
    for row in rows {
        let order_id: String = row.try_get(0)?;
        let status = match row.try_get::<_, &str>(2)? {
            "active" => ReservationStatus::Active,
            "committed" => ReservationStatus::Committed,
            "released" => ReservationStatus::Released,
            "expired" => ReservationStatus::Expired,
            other => return Err(Failure::fatal(format!("reservation status `{other}`"))),
        };
        let reservation = orders.entry(order_id).or_insert_with(|| Reservation {
            event_id: String::new(),
            lines: Vec::new(),
            status,
            expires_at: chrono::DateTime::UNIX_EPOCH,
        });
        reservation.event_id = row.try_get(1)?;
        reservation.expires_at =
            chrono::DateTime::from_timestamp_millis(row.try_get(3)?).unwrap_or_default();
        reservation.lines.push(Line {
            sku: row.try_get(4)?,
            quantity: row.try_get(5)?,
        });
    }
    Ok(orders)
}

/// The plan's dead letters.
struct DeadLetterRows<'a> {
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<Option<&'a [u8]>>,
    errors: Vec<&'a str>,
    details: Vec<&'a str>,
}

impl<'a> DeadLetterRows<'a> {
    fn of(plan: &'a BatchPlan<'a>) -> Self {
        let d = &plan.dead_letters;
        DeadLetterRows {
            partitions: d.iter().map(|d| d.delivery.partition).collect(),
            offsets: d.iter().map(|d| d.delivery.offset).collect(),
            keys: d.iter().map(|d| d.delivery.key.as_deref()).collect(),
            payloads: d.iter().map(|d| d.delivery.payload.as_deref()).collect(),
            errors: d.iter().map(|d| d.error).collect(),
            details: d.iter().map(|d| d.detail.as_str()).collect(),
        }
    }

    /// For [`INSERT_DEAD_LETTERS`].
    fn params<'s>(&'s self, topic: &'s String) -> [(&'s (dyn ToSql + Sync), Type); 7] {
        [
            (topic, Type::TEXT),
            (&self.partitions, Type::INT4_ARRAY),
            (&self.offsets, Type::INT8_ARRAY),
            (&self.keys, Type::BYTEA_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
            (&self.errors, Type::TEXT_ARRAY),
            (&self.details, Type::TEXT_ARRAY),
        ]
    }
}
