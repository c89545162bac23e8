//! The batch transaction: everything one batch of one partition does, atomically.
//!
//! 1. `pg_advisory_xact_lock` on every SKU of the batch, keys ascending ([`Batch::lock_keys`]):
//!    from here until commit no other replica works on these SKUs, and because every transaction
//!    takes its locks in the same global order, multi-SKU batches cannot deadlock.
//! 2. Read which event ids are already recorded (with their digest) and the stock of the SKUs.
//!    Both reads run after the locks are held, so under READ COMMITTED they see every effect
//!    committed before us on these SKUs.
//! 3. [`Batch::plan`] decides every delivery (pure code).
//! 4. Write: the new `processed_events` rows, the product changes as atomic increments
//!    (`current_stock = current_stock + delta`, `version = version + changes`; the CHECK on
//!    stock is the last line of defence) and inserts of first-restocked SKUs, the ledger, the
//!    dead letters.
//!    And the partition's next offset, in `partition_offsets`, where a new owner resumes.
//! 5. Commit. Only after this returns may the caller let the partition's offset advance.
//!
//! Every statement is set-based over arrays (`unnest`), so a batch costs a fixed number of
//! round trips whatever its size, and is sent with explicit parameter types
//! (`query_typed`), which needs no separate prepare round trip.

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};

use crate::domain::batch::ProductChange;
use crate::domain::{Batch, StockBook};
use crate::store::{Failure, Pool};

/// Where a batch comes from: its partition's offsets are recorded under this group and topic.
#[derive(Debug, Clone)]
pub struct Source {
    pub group: String,
    pub topic: String,
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
const LOCK: &str = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)";

const RECORDED: &str =
    "SELECT event_id, payload_digest FROM processed_events WHERE event_id = ANY($1::text[])";

const STOCK: &str = "SELECT sku, current_stock FROM products WHERE sku = ANY($1::text[])";

const INSERT_EVENTS: &str = "
    INSERT INTO processed_events
        (event_id, event_type, outcome, reason, line_count, topic, partition, \"offset\", payload_digest)
    SELECT e.id, e.kind, e.outcome, e.reason, e.lines, $1, $2, e.off, e.digest
    FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::bigint[], $9::bytea[])
        AS e(id, kind, outcome, reason, lines, off, digest)";

// Existing SKUs change by increment, never by a value computed here, so even a writer that
// bypassed the locks could not be overwritten. (Not an upsert: PostgreSQL checks the CHECK
// constraint on the proposed insert row first, which a net sale would fail.)
const UPDATE_PRODUCTS: &str = "
    UPDATE products AS p
    SET current_stock = p.current_stock + c.delta,
        version = p.version + c.changes,
        updated_at = now()
    FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS c(sku, delta, changes)
    WHERE p.sku = c.sku";

// SKUs restocked for the first time.
const INSERT_PRODUCTS: &str = "
    INSERT INTO products (sku, current_stock, version)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])";

const INSERT_MOVEMENTS: &str = "
    INSERT INTO stock_movements (event_id, sku, delta, stock_after)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])";

// Never moves back: a zombie's late batch cannot rewind a partition.
const RECORD_OFFSET: &str = "
    INSERT INTO partition_offsets AS o (consumer_group, topic, partition, next_offset)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (consumer_group, topic, partition) DO UPDATE
        SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset), updated_at = now()";

const LOAD_OFFSETS: &str = "
    SELECT partition, next_offset FROM partition_offsets
    WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])";

