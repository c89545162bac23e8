//! Offsets to Kafka, synchronously, and only what the workers recorded as processed, which is
//! what the database holds: periodically while consuming, and for partitions given up.

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use crate::kafka::group::GroupContext;

impl GroupContext {
    /// Commits every processed offset not yet committed. Synchronously: only the broker's
    /// answer says an offset is committed, and rust-rdkafka reports no result for a manual
    /// asynchronous commit (librdkafka posts one only to an `offset_commit_cb`, which the event
    /// API it uses does not set). A refused commit (as during a rebalance) is retried next time.
    pub fn commit_processed(&self, consumer: &BaseConsumer<Self>) {
        let pending = self.ctx.offsets.uncommitted();
        if pending.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in pending {
            let _ = tpl.add_partition_offset(&self.ctx.source.topic, p, Offset::Offset(next));
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => self.mark_committed(&tpl),
            Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
        }
    }

    fn mark_committed(&self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Offset::Offset(next) = e.offset() {
                self.ctx.offsets.committed(e.partition(), next);
                metrics::gauge!(crate::metrics::COMMITTED_OFFSET, "partition" => e.partition().to_string())
                    .set(next as f64);
            }
        }
    }

    /// Commits the processed offsets of partitions being given up (drained), before
    /// librdkafka hands them to their next owner, and forgets them.
    pub(super) fn commit_given_up(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            if let Some(next) = self.ctx.offsets.remove(p) {
                let _ = tpl.add_partition_offset(&self.ctx.source.topic, p, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                tracing::info!(offsets = ?offsets_of(&tpl), "committed offsets of revoked partitions")
            }
            Err(e) => {
                tracing::warn!(error = %e, offsets = ?offsets_of(&tpl), "commit on revoke failed; the next owner starts from the offsets in the database")
            }
        }
    }
}

fn offsets_of(tpl: &TopicPartitionList) -> Vec<(i32, Offset)> {
    tpl.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}
