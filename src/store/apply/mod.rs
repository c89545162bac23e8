//! The batch transaction: everything one batch of one partition does, atomically; or the
//! batches of several partitions, one after the other in one transaction ([`apply_parts`]),
//! each part fenced and offset-recorded as its own transaction would be.
//!
//! 0. Plan by key for this transaction ([`KEYED_PLANS`]). Take the period clock's shared lock
//!    ([`super::retention`]), so that the batch writes its history into the current period
//!    and no new period starts until it ends. Then lock the partition's row in
//!    `partition_owners` and check the epoch this owner claimed ([`super::ownership`]): a
//!    replica that lost the partition aborts here; and so does a batch of a paused partition
//!    ([`super::pauses`], read by the next statement: it sees a pause that the fence waited for).
//! 1. `pg_advisory_xact_lock` on every SKU of the batch, keys ascending ([`Batch::lock_keys`]):
//!    from here until commit no other replica works on these SKUs, and because every transaction
//!    takes its locks in the same global order, multi-SKU batches cannot deadlock.
//! 2. Read the stock of the SKUs and which event ids are already recorded (with their digest),
//!    in every period still kept that may hold one of them (`RECORDED`). The reads run after
//!    the locks are held, so under READ COMMITTED they see every effect committed before us on
//!    these SKUs, and every event of an earlier period. Two batches that record the same event
//!    id at once write to the same period, whose unique index makes the second fail and be
//!    retried (it then finds the id).
//! 3. [`Batch::plan`] decides every delivery (pure code).
//! 4. Write: the new `processed_events` rows, the product changes as atomic increments
//!    (`current_stock = current_stock + delta`, `version = version + changes`; the CHECK on
//!    stock is the last line of defence) and inserts of first-restocked SKUs, the ledger, the
//!    dead letters.
//!    And the partition's next offset, in `partition_offsets`, where a new owner resumes.
//! 5. Commit. Only after this returns may the caller let the partition's offset advance.
//!
//! Every statement is set-based over arrays (`unnest`), so a batch costs a fixed number of
//! round trips whatever its size. Each is prepared once per connection
//! ([`super::statements`]; all of a round trip's before it is sent, which keeps them in order):
//! parsed once, and planned once for arrays of any length. History rows name their period with
//! [`current_period!`], evaluated once per statement.

pub(in crate::store) mod rows;
pub(in crate::store) mod sql;

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use tracing::Instrument as _;

use crate::domain::{Batch, Clock, OrderBook, Parts, StockBook};
use crate::store::ownership::{FENCE, check_fence};
use crate::store::pauses::{PAUSED, WHOLE_TOPIC};
use crate::store::retention::{CLOCK_SHARED, clock_key};
use crate::store::statements::{Params, Statements};
use crate::store::{Failure, Pool};
use crate::traces;
use rows::{WriteRows, lock_keys, read_reservations, read_stock};
use sql::{KEYED_PLANS, KEYED_PLANS_BOUNDED, LOCK, NOW, ORDER_SKUS, RECORDED, RESERVATIONS, STOCK};

/// Where a batch comes from: its partition's offsets are recorded under this group and topic.
/// And what its decisions need beyond the database: the expiry of a reserve that gives none,
/// and the longest one allowed.
#[derive(Debug, Clone)]
pub struct Source {
    pub group: String,
    pub topic: String,
    /// `reservations.default_ttl_s`.
    pub reservation_ttl: Duration,
    /// `reservations.max_ttl_s`.
    pub reservation_max_ttl: Duration,
    /// The most SKU locks one batch transaction takes (the replica's lock budget,
    /// [`crate::store::lock_budget`]); a batch over it is applied in parts.
    pub max_locks: usize,
    /// `results.all_events`: stock events' outcomes are replied too.
    pub reply_all: bool,
}

/// Whether a batch takes its advisory locks (the period clock's and the SKUs') and checks for
/// recorded event ids. Always `On` in service; `Off` exists only for the benchmark's unsafe
/// baseline, to measure what they cost, in builds with the `benchmark-baseline` feature
/// (`inventory-dev`'s), never in the service's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guards {
    On,
    #[cfg(feature = "benchmark-baseline")]
    Off,
}

pub use crate::domain::BatchOutcome;

