-- Bounded history (src/store/history_periods.rs). The four tables that gain rows forever,
-- `processed_events`, `stock_movements`, `dead_letters` and `replies`, become partitioned by
-- *period*: a numbered stretch of time, one partition of each table per period. Maintenance
-- starts a new period every `history.period_s` and drops a period's partitions once it ended
-- longer ago than that table's retention. The existing rows become period 0 as they are (each
-- table is renamed and attached, not copied), so converting a large database takes seconds.
--
-- A period, not a timestamp, is the partition key so that no two transactions of different
-- periods ever run at once: every writer takes the shared advisory lock of the period clock
-- before any other lock and reads the period after it, and a new period starts only under the
-- exclusive lock, once every transaction of the old one has ended. Two transactions that may
-- record the same event id therefore either write to the same partition, whose unique index
-- stops the second, or run one after the other, and the later one's read of recorded ids sees
-- the earlier one's row. An event id is unique within the dedupe horizon (the retention of
-- `processed_events`), no longer for ever.

CREATE TABLE history_periods (
    period      integer     PRIMARY KEY CHECK (period >= 0),
    -- Every transaction of the period ran between these two instants.
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    -- What the dropped partitions of the period held, so that `verify` can still count them.
    events_dropped       bigint NOT NULL DEFAULT 0,
    applied_dropped      bigint NOT NULL DEFAULT 0,
    rejected_dropped     bigint NOT NULL DEFAULT 0,
    order_replies_dropped bigint NOT NULL DEFAULT 0,
    dead_letters_dropped bigint NOT NULL DEFAULT 0,
    movements_dropped    bigint NOT NULL DEFAULT 0,
    -- Which of its partitions are gone.
    events_gone          boolean NOT NULL DEFAULT false,
    movements_gone       boolean NOT NULL DEFAULT false,
    dead_letters_gone    boolean NOT NULL DEFAULT false
);
INSERT INTO history_periods (period, started_at, ended_at)
VALUES (0, '-infinity', now()), (1, now(), NULL);

-- The period writers write to; read under the clock's shared lock. The `period` columns have no
-- default: a writer names the period it read under the lock, and a replica of an earlier
-- version (which knows no clock and could apply an event of an earlier period again) fails
-- to insert instead of writing where it should not.
CREATE FUNCTION current_history_period() RETURNS integer LANGUAGE sql STABLE
    AS 'SELECT max(period) FROM history_periods';

-- The ledger's balances before its oldest remaining row, per SKU: what dropped ledger
-- partitions added up to. `verify` checks stock = opening + remaining movements.
CREATE TABLE ledger_openings (
    sku      text    PRIMARY KEY,
    stock    bigint  NOT NULL CHECK (stock >= 0),
    reserved bigint  NOT NULL CHECK (reserved >= 0),
    -- Movements dropped: `products.version` counts them too.
    changes  bigint  NOT NULL CHECK (changes >= 0)
);

-- Foreign keys cannot name a partitioned table by a column that is not its partition key; the
-- audit checks these references instead (within the periods still kept).
ALTER TABLE reservations
    DROP CONSTRAINT IF EXISTS reservations_event_id_fkey,
    DROP CONSTRAINT IF EXISTS reservations_ended_by_fkey;
ALTER TABLE replies DROP CONSTRAINT IF EXISTS replies_event_id_fkey;
ALTER TABLE reply_outbox DROP CONSTRAINT IF EXISTS reply_outbox_event_id_fkey;

