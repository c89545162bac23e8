//! The pure core: what an event is, what it does to stock, and how a batch of deliveries is
//! decided. Nothing here touches Kafka, PostgreSQL or an async runtime, so every rule can be
//! tested exhaustively with plain data (unit and property tests live next to the code).

pub mod batch;
pub mod dead_letter_limit;
pub mod event;
pub mod lock_key;
pub mod orders;
pub mod replies;
pub mod rules;

pub use batch::{
    Batch, BatchOutcome, BatchPlan, DeadLetter, Delivery, MAX_LINES_PER_BATCH, Parts, PlannedEvent,
    Queued, TraceHeaders,
};
pub use dead_letter_limit::{DeadLetterLimit, LimitExceeded};
pub use event::{Event, EventKind, Expiry, InvalidEvent, Line, decode};
pub use lock_key::lock_key;
pub use orders::{Clock, OrderBook, Reservation, ReservationStatus, apply_order_step, expire};
pub use replies::{Reply, expiry_reply, reply_to};
pub use rules::{Movement, Outcome, RejectReason, Stock, StockBook, apply_event};
