//! Any bytes through the decoder and the pure batch planning: never a panic, and whatever is
//! accepted holds the contract's bounds. Run: `cargo +nightly fuzz run decode` (see README).
#![no_main]

use std::collections::HashMap;

use inventory_consumer::domain::{
    Batch, Clock, Delivery, EventKind, OrderBook, StockBook, decode,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode(Some(data)) {
        let id_chars = event.id.chars().count();
        assert!(
            (1..=128).contains(&id_chars),
            "event id of {id_chars} characters"
        );
        // A commit or release names no lines; every other event 1 to 100.
        let lines = match event.kind {
            EventKind::Commit | EventKind::Release => 0..=0,
            _ => 1..=100,
        };
        assert!(lines.contains(&event.lines.len()));
        for line in &event.lines {
            assert!((1..=64).contains(&line.sku.len()));
            assert!(
                line.sku
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
            );
            assert!(line.quantity != 0 && line.quantity.abs() <= 1_000_000_000);
        }
        assert_eq!(event.digest(), event.digest());
    }
    // The same bytes as a delivery, planned against an empty database: every delivery ends as
    // exactly one outcome or one dead letter, and no stock goes negative.
    let mut batch = Batch::default();
    batch.push(Delivery {
        partition: 0,
        offset: 0,
        key: None,
        payload: Some(data.to_vec()),
        timestamp_ms: None,
        trace: None,
    });
    let clock = Clock {
        now: chrono::DateTime::UNIX_EPOCH,
        default_ttl: chrono::TimeDelta::seconds(900),
    };
    let plan = batch.plan(
        &HashMap::new(),
        StockBook::default(),
        OrderBook::default(),
        clock,
        true,
    );
    assert_eq!(
        plan.events.len() + plan.dead_letters.len() + plan.duplicates as usize,
        1
    );
    assert!(plan.movements.iter().all(|(_, m)| m.stock_after >= 0));
    assert!(plan.replies.len() <= plan.events.len(), "one reply per decided event at most");
});
