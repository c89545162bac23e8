//! Bounded history: periods, and the retention of the tables that would otherwise grow for ever.
//!
//! `processed_events`, `stock_movements`, `dead_letters` and `replies` are partitioned by period
//! (migration 8 says why a period and not a timestamp). Maintenance, run by every replica every
//! [`HistorySettings::maintenance_interval`] and by the `maintain` command, does five things,
//! each in a transaction of its own that only one session at a time may run (a
//! transaction-level try-lock: a replica that finds it taken skips the step):
//! 1. creates the partitions of the next [`AHEAD`] periods, so that starting one never waits on
//!    DDL;
//! 2. starts a new period once the current one is `history.period_s` old, under the period
//!    clock's exclusive lock: the switch waits for the batches of the old period to commit, and
//!    no batch of the new one starts before it commits;
//! 3. drops, oldest first, each table's partitions of the periods that ended longer ago than its
//!    retention, recording what they held in `history_periods` (so `verify` still adds up) and,
//!    for the ledger, carrying each SKU's balance forward into `ledger_openings`. A period of
//!    replies still queued for the relay is kept until they are published. The partitions are
//!    detached there and their tables dropped last (see [`drop_detached`]);
//! 4. counts, once, what the events of each ended period still kept hold, and the range of
//!    their ids, into `history_periods` (see [`count_ended`]);
//! 5. drops the tables detached.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;

use crate::config::HistorySettings;
use crate::domain::lock_key;
use crate::store::{Failure, Pool};

/// Periods whose partitions exist ahead of the current one.
pub const AHEAD: i32 = 2;

/// The longest a maintenance step waits for a lock (see [`exclusive`]).
const DDL_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The period clock's lock: every transaction that writes history takes it shared, before any
/// other lock; starting a period takes it exclusive. No SKU contains a space, so the key is
/// outside the SKU lock space.
pub fn clock_key() -> i64 {
    lock_key("history period clock")
}

pub(super) const CLOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1)";

fn maintenance_key() -> i64 {
    lock_key("history maintenance")
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    /// The period current after the pass.
    pub period: i32,
    /// A new period started.
    pub started: bool,
    /// Partitions created and dropped, by table name (`processed_events_p3`...).
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Ended periods counted (see [`count_ended`]).
    pub counted: Vec<i32>,
    /// Another session was maintaining: some steps were skipped.
    pub skipped: bool,
}

/// One maintenance pass (see the module doc).
pub async fn maintain(db: &mut Client, settings: &HistorySettings) -> Result<Maintenance, Failure> {
    let mut done = Maintenance::default();
    // Each step on its own: one that fails (a lock not granted in time) leaves the others to
    // do their part; the first failure is reported.
    let mut failed = None;
    // Expired periods are dropped before the ended ones are counted: counting one about to go
    // would read it for nothing (its drop counts it if it was never counted).
    for step in 0..4 + Table::ALL.len() {
        let result = match step {
            0 => create_ahead(db, &mut done).await,
            1 => start_period(db, settings, &mut done).await,
            n if n < 2 + Table::ALL.len() => {
                drop_expired(db, Table::ALL[n - 2], settings, &mut done).await
            }
            n if n == 2 + Table::ALL.len() => count_ended(db, &mut done).await,
            _ => drop_detached(db).await,
        };
        if let Err(e) = result {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    done.period = current(db).await?;
    Ok(done)
}

/// Maintains every `settings.maintenance_interval()` until `stop`; a failed pass is logged and
/// tried again next time.
pub async fn maintain_until(pool: Pool, settings: HistorySettings, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(settings.maintenance_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let pass = async {
            let mut conn = pool.get().await?;
            maintain(&mut conn, &settings).await
        };
        match pass.await {
            Ok(m) if m.started || !m.dropped.is_empty() || !m.counted.is_empty() => tracing::info!(
                period = m.period,
                started = m.started,
                counted = ?m.counted,
                dropped = ?m.dropped,
                "history maintained"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::logs::chain(&e), "history maintenance failed; trying again")
            }
        }
    }
}

/// The period writers write to now.
pub async fn current(db: &Client) -> Result<i32, Failure> {
    Ok(db
        .query_one("SELECT current_history_period()", &[])
        .await?
        .try_get(0)?)
}

/// Starts a transaction and takes the maintenance try-lock; `None` if another session holds it.
async fn exclusive(db: &mut Client) -> Result<Option<tokio_postgres::Transaction<'_>>, Failure> {
    let tx = db.transaction().await?;
    // Creating and dropping a partition locks its parent table exclusively, and the batches
    // that come meanwhile queue behind that lock: a long read of the table (an audit) must not
    // hold them up for long. The step fails instead, and the next pass tries again.
    // And counting a period and a drop that carries the ledger forward read a whole period,
    // which can outlast the pool's statement timeout: no statement bound here, only the lock
    // bound.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = 0",
        DDL_LOCK_WAIT.as_millis()
    ))
    .await?;
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&maintenance_key()],
        )
        .await?
        .try_get(0)?;
    Ok(locked.then_some(tx))
}

