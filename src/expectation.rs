//! The outcome a correct consumer must reach for a workload: written by `inventory-dev produce`
//! (from its oracle), read by `verify --expected FILE`, which compares the database with it
//! (docs/contract.md section 4). Its JSON form is the file both sides share.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a correct consumer must end with; written by `inventory-dev produce`, read by `verify`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    /// Final stock of every SKU that was ever restocked.
    pub stock: BTreeMap<String, i64>,
    /// Final reserved stock of the SKUs that have some (absent: none).
    #[serde(default)]
    pub reserved: BTreeMap<String, i64>,
    /// Reservations by final status (`active`, `committed`, `released`, `expired`).
    #[serde(default)]
    pub reservations: BTreeMap<String, u64>,
    /// Distinct replies: one per distinct order step, one per expiry.
    #[serde(default)]
    pub replies: u64,
    /// Distinct valid events: rows expected in `processed_events`.
    pub events: u64,
    pub applied: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    /// Messages that repeat an already-sent event (same id, same body).
    pub duplicates: u64,
    pub messages: u64,
}

impl Expectation {
    /// This expectation on top of `base` (disjoint SKUs and events, as a history's are).
    pub fn on_top_of(mut self, base: Expectation) -> Expectation {
        self.stock.extend(base.stock);
        self.reserved.extend(base.reserved);
        for (status, n) in base.reservations {
            *self.reservations.entry(status).or_default() += n;
        }
        self.events += base.events;
        self.applied += base.applied;
        self.rejected += base.rejected;
        self.dead_letters += base.dead_letters;
        self.duplicates += base.duplicates;
        self.messages += base.messages;
        self.replies += base.replies;
        self
    }
}
