//! The delivery path on the poll thread: each message goes to its partition's worker at once,
//! or its partition is paused ([`super::flow`] decides); paused partitions resume when their
//! worker has room again, halted ones stay paused until given up.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::domain::{Delivery, TraceHeaders};
use crate::kafka::group::GroupContext;
use crate::kafka::partitions::Dispatched;
use crate::kafka::worker::Halted;

/// Bound on seeking a partition before resuming it: the seek is served by librdkafka's own
/// threads, not the network, so it is quick; a failed one is retried on the next turn.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// The message's W3C Trace Context headers, when it has a `traceparent` (the first of each;
/// values that are not UTF-8 count as absent).
fn trace_headers(message: &BorrowedMessage<'_>) -> Option<Box<TraceHeaders>> {
    let headers = message.headers()?;
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    Some(Box::new(TraceHeaders {
        traceparent: value("traceparent")?,
        tracestate: value("tracestate"),
    }))
}

impl GroupContext {
    /// Hands a delivery to its partition's worker without ever waiting: a partition whose
    /// worker's backlog is full is paused instead ([`crate::kafka::flow`]).
    pub fn dispatch(&self, consumer: &BaseConsumer<Self>, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let delivery = Delivery {
            partition,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
            trace: trace_headers(message),
        };
        let dispatched = self.partitions().deliver(delivery);
        match dispatched {
            Dispatched::Sent | Dispatched::Skipped => {}
            Dispatched::NotOurs => tracing::debug!(
                partition,
                "delivery for a partition not owned or draining; ignored"
            ),
            Dispatched::WorkerGone => {
                tracing::debug!(partition, "worker gone; delivery left for the next reader");
            }
            Dispatched::PauseAt { offset, backlog } => {
                metrics::counter!(crate::metrics::FLOW_PAUSES).increment(1);
                tracing::debug!(partition, offset, backlog, "backlog full; partition paused");
                if let Err(e) = consumer.pause(&self.one(partition)) {
                    // Still correct: its deliveries are skipped until the seek on resume.
                    tracing::warn!(partition, error = %e, "cannot pause the partition");
                }
            }
        }
    }

    /// Resumes the partitions paused for a full backlog whose worker has room again, each
    /// sought first to its first undelivered offset. A partition whose seek fails stays paused
    /// and is tried again on the next turn.
    pub fn resume_ready(&self, consumer: &BaseConsumer<Self>) {
        let ready = self.partitions().resumable();
        for (partition, offset) in ready {
            let sought = consumer.seek(
                &self.ctx.source.topic,
                partition,
                Offset::Offset(offset),
                SEEK_TIMEOUT,
            );
            let resumed = sought.and_then(|()| consumer.resume(&self.one(partition)));
            match resumed {
                Ok(()) => {
                    self.partitions().resumed(partition);
                    tracing::debug!(
                        event = crate::logs::FETCH_RESUMED,
                        partition,
                        offset,
                        "partition resumed"
                    );
                }
                Err(e) => {
                    tracing::warn!(partition, offset, error = %e, "cannot resume the partition yet")
                }
            }
        }
    }

    fn one(&self, partition: i32) -> TopicPartitionList {
        self.list(&[partition])
    }

    /// `partitions` of this replica's topic, as librdkafka takes them.
    pub(super) fn list(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.ctx.source.topic, p);
        }
        tpl
    }

    /// Stops fetching a partition whose worker halted it (dead-letter limit), while it stays
    /// assigned to this replica: its lag shows, and nobody else picks the bad messages up.
    pub fn halt(&self, consumer: &BaseConsumer<Self>, halted: Halted) {
        let partition = halted.partition;
        if !self.partitions().halt(partition, halted.ownership) {
            return;
        }
        match consumer.pause(&self.one(partition)) {
            Ok(()) => tracing::warn!(partition, "partition paused"),
            Err(e) => tracing::warn!(partition, error = %e, "cannot pause the halted partition"),
        }
    }
}
