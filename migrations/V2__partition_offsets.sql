-- Where each partition's processing stands, per consumer group, written in the same transaction
-- as the batch it follows. A new owner resumes here, so a partition changes hands without
-- redelivery even when Kafka refuses the offset commit of a revoke (as during some
-- rebalances); Kafka's committed offsets are still kept current for lag monitoring.
CREATE TABLE partition_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    -- The next offset to read: everything before it is in the database.
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
