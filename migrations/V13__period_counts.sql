-- An ended period is sealed, once, by maintenance, soon after it ended: its rows no longer
-- change then (every transaction of the period ended before the clock moved on, and none can
-- start).
--
-- What its events held is counted (NULL until then). Dropping the period later records these
-- counts instead of scanning it: a drop that counted took seconds of a core from the batches,
-- and a table lock they queued behind.
--
-- Its `event_id` index becomes a hash index. Every batch reads the recorded ids of every kept
-- period, one index probe per event and period: a B-tree probe walks three or four pages of a
-- period of millions of events, a hash probe reads one bucket (a third of the time, measured).
-- Nothing can insert into an ended period, so it needs no unique index; the current period
-- keeps its unique B-tree, which stops a second row for an event id.
--
-- A period that ended before this migration is sealed at the next maintenance pass (or counted
-- by its drop, whichever comes first).
ALTER TABLE history_periods
    ADD COLUMN events_counted        bigint,
    ADD COLUMN applied_counted       bigint,
    ADD COLUMN rejected_counted      bigint,
    ADD COLUMN order_replies_counted bigint,
    ADD COLUMN events_sealed         boolean NOT NULL DEFAULT false;
