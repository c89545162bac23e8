//! Per-partition flow control between the poll thread and the partition workers: the poll
//! thread never waits for a worker. Each partition's deliveries wait in an unbounded channel
//! whose content is counted in bytes ([`Backlog`]); when a partition's backlog would pass its
//! share of the replica's buffer (`processing.buffer_bytes` split evenly over the partitions
//! it owns, and never less than [`MIN_SHARE`]), the poll thread pauses that partition in
//! librdkafka and keeps polling the others. Once its worker has taken the backlog down to half
//! its share, the partition is sought back to its first undelivered offset and resumed.
//!
//! Why pause and seek rather than one librdkafka queue per partition (Vector's way): one
//! thread keeps owning the consumer, the rebalance callbacks and the commits, and a partition
//! that falls behind costs nothing but its own refetch. librdkafka purges a paused partition's
//! prefetched messages and bumps its fetch version, so no message fetched before the pause is
//! returned after it; the seek (before the resume, as librdkafka's author advises) restarts the
//! fetch exactly at the delivery that did not fit, which this module remembers. Nothing is
//! skipped, and nothing reaches a worker twice (the worker's forward-only gate would drop a
//! repeat anyway).
//!
//! Partitions halted at their dead-letter limit are paused too, but stay paused until given up.
//! So does, in effect, a partition whose worker stopped (fenced, or failed fatally) once its
//! queue is full: nothing more is fetched for a partition nobody processes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::domain::Delivery;

/// What one buffered delivery costs beyond its key and payload (the struct, two allocations,
/// the channel's slot): small messages are then bounded too.
const DELIVERY_OVERHEAD: usize = 128;

/// The bytes a delivery holds while it waits for its worker.
pub fn footprint(delivery: &Delivery) -> usize {
    delivery.size() + DELIVERY_OVERHEAD
}

/// Bytes waiting for one partition's worker: the poll thread adds, the worker takes.
#[derive(Debug, Default)]
pub struct Backlog {
    bytes: AtomicUsize,
}

impl Backlog {
    pub fn added(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Relaxed);
    }

    pub fn taken(&self, bytes: usize) {
        // Never below zero: each delivery is added before it is sent, so this cannot wrap.
        let _ = self
            .bytes
            .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(bytes)));
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }
}

/// Why a partition does not fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Its backlog was full; fetching restarts at `resume_at` once the worker has room.
    Full { resume_at: i64 },
    /// Halted at its dead-letter limit: paused until the partition is given up.
    Halted,
    /// Its worker is being replaced (a rewind): paused until the new one is started and says
    /// where to fetch from ([`FlowControl::refetch_from`]), or the partition is given up.
    Restarting,
}

/// What to do with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Deliver,
    /// It does not fit: pause the partition; the delivery is fetched again after the resume.
    PauseAt(i64),
    /// The partition is paused: librdkafka may still hand over a message it had queued, which
    /// the seek on resume fetches again.
    Skip,
}

/// The least a partition's backlog may hold, however many partitions share the buffer: about
/// 200 typical events, so that a worker still finds a good part of its next batch waiting.
pub const MIN_SHARE: usize = 64 << 10;

/// The poll thread's flow decisions, free of librdkafka: which partitions are paused, and why.
#[derive(Debug)]
pub struct FlowControl {
    /// Bytes the backlogs of all owned partitions may hold together.
    buffer: usize,
    /// Most bytes a partition's backlog may hold: its share of `buffer`. One delivery always
    /// fits in an empty backlog, however large, so a partition never stops for good.
    limit: usize,
    paused: BTreeMap<i32, Pause>,
}

impl FlowControl {
    pub fn new(buffer: usize) -> Self {
        FlowControl {
            buffer,
            limit: buffer.max(MIN_SHARE),
            paused: BTreeMap::new(),
        }
    }

    /// The replica now owns `partitions` partitions: each gets an even share of the buffer.
    pub fn share_among(&mut self, partitions: usize) {
        self.limit = (self.buffer / partitions.max(1)).max(MIN_SHARE);
    }

    /// Most bytes one partition's backlog may hold now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Decides a delivery of `partition` at `offset`, costing `bytes`, given its backlog.
    pub fn admit(
        &mut self,
        partition: i32,
        offset: i64,
        bytes: usize,
        backlog: usize,
    ) -> Admission {
        if self.paused.contains_key(&partition) {
            return Admission::Skip;
        }
        if backlog > 0 && backlog + bytes > self.limit {
            self.paused
                .insert(partition, Pause::Full { resume_at: offset });
            return Admission::PauseAt(offset);
        }
        Admission::Deliver
    }

    /// Halts a partition: no more deliveries until it is given up.
    pub fn halt(&mut self, partition: i32) {
        self.paused.insert(partition, Pause::Halted);
    }

    /// Partitions paused for a full backlog whose worker has taken it down to half the limit,
    /// each with the offset to fetch from. `backlog` is a partition's current backlog.
    pub fn resumable(&self, backlog: impl Fn(i32) -> usize) -> Vec<(i32, i64)> {
        self.paused
            .iter()
            .filter_map(|(&p, pause)| match pause {
                Pause::Full { resume_at } if backlog(p) <= self.limit / 2 => Some((p, *resume_at)),
                _ => None,
            })
            .collect()
    }

