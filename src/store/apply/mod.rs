//! The batch transaction: everything one batch of one partition does, atomically.
//!
//! 0. Plan by key for this transaction ([`KEYED_PLANS`]). Take the period clock's shared lock
//!    ([`super::retention`]), so that the batch writes its history into the current period
//!    and no new period starts until it ends. Then lock the partition's row in
//!    `partition_owners` and check the epoch this owner claimed ([`super::ownership`]): a
//!    replica that lost the partition aborts here; and so does a batch of a paused partition
//!    ([`super::pauses`]).
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

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::domain::batch::{BatchPlan, EndedReservation, ProductChange};
use crate::domain::{
    Batch, Clock, Line, Movement, OrderBook, Reply, Reservation, ReservationStatus, Stock,
    StockBook, lock_key,
};
use crate::store::ownership::{FENCE, check_fence};
use crate::store::retention::{CLOCK_SHARED, clock_key};
use crate::store::statements::{Params, Statements};
use crate::store::{Failure, Pool};

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

/// What a committed batch did, for counters and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
}

// Array order is scan order in a function scan, so the locks are taken in the order given.
pub(super) const LOCK: &str = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)";

/// The period writers write to, `current_history_period()` (migration 8) written out: a call of
/// that SQL function is parsed and planned again by every statement that makes it (three or more
/// per batch), where this subquery is planned once with its prepared statement.
macro_rules! current_period {
    () => {
        "(SELECT max(period) FROM history_periods)"
    };
}

// The recorded ids are read only in the periods that may hold one of the batch's ids: those
// not counted yet (the current one, one just ended), the counted ones without a range, and the
// counted ones whose range of ids overlaps the batch's (migration 15). An ended period's rows
// never change, so its range, taken when it was counted, holds every id it has. A counted
// period without a range may hold ids: a release before migration 15 counted it without one
// (maintenance counts it again, with its range, unless it holds only expiries, which that
// release counts as no event), or it is empty.
// Ids that grow with time (a sequence, or a timestamp or UUIDv7 first) then cost one index
// probe each, in the current period, however many periods are kept; ids in no order cost one
// probe per period, as before. Periods made
// ahead have no row in `history_periods` yet, and the partitions of the others are pruned on
// each turn of the loop. `h.period >= 0` always holds: it gives the planner an index
// condition, where a scan (disabled, KEYED_PLANS) would cost enough to be compiled by JIT.
const RECORDED: &str = "
    SELECT e.event_id, e.payload_digest
    FROM history_periods h CROSS JOIN LATERAL (
        SELECT event_id, payload_digest FROM processed_events p
        WHERE p.period = h.period AND p.event_id = ANY($1::text[]) OFFSET 0) e
    WHERE h.period >= 0 AND NOT h.events_gone
      AND (h.events_counted IS NULL OR h.events_min_id IS NULL
           OR (h.events_min_id <= (SELECT max(i) FROM unnest($1::text[]) AS i)
               AND h.events_max_id >= (SELECT min(i) FROM unnest($1::text[]) AS i)))";

pub(super) const STOCK: &str =
    "SELECT sku, current_stock, reserved_stock FROM products WHERE sku = ANY($1::text[])";

// Before the locks: the SKUs of the batch's orders' reservations, whose locks a commit or
// release needs too. Lines never change once written; what they belong to is re-read under
// the locks (below).
const ORDER_SKUS: &str =
    "SELECT DISTINCT sku FROM reservation_lines WHERE order_id = ANY($1::text[])";

// Under the locks: the reservations of the batch's orders, row-locked against the sweeper.
pub(super) const RESERVATIONS: &str = "
    SELECT r.order_id, r.event_id, r.status,
           (extract(epoch FROM r.expires_at) * 1000)::bigint, l.sku, l.quantity
    FROM reservations r JOIN reservation_lines l ON l.order_id = r.order_id
    WHERE r.order_id = ANY($1::text[])
    ORDER BY r.order_id, l.line
    FOR UPDATE OF r";