async fn create_ahead(db: &mut Client, done: &mut Maintenance) -> Result<(), Failure> {
    let Some(tx) = exclusive(db).await? else {
        done.skipped = true;
        return Ok(());
    };
    let period: i32 = tx
        .query_one("SELECT current_history_period()", &[])
        .await?
        .try_get(0)?;
    for p in period..=period + AHEAD {
        // Only what is missing: creating a partition locks its parent table.
        let name = format!("processed_events_p{p}");
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .try_get(0)?;
        if !exists {
            tx.execute("SELECT create_history_partitions($1)", &[&p])
                .await?;
            done.created.push(format!("period {p}"));
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn start_period(
    db: &mut Client,
    settings: &HistorySettings,
    done: &mut Maintenance,
) -> Result<(), Failure> {
    let Some(tx) = exclusive(db).await? else {
        done.skipped = true;
        return Ok(());
    };
    let due: bool = tx
        .query_one(
            "SELECT started_at <= now() - make_interval(secs => $1)
             FROM history_periods WHERE period = current_history_period()",
            &[&(settings.period_s as f64)],
        )
        .await?
        .try_get(0)?;
    if !due {
        return Ok(());
    }
    // Waits for every transaction of the current period to end (bounded by lock_timeout);
    // batches that come meanwhile queue behind it and then read the new period.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&clock_key()])
        .await?;
    // Its partitions exist (created ahead); made here if maintenance ran late.
    tx.execute(
        "SELECT create_history_partitions(current_history_period() + 1)",
        &[],
    )
    .await?;
    // clock_timestamp(): after the lock, so every transaction of the old period ran before it.
    tx.batch_execute(&next_period("clock_timestamp()")).await?;
    tx.commit().await?;
    done.started = true;
    Ok(())
}

/// The statement that ends the current period at `at` (an SQL expression) and starts the next.
pub fn next_period(at: &str) -> String {
    format!(
        "WITH t AS (SELECT {at} AS at, current_history_period() AS p),
              ended AS (UPDATE history_periods SET ended_at = t.at FROM t WHERE period = t.p)
         INSERT INTO history_periods (period, started_at) SELECT t.p + 1, t.at FROM t"
    )
}

/// Counts the events of each ended period still kept and not counted yet, oldest first, one
/// period per transaction (migration 13). An ended period's rows no longer change: every
/// transaction of it ended before the clock moved on, and none can start. So the count taken
/// now is the count its drop records, days later, without scanning the period while the
/// batches wait, and the range of ids taken with it holds every id of the period for good.
/// Counting reads the period and locks nothing the batches need.
async fn count_ended(db: &mut Client, done: &mut Maintenance) -> Result<(), Failure> {
    loop {
        let Some(tx) = exclusive(db).await? else {
            done.skipped = true;
            return Ok(());
        };
        let Some(row) = tx.query(UNCOUNTED, &[]).await?.into_iter().next() else {
            return Ok(());
        };
        let p: i32 = row.try_get(0)?;
        tx.batch_execute(&count_events(p)).await?;
        tx.commit().await?;
        done.counted.push(p);
    }
}

/// The ended periods whose events are kept and not counted yet, oldest first; and those a
/// release before migration 15 counted without their range of ids (events but no range), which
/// are counted again: until then the batches read their recorded ids there as in a period not
/// counted (src/store/apply/mod.rs), and a range is what spares them that.
pub const UNCOUNTED: &str = "
    SELECT period FROM history_periods
    WHERE ended_at IS NOT NULL AND NOT events_gone
      AND (events_counted IS NULL OR (events_counted > 0 AND events_min_id IS NULL))
    ORDER BY period";

/// Counts what period `p`'s events hold into its `*_counted` columns, with the range of its
/// event ids (where the batches look for recorded ids, src/store/apply/mod.rs), unless counted
/// already with its range (then the count is not run): one pass over the events; the replies
/// are few (order steps only). The counts of a period counted again are the same: its rows no
/// longer change.
pub fn count_events(p: i32) -> String {
    format!(
        "UPDATE history_periods SET
             (events_counted, applied_counted, rejected_counted, order_replies_counted,
              events_min_id, events_max_id) = (
                 SELECT count(*) FILTER (WHERE event_type <> 'expire'),
                        count(*) FILTER (WHERE outcome = 'applied' AND event_type <> 'expire'),
                        count(*) FILTER (WHERE outcome = 'rejected'),
                        (SELECT count(*) FROM replies_p{p} r
                         JOIN processed_events_p{p} e USING (event_id)
                         WHERE e.event_type IN ('reserve', 'commit', 'release', 'expire')),
                        min(event_id), max(event_id)
                 FROM processed_events_p{p})
         WHERE period = {p} AND (events_counted IS NULL OR events_min_id IS NULL)"
    )
}

/// The tables with a retention of their own (replies go with `processed_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Events,
    Ledger,
    DeadLetters,
}

impl Table {
    const ALL: [Table; 3] = [Table::Events, Table::Ledger, Table::DeadLetters];

    fn retention(self, s: &HistorySettings) -> u64 {
        match self {
            Table::Events => s.dedupe_horizon_s,
            Table::Ledger => s.ledger_retention_s,
            Table::DeadLetters => s.dead_letter_retention_s,
        }
    }

    /// Its flag in `history_periods`.
    fn gone(self) -> &'static str {
        match self {
            Table::Events => "events_gone",
            Table::Ledger => "movements_gone",
            Table::DeadLetters => "dead_letters_gone",
        }
    }
}

/// Detaches, oldest first, each period of `table` past its retention (the tables are dropped
/// later: [`DETACHED`]), carrying what the audit needs forward; one transaction a period.
async fn drop_expired(
    db: &mut Client,
    table: Table,
    settings: &HistorySettings,
    done: &mut Maintenance,
) -> Result<(), Failure> {
    let retention = table.retention(settings);
    if retention == 0 {
        return Ok(());
    }
    loop {
        let Some(tx) = exclusive(db).await? else {
            done.skipped = true;
            return Ok(());
        };
        let gone = table.gone();
        let oldest = tx
            .query_typed_opt(
                &format!(
                    "SELECT period, events_counted IS NULL FROM history_periods
                     WHERE NOT {gone} AND ended_at < now() - make_interval(secs => $1)
                     ORDER BY period LIMIT 1"
                ),
                &[(&(retention as f64), Type::FLOAT8)],
            )
            .await?;
        let Some(row) = oldest else {
            return Ok(());
        };
        let p: i32 = row.try_get(0)?;
        let uncounted: bool = row.try_get(1)?;
        let dropped = match table {
            Table::Events => match detach_events(&tx, p, uncounted).await? {
                Some(dropped) => dropped,
                // Kept for now; the transaction rolls back.
                None => return Ok(()),
            },
            Table::Ledger => detach_ledger(&tx, p).await?,
            Table::DeadLetters => detach_dead_letters(&tx, p).await?,
        };
        tx.commit().await?;
        done.dropped.extend(dropped);
    }
}

/// Period `p` of `processed_events` and `replies`, its counts carried into `history_periods`;
/// `None` while replies of it are still queued for the relay (the relay may be down).
async fn detach_events(
    tx: &Transaction<'_>,
    p: i32,
    uncounted: bool,
) -> Result<Option<Vec<String>>, Failure> {
    // Counted soon after the period ended (`count_ended`); if that has not happened yet, now,
    // before any table lock. Only then: even when it updates no row, the count's statement is
    // costed as a scan of the whole period, and PostgreSQL's JIT compiled it for 0.4 s of a
    // core (50 million events here).
    if uncounted {
        tx.batch_execute(&count_events(p)).await?;
    }
    // Both parents, in the order the writers lock them (events, then replies), so that
    // dropping cannot deadlock with a batch; and from here no batch can queue a reply of this
    // period again before the check below.
    tx.batch_execute("LOCK TABLE processed_events, replies IN ACCESS EXCLUSIVE MODE")
        .await?;
    let queued: bool = tx
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM reply_outbox o
                                JOIN replies_p{p} r USING (event_id))"
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    if queued {
        tracing::warn!(
            period = p,
            "replies of an expired period are still queued for the relay; kept until published"
        );
        return Ok(None);
    }
    tx.execute(
        "UPDATE history_periods SET
             events_dropped = events_dropped + events_counted,
             applied_dropped = applied_dropped + applied_counted,
             rejected_dropped = rejected_dropped + rejected_counted,
             order_replies_dropped = order_replies_dropped + order_replies_counted,
             events_gone = true
         WHERE period = $1",
        &[&p],
    )
    .await?;
    tx.batch_execute(&format!(
        "ALTER TABLE replies DETACH PARTITION replies_p{p};
         ALTER TABLE processed_events DETACH PARTITION processed_events_p{p};"
    ))
    .await?;
    Ok(Some(vec![
        format!("processed_events_p{p}"),
        format!("replies_p{p}"),
    ]))
}

