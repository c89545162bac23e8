-- `dead-letters redrive` publishes a dead letter to the topic again (as it was, or corrected)
-- and marks it here, so that nobody sends it twice by accident. Nullable, no default: adding
-- them rewrites nothing.
ALTER TABLE dead_letters
    ADD COLUMN redriven_at timestamptz,
    -- Where it went: topic/partition@offset.
    ADD COLUMN redriven_to text;
