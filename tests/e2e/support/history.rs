//! The bounded history's tests share these (`periods.rs`, `retention.rs`): history settings of
//! a day's period, a way to let days pass without waiting for them, one maintenance pass, the
//! audit's invariants, and store-level batches of restocks on partition 0.
//!
//! Time is moved on by moving the periods' timestamps back ([`pass_days`]): the database's clock
//! decides what is due, so no test waits for a day to pass.

use serde_json::json;

use inventory_consumer::config::HistorySettings;
use inventory_consumer::store::retention::{self, Maintenance};
use inventory_consumer::store::{self, BatchOutcome, Guards, Source, apply_batch, audit};

use super::{TestDb, batch, migrated_store};

/// A day, in seconds: the length of a period in [`settings`].
pub const DAY: u64 = 86_400;

/// Periods of a day, a dedupe horizon of 15 days, the ledger and dead letters kept 30 days.
pub fn settings() -> HistorySettings {
    HistorySettings {
        period_s: DAY,
        dedupe_horizon_s: 15 * DAY,
        ledger_retention_s: 30 * DAY,
        dead_letter_retention_s: 30 * DAY,
    }
}

/// `days` pass, as far as history is concerned.
pub async fn pass_days(db: &tokio_postgres::Client, days: i32) {
    db.execute(
        "UPDATE history_periods SET started_at = started_at - make_interval(days => $1),
                                    ended_at = ended_at - make_interval(days => $1)",
        &[&days],
    )
    .await
    .expect("moving the periods back");
}

/// One pass of history maintenance with [`settings`], as a replica runs it.
pub async fn maintain(db: &TestDb) -> Maintenance {
    let mut client = db.client().await;
    retention::maintain(&mut client, &settings())
        .await
        .expect("maintenance")
}

/// The audit's invariants (no expectation); panics with the failed checks.
pub async fn assert_audit_passes(db: &TestDb, what: &str) {
    let report = audit::audit(&db.client().await, None)
        .await
        .expect("auditing");
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{what}: {failed:?}");
    assert!(report.checks.len() >= 10, "{what}: too few checks ran");
}

/// A migrated store with partition 0 claimed by one replica, and the claim's epoch.
pub async fn claimed_store() -> (TestDb, store::Pool, Source, i64) {
    let (db, pool, source) = migrated_store().await;
    let epoch = store::claim(&pool, &source, "a", &[0])
        .await
        .expect("claim")[&0]
        .epoch;
    (db, pool, source, epoch)
}

/// Applies `events` (JSON texts) as one batch of partition 0 from `offset` on, fenced by
/// `epoch`.
pub async fn apply_events(
    pool: &store::Pool,
    source: &Source,
    epoch: i64,
    offset: i64,
    events: Vec<String>,
) -> BatchOutcome {
    apply_batch(pool, source, &batch(offset, &events), Guards::On, epoch)
        .await
        .expect("applying a batch")
}

/// A restock of `quantity` units of SKU `S-1`, with the event id `id`.
pub fn restock(id: &str, quantity: i64) -> String {
    json!({"event_id": id, "type": "restock", "sku": "S-1", "quantity": quantity}).to_string()
}