const INSERT_DEAD_LETTERS: &str = "
    INSERT INTO dead_letters (topic, partition, \"offset\", key, payload, error, detail)
    SELECT $1, $2, d.off, d.key, d.payload, d.error, d.detail
    FROM unnest($3::bigint[], $4::bytea[], $5::bytea[], $6::text[], $7::text[])
        AS d(off, key, payload, error, detail)
    ON CONFLICT (topic, partition, \"offset\") DO NOTHING";

/// Applies one batch of one partition in one transaction; see the module doc for the steps.
pub async fn apply_batch(
    pool: &Pool,
    source: &Source,
    batch: &Batch,
) -> Result<BatchOutcome, Failure> {
    let (Some(partition), Some((_, last))) = (batch.partition(), batch.offsets()) else {
        return Ok(BatchOutcome::default());
    };
    let topic = source.topic.as_str();
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;

    let keys = batch.lock_keys();
    if !keys.is_empty() {
        let waiting = std::time::Instant::now();
        tx.execute_typed(LOCK, &[(&keys, Type::INT8_ARRAY)]).await?;
        metrics::histogram!(crate::metrics::LOCK_WAIT_SECONDS)
            .record(waiting.elapsed().as_secs_f64());
    }
    let ids = batch.event_ids();
    let skus = batch.skus();
    let ids_param = [(&ids as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    let skus_param = [(&skus as &(dyn ToSql + Sync), Type::TEXT_ARRAY)];
    // Both reads are sent before either answer is awaited (one round trip for the two).
    let (recorded_rows, stock_rows) = tokio::try_join!(
        tx.query_typed(RECORDED, &ids_param),
        tx.query_typed(STOCK, &skus_param),
    )?;
    let mut recorded = HashMap::with_capacity(recorded_rows.len());
    for row in recorded_rows {
        recorded.insert(row.try_get::<_, String>(0)?, row.try_get::<_, Vec<u8>>(1)?);
    }
    let mut stock = StockBook::with_capacity(stock_rows.len());
    for row in stock_rows {
        stock.insert(row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?);
    }

    let plan = batch.plan(&recorded, stock);

    if !plan.events.is_empty() {
        let ids: Vec<&str> = plan.events.iter().map(|e| e.event.id.as_str()).collect();
        let kinds: Vec<&str> = plan.events.iter().map(|e| e.event.kind.as_str()).collect();
        let outcomes: Vec<&str> = plan.events.iter().map(|e| e.outcome.as_str()).collect();
        let reasons: Vec<Option<&str>> = plan.events.iter().map(|e| e.outcome.reason()).collect();
        let lines: Vec<i32> = plan
            .events
            .iter()
            .map(|e| e.event.lines.len() as i32)
            .collect();
        let offsets: Vec<i64> = plan.events.iter().map(|e| e.offset).collect();
        let digests: Vec<&[u8]> = plan.events.iter().map(|e| e.digest.as_slice()).collect();
        tx.execute_typed(
            INSERT_EVENTS,
            &[
                (&topic, Type::TEXT),
                (&partition, Type::INT4),
                (&ids, Type::TEXT_ARRAY),
                (&kinds, Type::TEXT_ARRAY),
                (&outcomes, Type::TEXT_ARRAY),
                (&reasons, Type::TEXT_ARRAY),
                (&lines, Type::INT4_ARRAY),
                (&offsets, Type::INT8_ARRAY),
                (&digests, Type::BYTEA_ARRAY),
            ],
        )
        .await?;
    }
    if !plan.products.is_empty() {
        for (sql, created) in [(UPDATE_PRODUCTS, false), (INSERT_PRODUCTS, true)] {
            let changes: Vec<&ProductChange> = plan
                .products
                .iter()
                .filter(|p| p.created == created)
                .collect();
            if changes.is_empty() {
                continue;
            }
            let skus: Vec<&str> = changes.iter().map(|p| p.sku.as_str()).collect();
            let deltas: Vec<i64> = changes.iter().map(|p| p.delta).collect();
            let counts: Vec<i64> = changes.iter().map(|p| p.changes).collect();
            let rows = tx
                .execute_typed(
                    sql,
                    &[
                        (&skus, Type::TEXT_ARRAY),
                        (&deltas, Type::INT8_ARRAY),
                        (&counts, Type::INT8_ARRAY),
                    ],
                )
                .await?;
            if rows != changes.len() as u64 {
                // We read these rows under their locks a moment ago: someone deletes products.
                return Err(Failure::Fatal(format!(
                    "expected to change {} products, changed {rows}: products are being modified outside this service",
                    changes.len()
                )));
            }
        }
        let event_ids: Vec<&str> = plan.movements.iter().map(|(id, _)| *id).collect();
        let skus: Vec<&str> = plan.movements.iter().map(|(_, m)| m.sku.as_str()).collect();
        let deltas: Vec<i64> = plan.movements.iter().map(|(_, m)| m.delta).collect();
        let after: Vec<i64> = plan.movements.iter().map(|(_, m)| m.stock_after).collect();
        tx.execute_typed(
            INSERT_MOVEMENTS,
            &[
                (&event_ids, Type::TEXT_ARRAY),
                (&skus, Type::TEXT_ARRAY),
                (&deltas, Type::INT8_ARRAY),
                (&after, Type::INT8_ARRAY),
            ],
        )
        .await?;
    }
    if !plan.dead_letters.is_empty() {
        let d = &plan.dead_letters;
        let offsets: Vec<i64> = d.iter().map(|d| d.delivery.offset).collect();
        let keys: Vec<Option<&[u8]>> = d.iter().map(|d| d.delivery.key.as_deref()).collect();
        let payloads: Vec<Option<&[u8]>> =
            d.iter().map(|d| d.delivery.payload.as_deref()).collect();
        let errors: Vec<&str> = d.iter().map(|d| d.error).collect();
        let details: Vec<&str> = d.iter().map(|d| d.detail.as_str()).collect();
        tx.execute_typed(
            INSERT_DEAD_LETTERS,
            &[
                (&topic, Type::TEXT),
                (&partition, Type::INT4),
                (&offsets, Type::INT8_ARRAY),
                (&keys, Type::BYTEA_ARRAY),
                (&payloads, Type::BYTEA_ARRAY),
                (&errors, Type::TEXT_ARRAY),
                (&details, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    }
    tx.execute_typed(
        RECORD_OFFSET,
        &[
            (&source.group, Type::TEXT),
            (&topic, Type::TEXT),
            (&partition, Type::INT4),
            (&(last + 1), Type::INT8),
        ],
    )
    .await?;
    let outcome = BatchOutcome {
        applied: plan.count("applied"),
        rejected: plan.count("rejected"),
        duplicates: plan.duplicates,
        dead_letters: plan.dead_letters.len() as u64,
    };
    tx.commit().await?;
    Ok(outcome)
}

/// The recorded next offsets of `partitions` (absent: never processed by this group).
pub async fn load_offsets(
    pool: &Pool,
    source: &Source,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, Failure> {
    let conn = pool.get().await?;
    let rows = conn
        .query_typed(
            LOAD_OFFSETS,
            &[
                (&source.group, Type::TEXT),
                (&source.topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    let mut offsets = HashMap::with_capacity(rows.len());
    for row in rows {
        offsets.insert(row.try_get::<_, i32>(0)?, row.try_get::<_, i64>(1)?);
    }
    Ok(offsets)
}