/// Period `p` of the ledger, each SKU's balance at its end carried into `ledger_openings`.
async fn detach_ledger(tx: &Transaction<'_>, p: i32) -> Result<Vec<String>, Failure> {
    // Periods drop oldest first, so each SKU's last movement here is its balance at the end of
    // the period, and the openings hold everything before. One pass: the period's count is the
    // sum of the SKUs' counts.
    tx.batch_execute(&format!(
        "WITH last AS (
             SELECT DISTINCT ON (sku) sku, stock_after, reserved_after,
                    count(*) OVER (PARTITION BY sku) AS changes
             FROM stock_movements_p{p} ORDER BY sku, id DESC),
         carried AS (
             INSERT INTO ledger_openings AS o (sku, stock, reserved, changes)
             SELECT sku, stock_after, reserved_after, changes FROM last
             ON CONFLICT (sku) DO UPDATE SET stock = EXCLUDED.stock,
                 reserved = EXCLUDED.reserved, changes = o.changes + EXCLUDED.changes)
         UPDATE history_periods SET
             movements_dropped = movements_dropped
                 + (SELECT coalesce(sum(changes), 0) FROM last),
             movements_gone = true
         WHERE period = {p};
         ALTER TABLE stock_movements DETACH PARTITION stock_movements_p{p};"
    ))
    .await?;
    Ok(vec![format!("stock_movements_p{p}")])
}

