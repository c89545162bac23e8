-- A reply's Kafka key: the order id of an order step or expiry, and, with
-- `results.all_events`, the first SKU of a stock event, whose outcome is replied too (such a
-- reply has no order id). Added beside `order_id` rather than renaming it, so that replicas of
-- the previous version keep working during a rolling update: they write `order_id` only, and
-- the relay publishes under `coalesce(reply_key, order_id)`.
ALTER TABLE replies ADD COLUMN reply_key text;
ALTER TABLE replies ALTER COLUMN order_id DROP NOT NULL;
