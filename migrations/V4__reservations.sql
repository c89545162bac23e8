-- Reservations for order sagas (CONTRACT.md section 7). Existing rows keep their meaning:
-- nothing is reserved yet, every ledger row moved the stock on hand only.

-- Units reserved for orders stay on hand but are not for sale.
ALTER TABLE products
    ADD COLUMN reserved_stock bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT products_reserved_stock_check
        CHECK (reserved_stock >= 0 AND reserved_stock <= current_stock);

-- The order steps are events too; an expiry is recorded as the event `expire:<order_id>`, which
-- the service makes itself (no Kafka position), once per order.
ALTER TABLE processed_events
    -- `expire:` and an order id of up to 128 characters.
    DROP CONSTRAINT processed_events_event_id_check,
    ADD CONSTRAINT processed_events_event_id_check CHECK (length(event_id) BETWEEN 1 AND
        CASE WHEN event_type = 'expire' THEN 135 ELSE 128 END),
    DROP CONSTRAINT processed_events_event_type_check,
    ADD CONSTRAINT processed_events_event_type_check CHECK (event_type IN
        ('restock', 'sale', 'adjustment', 'reserve', 'commit', 'release', 'expire')),
    -- A commit or release names no lines: it counts those of its reservation (0 if none).
    DROP CONSTRAINT processed_events_line_count_check,
    ADD CONSTRAINT processed_events_line_count_check CHECK (line_count BETWEEN 0 AND 100),
    ALTER COLUMN partition DROP NOT NULL,
    ALTER COLUMN "offset" DROP NOT NULL,
    ADD CONSTRAINT processed_events_position_check
        CHECK ((event_type = 'expire') = (partition IS NULL AND "offset" IS NULL));

-- Every change of either column has its row, naming its cause through its event.
ALTER TABLE stock_movements
    ADD COLUMN reserved_delta bigint NOT NULL DEFAULT 0,
    ADD COLUMN reserved_after bigint NOT NULL DEFAULT 0 CHECK (reserved_after >= 0),
    DROP CONSTRAINT stock_movements_delta_check,
    ADD CONSTRAINT stock_movements_delta_check CHECK (delta <> 0 OR reserved_delta <> 0);

CREATE TABLE reservations (
    order_id   text        PRIMARY KEY CHECK (length(order_id) BETWEEN 1 AND 128),
    -- The reserve event that made it.
    event_id   text        NOT NULL UNIQUE REFERENCES processed_events (event_id),
    status     text        NOT NULL
                           CHECK (status IN ('active', 'committed', 'released', 'expired')),
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- When and by which event (a commit, a release, or `expire:<order_id>`) it ended.
    ended_at   timestamptz,
    ended_by   text        REFERENCES processed_events (event_id),
    CHECK ((status = 'active') = (ended_by IS NULL))
);
-- The sweeper's question: which active reservations have expired.
CREATE INDEX reservations_active_expiry_idx ON reservations (expires_at) WHERE status = 'active';

CREATE TABLE reservation_lines (
    order_id text   NOT NULL REFERENCES reservations (order_id),
    line     integer NOT NULL CHECK (line BETWEEN 1 AND 100),
    sku      text   NOT NULL REFERENCES products (sku),
    quantity bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line)
);
