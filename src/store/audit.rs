//! The audit behind `verify`: invariants that must hold in any database this service wrote,
//! and, given the oracle an `inventory-dev produce` run wrote, equality with what should have happened.
//!
//! History that retention dropped (src/store/retention.rs) is accounted for: the ledger's
//! sums start from `ledger_openings`, the counts add what `history_periods` says the dropped
//! partitions held, and checks that join two tables skip the periods one of them lost.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::expectation::Expectation;
use crate::store::Failure;

/// The single number a counting query returns.
async fn count(db: &Client, sql: &str) -> Result<i64, Failure> {
    Ok(db.query_one(sql, &[]).await?.try_get(0)?)
}

/// Reservations that have expired so far (each one's expiry is recorded like an event, but
/// comes from no message, so [`settled`] leaves it out).
pub async fn expired(db: &Client) -> Result<i64, Failure> {
    count(
        db,
        "SELECT count(*) FROM reservations WHERE status = 'expired'",
    )
    .await
}

/// Replies written but not yet published (rows of `reply_outbox`).
pub async fn queued_replies(db: &Client) -> Result<i64, Failure> {
    count(db, "SELECT count(*) FROM reply_outbox").await
}

/// The event ids of every recorded reply.
pub async fn reply_ids(db: &Client) -> Result<BTreeSet<String>, Failure> {
    let rows = db.query("SELECT event_id FROM replies", &[]).await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Messages that reached an end: events decided (`processed_events`) plus dead letters,
/// counting those retention dropped.
pub async fn settled(db: &Client) -> Result<i64, Failure> {
    count(
        db,
        "SELECT (SELECT count(*) FROM processed_events WHERE event_type <> 'expire')
              + (SELECT count(*) FROM dead_letters)
              + (SELECT coalesce(sum(events_dropped + dead_letters_dropped), 0)::bigint
                 FROM history_periods)",
    )
    .await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct AuditReport {
    pub checks: Vec<Check>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn check(&mut self, name: &'static str, passed: bool, detail: String) {
        self.checks.push(Check {
            name,
            passed,
            detail,
        });
    }

    /// Adds a check that a query counting violations returns zero.
    async fn none_of(
        &mut self,
        db: &Client,
        name: &'static str,
        what: &str,
        sql: &str,
    ) -> Result<(), Failure> {
        let violations = count(db, sql).await?;
        self.check(name, violations == 0, format!("{violations} {what}"));
        Ok(())
    }
}

// Per SKU: its opening balance (what dropped ledger periods added up to) plus its movements.
const MOVEMENT_TOTALS: &str = "
    SELECT sku, sum(delta)::bigint AS total, sum(reserved_delta)::bigint AS reserved,
           sum(changes)::bigint AS changes
    FROM (SELECT sku, delta, reserved_delta, 1 AS changes FROM stock_movements
          UNION ALL
          SELECT sku, stock, reserved, changes FROM ledger_openings) l
    GROUP BY sku";

/// Runs every check; `expected` adds the comparison with an oracle.
pub async fn audit(db: &Client, expected: Option<&Expectation>) -> Result<AuditReport, Failure> {
    let mut r = AuditReport::default();
    check_stock_and_ledger(db, &mut r).await?;
    check_events(db, &mut r).await?;
    if let Some(expected) = expected {
        compare_with_oracle(db, expected, &mut r).await?;
    }
    Ok(r)
}

/// Stock, reserved stock and versions against the ledger and the active reservations.
async fn check_stock_and_ledger(db: &Client, r: &mut AuditReport) -> Result<(), Failure> {
    r.none_of(
        db,
        "no negative stock",
        "products below zero",
        "SELECT count(*) FROM products WHERE current_stock < 0",
    )
    .await?;
    r.none_of(
        db,
        "ledger equals stock",
        "products whose stock differs from the sum of their movements",
        &format!(
            "SELECT count(*) FROM products p LEFT JOIN ({MOVEMENT_TOTALS}) m USING (sku)
             WHERE p.current_stock <> coalesce(m.total, 0)"
        ),
    )
    .await?;
    r.none_of(
        db,
        "ledger equals reserved stock",
        "products whose reserved stock differs from the sum of their movements",
        &format!(
            "SELECT count(*) FROM products p LEFT JOIN ({MOVEMENT_TOTALS}) m USING (sku)
             WHERE p.reserved_stock <> coalesce(m.reserved, 0)"
        ),
    )
    .await?;
    r.none_of(
        db,
        "reserved equals active reservations",
        "products whose reserved stock differs from the lines of their active reservations, or exceeds their stock",
        "SELECT count(*) FROM products p
         LEFT JOIN (SELECT l.sku, sum(l.quantity)::bigint AS units
                    FROM reservations r JOIN reservation_lines l USING (order_id)
                    WHERE r.status = 'active' GROUP BY l.sku) a USING (sku)
         WHERE p.reserved_stock <> coalesce(a.units, 0) OR p.reserved_stock > p.current_stock",
    )
    .await?;
    r.none_of(
        db,
        "ledger rows name recorded events and known products",
        "movements whose event is not in processed_events or whose SKU is not in products",
        "SELECT count(*) FROM stock_movements m JOIN history_periods h USING (period)
         WHERE (NOT h.events_gone AND NOT EXISTS (SELECT 1 FROM processed_events e
                                                  WHERE e.event_id = m.event_id
                                                    AND e.period = m.period))
            OR NOT EXISTS (SELECT 1 FROM products p WHERE p.sku = m.sku)",
    )
    .await?;
    r.none_of(
        db,
        "version counts changes",
        "products whose version differs from their number of movements",
        &format!(
            "SELECT count(*) FROM products p LEFT JOIN ({MOVEMENT_TOTALS}) m USING (sku)
             WHERE p.version <> coalesce(m.changes, 0)"
        ),
    )
    .await?;
    r.none_of(
        db,
        "running balance",
        "movements whose stock_after is not the running sum of their SKU's ledger",
        "SELECT count(*) FROM (
             SELECT stock_after, reserved_after,
                    coalesce(o.stock, 0)
                        + sum(delta) OVER (PARTITION BY m.sku ORDER BY id) AS running,
                    coalesce(o.reserved, 0)
                        + sum(reserved_delta) OVER (PARTITION BY m.sku ORDER BY id) AS reserved
             FROM stock_movements m LEFT JOIN ledger_openings o USING (sku)) m
         WHERE stock_after <> running OR running < 0
            OR reserved_after <> reserved OR reserved < 0 OR reserved > running",
    )
    .await?;
    Ok(())
}

/// The event rows, their periods, their effects and the reservations they ended.
async fn check_events(db: &Client, r: &mut AuditReport) -> Result<(), Failure> {
    // The conditions migration 14 moved here from CHECK constraints of `processed_events`
    // (a NULL condition passes, as it did there).
    r.none_of(
        db,
        "event rows as recorded",
        "events whose row breaks the table's rules (id length, type, outcome and reason, line count, position)",
        "SELECT count(*) FROM processed_events
         WHERE NOT (length(event_id) BETWEEN 1 AND CASE WHEN event_type = 'expire' THEN 135 ELSE 128 END
                    AND event_type IN ('restock', 'sale', 'adjustment', 'reserve', 'commit',
                                       'release', 'expire')
                    AND outcome IN ('applied', 'rejected')
                    AND line_count BETWEEN 0 AND 100
                    AND (outcome = 'applied') = (reason IS NULL)
                    AND (event_type = 'expire') = (partition IS NULL AND \"offset\" IS NULL))",
    )
    .await?;
    // The batches look for recorded ids in a counted period only where its range of ids says
    // they may be (src/store/apply/mod.rs): a range that left out an id would let it apply again.
    // A period without a range is read by every batch, whatever it holds.
    r.none_of(
        db,
        "period id ranges",
        "counted periods whose range of event ids leaves out one of their events",
        "SELECT count(*) FROM history_periods h
         CROSS JOIN LATERAL (SELECT min(event_id) AS lo, max(event_id) AS hi
                             FROM processed_events e WHERE e.period = h.period) x
         WHERE h.events_counted IS NOT NULL AND NOT h.events_gone AND x.lo IS NOT NULL
           AND h.events_min_id IS NOT NULL
           AND (x.lo < h.events_min_id OR x.hi > h.events_max_id)",
    )
    .await?;
    r.none_of(
        db,
        "outcomes match effects",
        "events whose movements do not match their outcome (applied: one per line; rejected: none)",
        "SELECT count(*) FROM processed_events e
         LEFT JOIN (SELECT event_id, period, count(*) AS n FROM stock_movements
                    GROUP BY event_id, period) m USING (event_id, period)
         -- (Where the period's ledger is kept.)
         WHERE (e.period NOT IN (SELECT period FROM history_periods WHERE movements_gone)
                AND ((e.outcome = 'applied' AND coalesce(m.n, 0) <> e.line_count)
                     OR (e.outcome = 'rejected' AND coalesce(m.n, 0) <> 0)))
            OR (e.outcome = 'rejected' AND e.reason NOT IN ('insufficient_stock', 'unknown_sku',
                'stock_overflow', 'order_exists', 'no_active_reservation', 'invalid_ttl',
                'invalid_expires_at'))",
    )
    .await?;
    r.none_of(
        db,
        "each reservation ended once",
        "reservations whose status does not match the event that ended them",
        "SELECT count(*) FROM reservations r
         LEFT JOIN processed_events e ON e.event_id = r.ended_by
         WHERE (r.status = 'active') <> (r.ended_by IS NULL)
            -- Unless its ending event was dropped with its period (then only the above).
            OR (coalesce(r.ended_at >= (SELECT max(ended_at) FROM history_periods
                                        WHERE events_gone), true)
                AND ((r.status = 'committed' AND e.event_type IS DISTINCT FROM 'commit')
                  OR (r.status = 'released' AND e.event_type IS DISTINCT FROM 'release')
                  OR (r.status = 'expired' AND e.event_type IS DISTINCT FROM 'expire')))",
    )
    .await?;
    r.none_of(
        db,
        "each event id recorded once",
        "event ids with more than one row in processed_events",
        "SELECT count(*) FROM (SELECT event_id FROM processed_events
                               GROUP BY event_id HAVING count(*) > 1) d",
    )
    .await
}

/// The database against what the workload's oracle says a correct consumer ends with.
async fn compare_with_oracle(
    db: &Client,
    expected: &Expectation,
    r: &mut AuditReport,
) -> Result<(), Failure> {
    compare_stock(db, expected, r).await?;
    compare_reservations(db, expected, r).await?;
    compare_counts(db, expected, r).await
}

/// Every SKU's stock and reserved stock, and no SKU the oracle does not know.
async fn compare_stock(
    db: &Client,
    expected: &Expectation,
    r: &mut AuditReport,
) -> Result<(), Failure> {
    let rows = db
        .query(
            "SELECT sku, current_stock, reserved_stock FROM products",
            &[],
        )
        .await?;
    let mut actual = BTreeMap::new();
    for row in rows {
        let stock: (i64, i64) = (row.try_get(1)?, row.try_get(2)?);
        actual.insert(row.try_get::<_, String>(0)?, stock);
    }
    let mut wrong: Vec<String> = Vec::new();
    for (sku, want) in &expected.stock {
        let want = (*want, expected.reserved.get(sku).copied().unwrap_or(0));
        match actual.get(sku) {
            Some(got) if *got == want => {}
            got => wrong.push(format!(
                "{sku}: expected (stock, reserved) {want:?}, found {got:?}"
            )),
        }
    }
    for sku in actual.keys().filter(|s| !expected.stock.contains_key(*s)) {
        wrong.push(format!("{sku}: not expected to exist"));
    }
    let sample: Vec<&str> = wrong.iter().take(5).map(String::as_str).collect();
    r.check(
        "stock and reserved stock equal oracle",
        wrong.is_empty(),
        format!(
            "{} of {} SKUs differ{}",
            wrong.len(),
            expected.stock.len(),
            if sample.is_empty() {
                String::new()
            } else {
                format!(": {}", sample.join("; "))
            }
        ),
    );
    Ok(())
}

async fn compare_reservations(
    db: &Client,
    expected: &Expectation,
    r: &mut AuditReport,
) -> Result<(), Failure> {
    let rows = db
        .query(
            "SELECT status, count(*) FROM reservations GROUP BY status",
            &[],
        )
        .await?;
    let mut statuses = BTreeMap::new();
    for row in rows {
        statuses.insert(
            row.try_get::<_, String>(0)?,
            row.try_get::<_, i64>(1)? as u64,
        );
    }
    r.check(
        "reservations equal oracle",
        statuses == expected.reservations,
        format!(
            "by status: expected {:?}, found {statuses:?}",
            expected.reservations
        ),
    );
    Ok(())
}

/// Events, outcomes, dead letters and replies, counting what retention dropped.
async fn compare_counts(
    db: &Client,
    expected: &Expectation,
    r: &mut AuditReport,
) -> Result<(), Failure> {
    let counts = db
        .query_one(
            "WITH dropped AS (
                 SELECT coalesce(sum(events_dropped), 0)::bigint AS events,
                        coalesce(sum(applied_dropped), 0)::bigint AS applied,
                        coalesce(sum(rejected_dropped), 0)::bigint AS rejected,
                        coalesce(sum(dead_letters_dropped), 0)::bigint AS dead_letters,
                        coalesce(sum(order_replies_dropped), 0)::bigint AS replies
                 FROM history_periods)
             SELECT (SELECT count(*) FROM processed_events WHERE event_type <> 'expire') + events,
                    (SELECT count(*) FROM processed_events WHERE outcome = 'applied' AND event_type <> 'expire') + applied,
                    (SELECT count(*) FROM processed_events WHERE outcome = 'rejected') + rejected,
                    (SELECT count(*) FROM dead_letters) + dead_letters,
                    (SELECT count(*) FROM replies r JOIN processed_events e USING (event_id, period)
                     WHERE e.event_type IN ('reserve', 'commit', 'release', 'expire')) + replies
             FROM dropped",
            &[],
        )
        .await?;
    for (i, name, want) in [
        (0, "one outcome per distinct event", expected.events),
        (1, "applied events equal oracle", expected.applied),
        (2, "rejected events equal oracle", expected.rejected),
        (3, "dead letters equal oracle", expected.dead_letters),
        (4, "replies equal oracle", expected.replies),
    ] {
        let got: i64 = counts.try_get(i)?;
        r.check(
            name,
            got == want as i64,
            format!("expected {want}, found {got}"),
        );
    }
    Ok(())
}