/// The first statement of every batch transaction: index probes by key and nested loops,
/// whatever the statistics say. The statements' generic plans are made on their first use and
/// kept until the next ANALYZE; made while `products` was still small (a new database, the
/// first batches) they scan it whole for every batch, comparing each row with every key of the
/// batch. Seen in `bench`: the stock read took 31 ms a batch instead of 1. Every statement of
/// the batch touches a few rows per key, by key: a scan or a hash of a whole table never pays.
/// And no JIT: a plan left with no path but a disabled one costs more than JIT's threshold,
/// and compiling it would take a batch 100 ms or more.
pub(super) const KEYED_PLANS: &str = "
    SELECT set_config('enable_seqscan', 'off', true),
           set_config('enable_hashjoin', 'off', true),
           set_config('enable_mergejoin', 'off', true),
           set_config('jit', 'off', true)";

// The database's clock decides expiries, never a replica's: read after the locks (`now()` is
// the transaction's start, which a lock wait can leave seconds behind).
pub(super) const NOW: &str = "SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint";

const INSERT_RESERVATIONS: &str = "
    INSERT INTO reservations (order_id, event_id, status, expires_at)
    SELECT o, e, 'active', to_timestamp(x / 1000.0)
    FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(o, e, x)";

const INSERT_RESERVATION_LINES: &str = "
    INSERT INTO reservation_lines (order_id, line, sku, quantity)
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[])";

// The replies of the batch's order steps, each queued for the relay; and the recorded replies
// of requests sent again, queued once more.
pub(super) const INSERT_REPLIES: &str = concat!(
    "INSERT INTO replies (event_id, order_id, reply_key, payload, period)
     SELECT *, ",
    current_period!(),
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
);

// Queued in the order given (a function scan keeps array order, and so do the identities):
// the batch's order, new replies and those of requests sent again alike. A request sent
// again whose first delivery got no reply (a stock event decided while `results.all_events`
// was off) has none to publish.
pub(super) const QUEUE_REPLIES: &str = "
    INSERT INTO reply_outbox (event_id)
    SELECT t.e FROM unnest($1::text[]) WITH ORDINALITY AS t(e, n)
    WHERE EXISTS (SELECT 1 FROM replies r WHERE r.event_id = t.e)
    ORDER BY t.n";

pub(super) const END_RESERVATIONS: &str = "
    UPDATE reservations AS r SET status = t.s, ended_at = statement_timestamp(), ended_by = t.b
    FROM unnest($1::text[], $2::text[], $3::text[]) AS t(o, s, b)
    WHERE r.order_id = t.o";

pub(super) const INSERT_EVENTS: &str = concat!(
    "INSERT INTO processed_events
         (event_id, event_type, outcome, reason, line_count, topic, partition, \"offset\",
          payload_digest, period)
     SELECT e.id, e.kind, e.outcome, e.reason, e.lines, $1, $2, e.off, e.digest, ",
    current_period!(),
    " FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::bigint[],
                  $9::bytea[]) AS e(id, kind, outcome, reason, lines, off, digest)"
);

// Existing SKUs change by increment, never by a value computed here, so even a writer that
// bypassed the locks could not be overwritten. (Not an upsert: PostgreSQL checks the CHECK
// constraint on the proposed insert row first, which a net sale would fail.)
pub(super) const UPDATE_PRODUCTS: &str = "
    UPDATE products AS p
    SET current_stock = p.current_stock + c.delta,
        reserved_stock = p.reserved_stock + c.reserved,
        version = p.version + c.changes,
        updated_at = now()
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS c(sku, delta, changes, reserved)
    WHERE p.sku = c.sku";

// SKUs restocked for the first time.
const INSERT_PRODUCTS: &str = "
    INSERT INTO products (sku, current_stock, version, reserved_stock)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])";

