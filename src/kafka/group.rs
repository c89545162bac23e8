//! Group membership: which partitions this replica owns, and what happens when that changes.
//! The state and its invariants are [`super::partitions`] (with the pure phase machine of
//! [`super::membership`] inside); this module translates librdkafka's callbacks into calls on
//! it and does the I/O around them (claims, waiting for workers, commits, metrics, logs).
//!
//! librdkafka calls the rebalance callbacks on the thread that polls, which is a dedicated OS
//! thread (see [`super::consumer`]), so blocking here to drain cannot starve the async runtime
//! that the partition workers run on.
//!
//! - **assign**: claim each new partition in the database (a new epoch, which fences off any
//!   previous owner: [`crate::store::ownership`]), start it where the database says it stands
//!   (the offset recorded with its last batch, else Kafka's committed offset), one worker per
//!   partition.
//! - **revoke**: stop dispatching to those partitions, tell their workers to stop (each finishes
//!   the transaction it is in), wait for them up to the drain timeout, then commit their
//!   processed offsets synchronously, before librdkafka gives the partitions up.
//! - **lost** (the group already gave the partitions to someone else, e.g. after a session
//!   timeout, or a rebalance failed): stop the workers the same way but commit nothing: the
//!   offsets are no longer ours, and whatever we applied meanwhile is recognised as a duplicate
//!   by the new owner.
//!
//! The workers themselves are started and joined by [`super::workers`]; deliveries reach them
//! through [`super::intake`], and offsets reach Kafka through [`super::commits`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::http::Health;
use crate::kafka::flow::FlowControl;
use crate::kafka::membership::{Membership, Revocation};
use crate::kafka::partitions::{GivingUp, Partitions};
use crate::kafka::worker::WorkerContext;
use crate::kafka::workers::Workers;
use crate::store::{Claim, Failure, claim};

/// Bound on claiming partitions during an assignment (the group waits for us). A claim waits
/// for a previous owner's batch in flight; past this, each worker claims before its first batch.
pub(super) const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

pub struct GroupContext {
    /// Locked briefly by the poll thread, and by librdkafka's statistics callback (`owned`).
    partitions: Mutex<Partitions>,
    pub(super) ctx: WorkerContext,
    health: Arc<Health>,
    /// Incremental (un)assignment: KIP-848 or a cooperative classic strategy. Known from the
    /// configuration, because asking librdkafka inside a callback can hang during close
    /// (librdkafka #4041).
    cooperative: bool,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) drain_timeout: Duration,
    /// When the periodic commit waiting for its answer was sent (poll thread only).
    commit_in_flight: Mutex<Option<Instant>>,
}

/// What librdkafka asks of the rebalance callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebalance {
    Assign,
    Revoke,
    /// The partitions are someone else's already. After a failed rebalance librdkafka expects
    /// everything unassigned: then `everything` we own is lost, whatever the list says.
    Lost {
        everything: bool,
    },
}

impl Rebalance {
    fn of(err: RDKafkaRespErr, assignment_lost: bool) -> Self {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if assignment_lost => {
                Rebalance::Lost { everything: false }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke,
            other => {
                tracing::warn!(error = ?other, "rebalance error; abandoning owned partitions");
                Rebalance::Lost { everything: true }
            }
        }
    }
}

impl GroupContext {
    pub fn new(
        ctx: WorkerContext,
        health: Arc<Health>,
        cooperative: bool,
        runtime: tokio::runtime::Handle,
        drain_timeout: Duration,
        buffer_bytes: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let partitions = Partitions::new(
            Membership::new(drain_timeout),
            Workers::new(ctx.clone(), runtime.clone(), shutdown),
            FlowControl::new(buffer_bytes),
        );
        publish(&partitions);
        GroupContext {
            partitions: Mutex::new(partitions),
            ctx,
            health,
            cooperative,
            runtime,
            drain_timeout,
            commit_in_flight: Mutex::new(None),
        }
    }