    /// Holds a partition whose worker is being replaced: no deliveries until
    /// [`Self::refetch_from`] or [`Self::forget`].
    pub fn hold_for_restart(&mut self, partition: i32) {
        self.paused.insert(partition, Pause::Restarting);
    }

    /// The partition must fetch from `offset` (an operator rewound it): paused until the seek on
    /// resume, so that nothing fetched from the old position reaches its new worker.
    pub fn refetch_from(&mut self, partition: i32, offset: i64) {
        self.paused
            .insert(partition, Pause::Full { resume_at: offset });
    }

    /// The partition fetches again.
    pub fn resumed(&mut self, partition: i32) {
        if matches!(self.paused.get(&partition), Some(Pause::Full { .. })) {
            self.paused.remove(&partition);
        }
    }

    /// Forgets the partitions given up; returns those that were paused (to resume in
    /// librdkafka, so that a later assignment of them starts fetching).
    pub fn forget(&mut self, partitions: &[i32]) -> Vec<i32> {
        partitions
            .iter()
            .copied()
            .filter(|p| self.paused.remove(p).is_some())
            .collect()
    }

    pub fn paused(&self) -> impl Iterator<Item = (i32, Pause)> + '_ {
        self.paused.iter().map(|(&p, &pause)| (p, pause))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_backlog_pauses_its_partition_only_and_resumes_at_the_first_undelivered_offset() {
        let mut flow = FlowControl::new(1_000);
        flow.limit = 1_000;
        assert_eq!(flow.admit(0, 10, 400, 0), Admission::Deliver);
        assert_eq!(flow.admit(0, 11, 400, 400), Admission::Deliver);
        assert_eq!(flow.admit(0, 12, 400, 800), Admission::PauseAt(12));
        assert_eq!(
            flow.admit(0, 13, 400, 800),
            Admission::Skip,
            "already queued by librdkafka: fetched again after the seek"
        );
        assert_eq!(flow.admit(1, 5, 400, 0), Admission::Deliver, "others flow");
        assert!(flow.resumable(|_| 800).is_empty(), "no room yet");
        assert_eq!(flow.resumable(|_| 500), [(0, 12)], "half the limit");
        flow.resumed(0);
        assert_eq!(flow.admit(0, 12, 400, 500), Admission::Deliver);
    }

    #[test]
    fn a_refetch_skips_deliveries_until_the_seek_to_its_offset() {
        let mut flow = FlowControl::new(1_000);
        flow.hold_for_restart(0);
        assert_eq!(flow.admit(0, 100, 10, 0), Admission::Skip, "no worker yet");
        assert!(
            flow.resumable(|_| 0).is_empty(),
            "not before its new start is known"
        );
        flow.refetch_from(0, 7);
        assert_eq!(
            flow.admit(0, 120, 10, 0),
            Admission::Skip,
            "from the old position"
        );
        assert_eq!(flow.resumable(|_| 0), [(0, 7)]);
        flow.resumed(0);
        assert_eq!(flow.admit(0, 7, 10, 0), Admission::Deliver);
    }

    #[test]
    fn one_delivery_always_fits_an_empty_backlog() {
        let mut flow = FlowControl::new(1_000);
        flow.limit = 1_000;
        assert_eq!(flow.admit(0, 0, 5_000_000, 0), Admission::Deliver);
        assert_eq!(flow.admit(0, 1, 1, 5_000_000), Admission::PauseAt(1));
    }

    #[test]
    fn halted_partitions_stay_paused_until_given_up() {
        let mut flow = FlowControl::new(1_000);
        flow.limit = 1_000;
        flow.halt(3);
        assert_eq!(flow.admit(3, 0, 1, 0), Admission::Skip);
        assert!(flow.resumable(|_| 0).is_empty());
        flow.resumed(3);
        assert_eq!(flow.admit(3, 0, 1, 0), Admission::Skip, "not a flow pause");
        flow.admit(4, 9, 2_000, 10);
        assert_eq!(flow.forget(&[3, 4, 5]), [3, 4]);
        assert_eq!(flow.paused().count(), 0);
        assert_eq!(flow.admit(3, 0, 1, 0), Admission::Deliver);
    }

    #[test]
    fn the_buffer_is_shared_evenly_but_never_below_the_least_share() {
        let mut flow = FlowControl::new(16 << 20);
        assert_eq!(flow.limit(), 16 << 20, "nothing owned yet");
        flow.share_among(4);
        assert_eq!(flow.limit(), 4 << 20);
        flow.share_among(64);
        assert_eq!(flow.limit(), 256 << 10);
        flow.share_among(1024);
        assert_eq!(flow.limit(), MIN_SHARE, "the floor");
        flow.share_among(0);
        assert_eq!(flow.limit(), 16 << 20);
    }

    #[test]
    fn the_backlog_counts_bytes_both_ways() {
        let backlog = Backlog::default();
        let d = Delivery {
            partition: 0,
            offset: 0,
            key: Some(b"sku".to_vec()),
            payload: Some(vec![0; 1000]),
            timestamp_ms: None,
            trace: None,
        };
        backlog.added(footprint(&d));
        assert_eq!(backlog.bytes(), 1003 + DELIVERY_OVERHEAD);
        backlog.taken(footprint(&d));
        backlog.taken(1);
        assert_eq!(backlog.bytes(), 0, "never below zero");
    }
}
