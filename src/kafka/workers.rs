//! The partition workers of this replica: starting one per newly owned partition, handing it
//! deliveries, and stopping and joining workers as their partitions are given up. The group
//! ([`super::group`]) decides when; this module knows how.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::Delivery;
use crate::kafka::flow::Backlog;
use crate::kafka::worker::{ForwardOnly, PartitionWorker, WorkerContext};
use crate::store::Claim;

struct WorkerHandle {
    /// Tells this ownership of the partition from later ones by this replica.
    ownership: u64,
    /// The epoch it claimed the partition with, if the assignment could claim it.
    epoch: Option<i64>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    backlog: Arc<Backlog>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Workers {
    running: BTreeMap<i32, WorkerHandle>,
    /// Numbers each worker started, so that a late message of an old one is recognised.
    ownerships: u64,
    ctx: WorkerContext,
    runtime: Handle,
    /// Parent of every worker's stop token: cancelled on shutdown.
    shutdown: CancellationToken,
}

/// Workers told to stop, to be joined.
#[must_use]
pub struct Stopping {
    tasks: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn new(ctx: WorkerContext, runtime: Handle, shutdown: CancellationToken) -> Self {
        Workers {
            running: BTreeMap::new(),
            ownerships: 0,
            ctx,
            runtime,
            shutdown,
        }
    }

    /// Starts the worker of a newly owned partition. `claim`, when the assignment could claim
    /// the partition, holds its epoch and the offset it resumes from: that offset counts as
    /// processed (everything before it is in the database), so Kafka's committed offset
    /// catches up (lag monitoring) even before the first new batch.
    pub fn start(&mut self, partition: i32, claim: Option<&Claim>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let stop = self.shutdown.child_token();
        self.ctx.offsets.assign(partition);
        let resumed = claim.and_then(|c| c.next_offset);
        if let Some(next) = resumed {
            self.ctx.offsets.processed(partition, next);
        }
        self.ownerships += 1;
        let worker = PartitionWorker {
            partition,
            ownership: self.ownerships,
            deliveries: rx,
            backlog: backlog.clone(),
            stop: stop.clone(),
            ctx: self.ctx.clone(),
            gate: ForwardOnly::starting_at(resumed),
            epoch: claim.map(|c| c.epoch),
            dead_letter_limit: self.ctx.dead_letter_limit.clone(),
        };
        let task = self.runtime.spawn(worker.run());
        self.running.insert(
            partition,
            WorkerHandle {
                ownership: self.ownerships,
                epoch: claim.map(|c| c.epoch),
                deliveries: tx,
                backlog,
                stop,
                task,
            },
        );
    }

    /// The bytes waiting for a partition's worker, if it has one.
    pub fn backlog(&self, partition: i32) -> Option<Arc<Backlog>> {
        self.running.get(&partition).map(|w| w.backlog.clone())
    }

    /// Which ownership the partition's running worker belongs to.
    pub fn ownership(&self, partition: i32) -> Option<u64> {
        self.running.get(&partition).map(|w| w.ownership)
    }

    /// The epoch the partition's running worker claimed it with, if known.
    pub fn epoch(&self, partition: i32) -> Option<i64> {
        self.running.get(&partition).and_then(|w| w.epoch)
    }

    /// Hands a delivery to its partition's worker; false when the worker is gone (it stopped
    /// on a fatal failure, was fenced or halted).
    pub fn send(&self, delivery: Delivery) -> bool {
        self.running
            .get(&delivery.partition)
            .is_some_and(|w| w.deliveries.send(delivery).is_ok())
    }

    /// Tells the workers of `partitions` to stop: each finishes the transaction it is in, then
    /// exits. They are no longer this set's; join them with [`Stopping::join`].
    pub fn stop(&mut self, partitions: &[i32]) -> Stopping {
        let tasks = partitions
            .iter()
            .filter_map(|p| self.running.remove(p))
            .map(|w| {
                w.stop.cancel();
                w.task
            })
            .collect();
        Stopping { tasks }
    }
}

impl Stopping {
    /// Waits for the stopped workers until `deadline`, then aborts any still running; returns
    /// whether all had finished. Blocking: the poll thread calls it from a rebalance callback.
    pub fn join(mut self, runtime: &Handle, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from_std(deadline);
        let finished = runtime.block_on(async {
            tokio::time::timeout_at(deadline, async {
                for task in self.tasks.iter_mut() {
                    let _ = task.await;
                }
            })
            .await
            .is_ok()
        });
        if !finished {
            // A transaction still running may yet commit; its events are then duplicates for
            // the next owner, never lost, because its offset is not committed here.
            for task in &self.tasks {
                task.abort();
            }
        }
        finished
    }
}
