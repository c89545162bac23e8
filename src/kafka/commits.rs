//! Offsets to Kafka, only what the workers recorded as processed, which is what the database
//! holds: periodically while consuming, without waiting for the broker (the database holds the
//! truth, and a commit that fails is made again by the next), and synchronously for partitions
//! given up, which the protocol requires before they go to their next owner.

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;

use crate::kafka::group::GroupContext;

impl GroupContext {
    /// Sends every processed offset not yet committed, asynchronously: the poll thread goes on
    /// delivering while the broker answers. The answer comes back through
    /// [`Self::committed`] on a later poll; until then the offsets count as uncommitted and
    /// may be sent again, which is harmless. A refused commit (as during a rebalance) is made
    /// again next time.
    pub fn commit_processed(&self, consumer: &BaseConsumer<Self>) {
        let pending = self.ctx.offsets.uncommitted();
        if pending.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in pending {
            let _ = tpl.add_partition_offset(&self.ctx.source.topic, p, Offset::Offset(next));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit not sent; will retry");
        }
    }

    /// The broker's answer to an asynchronous commit (librdkafka's offset-commit event, served
    /// by the poll). Its offsets are those of the request; a partition given up meanwhile is
    /// no longer tracked, and its offset is ignored.
    pub(super) fn committed(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.mark_committed(offsets),
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