pub(super) const INSERT_MOVEMENTS: &str = concat!(
    "INSERT INTO stock_movements
         (event_id, sku, delta, stock_after, reserved_delta, reserved_after, period)
     SELECT *, ",
    current_period!(),
    " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                  $6::bigint[])"
);

// Never moves back: a zombie's late batch cannot rewind a partition.
const RECORD_OFFSET: &str = "
    INSERT INTO partition_offsets AS o (consumer_group, topic, partition, next_offset)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (consumer_group, topic, partition) DO UPDATE
        SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset), updated_at = now()";

// A redelivered bad message is kept once, whatever period holds it. (The partition's fence
// serializes the batches of one partition, so no other transaction adds the same position.)
const INSERT_DEAD_LETTERS: &str = concat!(
    "INSERT INTO dead_letters (topic, partition, \"offset\", key, payload, error, detail, period)
     SELECT $1, $2, d.off, d.key, d.payload, d.error, d.detail, ",
    current_period!(),
    " FROM unnest($3::bigint[], $4::bytea[], $5::bytea[], $6::text[], $7::text[])
         AS d(off, key, payload, error, detail)
     WHERE NOT EXISTS (SELECT 1 FROM dead_letters x
                       WHERE x.topic = $1 AND x.partition = $2 AND x.\"offset\" = d.off)"
);

/// Applies one batch of one partition in one transaction; see the module doc for the steps.
pub async fn apply_batch(
    pool: &Pool,
    source: &Source,
    batch: &Batch,
    guards: Guards,
    epoch: i64,
) -> Result<BatchOutcome, Failure> {
    let (Some(partition), Some((_, last))) = (batch.partition(), batch.offsets()) else {
        return Ok(BatchOutcome::default());
    };
    let mut conn = pool.get().await?;
    let statements = conn.statements.clone();
    let tx = conn.transaction().await?;
    let txn = Txn {
        tx: &tx,
        statements: &statements,
    };

    let orders = batch.order_ids();
    let order_skus = read_order_skus(txn, &orders).await?;
    let skus = skus_to_lock(batch, &order_skus, !orders.is_empty())?;
    if skus.len() > source.max_locks && batch.len() > 1 {
        return Err(Failure::TooManyLocks { skus: skus.len() });
    }
    let read = lock_and_read(txn, source, partition, guards, batch, &orders, &skus).await?;
    check_fence(partition, epoch, read.owner.map(|(epoch, _)| epoch))?;
    if read.owner.is_some_and(|(_, paused)| paused) {
        return Err(Failure::Paused(partition));
    }
    check_reservations_locked(&read.reservations, &skus)?;

    let clock = clock(source, read.now_ms);
    let plan = batch.plan(
        &read.recorded,
        read.stock,
        read.reservations,
        clock,
        source.reply_all,
    );

    let rows = WriteRows::of(&plan, source, partition, last + 1);
    write(txn, &rows.writes()).await?;
    let outcome = BatchOutcome {
        applied: plan.applied(),
        rejected: plan.rejected(),
        duplicates: plan.duplicates,
        dead_letters: plan.dead_letters.len() as u64,
    };
    tx.commit().await?;
    Ok(outcome)
}

/// The transaction and the statements prepared on its connection: what every step sends on.
#[derive(Clone, Copy)]
struct Txn<'t> {
    tx: &'t tokio_postgres::Transaction<'t>,
    statements: &'t Statements,
}

/// Before the locks: the SKUs of the reservations of the batch's commits and releases
/// ([`ORDER_SKUS`]), whose locks they need too. [`KEYED_PLANS`] goes with the transaction's
/// first round trip: this one when the batch has orders, else the next.
async fn read_order_skus(txn: Txn<'_>, orders: &[&str]) -> Result<Vec<Row>, Failure> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let orders_param = [(&orders as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let no_params: [(&(dyn ToSql + Sync), Type); 0] = [];
    txn.statements
        .prepare(
            txn.tx,
            &[(KEYED_PLANS, &no_params), (ORDER_SKUS, &orders_param)],
        )
        .await?;
    let (_, rows) = tokio::try_join!(
        biased;
        txn.statements.execute(txn.tx, KEYED_PLANS, &no_params),
        txn.statements.query(txn.tx, ORDER_SKUS, &orders_param),
    )?;
    Ok(rows)
}

