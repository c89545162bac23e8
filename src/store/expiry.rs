//! Expiry of reservations (docs/contract.md section 7): every replica sweeps, every
//! `reservations.sweep_interval_ms`, for active reservations whose expiry has passed by the
//! database's clock, and releases them as the event `expire:<order_id>` (outcome `expired` of
//! that order): its ledger rows, the reserved stock given back, the reservation ended.
//!
//! Replicas sweep at once without doing anything twice: a sweep takes the advisory locks of the
//! due reservations' SKUs, in the same global order as every batch, then re-reads them under
//! row locks and expires only those still active and due; a reservation another replica (or a
//! commit, or a release) ended meanwhile is skipped. The `expire:` event id is recorded once
//! per order, like any event, and its reply queued for the relay in the same transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::domain::batch::{EndedReservation, product_changes};
use crate::domain::event::EXPIRY_PREFIX;
use crate::domain::{
    Movement, OrderBook, Queued, Reply, ReservationStatus, StockBook, expire, expiry_reply,
};
use crate::store::apply::rows::{
    EndedRows, MovementRows, ProductRows, QueueRows, ReplyRows, lock_keys, read_reservations,
    read_stock,
};
use crate::store::apply::sql::{
    END_RESERVATIONS, INSERT_EVENTS, INSERT_MOVEMENTS, INSERT_REPLIES, LOCK, NOW, QUEUE_REPLIES,
    RESERVATIONS, STOCK, UPDATE_PRODUCTS,
};
use crate::store::apply::unless_empty;
use crate::store::retention::{CLOCK_SHARED, clock_key};
use crate::store::{Failure, Pool};

/// Most reservations one sweep considers (one transaction); the next sweep takes the rest.
const SWEEP_LIMIT: i64 = 500;

// With their line counts: a sweep takes at most as many locks as a batch may.
const DUE: &str = "
    SELECT r.order_id, (SELECT count(*) FROM reservation_lines l WHERE l.order_id = r.order_id)
    FROM reservations r
    WHERE r.status = 'active' AND r.expires_at <= statement_timestamp()
    ORDER BY r.expires_at, r.order_id
    LIMIT $1";

const DUE_SKUS: &str =
    "SELECT DISTINCT sku FROM reservation_lines WHERE order_id = ANY($1::text[]) ORDER BY sku";

/// The event id an order's expiry is recorded (and replied) under.
pub fn expiry_event_id(order_id: &str) -> String {
    format!("{EXPIRY_PREFIX}{order_id}")
}

/// Sweeps until `stop`: a failed sweep (database away) is logged and tried again next time.
/// Each sweep is one of the replica's lock-holding transactions (`holders`, shared with its
/// batches) and takes at most `max_locks` SKU locks ([`crate::store::lock_budget`]).
pub async fn sweep_until(
    pool: Pool,
    topic: String,
    every: Duration,
    holders: Arc<Semaphore>,
    max_locks: usize,
    replies_queued: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = holders.clone().acquire_owned() => permit,
        };
        let swept = sweep(&pool, &topic, max_locks).await;
        drop(permit);
        match swept {
            Ok(0) => {}
            Ok(expired) => {
                // Each expiry queued its reply.
                replies_queued.notify_one();
                tracing::info!(expired, "reservations expired");
            }
            Err(e) => {
                tracing::warn!(error = %crate::logs::chain(&e), "expiry sweep failed; trying again")
            }
        }
    }
}

/// One sweep, one transaction, over reservations of at most `max_lines` lines in all (each
/// line's SKU may take a lock); returns how many reservations it expired.
pub async fn sweep(pool: &Pool, topic: &str, max_lines: usize) -> Result<usize, Failure> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    let due = due_orders(&tx, max_lines).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let span = crate::traces::span("expire reservations", "internal");
    let expired = expire_due(tx, topic, &due).instrument(span.clone()).await?;
    span.record("expired", expired);
    metrics::counter!(crate::metrics::EXPIRED).increment(expired as u64);
    Ok(expired)
}

