//! Group membership: which partitions this replica owns, and what happens when that changes.
//! The decisions are made by the pure state machine in [`super::membership`]; this module
//! carries them out (workers, waiting, committing) from librdkafka's callbacks.
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
//!   timeout): stop the workers the same way but commit nothing: the offsets are no longer ours,
//!   and whatever we applied meanwhile is recognised as a duplicate by the new owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{Delivery, RecordedLookup};
use crate::http::Health;
use crate::kafka::flow::{Admission, Backlog, FlowControl, footprint};
use crate::kafka::membership::{Membership, Revocation};
use crate::kafka::worker::{ForwardOnly, Halted, PartitionWorker, WorkerContext};
use crate::store::{Claim, claim};

/// Bound on claiming partitions during an assignment (the group waits for us). A claim waits
/// for a previous owner's batch in flight; past this, each worker claims before its first batch.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on seeking a partition before resuming it: the seek is served by librdkafka's own
/// threads, not the network, so it is quick; a failed one is retried on the next turn.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);

struct WorkerHandle {
    ownership: u64,
    deliveries: mpsc::UnboundedSender<Delivery>,
    backlog: Arc<Backlog>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct State {
    membership: Membership,
    workers: BTreeMap<i32, WorkerHandle>,
    /// Which partitions are paused in librdkafka, and why.
    flow: FlowControl,
    /// Numbers each worker started, so that a late message of an old one is recognised.
    ownerships: u64,
}

pub struct GroupContext {
    state: Mutex<State>,
    ctx: WorkerContext,
    health: Arc<Health>,
    /// Incremental (un)assignment: KIP-848 or a cooperative classic strategy. Known from the
    /// configuration, because asking librdkafka inside a callback can hang during close
    /// (librdkafka #4041).
    cooperative: bool,
    runtime: tokio::runtime::Handle,
    /// Parent of every worker's stop token: cancelled on shutdown.
    shutdown: CancellationToken,
}

impl GroupContext {
    pub fn new(
        ctx: WorkerContext,
        health: Arc<Health>,
        cooperative: bool,
        runtime: tokio::runtime::Handle,
        drain_timeout: Duration,
        partition_buffer_bytes: usize,
        shutdown: CancellationToken,
    ) -> Self {
        GroupContext {
            state: Mutex::new(State {
                membership: Membership::new(drain_timeout),
                workers: BTreeMap::new(),
                flow: FlowControl::new(partition_buffer_bytes),
                ownerships: 0,
            }),
            ctx,
            health,
            cooperative,
            runtime,
            shutdown,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Hands a delivery to its partition's worker without ever waiting: a partition whose
    /// worker's backlog is full is paused instead ([`crate::kafka::flow`]).
    pub fn dispatch(&self, consumer: &BaseConsumer<Self>, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let mut state = self.state();
        if !state.membership.accepts(partition) {
            tracing::debug!(
                partition,
                "delivery for a partition not owned or draining; ignored"
            );
            return;
        }
        let Some(backlog) = state.workers.get(&partition).map(|w| w.backlog.clone()) else {
            return;
        };
        let delivery = Delivery {
            partition,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
        };
        let bytes = footprint(&delivery);
        match state
            .flow
            .admit(partition, delivery.offset, bytes, backlog.bytes())
        {
            Admission::Deliver => {
                // Counted before it is sent: the worker may take it (and uncount it) at once.
                backlog.added(bytes);
                let sent = state
                    .workers
                    .get(&partition)
                    .is_some_and(|w| w.deliveries.send(delivery).is_ok());
                if !sent {
                    backlog.taken(bytes);
                    // The worker stopped (fatal failure, fenced, halted); the message stays
                    // uncommitted for the partition's next reader.
                    tracing::debug!(partition, "worker gone; delivery left for the next reader");
                }
            }
            Admission::PauseAt(offset) => {
                drop(state);
                metrics::counter!(crate::metrics::FLOW_PAUSES).increment(1);
                tracing::debug!(
                    partition,
                    offset,
                    backlog = backlog.bytes(),
                    "backlog full; partition paused"
                );
                if let Err(e) = consumer.pause(&self.one(partition)) {
                    // Still correct: its deliveries are skipped until the seek on resume.
                    tracing::warn!(partition, error = %e, "cannot pause the partition");
                }
            }
            Admission::Skip => {}
        }
    }

    /// Resumes the partitions paused for a full backlog whose worker has room again, each
    /// sought first to its first undelivered offset. A partition whose seek fails stays paused
    /// and is tried again on the next turn.
    pub fn resume_ready(&self, consumer: &BaseConsumer<Self>) {
        let ready = {
            let state = self.state();
            state
                .flow
                .resumable(|p| state.workers.get(&p).map_or(0, |w| w.backlog.bytes()))
        };
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
                    self.state().flow.resumed(partition);
                    tracing::debug!(partition, offset, "partition resumed");
                }
                Err(e) => {
                    tracing::warn!(partition, offset, error = %e, "cannot resume the partition yet")
                }
            }
        }
    }

