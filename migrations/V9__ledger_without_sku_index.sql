-- The ledger's index on (sku, id) served readers only: the audit, which reads the whole ledger
-- and sorts it anyway, and the carry-forward of a dropped period, which reads a whole
-- partition. Every ledger row paid for it with an insert into a B-tree ordered by SKU, a random
-- page of an index over all SKUs (about a third of the ledger insert's time in `bench`'s
-- profile). Without it a ledger partition is appended to, like a log. Whoever reads one SKU's
-- history often can add it back: `CREATE INDEX ON stock_movements (sku, id)`; nothing here
-- depends on its absence.
DROP INDEX IF EXISTS stock_movements_sku_idx;