/// Expires what of `due` is still due, and commits.
async fn expire_due(tx: Transaction<'_>, topic: &str, due: &[String]) -> Result<usize, Failure> {
    let mut read = lock_and_read(&tx, due).await?;
    let expiries = decide(due, &mut read);
    if expiries.expired.is_empty() {
        return Ok(0);
    }
    write(&tx, topic, &expiries, &read.existing).await?;
    tx.commit().await?;
    Ok(expiries.expired.len())
}

/// The due reservations, oldest expiry first, as many as `max_lines` lines allow (at least
/// one, however wide).
async fn due_orders(tx: &Transaction<'_>, max_lines: usize) -> Result<Vec<String>, Failure> {
    let mut due: Vec<String> = Vec::new();
    let mut lines = 0;
    for row in tx.query_typed(DUE, &[(&SWEEP_LIMIT, Type::INT8)]).await? {
        lines += row.try_get::<_, i64>(1)?;
        if !due.is_empty() && lines > max_lines as i64 {
            break;
        }
        due.push(row.try_get(0)?);
    }
    Ok(due)
}

/// What a sweep reads under its locks.
struct Read {
    stock: StockBook,
    /// The SKUs that have a product row (all of a reservation's do).
    existing: HashSet<String>,
    orders: OrderBook,
    now: chrono::DateTime<chrono::Utc>,
}

