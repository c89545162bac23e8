-- Which replica may write for each partition (see src/store/ownership.rs). A replica claims a
-- partition on assignment by moving its epoch on; every batch transaction locks the row first
-- and aborts unless the epoch is still the one it claimed. A replica that lost a partition
-- without noticing (a long pause, a session timeout) can commit nothing after the new owner's
-- claim.
CREATE TABLE partition_owners (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    epoch          bigint      NOT NULL CHECK (epoch >= 1),
    -- The claiming replica (host and process), for operators.
    owner          text        NOT NULL,
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
