//! Rewinds by an operator (`replay`), carried out by the replica that owns the partition.
//!
//! `replay` moves a partition's recorded offset back and its epoch on ([`crate::store::replay`]),
//! so the owner's worker is fenced on its next batch, but Kafka still assigns the partition to
//! the same replica and its fetch position is still the old one. So each replica looks every
//! [`CHECK_INTERVAL`] for partitions marked rewound ([`watch_until`]); the poll thread then
//! claims each one it owns again, restarts its worker, and fetches again from the offset now
//! recorded ([`GroupContext::rewind`]). The claim clears the mark. An idle partition is rewound
//! too, which is why this is a watch and not a reaction to a fenced batch.

use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::group::{CLAIM_TIMEOUT, GroupContext};
use crate::store::{Pool, Source, claim, ownership};

/// How often a replica looks for rewound partitions: a replay takes effect within about this.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A partition rewound by an operator, and the epoch the rewind moved it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    pub partition: i32,
    pub epoch: i64,
}

/// Reports the rewound partitions of the group (whoever owns them) to the poll thread until
/// `stop`. A failed look is only logged: the mark stays until a claim clears it.
pub async fn watch_until(
    pool: Pool,
    source: Source,
    rewinds: mpsc::UnboundedSender<Vec<Rewind>>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(CHECK_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match ownership::rewound(&pool, &source).await {
            Ok(found) if found.is_empty() => {}
            Ok(found) => {
                let found = found
                    .into_iter()
                    .map(|(partition, epoch)| Rewind { partition, epoch })
                    .collect();
                if rewinds.send(found).is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for rewound partitions now"),
        }
    }
}

impl GroupContext {
    /// Claims again the `rewound` partitions this replica owns, and restarts each one's worker
    /// reading from its recorded offset. On the poll thread.
    pub fn rewind(&self, consumer: &BaseConsumer<Self>, rewound: &[Rewind]) {
        let partitions: Vec<i32> = {
            let state = self.state();
            if !state.membership.takes_assignments() {
                return;
            }
            rewound
                .iter()
                // Not one that is draining, nor one this replica claimed since the rewind
                // (a report that raced the claim that cleared it).
                .filter(|r| {
                    state.membership.accepts(r.partition)
                        && state
                            .workers
                            .epoch(r.partition)
                            .is_none_or(|mine| mine < r.epoch)
                })
                .map(|r| r.partition)
                .collect()
        };
        if partitions.is_empty() {
            return;
        }
        // First the claim: when it fails, the mark stays and the next look tries again (the
        // old worker is fenced meanwhile, so it records nothing).
        // The timer is made inside the runtime: this thread is not one of its workers.
        let claimed = self.runtime.block_on(async {
            tokio::time::timeout(
                CLAIM_TIMEOUT,
                claim(
                    &self.ctx.pool,
                    &self.ctx.source,
                    &self.ctx.owner,
                    &partitions,
                ),
            )
            .await
        });
        let claims = match claimed {
            Ok(Ok(claims)) => claims,
            Ok(Err(e)) => {
                tracing::warn!(partitions = ?partitions, error = %e, "cannot claim the rewound partitions now; trying again shortly");
                return;
            }
            Err(_) => {
                tracing::warn!(partitions = ?partitions, "claiming the rewound partitions timed out; trying again shortly");
                return;
            }
        };
        let stopping = self.state().workers.stop(&partitions);
        if !stopping.join(&self.runtime, Instant::now() + self.drain_timeout) {
            tracing::warn!(partitions = ?partitions, "a rewound partition's worker did not stop in time; abandoned");
        }
        // Fetching stops until each partition is sought to its new start (flow control's
        // resume): nothing fetched from the old position reaches the new worker.
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition(&self.ctx.source.topic, p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            // Still correct: flow control skips the partition's deliveries until the seek.
            tracing::warn!(error = %e, "cannot pause the rewound partitions");
        }
        let mut state = self.state();
        for &p in &partitions {
            let claim = claims.get(&p);
            self.ctx.offsets.remove(p);
            state.flow.forget(&[p]);
            match claim.and_then(|c| c.next_offset) {
                Some(next) => {
                    state.flow.refetch_from(p, next);
                    metrics::gauge!(crate::metrics::RECORDED_OFFSET, "partition" => p.to_string())
                        .set(next as f64);
                }
                // Nothing recorded (the offsets were deleted meanwhile): Kafka's position holds.
                None => {
                    let mut one = TopicPartitionList::new();
                    one.add_partition(&self.ctx.source.topic, p);
                    let _ = consumer.resume(&one);
                }
            }
            state.workers.start(p, claim);
            tracing::info!(
                partition = p,
                epoch = claim.map(|c| c.epoch),
                next_offset = claim.and_then(|c| c.next_offset),
                "partition rewound by an operator: reading it again from the offset recorded"
            );
        }
        metrics::counter!(crate::metrics::REPLAYS).increment(partitions.len() as u64);
    }
}
