//! Per-partition offsets, in Kafka's meaning: the *next* offset to read. A worker records an
//! offset only after the transaction holding everything before it has committed; the poll
//! thread commits what was recorded: periodically without waiting for the broker, and
//! synchronously on revoke and on shutdown.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PartitionOffsets {
    /// Next offset to read, as far as the database is concerned.
    processed: Option<i64>,
    /// Last offset Kafka confirmed as committed.
    committed: Option<i64>,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<BTreeMap<i32, PartitionOffsets>>,
}

impl OffsetTracker {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<i32, PartitionOffsets>) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        let mut guard = match self.partitions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    pub fn assign(&self, partition: i32) {
        self.with(|p| {
            p.entry(partition).or_default();
        });
    }

    /// Forgets a partition that is no longer ours; returns its processed offset, if any, to be
    /// committed once more on the way out (cheap, and certain).
    pub fn remove(&self, partition: i32) -> Option<i64> {
        self.with(|p| p.remove(&partition))
            .and_then(|o| o.processed)
    }

    /// Records that everything before `next` is in the database. Ignored for a partition that
    /// is not assigned (its worker outlived a revoke): that offset is not ours to commit.
    pub fn processed(&self, partition: i32, next: i64) {
        self.with(|p| {
            if let Some(o) = p.get_mut(&partition) {
                o.processed = Some(o.processed.map_or(next, |n| n.max(next)));
            }
        });
    }

    /// Offsets processed but not yet confirmed committed.
    pub fn uncommitted(&self) -> Vec<(i32, i64)> {
        self.with(|p| {
            p.iter()
                .filter_map(|(part, o)| {
                    o.processed
                        .filter(|n| Some(*n) != o.committed)
                        .map(|n| (*part, n))
                })
                .collect()
        })
    }

    /// Records Kafka's confirmation; false for a partition no longer tracked (given up while
    /// the commit was on its way).
    pub fn committed(&self, partition: i32, next: i64) -> bool {
        self.with(|p| match p.get_mut(&partition) {
            Some(o) => {
                o.committed = Some(o.committed.map_or(next, |n| n.max(next)));
                true
            }
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_processed_and_committed_per_partition() {
        let t = OffsetTracker::default();
        t.assign(0);
        t.assign(1);
        assert!(t.uncommitted().is_empty());
        t.processed(0, 10);
        t.processed(0, 7); // never moves back
        t.processed(5, 3); // not assigned: ignored
        assert_eq!(t.uncommitted(), [(0, 10)]);
        assert!(t.committed(0, 10));
        assert!(!t.committed(7, 1), "not tracked");
        assert!(t.uncommitted().is_empty());
        t.processed(1, 4);
        assert_eq!(t.remove(1), Some(4));
        assert_eq!(
            t.remove(0),
            Some(10),
            "committed, but returned to commit again"
        );
        assert_eq!(t.remove(0), None);
        assert!(t.uncommitted().is_empty());
    }
}