/// The SKUs the batch locks: its events' and its orders' reservations' (`order_skus`), sorted
/// and distinct when there are orders (their reservations' lines are looked up in it).
fn skus_to_lock<'b>(
    batch: &'b Batch,
    order_skus: &'b [Row],
    has_orders: bool,
) -> Result<Vec<&'b str>, Failure> {
    let mut skus = batch.skus();
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
    /// The partition's claim: the epoch its owner holds and whether it is paused (none: never
    /// claimed).
    owner: Option<(i64, bool)>,
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
    partition: i32,
    guards: Guards,
    batch: &Batch,
    orders: &[&str],
    skus: &[&str],
) -> Result<Read, Failure> {
    let guarded = guards == Guards::On;
    let keys = if guarded { lock_keys(skus) } else { Vec::new() };
    let ids = if guarded {
        batch.event_ids()
    } else {
        Vec::new()
    };
    let no_params: [(&(dyn ToSql + Sync), Type); 0] = [];
    let clock_param = [(&clock_key() as &(dyn ToSql + Sync), Type::INT8)];
    let fence_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&source.group, Type::TEXT),
        (&source.topic, Type::TEXT),
        (&partition, Type::INT4),
    ];
    let keys_param = [(&keys as &(dyn ToSql + Sync), Type::INT8_ARRAY)];
    let ids_param = [(&ids as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let skus_param = [(&skus as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let orders_param = [(&orders as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let (tx, statements) = (txn.tx, txn.statements);
    statements
        .prepare(
            tx,
            &[
                (KEYED_PLANS, &no_params),
                (CLOCK_SHARED, &clock_param),
                (FENCE, &fence_params),
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
    let (_, _, owner, _, recorded, stock, reservations, now_ms) = tokio::try_join!(
        biased;
        // Sent in the first round trip already when the batch has orders (`read_order_skus`).
        unless_empty(has_orders, statements.execute(tx, KEYED_PLANS, &no_params)),
        unless_empty(!guarded, statements.execute(tx, CLOCK_SHARED, &clock_param)),
        statements.query_opt(tx, FENCE, &fence_params),
        lock,
        unless_empty(ids.is_empty(), statements.query(tx, RECORDED, &ids_param)),
        statements.query(tx, STOCK, &skus_param),
        unless_empty(!has_orders, statements.query(tx, RESERVATIONS, &orders_param)),
        unless_empty(!has_orders, async {
            statements.query_one(tx, NOW, &no_params).await?.try_get::<_, i64>(0)
        }),
    )?;
    Ok(Read {
        owner: owner
            .map(|row| Ok::<_, tokio_postgres::Error>((row.try_get(0)?, row.try_get(1)?)))
            .transpose()?,
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
        Some(line) => Err(Failure::Transient(format!(
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
            return Err(Failure::Fatal(format!(
                "expected to change {expected} products, changed {rows}: products are being modified outside this service"
            )));
        }
    }
    Ok(())
}

/// Everything the plan writes, by table, as the arrays the statements take.
struct WriteRows<'a> {
    source: &'a Source,
    partition: i32,
    next_offset: i64,
    events: EventRows<'a>,
    updated: ProductRows<'a>,
    created: ProductRows<'a>,
    movements: MovementRows<'a>,
    made: ReservationRows<'a>,
    ended: EndedRows<'a>,
    replies: ReplyRows<'a>,
    queued: &'a [&'a str],
    dead: DeadLetterRows<'a>,
}

impl<'a> WriteRows<'a> {
    fn of(plan: &'a BatchPlan<'a>, source: &'a Source, partition: i32, next_offset: i64) -> Self {
        WriteRows {
            source,
            partition,
            next_offset,
            events: EventRows::of(plan),
            updated: ProductRows::of(plan.products.iter().filter(|p| !p.created)),
            created: ProductRows::of(plan.products.iter().filter(|p| p.created)),
            movements: MovementRows::of(plan.movements.iter().map(|(id, m)| (*id, m))),
            made: ReservationRows::of(plan),
            ended: EndedRows::of(&plan.ended),
            replies: ReplyRows::of(&plan.replies),
            queued: &plan.queued,
            dead: DeadLetterRows::of(plan),
        }
    }

    /// The writes, in the order they run.
    fn writes(&self) -> Vec<Write<'_>> {
        let (topic, partition) = (&self.source.topic, &self.partition);
        let (updated, created, made) = (&self.updated, &self.created, &self.made);
        vec![
            Write::new(
                INSERT_EVENTS,
                &self.events.params(topic, partition),
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
                &[(&self.queued, Type::TEXT_ARRAY)],
                !self.queued.is_empty(),
            ),
            Write::new(
                INSERT_DEAD_LETTERS,
                &self.dead.params(topic, partition),
                !self.dead.offsets.is_empty(),
            ),
            Write::new(
                RECORD_OFFSET,
                &[
                    (&self.source.group, Type::TEXT),
                    (topic, Type::TEXT),
                    (partition, Type::INT4),
                    (&self.next_offset, Type::INT8),
                ],
                true,
            ),
        ]
    }
}

/// Runs `statement` unless there is nothing to do (then its default, and no round trip).
pub(super) async fn unless_empty<T: Default>(
    empty: bool,
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    if empty {
        Ok(T::default())
    } else {
        statement.await
    }
}

/// The columns of the plan's `processed_events` rows.
struct EventRows<'a> {
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
            ids: e.iter().map(|e| e.event.id.as_str()).collect(),
            kinds: e.iter().map(|e| e.event.kind.as_str()).collect(),
            outcomes: e.iter().map(|e| e.outcome.as_str()).collect(),
            reasons: e.iter().map(|e| e.outcome.reason()).collect(),
            lines: e.iter().map(|e| e.line_count).collect(),
            offsets: e.iter().map(|e| e.offset).collect(),
            digests: e.iter().map(|e| e.digest.as_slice()).collect(),
        }
    }

    /// For [`INSERT_EVENTS`], with the partition the events came from.
    fn params<'s>(
        &'s self,
        topic: &'s String,
        partition: &'s i32,
    ) -> [(&'s (dyn ToSql + Sync), Type); 9] {
        [
            (topic, Type::TEXT),
            (partition, Type::INT4),
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
pub(super) struct ProductRows<'a> {
    skus: Vec<&'a str>,
    deltas: Vec<i64>,
    changes: Vec<i64>,
    reserved: Vec<i64>,
}

impl<'a> ProductRows<'a> {
    pub(super) fn of(changes: impl Iterator<Item = &'a ProductChange>) -> Self {
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
    pub(super) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.skus, Type::TEXT_ARRAY),
            (&self.deltas, Type::INT8_ARRAY),
            (&self.changes, Type::INT8_ARRAY),
            (&self.reserved, Type::INT8_ARRAY),
        ]
    }
}

/// Ledger rows, each with the event that caused it.
pub(super) struct MovementRows<'a> {
    event_ids: Vec<&'a str>,
    skus: Vec<&'a str>,
    deltas: Vec<i64>,
    after: Vec<i64>,
    reserved_deltas: Vec<i64>,
    reserved_after: Vec<i64>,
}

impl<'a> MovementRows<'a> {
    pub(super) fn of(movements: impl Iterator<Item = (&'a str, &'a Movement)>) -> Self {
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

    pub(super) fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
    }

    pub(super) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 6] {
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
pub(super) struct ReplyRows<'a> {
    pub(super) event_ids: Vec<&'a str>,
    orders: Vec<Option<&'a str>>,
    keys: Vec<&'a str>,
    payloads: Vec<&'a str>,
}

impl<'a> ReplyRows<'a> {
    pub(super) fn of(replies: &'a [Reply]) -> Self {
        ReplyRows {
            event_ids: replies.iter().map(|r| r.event_id.as_str()).collect(),
            orders: replies.iter().map(|r| r.order_id.as_deref()).collect(),
            keys: replies.iter().map(|r| r.key.as_str()).collect(),
            payloads: replies.iter().map(|r| r.payload.as_str()).collect(),
        }
    }

    pub(super) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.event_ids, Type::TEXT_ARRAY),
            (&self.orders, Type::TEXT_ARRAY),
            (&self.keys, Type::TEXT_ARRAY),
            (&self.payloads, Type::TEXT_ARRAY),
        ]
    }
}

