//! The group's state on this replica: which partitions it owns and in what phase
//! ([`Membership`]), their workers ([`Workers`]), which of them do not fetch and why
//! ([`FlowControl`]), and those a restart left without a worker. [`super::group`] and its
//! siblings (`intake`, `rewinds`) translate librdkafka's callbacks into calls on it and do the
//! I/O around them: claims in the database, commits, librdkafka's pause, seek and resume.
//!
//! Its methods keep these invariants, which is why its parts are not reachable on their own:
//! - **a worker runs only for a partition the membership accepts deliveries for**: workers
//!   start in [`Partitions::assign`] and [`Partitions::restarted`], and giving partitions up
//!   stops their workers in the same call that starts the drain;
//! - **each owned partition's backlog may hold its share of the buffer**: the share is set
//!   again whenever the partitions owned change;
//! - **every partition paused in librdkafka is in flow control with its reason**, and is
//!   forgotten (so that it is resumed) when given up;
//! - **a partition waiting for a restart is owned and has no worker.**

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::domain::Delivery;
use crate::kafka::flow::{Admission, FlowControl, footprint};
use crate::kafka::membership::{Membership, Phase, Revocation};
use crate::kafka::rewinds::Rewind;
use crate::kafka::workers::{Stopping, Workers};
use crate::store::Claim;

pub struct Partitions {
    membership: Membership,
    workers: Workers,
    /// Which partitions are paused in librdkafka, and why.
    flow: FlowControl,
    /// Owned partitions left without a worker by a restart ([`super::rewinds`]) that could not
    /// claim them yet.
    unstarted: BTreeSet<i32>,
}

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// On its way to the partition's worker.
    Sent,
    /// Not for this replica (not owned, or draining): ignored.
    NotOurs,
    /// The partition's worker stopped (fatal failure, fenced, halted): the message stays
    /// uncommitted for the partition's next reader.
    WorkerGone,
    /// Its worker's backlog is full: pause the partition in librdkafka; the delivery is fetched
    /// again when it resumes.
    PauseAt { offset: i64, backlog: usize },
    /// The partition is paused already: librdkafka handed over a message it had queued.
    Skipped,
}

/// Partitions being given up: their workers, told to stop, to join until the revocation's
/// deadline.
#[must_use]
pub struct GivingUp {
    pub revocation: Revocation,
    pub stopping: Stopping,
}

/// Where a restarted partition fetches from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restarted {
    /// From the offset the database records: seek there, then resume.
    From(i64),
    /// Nothing recorded (the offsets were deleted meanwhile): Kafka's position holds; resume.
    AsBefore,
}

impl Partitions {
    pub fn new(membership: Membership, workers: Workers, flow: FlowControl) -> Self {
        Partitions {
            membership,
            workers,
            flow,
            unstarted: BTreeSet::new(),
        }
    }

    pub fn owned(&self) -> Vec<i32> {
        self.membership.owned()
    }

    pub fn phase(&self) -> &Phase {
        self.membership.phase()
    }

    /// The partitions of an assignment that are new to this replica: claiming one it already
    /// works on would fence its own worker. None on the way out (librdkafka turns the assign
    /// into an unassign during close): nothing to claim or resume.
    pub fn new_among(&self, partitions: &[i32]) -> Vec<i32> {
        if !self.membership.takes_assignments() {
            return Vec::new();
        }
        let owned = self.membership.owned();
        partitions
            .iter()
            .copied()
            .filter(|p| !owned.contains(p))
            .collect()
    }

    /// Takes `partitions` on and starts a worker for each new one, from its claim if the
    /// assignment could claim it. Returns the partitions started.
    pub fn assign(&mut self, partitions: &[i32], claims: &HashMap<i32, Claim>) -> Vec<i32> {
        let started = self.membership.assign(partitions);
        for &partition in &started {
            self.workers.start(partition, claims.get(&partition));
        }
        self.share_buffer();
        started
    }

    /// Partitions moving to another member: drain them, then commit.
    pub fn revoke(&mut self, partitions: &[i32], now: Instant) -> GivingUp {
        let revocation = self.membership.revoke(partitions, now);
        self.give_up(revocation)
    }

    /// Partitions someone else owns already (`None`: every partition owned): stop them, commit
    /// nothing.
    pub fn lose(&mut self, partitions: Option<&[i32]>, now: Instant) -> GivingUp {
        let partitions = partitions.map_or_else(|| self.membership.owned(), <[i32]>::to_vec);
        let revocation = self.membership.lose(&partitions, now);
        self.give_up(revocation)
    }

    /// Shutdown: every partition drains and commits, and no assignment is taken after it.
    pub fn shutdown(&mut self, now: Instant) -> GivingUp {
        let revocation = self.membership.shutdown(now);
        self.give_up(revocation)
    }

    fn give_up(&mut self, revocation: Revocation) -> GivingUp {
        let stopping = self.workers.stop(&revocation.partitions);
        self.unstarted
            .retain(|p| !revocation.partitions.contains(p));
        GivingUp {
            revocation,
            stopping,
        }
    }