    fn one(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.ctx.source.topic, partition);
        tpl
    }

    pub fn owned(&self) -> Vec<i32> {
        self.state().membership.owned()
    }

    /// Starts workers for new partitions. `claims` hold their epochs and the offsets they
    /// start from when the database had them: those count as processed, so Kafka's committed
    /// offsets catch up (lag monitoring) even before the first new batch.
    fn assign(&self, partitions: &[i32], claims: &HashMap<i32, Claim>) {
        let mut state = self.state();
        let started = state.membership.assign(partitions);
        for &partition in &started {
            let (tx, rx) = mpsc::unbounded_channel();
            let backlog = Arc::new(Backlog::default());
            let stop = self.shutdown.child_token();
            self.ctx.offsets.assign(partition);
            let claim = claims.get(&partition);
            let resumed = claim.and_then(|c| c.next_offset);
            if let Some(next) = resumed {
                self.ctx.offsets.processed(partition, next);
            }
            state.ownerships += 1;
            let ownership = state.ownerships;
            let worker = PartitionWorker {
                partition,
                ownership,
                deliveries: rx,
                backlog: backlog.clone(),
                stop: stop.clone(),
                ctx: self.ctx.clone(),
                // Everything before the recorded offset is in the database already.
                gate: ForwardOnly::starting_at(resumed),
                epoch: claim.map(|c| c.epoch),
                dead_letter_limit: self.ctx.dead_letter_limit.clone(),
                recorded_lookup: RecordedLookup::new(),
            };
            let task = self.runtime.spawn(worker.run());
            state.workers.insert(
                partition,
                WorkerHandle {
                    ownership,
                    deliveries: tx,
                    backlog,
                    stop,
                    task,
                },
            );
        }
        self.ctx.stats.record_assigned(started.len());
        metrics::gauge!(crate::metrics::ASSIGNED).set(state.membership.owned().len() as f64);
        tracing::info!(
            assigned = ?started,
            owned = ?state.membership.owned(),
            "partitions assigned"
        );
    }

    /// The partitions of an assignment that are new to this replica: claiming one it already
    /// works on would fence its own worker. None on the way out (librdkafka turns the assign
    /// into an unassign during close): nothing to claim or resume.
    fn new_partitions(&self, partitions: &[i32]) -> Vec<i32> {
        let state = self.state();
        if !state.membership.takes_assignments() {
            return Vec::new();
        }
        let owned = state.membership.owned();
        partitions
            .iter()
            .copied()
            .filter(|p| !owned.contains(p))
            .collect()
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
                    }
                }
                claims
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot claim the partitions now; starting from Kafka's committed offsets, workers claim before their first batch");
                HashMap::new()
            }
            Err(_) => {
                tracing::warn!(
                    "claiming the partitions timed out; starting from Kafka's committed offsets, workers claim before their first batch"
                );
                HashMap::new()
            }
        }
    }

    /// Stops fetching a partition whose worker halted it (dead-letter limit), while it stays
    /// assigned to this replica: its lag shows, and nobody else picks the bad messages up.
    pub fn halt(&self, consumer: &BaseConsumer<Self>, halted: Halted) {
        let partition = halted.partition;
        let mut state = self.state();
        // Only if the worker that halted still holds the partition (not a later ownership).
        if state.workers.get(&partition).map(|w| w.ownership) != Some(halted.ownership) {
            return;
        }
        state.flow.halt(partition);
        match consumer.pause(&self.one(partition)) {
            Ok(()) => tracing::warn!(partition, "partition paused"),
            Err(e) => tracing::warn!(partition, error = %e, "cannot pause the halted partition"),
        }
    }

    /// Resumes fetching of paused partitions among `partitions` as they are given up, so that a
    /// later assignment starts unpaused.
    fn unpause(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let paused = self.state().flow.forget(partitions);
        let mut tpl = TopicPartitionList::new();
        for p in paused {
            tpl.add_partition(&self.ctx.source.topic, p);
        }
        if tpl.count() > 0 {
            let _ = consumer.resume(&tpl);
        }
    }

    /// Shutdown: every partition is given up as a revoke would (drain, commit).
    pub fn shutdown(&self, consumer: &BaseConsumer<Self>) {
        self.health.draining();
        let revocation = self.state().membership.shutdown(Instant::now());
        self.give_up(consumer, revocation);
    }

    /// Carries out a revocation on the poll thread: stop the partitions' workers, wait for
    /// them until the deadline, then commit what they processed, unless the partitions were
    /// lost.
    fn give_up(&self, consumer: &BaseConsumer<Self>, revocation: Revocation) {
        let Revocation {
            partitions,
            deadline,
            commit,
        } = revocation;
        let mut tasks: Vec<JoinHandle<()>> = {
            let mut state = self.state();
            partitions
                .iter()
                .filter_map(|p| state.workers.remove(p))
                .map(|w| {
                    // Each worker finishes the transaction it is in, then exits.
                    w.stop.cancel();
                    w.task
                })
                .collect()
        };
        let drained = self.runtime.block_on(async {
            let deadline = tokio::time::Instant::from_std(deadline);
            tokio::time::timeout_at(deadline, async {
                for task in tasks.iter_mut() {
                    let _ = task.await;
                }
            })
            .await
            .is_ok()
        });
        if !drained {
            // A transaction still running may yet commit; its events are then duplicates for
            // the next owner, never lost, because its offset is not committed here.
            tracing::warn!(partitions = ?partitions, "drain timed out; abandoning in-flight work");
            for task in &tasks {
                task.abort();
            }
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            if let Some(next) = self.ctx.offsets.remove(p) {
                let _ = tpl.add_partition_offset(&self.ctx.source.topic, p, Offset::Offset(next));
            }
        }
        if commit && tpl.count() > 0 {
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => {
                    tracing::info!(offsets = ?offsets_of(&tpl), "committed offsets of revoked partitions")
                }
                Err(e) => {
                    tracing::warn!(error = %e, offsets = ?offsets_of(&tpl), "commit on revoke failed; the next owner will see these events again as duplicates")
                }
            }
        }
        self.unpause(consumer, &partitions);
        let mut state = self.state();
        state.membership.drained();
        metrics::gauge!(crate::metrics::ASSIGNED).set(state.membership.owned().len() as f64);
        if commit {
            self.ctx.stats.record_revoked(partitions.len());
            tracing::info!(revoked = ?partitions, owned = ?state.membership.owned(), drained, "partitions revoked");
        } else {
            self.ctx.stats.record_lost(partitions.len());
            tracing::warn!(lost = ?partitions, owned = ?state.membership.owned(), drained, "partitions lost; their offsets are not committed");
        }
    }

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
}

