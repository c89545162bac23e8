-- The range of event ids each ended period holds, taken when maintenance counts the period
-- (migration 13): its rows no longer change then. A batch reads its recorded ids only in the
-- periods not counted yet and in those whose range overlaps the batch's ids
-- (src/store/apply.rs), so ids that grow with time cost one index probe each however many
-- periods the dedupe horizon keeps. NULL in a counted period: it holds no event.
ALTER TABLE history_periods
    ADD COLUMN events_min_id text,
    ADD COLUMN events_max_id text;

-- The periods counted before have no range: counted again, with it, at the next maintenance
-- pass (one read of each kept period, as after migration 13). Until then the batches read
-- their recorded ids in them, as before. Dropped periods keep their counts.
UPDATE history_periods
SET events_counted = NULL, applied_counted = NULL, rejected_counted = NULL,
    order_replies_counted = NULL
WHERE NOT events_gone;
