//! Offsets to Kafka, only what the workers recorded as processed, which is what the database
//! holds. While consuming they are sent without waiting for the broker: the database holds the
//! truth, and a commit that fails is made again by the next. Partitions given up are committed
//! synchronously, as the protocol needs before they go to their next owner.
//!
//! Kafka's committed offset may lag the database's for a while, and in one case move back: a
//! periodic commit that librdkafka retries (a timeout, a lost connection) can reach the
//! coordinator after a revoke's synchronous commit of a later offset. Nothing depends on it:
//! a new owner starts from the offset its claim reads in the database, and only when the claim
//! fails from Kafka's, where what it reads again is skipped as duplicates.

use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};

use crate::kafka::group::GroupContext;

/// A periodic commit whose answer has not come back by then is sent again. librdkafka answers
/// every request (an error or a timeout is an answer); this only bounds a lost one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl GroupContext {
    /// Sends every processed offset not yet committed, unless the previous periodic commit is
    /// still waiting for its answer. The poll thread goes on delivering meanwhile; the answer
    /// comes back to [`Self::committed`] on a later poll.
    pub fn commit_processed(&self, consumer: &BaseConsumer<Self>) {
        let mut in_flight = self.commit_in_flight();
        if in_flight.is_some_and(|sent| sent.elapsed() < ANSWER_TIMEOUT) {
            return;
        }
        let pending = self.ctx.offsets.uncommitted();
        if pending.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in pending {
            let _ = tpl.add_partition_offset(&self.ctx.source.topic, p, Offset::Offset(next));
        }
        match commit_async(consumer, &tpl) {
            Ok(()) => *in_flight = Some(Instant::now()),
            Err(e) => tracing::warn!(error = %e, "offset commit not sent; will retry"),
        }
    }

    /// The broker's answer to a periodic commit (librdkafka's offset-commit event, served by
    /// the poll). Each partition in it has its own result; a partition given up meanwhile is
    /// no longer tracked, and its offset is ignored.
    pub(super) fn committed(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        *self.commit_in_flight() = None;
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; will retry");
        }
        for e in offsets.elements() {
            match (e.offset(), e.error()) {
                (Offset::Offset(next), Ok(())) => self.mark_committed(e.partition(), next),
                (_, Err(err)) => {
                    tracing::debug!(partition = e.partition(), error = %err, "offset commit of a partition refused; will retry")
                }
                _ => {}
            }
        }
    }

    fn mark_committed(&self, partition: i32, next: i64) {
        if self.ctx.offsets.committed(partition, next) {
            metrics::gauge!(crate::metrics::COMMITTED_OFFSET, "partition" => partition.to_string())
                .set(next as f64);
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

/// `rd_kafka_commit_queue` with the consumer's own queue as the reply queue, so the answer
/// comes back as an offset-commit event on the queue the poll thread serves, and rust-rdkafka
/// hands it to `commit_callback`. rust-rdkafka's `CommitMode::Async` gives no answer at all:
/// librdkafka posts one only to a reply queue or to an `offset_commit_cb` in the
/// configuration, and rust-rdkafka sets neither (`rdkafka_cgrp.c`,
/// `rd_kafka_cgrp_propagate_commit_result`).
fn commit_async(
    consumer: &BaseConsumer<GroupContext>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live consumer handle. The queue handle is a new reference to the
    // consumer queue, which the pending request keeps a reference of its own to (its reply
    // queue), so it is released right after; the list is copied by librdkafka.
    let err = unsafe {
        let queue = rdsys::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(KafkaError::ConsumerCommit(
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__UNKNOWN_GROUP.into(),
            ));
        }
        let err = rdsys::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut());
        rdsys::rd_kafka_queue_destroy(queue);
        err
    };
    if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::ConsumerCommit(err.into()))
    }
}

fn offsets_of(tpl: &TopicPartitionList) -> Vec<(i32, Offset)> {
    tpl.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}
