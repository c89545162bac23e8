//! The batch transaction's statements. Each is prepared once per connection
//! ([`crate::store::statements`]) and set-based over arrays, so that a batch costs a fixed
//! number of round trips whatever its size.

// Array order is scan order in a function scan, so the locks are taken in the order given.
pub(in crate::store) const LOCK: &str =
    "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)";

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
pub(in crate::store) const RECORDED: &str = "
    SELECT e.event_id, e.payload_digest
    FROM history_periods h CROSS JOIN LATERAL (
        SELECT event_id, payload_digest FROM processed_events p
        WHERE p.period = h.period AND p.event_id = ANY($1::text[]) OFFSET 0) e
    WHERE h.period >= 0 AND NOT h.events_gone
      AND (h.events_counted IS NULL OR h.events_min_id IS NULL
           OR (h.events_min_id <= (SELECT max(i) FROM unnest($1::text[]) AS i)
               AND h.events_max_id >= (SELECT min(i) FROM unnest($1::text[]) AS i)))";

pub(in crate::store) const STOCK: &str =
    "SELECT sku, current_stock, reserved_stock FROM products WHERE sku = ANY($1::text[])";

// Before the locks: the SKUs of the batch's orders' reservations, whose locks a commit or
// release needs too. Lines never change once written; what they belong to is re-read under
// the locks (below).
pub(in crate::store) const ORDER_SKUS: &str =
    "SELECT DISTINCT sku FROM reservation_lines WHERE order_id = ANY($1::text[])";

// Under the locks: the reservations of the batch's orders, row-locked against the sweeper.
pub(in crate::store) const RESERVATIONS: &str = "
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
pub(in crate::store) const KEYED_PLANS: &str = "
    SELECT set_config('enable_seqscan', 'off', true),
           set_config('enable_hashjoin', 'off', true),
           set_config('enable_mergejoin', 'off', true),
           set_config('jit', 'off', true)";

/// [`KEYED_PLANS`] for a transaction of several partitions' batches, which waits at most `$1`
/// (a PostgreSQL interval, e.g. `200ms`) for any lock (`crate::kafka::combiner`).
pub(in crate::store) const KEYED_PLANS_BOUNDED: &str = "
    SELECT set_config('enable_seqscan', 'off', true),
           set_config('enable_hashjoin', 'off', true),
           set_config('enable_mergejoin', 'off', true),
           set_config('jit', 'off', true),
           set_config('lock_timeout', $1, true)";

// The database's clock decides expiries, never a replica's: read after the locks (`now()` is
// the transaction's start, which a lock wait can leave seconds behind).
pub(in crate::store) const NOW: &str =
    "SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint";

pub(in crate::store) const INSERT_RESERVATIONS: &str = "
    INSERT INTO reservations (order_id, event_id, status, expires_at)
    SELECT o, e, 'active', to_timestamp(x / 1000.0)
    FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(o, e, x)";

pub(in crate::store) const INSERT_RESERVATION_LINES: &str = "
    INSERT INTO reservation_lines (order_id, line, sku, quantity)
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[])";

// The replies of the batch's order steps, each queued for the relay; and the recorded replies
// of requests sent again, queued once more.
pub(in crate::store) const INSERT_REPLIES: &str = concat!(
    "INSERT INTO replies (event_id, order_id, reply_key, payload, period)
     SELECT *, ",
    current_period!(),
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
);

// Queued in the order given (a function scan keeps array order, and so do the identities):
// the batch's order, new replies and those of requests sent again alike, each with the trace
// context of the message that asked (migration 16). A request sent again whose first delivery
// got no reply (a stock event decided while `results.all_events` was off) has none to publish.
pub(in crate::store) const QUEUE_REPLIES: &str = "
    INSERT INTO reply_outbox (event_id, traceparent, tracestate)
    SELECT t.e, t.tp, t.ts FROM unnest($1::text[], $2::text[], $3::text[])
        WITH ORDINALITY AS t(e, tp, ts, n)
    WHERE EXISTS (SELECT 1 FROM replies r WHERE r.event_id = t.e)
    ORDER BY t.n";

pub(in crate::store) const END_RESERVATIONS: &str = "
    UPDATE reservations AS r SET status = t.s, ended_at = statement_timestamp(), ended_by = t.b
    FROM unnest($1::text[], $2::text[], $3::text[]) AS t(o, s, b)
    WHERE r.order_id = t.o";

pub(in crate::store) const INSERT_EVENTS: &str = concat!(
    "INSERT INTO processed_events
         (event_id, event_type, outcome, reason, line_count, topic, partition, \"offset\",
          payload_digest, period)
     SELECT e.id, e.kind, e.outcome, e.reason, e.lines, $1, e.part, e.off, e.digest, ",
    current_period!(),
    " FROM unnest($2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[],
                  $8::bigint[], $9::bytea[]) AS e(part, id, kind, outcome, reason, lines, off, digest)"
);

// Existing SKUs change by increment, never by a value computed here, so even a writer that
// bypassed the locks could not be overwritten. (Not an upsert: PostgreSQL checks the CHECK
// constraint on the proposed insert row first, which a net sale would fail.)
pub(in crate::store) const UPDATE_PRODUCTS: &str = "
    UPDATE products AS p
    SET current_stock = p.current_stock + c.delta,
        reserved_stock = p.reserved_stock + c.reserved,
        version = p.version + c.changes,
        updated_at = now()
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS c(sku, delta, changes, reserved)
    WHERE p.sku = c.sku";

// SKUs restocked for the first time.
pub(in crate::store) const INSERT_PRODUCTS: &str = "
    INSERT INTO products (sku, current_stock, version, reserved_stock)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])";

pub(in crate::store) const INSERT_MOVEMENTS: &str = concat!(
    "INSERT INTO stock_movements
         (event_id, sku, delta, stock_after, reserved_delta, reserved_after, period)
     SELECT *, ",
    current_period!(),
    " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                  $6::bigint[])"
);

// Never moves back: a zombie's late batch cannot rewind a partition. In partition order, as
// the fence took the partitions' rows.
pub(in crate::store) const RECORD_OFFSET: &str = "
    INSERT INTO partition_offsets AS o (consumer_group, topic, partition, next_offset)
    SELECT $1, $2, p, n FROM unnest($3::int[], $4::bigint[]) AS t(p, n) ORDER BY p
    ON CONFLICT (consumer_group, topic, partition) DO UPDATE
        SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset), updated_at = now()";

// A redelivered bad message is kept once, whatever period holds it. (The partition's fence
// serializes the batches of one partition, so no other transaction adds the same position.)
pub(in crate::store) const INSERT_DEAD_LETTERS: &str = concat!(
    "INSERT INTO dead_letters (topic, partition, \"offset\", key, payload, error, detail, period)
     SELECT $1, d.part, d.off, d.key, d.payload, d.error, d.detail, ",
    current_period!(),
    " FROM unnest($2::int[], $3::bigint[], $4::bytea[], $5::bytea[], $6::text[], $7::text[])
         AS d(part, off, key, payload, error, detail)
     WHERE NOT EXISTS (SELECT 1 FROM dead_letters x
                       WHERE x.topic = $1 AND x.partition = d.part AND x.\"offset\" = d.off)"
);