/// Reservations ended, and by which event.
pub(super) struct EndedRows<'a> {
    orders: Vec<&'a str>,
    statuses: Vec<&'static str>,
    by: Vec<&'a str>,
}

impl<'a> EndedRows<'a> {
    pub(super) fn of(ended: &'a [EndedReservation]) -> Self {
        EndedRows {
            orders: ended.iter().map(|e| e.order_id.as_str()).collect(),
            statuses: ended.iter().map(|e| e.status.as_str()).collect(),
            by: ended.iter().map(|e| e.by.as_str()).collect(),
        }
    }

    pub(super) fn params(&self) -> [(&(dyn ToSql + Sync), Type); 3] {
        [
            (&self.orders, Type::TEXT_ARRAY),
            (&self.statuses, Type::TEXT_ARRAY),
            (&self.by, Type::TEXT_ARRAY),
        ]
    }
}

/// The stock of the SKUs a [`STOCK`] read found.
pub(super) fn read_stock(rows: &[tokio_postgres::Row]) -> Result<StockBook, Failure> {
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
pub(super) fn lock_keys(skus: &[impl AsRef<str>]) -> Vec<i64> {
    let mut keys: Vec<i64> = skus.iter().map(|s| lock_key(s.as_ref())).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The reservations read under the locks, by order (lines in line order).
pub(super) fn read_reservations(rows: &[tokio_postgres::Row]) -> Result<OrderBook, Failure> {
    let mut orders = OrderBook::new();
    for row in rows {
        let order_id: String = row.try_get(0)?;
        let status = match row.try_get::<_, &str>(2)? {
            "active" => ReservationStatus::Active,
            "committed" => ReservationStatus::Committed,
            "released" => ReservationStatus::Released,
            "expired" => ReservationStatus::Expired,
            other => return Err(Failure::Fatal(format!("reservation status `{other}`"))),
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
            offsets: d.iter().map(|d| d.delivery.offset).collect(),
            keys: d.iter().map(|d| d.delivery.key.as_deref()).collect(),
            payloads: d.iter().map(|d| d.delivery.payload.as_deref()).collect(),
            errors: d.iter().map(|d| d.error).collect(),
            details: d.iter().map(|d| d.detail.as_str()).collect(),
        }
    }

    /// For [`INSERT_DEAD_LETTERS`], with the partition the messages came from.
    fn params<'s>(
        &'s self,
        topic: &'s String,
        partition: &'s i32,
    ) -> [(&'s (dyn ToSql + Sync), Type); 7] {
        [
            (topic, Type::TEXT),
            (partition, Type::INT4),
            (&self.offsets, Type::INT8_ARRAY),
            (&self.keys, Type::BYTEA_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
            (&self.errors, Type::TEXT_ARRAY),
            (&self.details, Type::TEXT_ARRAY),
        ]
    }
}