/// Hands `tpl` back to librdkafka: incrementally, or (eager) the whole assignment.
fn unassign(
    consumer: &BaseConsumer<GroupContext>,
    tpl: &TopicPartitionList,
    cooperative: bool,
) -> KafkaResult<()> {
    if cooperative {
        consumer.incremental_unassign(tpl)
    } else {
        consumer.unassign()
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

fn offsets_of(tpl: &TopicPartitionList) -> Vec<(i32, Offset)> {
    tpl.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
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
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    /// The whole rebalance path, on the poll thread. Replaces rust-rdkafka's default so that
    /// an assignment can start where the database says the partition stands.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.health.joined();
        let cooperative = self.cooperative;
        let partitions = partitions_of(tpl);
        let handed_over = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let new = self.new_partitions(&partitions);
                let claims = self.claim_partitions(tpl, &new);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if result.is_ok() {
                    self.assign(&partitions, &claims);
                }
                result
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revocation = {
                    let mut state = self.state();
                    if consumer.assignment_lost() {
                        state.membership.lose(&partitions, Instant::now())
                    } else {
                        state.membership.revoke(&partitions, Instant::now())
                    }
                };
                self.give_up(consumer, revocation);
                unassign(consumer, tpl, cooperative)
            }
            other => {
                // librdkafka expects everything unassigned after a failed rebalance: whatever
                // we own is no longer ours, so stop it without committing.
                tracing::warn!(error = ?other, "rebalance error; abandoning owned partitions");
                let revocation = {
                    let mut state = self.state();
                    let owned = state.membership.owned();
                    state.membership.lose(&owned, Instant::now())
                };
                self.give_up(consumer, revocation);
                unassign(consumer, tpl, cooperative)
            }
        };
        if let Err(e) = handed_over {
            tracing::error!(error = %e, "librdkafka refused the (un)assignment");
        }
    }
}