    pub(super) fn commit_in_flight(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        match self.commit_in_flight.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(super) fn partitions(&self) -> std::sync::MutexGuard<'_, Partitions> {
        match self.partitions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn owned(&self) -> Vec<i32> {
        self.partitions().owned()
    }

    /// New partitions: claim them, tell librdkafka where each starts, start their workers.
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> KafkaResult<()> {
        let partitions = partitions_of(tpl);
        let new = self.partitions().new_among(&partitions);
        let claims = self.claim_partitions(tpl, &new);
        let handed = if self.cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = handed {
            // Not a step to skip: the group now counts this member as the partitions' owner,
            // and none is fetched until the next rebalance, which may never come (a stable
            // group). Stopping the replica hands them on at once; its restart joins afresh.
            let _ = self.ctx.fatal.send(Failure::fatal_from(
                format!("librdkafka refused the assignment of partitions {partitions:?}"),
                e.clone(),
            ));
            return Err(e);
        }
        let (started, owned) = {
            let mut state = self.partitions();
            (state.assign(&partitions, &claims), state.owned())
        };
        self.ctx.stats.record_assigned(started.len());
        metrics::gauge!(crate::metrics::ASSIGNED).set(owned.len() as f64);
        tracing::info!(
            event = crate::logs::PARTITIONS_ASSIGNED,
            partitions = %crate::logs::list(&started),
            owned = %crate::logs::list(&owned),
            "partitions assigned"
        );
        Ok(())
    }

    /// Partitions moving to another member: drain, commit, hand back.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> KafkaResult<()> {
        let giving_up = self
            .partitions()
            .revoke(&partitions_of(tpl), Instant::now());
        self.give_up(consumer, giving_up);
        self.unassign(consumer, tpl)
    }

    /// Partitions already someone else's: stop, commit nothing, hand back.
    fn lose(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        everything: bool,
    ) -> KafkaResult<()> {
        let listed = partitions_of(tpl);
        let giving_up = self
            .partitions()
            .lose((!everything).then_some(&listed[..]), Instant::now());
        self.give_up(consumer, giving_up);
        self.unassign(consumer, tpl)
    }

    /// Shutdown: every partition is given up as a revoke would (drain, commit).
    pub fn shutdown(&self, consumer: &BaseConsumer<Self>) {
        self.health.draining();
        let giving_up = self.partitions().shutdown(Instant::now());
        self.give_up(consumer, giving_up);
    }

    /// Carries out a revocation on the poll thread: stop the partitions' workers, wait for
    /// them until the deadline, then commit what they processed, unless the partitions were
    /// lost. The membership shows `draining` meanwhile (`inventory_membership_phase`).
    fn give_up(&self, consumer: &BaseConsumer<Self>, giving_up: GivingUp) {
        let GivingUp {
            revocation:
                Revocation {
                    partitions,
                    deadline,
                    commit,
                },
            stopping,
        } = giving_up;
        publish(&self.partitions());
        let drained = stopping.join(&self.runtime, deadline);
        // No longer this replica's to report (its offsets stay: they only grow).
        for p in &partitions {
            for gauge in [crate::metrics::LAG, crate::metrics::PAUSED] {
                metrics::gauge!(gauge, "partition" => p.to_string()).set(0.0);
            }
        }
        if !drained {
            tracing::warn!(partitions = ?partitions, "drain timed out; abandoning in-flight work");
        }
        if commit {
            self.commit_given_up(consumer, &partitions);
        } else {
            for &p in &partitions {
                self.ctx.offsets.remove(p);
            }
        }
        let (paused, owned) = {
            let mut state = self.partitions();
            let paused = state.given_up(&partitions);
            publish(&state);
            (paused, state.owned())
        };
        // Resumed in librdkafka, so that a later assignment of them fetches.
        if !paused.is_empty() {
            let _ = consumer.resume(&self.list(&paused));
        }
        metrics::gauge!(crate::metrics::ASSIGNED).set(owned.len() as f64);
        if commit {
            self.ctx.stats.record_revoked(partitions.len());
            tracing::info!(
                event = crate::logs::PARTITIONS_REVOKED,
                partitions = %crate::logs::list(&partitions),
                owned = %crate::logs::list(&owned),
                drained,
                "partitions revoked"
            );
        } else {
            self.ctx.stats.record_lost(partitions.len());
            tracing::warn!(
                event = crate::logs::PARTITIONS_LOST,
                partitions = %crate::logs::list(&partitions),
                owned = %crate::logs::list(&owned),
                drained,
                "partitions lost; their offsets are not committed"
            );
        }
    }

