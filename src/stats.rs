//! Per-process counters of what the pipeline did. `run` prints them as one JSON line on stdout
//! when it exits, which is how tests and the demo count duplicates and redeliveries; each is
//! also exported as a Prometheus metric (see [`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::metrics as m;
use crate::store::BatchOutcome;

#[derive(Debug, Default)]
pub struct Stats {
    applied: AtomicU64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    dead_letters: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
    abandoned_batches: AtomicU64,
    fenced_batches: AtomicU64,
    partitions_halted: AtomicU64,
    partitions_assigned: AtomicU64,
    partitions_revoked: AtomicU64,
    partitions_lost: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub applied: u64,
    pub rejected: u64,
    /// Deliveries of events already recorded: re-sent duplicates plus redeliveries.
    pub duplicates: u64,
    pub dead_letters: u64,
    pub batches: u64,
    pub retries: u64,
    pub abandoned_batches: u64,
    /// Batches rolled back because another replica had claimed the partition since.
    #[serde(default)]
    pub fenced_batches: u64,
    /// Partitions stopped at their dead-letter limit.
    #[serde(default)]
    pub partitions_halted: u64,
    /// Partitions this replica was given, gave up with a commit, and lost without one.
    pub partitions_assigned: u64,
    pub partitions_revoked: u64,
    pub partitions_lost: u64,
}

impl Stats {
    pub fn record_batch(&self, o: &BatchOutcome) {
        metrics::counter!(m::EVENTS, "outcome" => "applied").increment(o.applied);
        metrics::counter!(m::EVENTS, "outcome" => "rejected").increment(o.rejected);
        metrics::counter!(m::DUPLICATES).increment(o.duplicates);
        metrics::counter!(m::DEAD_LETTERS).increment(o.dead_letters);
        self.applied.fetch_add(o.applied, Relaxed);
        self.rejected.fetch_add(o.rejected, Relaxed);
        self.duplicates.fetch_add(o.duplicates, Relaxed);
        self.dead_letters.fetch_add(o.dead_letters, Relaxed);
        self.batches.fetch_add(1, Relaxed);
    }

    pub fn record_retry(&self) {
        metrics::counter!(m::RETRIES).increment(1);
        self.retries.fetch_add(1, Relaxed);
    }

    pub fn record_abandoned(&self) {
        self.abandoned_batches.fetch_add(1, Relaxed);
    }

    pub fn record_fenced(&self) {
        metrics::counter!(m::FENCED).increment(1);
        self.fenced_batches.fetch_add(1, Relaxed);
    }

    pub fn record_halted(&self) {
        metrics::counter!(m::HALTED).increment(1);
        self.partitions_halted.fetch_add(1, Relaxed);
    }

    pub fn record_assigned(&self, n: usize) {
        metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
        self.partitions_assigned.fetch_add(n as u64, Relaxed);
    }

    pub fn record_revoked(&self, n: usize) {
        metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
        self.partitions_revoked.fetch_add(n as u64, Relaxed);
    }

    pub fn record_lost(&self, n: usize) {
        metrics::counter!(m::REBALANCES, "kind" => "lost").increment(1);
        self.partitions_lost.fetch_add(n as u64, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            applied: self.applied.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            batches: self.batches.load(Relaxed),
            retries: self.retries.load(Relaxed),
            abandoned_batches: self.abandoned_batches.load(Relaxed),
            fenced_batches: self.fenced_batches.load(Relaxed),
            partitions_halted: self.partitions_halted.load(Relaxed),
            partitions_assigned: self.partitions_assigned.load(Relaxed),
            partitions_revoked: self.partitions_revoked.load(Relaxed),
            partitions_lost: self.partitions_lost.load(Relaxed),
        }
    }
}

impl std::ops::Add for StatsSnapshot {
    type Output = StatsSnapshot;

    fn add(self, b: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            applied: self.applied + b.applied,
            rejected: self.rejected + b.rejected,
            duplicates: self.duplicates + b.duplicates,
            dead_letters: self.dead_letters + b.dead_letters,
            batches: self.batches + b.batches,
            retries: self.retries + b.retries,
            abandoned_batches: self.abandoned_batches + b.abandoned_batches,
            fenced_batches: self.fenced_batches + b.fenced_batches,
            partitions_halted: self.partitions_halted + b.partitions_halted,
            partitions_assigned: self.partitions_assigned + b.partitions_assigned,
            partitions_revoked: self.partitions_revoked + b.partitions_revoked,
            partitions_lost: self.partitions_lost + b.partitions_lost,
        }
    }
}