/// Period `p` of `dead_letters`, its count carried into `history_periods`.
async fn detach_dead_letters(tx: &Transaction<'_>, p: i32) -> Result<Vec<String>, Failure> {
    tx.batch_execute(&format!(
        "UPDATE history_periods SET
             dead_letters_dropped = dead_letters_dropped +
                 (SELECT count(*) FROM dead_letters_p{p}),
             dead_letters_gone = true
         WHERE period = {p};
         ALTER TABLE dead_letters DETACH PARTITION dead_letters_p{p};"
    ))
    .await?;
    Ok(vec![format!("dead_letters_p{p}")])
}

/// History tables detached from their parent (`drop_expired`) and not dropped yet.
const DETACHED: &str = "
    SELECT c.relname::text FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
      AND NOT c.relispartition
      AND c.relname ~ '^(processed_events|replies|stock_movements|dead_letters)_p[0-9]+$'";

/// Drops the history tables `drop_expired` detached (this pass, or one that stopped before
/// this step): their period is accounted for, and no statement of the batches reads them any
/// more. Dropping deletes their files, which takes seconds for a large period; done here, it
/// holds no lock the batches wait on, where dropping a partition locks its parent table.
async fn drop_detached(db: &mut Client) -> Result<(), Failure> {
    let Some(tx) = exclusive(db).await? else {
        return Ok(());
    };
    let names: Vec<String> = tx
        .query(DETACHED, &[])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    if names.is_empty() {
        return Ok(());
    }
    tx.batch_execute(&format!("DROP TABLE {}", names.join(", ")))
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The settings in words, for the start-up log and `maintain`.
pub fn describe(settings: &HistorySettings) -> String {
    let keep = |s: u64| {
        if s == 0 {
            "for ever".to_owned()
        } else {
            format!("{:?}", Duration::from_secs(s))
        }
    };
    format!(
        "periods of {:?}; events kept {}, ledger {}, dead letters {}",
        Duration::from_secs(settings.period_s),
        keep(settings.dedupe_horizon_s),
        keep(settings.ledger_retention_s),
        keep(settings.dead_letter_retention_s)
    )
}
