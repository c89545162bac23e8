//! Partitions read again from the offset the database records, restarted by the replica that
//! owns them: after an operator's rewind (`replay`), or when a worker finds the database behind
//! its fetch position (its claim during the assignment failed, so it started from Kafka's
//! committed offset, which a restore or a replay left ahead).
//!
//! `replay` moves a partition's recorded offset back and its epoch on ([`crate::store::replay`]),
//! so the owner's worker is fenced on its next batch, but Kafka still assigns the partition to
//! the same replica and its fetch position is still the old one. So each replica looks every
//! [`CHECK_INTERVAL`] for partitions marked rewound ([`watch_until`]); the poll thread then stops
//! the worker of each one it owns, claims it again, starts a new worker fetching from the offset
//! now recorded ([`GroupContext::rewind`]), and only then clears the mark. A partition whose
//! claim fails stays without a worker and is tried again every [`CHECK_INTERVAL`], mark or no
//! mark. An idle partition is rewound too, which is why this is a watch and not a reaction to a
//! fenced batch.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::group::{CLAIM_TIMEOUT, GroupContext};
use crate::kafka::partitions::Restarted;
use crate::store::ownership::{self, acknowledge_rewinds, reclaim};
use crate::store::{Pool, Source};

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
            Err(e) => {
                tracing::debug!(error = %crate::logs::chain(&e), "cannot look for rewound partitions now")
            }
        }
    }
}

impl GroupContext {
    /// Restarts the `rewound` partitions this replica owns, each reading from its recorded
    /// offset: the old worker stops, the partition is claimed again (a new epoch), a new worker
    /// starts and fetching restarts at the offset. On the poll thread. Whatever fails is tried
    /// again at the next report: the mark stays until the restart is acknowledged.
    pub fn rewind(&self, consumer: &BaseConsumer<Self>, rewound: &[Rewind]) {
        let (restart, restarted) = self.partitions().rewinds(rewound);
        if !restarted.is_empty() {
            // Restarted already, but the acknowledgement was lost: send it again.
            self.acknowledge(&restarted);
        }
        self.restart(consumer, &restart);
    }

    /// Tries again to restart the partitions left without a worker by a restart that failed
    /// (their rewind mark may be gone meanwhile: a claim clears it). On the poll thread.
    pub fn restart_unstarted(&self, consumer: &BaseConsumer<Self>) {
        let partitions = self.partitions().unstarted();
        self.restart(consumer, &partitions);
    }

    /// Stops the partitions' workers, claims the partitions again (a new epoch) and starts new
    /// workers fetching from the offsets recorded. A partition whose claim fails waits without
    /// a worker for [`Self::restart_unstarted`].
    fn restart(&self, consumer: &BaseConsumer<Self>, restart: &[i32]) {
        if restart.is_empty() {
            return;
        }
        // The old workers stop first: none may record anything, or claim its partition before
        // its first batch, after the claim below. Nothing is fetched until each partition is
        // sought to its new start (flow control's resume), so nothing fetched from the old
        // position reaches the new worker.
        let stopping = self.partitions().stop_for_restart(restart);
        if !stopping.join(&self.runtime, Instant::now() + self.drain_timeout) {
            tracing::warn!(partitions = ?restart, "a rewound partition's worker did not stop in time; abandoned");
        }
        if let Err(e) = consumer.pause(&self.list(restart)) {
            // Still correct: flow control skips the partition's deliveries until the seek.
            tracing::warn!(error = %e, "cannot pause the rewound partitions");
        }
        for &p in restart {
            self.ctx.offsets.remove(p);
        }
        // The timer is made inside the runtime: this thread is not one of its workers.
        let claimed = self.runtime.block_on(async {
            tokio::time::timeout(
                CLAIM_TIMEOUT,
                reclaim(&self.ctx.pool, &self.ctx.source, &self.ctx.owner, restart),
            )
            .await
        });
        let claims = match claimed {
            Ok(Ok(claims)) => claims,
            Ok(Err(e)) => {
                tracing::warn!(partitions = ?restart, error = %crate::logs::chain(&e), "cannot claim the rewound partitions now; they wait, without a worker, for the next try");
                return;
            }
            Err(_) => {
                tracing::warn!(partitions = ?restart, "claiming the rewound partitions timed out; they wait, without a worker, for the next try");
                return;
            }
        };
        let mut started = Vec::with_capacity(claims.len());
        for &p in restart {
            let Some(claim) = claims.get(&p) else {
                self.partitions().left_to_another(p);
                tracing::warn!(
                    partition = p,
                    "a rewound partition was claimed by another replica since; left to it"
                );
                continue;
            };
            match self.partitions().restarted(p, claim) {
                // Sought there and resumed by flow control.
                Some(Restarted::From(next)) => {
                    metrics::gauge!(crate::metrics::RECORDED_OFFSET, "partition" => p.to_string())
                        .set(next as f64);
                }
                Some(Restarted::AsBefore) => {
                    let _ = consumer.resume(&self.list(&[p]));
                }
                None => continue,
            }
            started.push((p, claim.epoch));
            tracing::info!(
                partition = p,
                epoch = claim.epoch,
                next_offset = claim.next_offset,
                "partition rewound: reading it again from the offset recorded"
            );
        }
        metrics::counter!(crate::metrics::REPLAYS).increment(started.len() as u64);
        self.acknowledge(&started);
    }

    fn acknowledge(&self, restarted: &[(i32, i64)]) {
        if restarted.is_empty() {
            return;
        }
        let acknowledged = self.runtime.block_on(async {
            tokio::time::timeout(
                CLAIM_TIMEOUT,
                acknowledge_rewinds(&self.ctx.pool, &self.ctx.source, restarted),
            )
            .await
        });
        if !matches!(acknowledged, Ok(Ok(()))) {
            tracing::debug!(partitions = ?restarted, "cannot clear the rewind marks now; trying again at the next look");
        }
    }
}
