//! How many locks a replica may hold at once, so that the replicas together never exhaust
//! PostgreSQL's shared lock table.
//!
//! The table holds `max_locks_per_transaction × (max_connections + max_prepared_transactions)`
//! locks for the whole server, shared by every session. A batch transaction holds one advisory
//! lock per SKU (up to [`MAX_LOCKS_PER_BATCH`]) and some relation locks (the history tables'
//! partitions and their indexes); an expiry sweep likewise. A replica runs up to
//! `database.pool_size` such transactions at once, and `database.max_replicas` replicas may
//! run. Past the table's size the server answers "out of shared memory" to every session that
//! needs one more lock, ours and everyone else's.
//!
//! The rule: the replicas together take at most half the table. Each replica's share is half
//! the table over `database.max_replicas`; it holds locks in at most `holders` transactions at
//! once (as many as full batches fit its share, at least one, at most its pool), and each
//! transaction takes at most `locks_per_batch` SKU locks (a batch over it is applied in
//! parts), never fewer than one event may need. A share too small for that is refused at
//! start-up.
//!
//! Besides its SKUs, a transaction holds relation locks on the tables, partitions and indexes
//! it touches (a generic plan locks every partition of a partitioned table, pruned or not),
//! and its transaction ids. Measured (`pg_locks` of a replica stopped mid-batch, a new
//! database): 16 relation locks kept outside the shared table ("fast path"), up to 9 in it,
//! and 2 others. So the budget counts, as [`other_locks`], every relation of the schema beyond
//! the fast path's 16: the partitions of a long history are in it.

use anyhow::Context;

use crate::config::ConfigError;
use crate::domain::batch::MAX_LOCKS_PER_BATCH;
use crate::domain::event::MAX_LINES;

/// Relation locks a session keeps outside the shared table.
const FAST_PATH: u64 = 16;
/// Transaction ids and the like.
const TRANSACTION_LOCKS: u64 = 8;
/// The fewest SKU locks a transaction may be allowed: what one event may take alone (its
/// lines, and for a commit or release its order's reservation), which is never split.
pub const MIN_LOCKS_PER_BATCH: u64 = 2 * MAX_LINES as u64;

/// The fewest relations counted: what the schema holds once migrated and maintained once
/// (measured: 49 after the migrations, 56 after the first maintenance pass), for a replica that
/// starts before the migrations ran (`database.migrate = false`, the Job not done yet).
const MIGRATED_RELATIONS: u64 = 56;

/// Locks a transaction holds in the shared table besides its SKU locks, for a schema of
/// `relations` tables, partitions and indexes.
pub fn other_locks(relations: u64) -> u64 {
    relations.max(MIGRATED_RELATIONS).saturating_sub(FAST_PATH) + TRANSACTION_LOCKS
}

/// What one replica may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LockBudget {
    /// Transactions that hold SKU locks at once (batches and expiry sweeps).
    pub holders: usize,
    /// SKU locks one of them takes at most.
    pub locks_per_batch: usize,
}

impl LockBudget {
    /// The budget when nothing bounds it below the batch's own cap (tests and tools that
    /// apply batches without a replica).
    pub fn unbounded(pool_size: u32) -> Self {
        LockBudget {
            holders: pool_size.max(1) as usize,
            locks_per_batch: MAX_LOCKS_PER_BATCH,
        }
    }
}

/// The server's lock table: `max_locks_per_transaction × (max_connections +
/// max_prepared_transactions)`.
pub fn table_size(max_locks_per_transaction: u64, max_connections: u64, max_prepared: u64) -> u64 {
    max_locks_per_transaction * (max_connections + max_prepared)
}

/// Each replica's budget when `max_replicas` replicas with `pool_size` connections each share
/// half of a lock table of `table` locks, each transaction also holding `other` locks
/// ([`other_locks`]); `Err` says why none fits.
pub fn plan(
    table: u64,
    other: u64,
    max_replicas: u64,
    pool_size: u32,
) -> Result<LockBudget, String> {
    let share = table / 2 / max_replicas.max(1);
    let full = MAX_LOCKS_PER_BATCH as u64 + other;
    let holders = (share / full).clamp(1, u64::from(pool_size.max(1)));
    let per_holder = share / holders;
    let locks_per_batch = per_holder
        .saturating_sub(other)
        .min(MAX_LOCKS_PER_BATCH as u64);
    if locks_per_batch < MIN_LOCKS_PER_BATCH {
        let needed = (MIN_LOCKS_PER_BATCH + other) * 2 * max_replicas.max(1);
        return Err(format!(
            "the server's lock table holds {table} locks (max_locks_per_transaction × \
             (max_connections + max_prepared_transactions)); half of it over \
             database.max_replicas = {max_replicas} leaves each replica {share}, less than \
             one transaction may need ({MIN_LOCKS_PER_BATCH} SKUs and {other} other locks): \
             raise the server's max_locks_per_transaction (a table of {needed} or more), or \
             lower database.max_replicas"
        ));
    }
    Ok(LockBudget {
        holders: holders as usize,
        locks_per_batch: locks_per_batch as usize,
    })
}