/// One partition's batch in a transaction, and the epoch its owner claimed the partition at.
#[derive(Debug, Clone, Copy)]
pub struct Part<'b> {
    pub batch: &'b Batch,
    pub epoch: i64,
}

/// Applies one batch of one partition in one transaction; see the module doc for the steps.
pub async fn apply_batch(
    pool: &Pool,
    source: &Source,
    batch: &Batch,
    guards: Guards,
    epoch: i64,
) -> Result<BatchOutcome, Failure> {
    if batch.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let outcomes = apply_parts(pool, source, &[Part { batch, epoch }], guards, None).await?;
    Ok(outcomes.first().copied().unwrap_or_default())
}

/// Applies the batches of several partitions in one transaction, decided one after the other
/// in the order given, as their own transactions run back to back would be: all or nothing
/// (a part fenced or paused fails the whole). Returns what each part did, in order.
/// `lock_wait`: the longest any lock may be waited for (else `database.lock_timeout_ms`).
pub async fn apply_parts(
    pool: &Pool,
    source: &Source,
    parts: &[Part<'_>],
    guards: Guards,
    lock_wait: Option<Duration>,
) -> Result<Vec<BatchOutcome>, Failure> {
    let mut next_offsets = Vec::with_capacity(parts.len());
    for part in parts {
        let (Some(partition), Some((_, last))) = (part.batch.partition(), part.batch.offsets())
        else {
            return Err(Failure::fatal("a transaction's part without deliveries"));
        };
        if next_offsets.iter().any(|(p, _)| *p == partition) {
            return Err(Failure::fatal(format!(
                "two parts of one transaction from partition {partition}"
            )));
        }
        next_offsets.push((partition, last + 1));
    }
    let batches: Vec<&Batch> = parts.iter().map(|p| p.batch).collect();
    let batches = Parts(&batches);
    let mut conn = pool.get().await?;
    let statements = conn.statements.clone();
    let tx = conn.transaction().await?;
    let lock_timeout = lock_wait.map(|wait| format!("{}ms", wait.as_millis().max(1)));
    let bounded = [(&lock_timeout as &(dyn ToSql + Sync), Type::TEXT)];
    let txn = Txn {
        tx: &tx,
        statements: &statements,
        keyed_plans: match lock_timeout {
            Some(_) => (KEYED_PLANS_BOUNDED, &bounded),
            None => (KEYED_PLANS, &[]),
        },
    };

    let orders = batches.order_ids();
    let order_skus = read_order_skus(txn, &orders).await?;
    let skus = skus_to_lock(batches, &order_skus, !orders.is_empty())?;
    if skus.len() > source.max_locks && batches.len() > 1 {
        return Err(Failure::TooManyLocks { skus: skus.len() });
    }
    let partitions: Vec<i32> = next_offsets.iter().map(|(p, _)| *p).collect();
    let read = lock_and_read(txn, source, &partitions, guards, batches, &orders, &skus)
        .instrument(traces::step("lock and read"))
        .await?;
    for (part, partition) in parts.iter().zip(&partitions) {
        check_fence(*partition, part.epoch, read.owners.get(partition).copied())?;
        if read.paused.contains(partition) || read.paused.contains(&WHOLE_TOPIC) {
            return Err(Failure::Paused(*partition));
        }
    }
    check_reservations_locked(&read.reservations, &skus)?;

    let clock = clock(source, read.now_ms);
    let plan = batches.plan(
        &read.recorded,
        read.stock,
        read.reservations,
        clock,
        source.reply_all,
    );

    let rows = WriteRows::of(&plan, source, next_offsets);
    write(txn, &rows.writes())
        .instrument(traces::step("write"))
        .await?;
    let outcomes = partitions.iter().map(|p| plan.outcome(*p)).collect();
    tx.commit().instrument(traces::step("commit")).await?;
    traces::decisions(&plan);
    Ok(outcomes)
}

/// The transaction and the statements prepared on its connection: what every step sends on.
#[derive(Clone, Copy)]
struct Txn<'t> {
    tx: &'t tokio_postgres::Transaction<'t>,
    statements: &'t Statements,
    /// The transaction's first statement ([`KEYED_PLANS`] or [`KEYED_PLANS_BOUNDED`]).
    keyed_plans: (&'static str, &'t Params<'t>),
}

/// Before the locks: the SKUs of the reservations of the batch's commits and releases
/// ([`ORDER_SKUS`]), whose locks they need too. [`KEYED_PLANS`] goes with the transaction's
/// first round trip: this one when the batch has orders, else the next.
async fn read_order_skus(txn: Txn<'_>, orders: &[&str]) -> Result<Vec<Row>, Failure> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let orders_param = [(&orders as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let (keyed_plans, keyed_params) = txn.keyed_plans;
    txn.statements
        .prepare(
            txn.tx,
            &[(keyed_plans, keyed_params), (ORDER_SKUS, &orders_param)],
        )
        .await?;
    let (_, rows) = tokio::try_join!(
        biased;
        txn.statements.execute(txn.tx, keyed_plans, keyed_params),
        txn.statements.query(txn.tx, ORDER_SKUS, &orders_param),
    )?;
    Ok(rows)
}

/// The SKUs the batch locks: its events' and its orders' reservations' (`order_skus`), sorted
/// and distinct when there are orders (their reservations' lines are looked up in it).
fn skus_to_lock<'b>(
    batches: Parts<'_, 'b>,
    order_skus: &'b [Row],
    has_orders: bool,
) -> Result<Vec<&'b str>, Failure> {
    let mut skus = batches.skus();
    if has_orders {
        for row in order_skus {
            skus.push(row.try_get::<_, &str>(0)?);
        }
        skus.sort_unstable();
        skus.dedup();
    }
    Ok(skus)
}

