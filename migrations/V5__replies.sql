-- Replies to order steps and expiries (CONTRACT.md section 7), written in the transaction of
-- their effect. `replies` keeps each request's reply (a request sent again publishes it again);
-- `reply_outbox` queues what is still to publish, in order, until a relay has published it to
-- the results topic and deleted its row.
CREATE TABLE replies (
    event_id   text        PRIMARY KEY REFERENCES processed_events (event_id),
    order_id   text        NOT NULL,
    -- The JSON value published.
    payload    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reply_outbox (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id  text        NOT NULL REFERENCES replies (event_id),
    queued_at timestamptz NOT NULL DEFAULT now()
);
