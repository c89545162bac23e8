-- The tables of CONTRACT.md section 3. Constraints are the last line of defence: the consumer
-- never relies on them for its decisions, but a bug can never make them false.

CREATE TABLE products (
    sku           text        PRIMARY KEY CHECK (length(sku) BETWEEN 1 AND 64),
    current_stock bigint      NOT NULL CHECK (current_stock >= 0),
    -- Grows by one with every change of the row (one per ledger movement).
    version       bigint      NOT NULL CHECK (version >= 1),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE processed_events (
    event_id       text        PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 128),
    event_type     text        NOT NULL CHECK (event_type IN ('restock', 'sale', 'adjustment')),
    outcome        text        NOT NULL CHECK (outcome IN ('applied', 'rejected')),
    reason         text,
    line_count     integer     NOT NULL CHECK (line_count BETWEEN 1 AND 100),
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    -- SHA-256 of the event's meaning; tells a re-send from a reused event id.
    payload_digest bytea       NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'applied') = (reason IS NULL))
);

CREATE TABLE stock_movements (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    text        NOT NULL REFERENCES processed_events (event_id),
    sku         text        NOT NULL REFERENCES products (sku),
    delta       bigint      NOT NULL CHECK (delta <> 0),
    stock_after bigint      NOT NULL CHECK (stock_after >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_movements_sku_idx ON stock_movements (sku, id);
CREATE INDEX stock_movements_event_idx ON stock_movements (event_id);

CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         bytea,
    payload     bytea,
    -- Stable reason code (invalid_json, event_id_conflict, ...); `detail` says more.
    error       text        NOT NULL,
    detail      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- A redelivered bad message is kept once.
    UNIQUE (topic, partition, "offset")
);