/// What the batch reads once its locks are held.
struct Read {
    /// The epoch each partition's owner holds (absent: never claimed).
    owners: HashMap<i32, i64>,
    /// Which of the partitions are paused ([`WHOLE_TOPIC`]: all), read once the fence is held.
    paused: Vec<i32>,
    /// The batch's event ids already recorded, with their payload digests.
    recorded: HashMap<String, Vec<u8>>,
    stock: StockBook,
    reservations: OrderBook,
    /// The database's clock in Unix milliseconds (read only when the batch has orders).
    now_ms: i64,
}

/// Steps 0 to 2 of the module doc in one round trip: the clock, the fence, the locks and the
/// reads are sent before any answer is awaited. The server runs them in order, so the reads
/// start once every lock is held. `biased`: polled in order, so a failure is reported by the
/// statement that failed, not by a later one that found the transaction already aborted.
async fn lock_and_read(
    txn: Txn<'_>,
    source: &Source,
    partitions: &[i32],
    guards: Guards,
    batches: Parts<'_, '_>,
    orders: &[&str],
    skus: &[&str],
) -> Result<Read, Failure> {
    let guarded = guards == Guards::On;
    let keys = if guarded { lock_keys(skus) } else { Vec::new() };
    let ids = if guarded {
        batches.event_ids()
    } else {
        Vec::new()
    };
    let no_params: [(&(dyn ToSql + Sync), Type); 0] = [];
    let clock_param = [(&clock_key() as &(dyn ToSql + Sync), Type::INT8)];
    let fence_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&source.group, Type::TEXT),
        (&source.topic, Type::TEXT),
        (&partitions, Type::INT4_ARRAY),
    ];
    let keys_param = [(&keys as &(dyn ToSql + Sync), Type::INT8_ARRAY)];
    let ids_param = [(&ids as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let skus_param = [(&skus as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let orders_param = [(&orders as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let (tx, statements) = (txn.tx, txn.statements);
    let (keyed_plans, keyed_params) = txn.keyed_plans;
    statements
        .prepare(
            tx,
            &[
                (keyed_plans, keyed_params),
                (CLOCK_SHARED, &clock_param),
                (FENCE, &fence_params),
                (PAUSED, &fence_params),
                (LOCK, &keys_param),
                (RECORDED, &ids_param),
                (STOCK, &skus_param),
                (RESERVATIONS, &orders_param),
                (NOW, &no_params),
            ],
        )
        .await?;
    let waiting = std::time::Instant::now();
    let lock = async {
        let locked = unless_empty(keys.is_empty(), statements.execute(tx, LOCK, &keys_param)).await;
        metrics::histogram!(crate::metrics::LOCK_WAIT_SECONDS)
            .record(waiting.elapsed().as_secs_f64());
        locked
    };
    let has_orders = !orders.is_empty();
    let (_, _, owners, paused, _, recorded, stock, reservations, now_ms) = tokio::try_join!(
        biased;
        // Sent in the first round trip already when the batch has orders (`read_order_skus`).
        unless_empty(has_orders, statements.execute(tx, keyed_plans, keyed_params)),
        unless_empty(!guarded, statements.execute(tx, CLOCK_SHARED, &clock_param)),
        statements.query(tx, FENCE, &fence_params),
        statements.query(tx, PAUSED, &fence_params),
        lock,
        unless_empty(ids.is_empty(), statements.query(tx, RECORDED, &ids_param)),
        statements.query(tx, STOCK, &skus_param),
        unless_empty(!has_orders, statements.query(tx, RESERVATIONS, &orders_param)),
        unless_empty(!has_orders, async {
            statements.query_one(tx, NOW, &no_params).await?.try_get::<_, i64>(0)
        }),
    )?;
    Ok(Read {
        owners: owners
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?,
        paused: paused
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?,
        recorded: recorded
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?,
        stock: read_stock(&stock)?,
        reservations: read_reservations(&reservations)?,
        now_ms,
    })
}

/// A reservation of one of the batch's orders written between the read of its SKUs and the
/// locks (its reserve came through another partition) has lines whose locks the batch does not
/// hold: the batch is tried again, and takes them.
fn check_reservations_locked(reservations: &OrderBook, skus: &[&str]) -> Result<(), Failure> {
    match reservations
        .values()
        .flat_map(|r| &r.lines)
        .find(|l| skus.binary_search(&l.sku.as_str()).is_err())
    {
        Some(line) => Err(Failure::transient(format!(
            "a reservation changed during the batch (SKU {})",
            line.sku
        ))),
        None => Ok(()),
    }
}

/// What the plan's decisions need beyond the database: the database's clock and the expiries
/// a reserve may have.
fn clock(source: &Source, now_ms: i64) -> Clock {
    Clock {
        now: chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default(),
        default_ttl: chrono::TimeDelta::from_std(source.reservation_ttl)
            .unwrap_or(chrono::TimeDelta::MAX),
        max_ttl: chrono::TimeDelta::from_std(source.reservation_max_ttl)
            .unwrap_or(chrono::TimeDelta::MAX),
    }
}

/// One write of the batch transaction, as data: its statement and parameters, whether it runs
/// (nothing to write: no round trip), and how many rows it must change where that is known.
struct Write<'a> {
    sql: &'static str,
    params: Vec<(&'a (dyn ToSql + Sync), Type)>,
    runs: bool,
    changes: Option<usize>,
}

impl<'a> Write<'a> {
    fn new(sql: &'static str, params: &[(&'a (dyn ToSql + Sync), Type)], runs: bool) -> Self {
        Write {
            sql,
            params: params.to_vec(),
            runs,
            changes: None,
        }
    }

    /// The write must change exactly `rows` rows.
    fn changing(self, rows: usize) -> Self {
        Write {
            changes: Some(rows),
            ..self
        }
    }
}

/// Step 4: sends every write before any answer is awaited (one round trip). The writes are
/// independent of each other's answers, and PostgreSQL runs them in the order sent, so
/// products exist before the ledger rows that name them; if one fails, the rest fail and
/// nothing commits. `try_join_all` polls in order: the statement that failed is the one
/// reported.
async fn write(txn: Txn<'_>, writes: &[Write<'_>]) -> Result<(), Failure> {
    let prepare: Vec<(&'static str, &Params<'_>)> = writes
        .iter()
        .map(|w| (w.sql, w.params.as_slice()))
        .collect();
    txn.statements.prepare(txn.tx, &prepare).await?;
    let sent = writes
        .iter()
        .map(|w| unless_empty(!w.runs, txn.statements.execute(txn.tx, w.sql, &w.params)));
    let changed = futures_util::future::try_join_all(sent).await?;
    for (w, rows) in writes.iter().zip(changed) {
        if let Some(expected) = w.changes
            && rows != expected as u64
        {
            // These rows were read under their locks a moment ago: someone deletes products.
            return Err(Failure::fatal(format!(
                "expected to change {expected} products, changed {rows}: products are being modified outside this service"
            )));
        }
    }
    Ok(())
}

/// Runs `statement` unless there is nothing to do (then its default, and no round trip).
pub(in crate::store) async fn unless_empty<T: Default>(
    empty: bool,
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    if empty {
        Ok(T::default())
    } else {
        statement.await
    }
}