    /// Claims the newly assigned partitions and sets each one's start to the offset recorded
    /// with its last batch, which is never behind Kafka's committed offset and is there even
    /// when a commit on revoke was refused. If the claim fails or times out, Kafka's committed
    /// offsets hold (at worst some redelivery, which dedupe absorbs) and each worker claims
    /// its partition before its first batch.
    fn claim_partitions(
        &self,
        tpl: &mut TopicPartitionList,
        partitions: &[i32],
    ) -> HashMap<i32, Claim> {
        if partitions.is_empty() {
            return HashMap::new();
        }
        let claimed = self.runtime.block_on(async {
            tokio::time::timeout(
                CLAIM_TIMEOUT,
                claim(
                    &self.ctx.pool,
                    &self.ctx.source,
                    &self.ctx.owner,
                    partitions,
                ),
            )
            .await
        });
        match claimed {
            Ok(Ok(claims)) => {
                for (&p, c) in &claims {
                    if let Some(next) = c.next_offset {
                        let _ = tpl.set_partition_offset(
                            &self.ctx.source.topic,
                            p,
                            Offset::Offset(next),
                        );
                        metrics::gauge!(crate::metrics::RECORDED_OFFSET, "partition" => p.to_string())
                            .set(next as f64);
                    }
                }
                claims
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::logs::chain(&e), "cannot claim the partitions now; starting from Kafka's committed offsets, workers claim before their first batch");
                HashMap::new()
            }
            Err(_) => {
                tracing::warn!(
                    event = crate::logs::CLAIM_TIMED_OUT,
                    "claiming the partitions timed out; starting from Kafka's committed offsets, workers claim before their first batch"
                );
                HashMap::new()
            }
        }
    }

    /// Hands `tpl` back to librdkafka: incrementally, or (eager) the whole assignment.
    fn unassign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> KafkaResult<()> {
        if self.cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        }
    }
}

/// Shows the membership's phase as `inventory_membership_phase{phase}`: 1 for the current one.
fn publish(partitions: &Partitions) {
    let now = partitions.phase().name();
    for phase in crate::kafka::membership::PHASES {
        metrics::gauge!(crate::metrics::MEMBERSHIP_PHASE, "phase" => phase).set(if phase == now {
            1.0
        } else {
            0.0
        });
    }
}

pub(super) fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for GroupContext {
    /// librdkafka's periodic statistics (`statistics.interval.ms`): per-partition lag.
    fn stats(&self, statistics: Statistics) {
        let owned = self.owned();
        for topic in statistics.topics.values() {
            for (p, partition) in &topic.partitions {
                if owned.contains(p) && partition.consumer_lag >= 0 {
                    metrics::gauge!(crate::metrics::LAG, "partition" => p.to_string())
                        .set(partition.consumer_lag as f64);
                }
                if owned.contains(p) && partition.hi_offset >= 0 {
                    metrics::gauge!(crate::metrics::END_OFFSET, "partition" => p.to_string())
                        .set(partition.hi_offset as f64);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    /// The answer to a periodic commit, which [`GroupContext::commit_processed`] asked to come
    /// back to the queue the poll serves.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.committed(result, offsets);
    }

    /// The whole rebalance path, on the poll thread. Replaces rust-rdkafka's default so that
    /// an assignment can start where the database says the partition stands.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.health.joined();
        let handed = match Rebalance::of(err, consumer.assignment_lost()) {
            Rebalance::Assign => self.assign(consumer, tpl),
            Rebalance::Revoke => self.revoke(consumer, tpl),
            Rebalance::Lost { everything } => self.lose(consumer, tpl, everything),
        };
        if let Err(e) = handed {
            tracing::error!(error = %e, "librdkafka refused the (un)assignment");
        }
    }
}
