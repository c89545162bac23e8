-- The ledger is written only by the batch transaction and the expiry sweep, each inserting a
-- movement with its event and after its product, under that product's advisory lock. Its two foreign keys
-- re-checked that on every row (an index lookup and a row lock each, most of the server's
-- time per event in `bench`'s profile), and the index on event_id served only the audit. The
-- audit behind `verify` checks both references instead ("ledger rows name recorded events and
-- known products").
ALTER TABLE stock_movements
    DROP CONSTRAINT IF EXISTS stock_movements_event_id_fkey,
    DROP CONSTRAINT IF EXISTS stock_movements_sku_fkey;
DROP INDEX IF EXISTS stock_movements_event_idx;