    /// The drain of `partitions` ended (their workers finished or were abandoned). Returns
    /// those that were paused, to resume in librdkafka so that a later assignment of them
    /// fetches.
    pub fn given_up(&mut self, partitions: &[i32]) -> Vec<i32> {
        let paused = self.flow.forget(partitions);
        self.membership.drained();
        self.share_buffer();
        paused
    }

    fn share_buffer(&mut self) {
        self.flow.share_among(self.membership.owned().len());
    }

    /// Hands a delivery to its partition's worker, or says why not, never waiting: a
    /// partition whose worker's backlog is full is to be paused instead.
    pub fn deliver(&mut self, delivery: Delivery) -> Dispatched {
        let partition = delivery.partition;
        if !self.membership.accepts(partition) {
            return Dispatched::NotOurs;
        }
        let Some(backlog) = self.workers.backlog(partition) else {
            return Dispatched::WorkerGone;
        };
        let bytes = footprint(&delivery);
        match self
            .flow
            .admit(partition, delivery.offset, bytes, backlog.bytes())
        {
            Admission::Deliver => {
                // Counted before it is sent: the worker may take it (and uncount it) at once.
                backlog.added(bytes);
                if self.workers.send(delivery) {
                    Dispatched::Sent
                } else {
                    backlog.taken(bytes);
                    Dispatched::WorkerGone
                }
            }
            Admission::PauseAt(offset) => Dispatched::PauseAt {
                offset,
                backlog: backlog.bytes(),
            },
            Admission::Skip => Dispatched::Skipped,
        }
    }

    /// Partitions paused for a full backlog whose worker has room again, each with the offset
    /// to seek to before resuming it.
    pub fn resumable(&self) -> Vec<(i32, i64)> {
        self.flow
            .resumable(|p| self.workers.backlog(p).map_or(0, |b| b.bytes()))
    }

    /// `partition` was sought and resumed in librdkafka.
    pub fn resumed(&mut self, partition: i32) {
        self.flow.resumed(partition);
    }

    /// A worker halted its partition (dead-letter limit): it fetches no more until given up.
    /// False when that worker no longer holds the partition (a later ownership does): nothing
    /// to pause.
    pub fn halt(&mut self, partition: i32, ownership: u64) -> bool {
        if self.workers.ownership(partition) != Some(ownership) {
            return false;
        }
        self.flow.halt(partition);
        true
    }

    /// Of the `rewound` partitions this replica owns: those to restart, and those restarted
    /// already (with their epoch) whose mark is still set.
    pub fn rewinds(&self, rewound: &[Rewind]) -> (Vec<i32>, Vec<(i32, i64)>) {
        let (mut restart, mut restarted) = (Vec::new(), Vec::new());
        if !self.membership.takes_assignments() {
            return (restart, restarted);
        }
        for r in rewound {
            // Not one that is draining or given up.
            if !self.membership.accepts(r.partition) {
                continue;
            }
            match self.workers.epoch(r.partition) {
                Some(mine) if mine == r.epoch => restarted.push((r.partition, mine)),
                // Claimed since (a report that raced the claim): nothing to do.
                Some(mine) if mine > r.epoch => {}
                _ => restart.push(r.partition),
            }
        }
        (restart, restarted)
    }

    /// The owned partitions a restart left without a worker.
    pub fn unstarted(&self) -> Vec<i32> {
        self.unstarted.iter().copied().collect()
    }

    /// Stops the workers of `partitions` for a restart: they fetch nothing until
    /// [`Self::restarted`] says where from (nothing fetched from the old position may reach
    /// the new worker), and wait without a worker meanwhile.
    pub fn stop_for_restart(&mut self, partitions: &[i32]) -> Stopping {
        let partitions: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|&p| self.membership.accepts(p))
            .collect();
        for &p in &partitions {
            self.flow.hold_for_restart(p);
            self.unstarted.insert(p);
        }
        self.workers.stop(&partitions)
    }

    /// `partition`, claimed again, gets a new worker. `None` when it is no longer this
    /// replica's to restart (given up meanwhile).
    pub fn restarted(&mut self, partition: i32, claim: &Claim) -> Option<Restarted> {
        if !self.unstarted.remove(&partition) {
            return None;
        }
        let from = match claim.next_offset {
            Some(next) => {
                self.flow.refetch_from(partition, next);
                Restarted::From(next)
            }
            None => {
                self.flow.forget(&[partition]);
                Restarted::AsBefore
            }
        };
        self.workers.start(partition, Some(claim));
        Some(from)
    }

    /// Another replica claimed `partition` since its restart began: one of us is about to lose
    /// it. It stays without a worker (and paused): this replica cannot take it back from the
    /// database's owner.
    pub fn left_to_another(&mut self, partition: i32) {
        self.unstarted.remove(&partition);
    }
}
