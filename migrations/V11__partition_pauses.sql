-- Partitions paused by an operator (`inventory-consumer pause`), for maintenance windows. A
-- batch reads this under its partition's fence (the row lock on partition_owners) and applies
-- nothing while its partition, or the whole topic, is paused: whichever replica owns the
-- partition, now or after a rebalance. `pause` takes the same row locks, so once it returns no
-- batch of a paused partition commits.
CREATE TABLE partition_pauses (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    -- -1: every partition of the topic.
    partition      integer     NOT NULL CHECK (partition >= -1),
    paused_at      timestamptz NOT NULL DEFAULT now(),
    -- Who paused it (user and host, as the command saw them) and why, for operators.
    paused_by      text        NOT NULL,
    reason         text,
    PRIMARY KEY (consumer_group, topic, partition)
);