-- processed_events: period 0 keeps its primary key as that partition's unique index.
ALTER TABLE processed_events RENAME TO processed_events_p0;
ALTER TABLE processed_events_p0 ADD COLUMN period integer NOT NULL DEFAULT 0;
CREATE TABLE processed_events (LIKE processed_events_p0 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (period);
ALTER TABLE processed_events ALTER COLUMN period DROP DEFAULT;
ALTER TABLE processed_events_p0 ALTER COLUMN period DROP DEFAULT;
ALTER TABLE processed_events ATTACH PARTITION processed_events_p0 FOR VALUES IN (0);

-- stock_movements: an identity column cannot be partitioned (before PostgreSQL 17); a plain
-- sequence goes on from where the identity stood.
ALTER TABLE stock_movements RENAME TO stock_movements_p0;
ALTER INDEX stock_movements_sku_idx RENAME TO stock_movements_p0_sku_idx;
ALTER TABLE stock_movements_p0 ADD COLUMN period integer NOT NULL DEFAULT 0;
CREATE SEQUENCE stock_movements_seq AS bigint;
SELECT setval('stock_movements_seq', coalesce((SELECT max(id) FROM stock_movements_p0), 0) + 1, false);
ALTER TABLE stock_movements_p0 ALTER COLUMN id DROP IDENTITY;
CREATE TABLE stock_movements (LIKE stock_movements_p0 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (period);
ALTER TABLE stock_movements ALTER COLUMN id SET DEFAULT nextval('stock_movements_seq');
ALTER SEQUENCE stock_movements_seq OWNED BY stock_movements.id;
ALTER TABLE stock_movements ALTER COLUMN period DROP DEFAULT;
ALTER TABLE stock_movements_p0 ALTER COLUMN period DROP DEFAULT;
ALTER TABLE stock_movements ATTACH PARTITION stock_movements_p0 FOR VALUES IN (0);
-- Attaches period 0's index rather than building another.
CREATE INDEX stock_movements_sku_idx ON stock_movements (sku, id);

-- dead_letters: likewise.
ALTER TABLE dead_letters RENAME TO dead_letters_p0;
ALTER TABLE dead_letters_p0 ADD COLUMN period integer NOT NULL DEFAULT 0;
CREATE SEQUENCE dead_letters_seq AS bigint;
SELECT setval('dead_letters_seq', coalesce((SELECT max(id) FROM dead_letters_p0), 0) + 1, false);
ALTER TABLE dead_letters_p0 ALTER COLUMN id DROP IDENTITY;
CREATE TABLE dead_letters (LIKE dead_letters_p0 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (period);
ALTER TABLE dead_letters ALTER COLUMN id SET DEFAULT nextval('dead_letters_seq');
ALTER SEQUENCE dead_letters_seq OWNED BY dead_letters.id;
ALTER TABLE dead_letters ALTER COLUMN period DROP DEFAULT;
ALTER TABLE dead_letters_p0 ALTER COLUMN period DROP DEFAULT;
ALTER TABLE dead_letters ATTACH PARTITION dead_letters_p0 FOR VALUES IN (0);

-- replies: kept as long as their events (a request sent again publishes its reply again).
ALTER TABLE replies RENAME TO replies_p0;
ALTER TABLE replies_p0 ADD COLUMN period integer NOT NULL DEFAULT 0;
CREATE TABLE replies (LIKE replies_p0 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (period);
ALTER TABLE replies ALTER COLUMN period DROP DEFAULT;
ALTER TABLE replies_p0 ALTER COLUMN period DROP DEFAULT;
ALTER TABLE replies ATTACH PARTITION replies_p0 FOR VALUES IN (0);

-- One period's partitions of all four tables, each with the unique index that stops a second
-- row for the same event id (or dead-lettered position) within the period.
CREATE FUNCTION create_history_partitions(p integer) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TABLE IF NOT EXISTS processed_events_p%s
                    PARTITION OF processed_events FOR VALUES IN (%s)', p, p);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS processed_events_p%s_event_id
                    ON processed_events_p%s (event_id)', p, p);
    EXECUTE format('CREATE TABLE IF NOT EXISTS stock_movements_p%s
                    PARTITION OF stock_movements FOR VALUES IN (%s)', p, p);
    EXECUTE format('CREATE TABLE IF NOT EXISTS dead_letters_p%s
                    PARTITION OF dead_letters FOR VALUES IN (%s)', p, p);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_p%s_position
                    ON dead_letters_p%s (topic, partition, "offset")', p, p);
    EXECUTE format('CREATE TABLE IF NOT EXISTS replies_p%s
                    PARTITION OF replies FOR VALUES IN (%s)', p, p);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS replies_p%s_event_id
                    ON replies_p%s (event_id)', p, p);
END $$;

SELECT create_history_partitions(1);
SELECT create_history_partitions(2);
