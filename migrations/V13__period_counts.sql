-- What a period's events held, counted once, by maintenance, soon after the period ended: its
-- rows no longer change then (every transaction of the period ended before the clock moved
-- on, and none can start). Dropping the period later records these counts instead of scanning
-- it: a drop that counted took seconds of a core from the batches, and a table lock they
-- queued behind. NULL until counted; a period that ended before this migration is counted at
-- the next maintenance pass (or by its drop, whichever comes first).
ALTER TABLE history_periods
    ADD COLUMN events_counted        bigint,
    ADD COLUMN applied_counted       bigint,
    ADD COLUMN rejected_counted      bigint,
    ADD COLUMN order_replies_counted bigint;