/// The period clock first, as in every batch (src/store/apply/mod.rs), then the SKUs' advisory
/// locks in their global order, then the stock and the reservations under them.
async fn lock_and_read(tx: &Transaction<'_>, due: &[String]) -> Result<Read, Failure> {
    let orders_param = [(&due as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let skus: Vec<String> = tx
        .query_typed(DUE_SKUS, &orders_param)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let keys = lock_keys(&skus);
    let keys_param = [(&keys as &(dyn ToSql + Sync), Type::INT8_ARRAY)];
    let skus_param = [(&skus as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let clock_param = [(&clock_key() as &(dyn ToSql + Sync), Type::INT8)];
    let (_, _, stock_rows, reservation_rows, now) = tokio::try_join!(
        biased;
        tx.execute_typed(CLOCK_SHARED, &clock_param),
        tx.execute_typed(LOCK, &keys_param),
        tx.query_typed(STOCK, &skus_param),
        tx.query_typed(RESERVATIONS, &orders_param),
        async { tx.query_typed_one(NOW, &[]).await?.try_get::<_, i64>(0) },
    )?;
    let stock = read_stock(&stock_rows)?;
    Ok(Read {
        existing: stock.keys().cloned().collect(),
        stock,
        orders: read_reservations(&reservation_rows)?,
        now: chrono::DateTime::from_timestamp_millis(now).unwrap_or_default(),
    })
}

/// The expiries a sweep makes, and their replies.
struct Expiries<'a> {
    /// (order, its expiry's event id, movements)
    expired: Vec<(&'a str, String, Vec<Movement>)>,
    replies: Vec<Reply>,
}

/// Expires each due reservation still active and due under the locks (another replica, a
/// commit or a release may have ended it meanwhile): pure, on what was read.
fn decide<'a>(due: &'a [String], read: &mut Read) -> Expiries<'a> {
    let mut expiries = Expiries {
        expired: Vec::new(),
        replies: Vec::new(),
    };
    for order_id in due {
        if let Some(movements) = expire(order_id, &mut read.stock, &mut read.orders, read.now) {
            let id = expiry_event_id(order_id);
            if let Some(reservation) = read.orders.get(order_id.as_str()) {
                expiries
                    .replies
                    .push(expiry_reply(&id, order_id, reservation));
            }
            expiries.expired.push((order_id, id, movements));
        }
    }
    expiries
}

/// The expiries' rows: each recorded as an event `expire:<order_id>`, the stock given back,
/// the ledger, the reservations ended, their replies queued for the relay.
async fn write(
    tx: &Transaction<'_>,
    topic: &str,
    expiries: &Expiries<'_>,
    existing: &HashSet<String>,
) -> Result<(), Failure> {
    let expired = &expiries.expired;
    let ids: Vec<&str> = expired.iter().map(|(_, id, _)| id.as_str()).collect();
    let events = ExpiryEventRows::of(expired);
    // An expiry comes from no partition.
    let partitions: Vec<Option<i32>> = vec![None; ids.len()];
    let event_params: [(&(dyn ToSql + Sync), Type); 9] = [
        (&topic, Type::TEXT),
        (&partitions, Type::INT4_ARRAY),
        (&ids, Type::TEXT_ARRAY),
        (&events.kinds, Type::TEXT_ARRAY),
        (&events.outcomes, Type::TEXT_ARRAY),
        (&events.reasons, Type::TEXT_ARRAY),
        (&events.lines, Type::INT4_ARRAY),
        (&events.offsets, Type::INT8_ARRAY),
        (&events.digests, Type::BYTEA_ARRAY),
    ];
    let movements = MovementRows::of(
        expired
            .iter()
            .flat_map(|(_, id, ms)| ms.iter().map(move |m| (id.as_str(), m))),
    );
    let movement_params = movements.params();
    // Every SKU of a reservation exists: these are updates, never inserts.
    let changes = product_changes(expired.iter().flat_map(|(_, _, ms)| ms), existing);
    let products = ProductRows::of(changes.iter());
    let product_params = products.params();
    let ended: Vec<EndedReservation> = expired
        .iter()
        .map(|(order, id, _)| EndedReservation {
            order_id: (*order).to_owned(),
            status: ReservationStatus::Expired,
            by: id.clone(),
        })
        .collect();
    let ended_rows = EndedRows::of(&ended);
    let ended_params = ended_rows.params();
    let replies = &expiries.replies;
    let reply_rows = ReplyRows::of(replies);
    let reply_params = reply_rows.params();
    // An expiry answers no message: its reply has no trace context to carry on.
    let queued: Vec<Queued<'_>> = replies
        .iter()
        .map(|r| Queued {
            event_id: &r.event_id,
            trace: None,
        })
        .collect();
    let queue_rows = QueueRows::of(&queued);
    let queue_param = queue_rows.params();
    tokio::try_join!(
        biased;
        tx.execute_typed(INSERT_EVENTS, &event_params),
        tx.execute_typed(UPDATE_PRODUCTS, &product_params),
        unless_empty(movements.is_empty(), tx.execute_typed(INSERT_MOVEMENTS, &movement_params)),
        tx.execute_typed(END_RESERVATIONS, &ended_params),
        unless_empty(replies.is_empty(), tx.execute_typed(INSERT_REPLIES, &reply_params)),
        unless_empty(
            replies.is_empty(),
            tx.execute_typed(QUEUE_REPLIES, &queue_param)
        ),
    )?;
    Ok(())
}

/// The expiries' columns of `processed_events` but their ids: kind `expire`, outcome
/// `applied`, no reason, their lines, no offset (no message carried them), the id's digest as
/// the body's (an expiry has no body).
struct ExpiryEventRows {
    kinds: Vec<&'static str>,
    outcomes: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    lines: Vec<i32>,
    offsets: Vec<Option<i64>>,
    digests: Vec<Vec<u8>>,
}

impl ExpiryEventRows {
    fn of(expired: &[(&str, String, Vec<Movement>)]) -> Self {
        let n = expired.len();
        ExpiryEventRows {
            kinds: vec!["expire"; n],
            outcomes: vec!["applied"; n],
            reasons: vec![None; n],
            lines: expired.iter().map(|(_, _, m)| m.len() as i32).collect(),
            offsets: vec![None; n],
            digests: expired
                .iter()
                .map(|(_, id, _)| Sha256::digest(id.as_bytes()).to_vec())
                .collect(),
        }
    }
}