/// This replica's share of the server's lock table, read at start-up (`run`); a table too
/// small for `database.max_replicas` is a configuration error.
pub async fn measure(
    client: &tokio_postgres::Client,
    db: &crate::config::DatabaseSettings,
) -> anyhow::Result<LockBudget> {
    let row = client
        .query_one(
            "SELECT current_setting('max_locks_per_transaction')::bigint,
                    current_setting('max_connections')::bigint,
                    current_setting('max_prepared_transactions')::bigint,
                    (SELECT count(*) FROM pg_class
                     WHERE relnamespace = current_schema()::regnamespace
                       AND relkind IN ('r', 'p', 'i', 'I'))",
            &[],
        )
        .await
        .context("reading the server's lock table size")?;
    let (locks, connections, prepared, relations): (i64, i64, i64, i64) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    );
    let table = table_size(locks as u64, connections as u64, prepared as u64);
    let other = other_locks(relations as u64);
    let budget = plan(table, other, db.max_replicas, db.pool_size)
        .map_err(|why| ConfigError::key("database.max_replicas", why))?;
    tracing::info!(
        lock_table = table,
        other_locks = other,
        max_replicas = db.max_replicas,
        holders = budget.holders,
        locks_per_batch = budget.locks_per_batch,
        "lock budget: lock-holding transactions at once, and SKU locks each"
    );
    metrics::gauge!(crate::metrics::LOCK_HOLDERS).set(budget.holders as f64);
    metrics::gauge!(crate::metrics::LOCKS_PER_BATCH).set(budget.locks_per_batch as f64);
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// About what a new database's schema holds (tables, partitions, indexes).
    const OTHER: u64 = 80;

    #[test]
    fn postgresqls_defaults_serve_six_replicas_one_transaction_each() {
        // max_locks_per_transaction 64, max_connections 100: 6,400 locks.
        let table = table_size(64, 100, 0);
        assert_eq!(
            plan(table, OTHER, 6, 4),
            Ok(LockBudget {
                holders: 1,
                locks_per_batch: 453
            })
        );
        assert_eq!(
            plan(table, OTHER, 3, 4),
            Ok(LockBudget {
                holders: 1,
                locks_per_batch: 500
            })
        );
        let refused = plan(table, OTHER, 12, 4).unwrap_err();
        assert!(refused.contains("database.max_replicas = 12"), "{refused}");
        assert!(refused.contains("max_locks_per_transaction"), "{refused}");
    }

    #[test]
    fn a_large_table_lets_every_connection_hold_a_full_batch() {
        let table = table_size(1024, 100, 0);
        assert_eq!(plan(table, OTHER, 12, 4), Ok(LockBudget::unbounded(4)));
    }

    #[test]
    fn relations_beyond_the_fast_path_count_against_the_share() {
        assert_eq!(
            other_locks(0),
            other_locks(MIGRATED_RELATIONS),
            "an empty schema counts as a migrated one"
        );
        assert_eq!(other_locks(116), 100 + TRANSACTION_LOCKS);
    }

    proptest! {
        /// Whatever the sizes, the replicas together stay within half the table, and every
        /// transaction may take what one event needs.
        #[test]
        fn the_replicas_never_take_more_than_half_the_table(
            locks in 10u64..4096, connections in 5u64..2000, prepared in 0u64..100,
            relations in 0u64..2000, replicas in 1u64..200, pool in 1u32..64,
        ) {
            let table = table_size(locks, connections, prepared);
            let other = other_locks(relations);
            if let Ok(b) = plan(table, other, replicas, pool) {
                let per_replica = b.holders as u64 * (b.locks_per_batch as u64 + other);
                prop_assert!(per_replica * replicas <= table / 2);
                prop_assert!(b.holders >= 1 && b.holders <= pool as usize);
                prop_assert!(b.locks_per_batch as u64 >= MIN_LOCKS_PER_BATCH);
            }
        }
    }
}
