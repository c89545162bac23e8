//! The replica's group membership as a small state machine, free of Kafka and of I/O, so that
//! every transition can be unit-tested. [`super::group`] calls these transitions from
//! librdkafka's rebalance callbacks and carries out the [`Revocation`]s they return.
//!
//! ```text
//!              assign(p)                    revoke(p) / lose(p)
//!   ┌────────────────────────┐   ┌───────────────────────────────────┐
//!   ▼                        │   │                                   ▼
//! Consuming ─────────────────┴───┴──────────────────────────► Draining{p, deadline, commit}
//!   ▲                                                                │
//!   └──────────────────────────── drained() ─────────────────────────┘
//!
//! Consuming ── shutdown() ──► Draining{all, commit} ── drained() ──► Stopped
//! ```
//!
//! While partitions drain, no delivery for them is dispatched; once stopped, nothing is
//! dispatched or assigned any more. The drain takes up to the drain timeout on the poll
//! thread, while other threads serve `/metrics`: the phase is published there
//! (`inventory_membership_phase`) as it is entered and left.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What the caller must do to give partitions up: stop their workers, wait for them until
/// `deadline`, then commit their processed offsets if `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub partitions: Vec<i32>,
    pub deadline: Instant,
    /// False when the partitions were lost: their offsets already belong to another member.
    pub commit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Consuming,
    Draining {
        revocation: Revocation,
        /// Whether the process stops once the drain ends.
        stopping: bool,
    },
    Stopped,
}

/// Every phase's name, as [`Phase::name`] gives them.
pub const PHASES: [&str; 3] = ["consuming", "draining", "stopped"];

impl Phase {
    /// Its name in logs and in the `inventory_membership_phase` gauge.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Consuming => PHASES[0],
            Phase::Draining { .. } => PHASES[1],
            Phase::Stopped => PHASES[2],
        }
    }
}

#[derive(Debug)]
pub struct Membership {
    owned: BTreeSet<i32>,
    phase: Phase,
    drain_timeout: Duration,
}

impl Membership {
    pub fn new(drain_timeout: Duration) -> Self {
        Membership {
            owned: BTreeSet::new(),
            phase: Phase::Consuming,
            drain_timeout,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Whether a delivery of `partition` may go to its worker now.
    pub fn accepts(&self, partition: i32) -> bool {
        match &self.phase {
            Phase::Consuming => self.owned.contains(&partition),
            Phase::Draining { revocation, .. } => {
                self.owned.contains(&partition) && !revocation.partitions.contains(&partition)
            }
            Phase::Stopped => false,
        }
    }

    /// New partitions: returns those that need a worker (not already owned). Ignored once
    /// stopping or stopped: a replica on its way out takes on nothing.
    pub fn assign(&mut self, partitions: &[i32]) -> Vec<i32> {
        if self.is_stopping() {
            return Vec::new();
        }
        partitions
            .iter()
            .copied()
            .filter(|p| self.owned.insert(*p))
            .collect()
    }

    /// A cooperative or eager revoke: drain, then commit.
    pub fn revoke(&mut self, partitions: &[i32], now: Instant) -> Revocation {
        self.begin_drain(partitions, true, false, now)
    }

    /// The group took the partitions away already (session timeout, fencing, failed
    /// rebalance): stop them without committing.
    pub fn lose(&mut self, partitions: &[i32], now: Instant) -> Revocation {
        self.begin_drain(partitions, false, false, now)
    }

    /// SIGTERM: give every owned partition up as a revoke would, then stop.
    pub fn shutdown(&mut self, now: Instant) -> Revocation {
        let all = self.owned();
        self.begin_drain(&all, true, true, now)
    }

    /// The drain of the current revocation ended (in time or not): its partitions are gone.
    pub fn drained(&mut self) {
        if let Phase::Draining {
            revocation,
            stopping,
        } = &self.phase
        {
            for p in &revocation.partitions {
                self.owned.remove(p);
            }
            self.phase = if *stopping {
                Phase::Stopped
            } else {
                Phase::Consuming
            };
        }
    }

    /// False once a shutdown began: assignments are then ignored.
    pub fn takes_assignments(&self) -> bool {
        !self.is_stopping()
    }

    fn is_stopping(&self) -> bool {
        matches!(
            self.phase,
            Phase::Stopped | Phase::Draining { stopping: true, .. }
        )
    }

    fn begin_drain(
        &mut self,
        partitions: &[i32],
        commit: bool,
        stopping: bool,
        now: Instant,
    ) -> Revocation {
        // Only what we own can be given up; librdkafka may name partitions twice (a revoke
        // after a lost assignment, the final revoke of close()).
        let partitions: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| self.owned.contains(p))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let revocation = Revocation {
            partitions,
            deadline: now + self.drain_timeout,
            commit,
        };
        let stopping = stopping || self.is_stopping();
        self.phase = Phase::Draining {
            revocation: revocation.clone(),
            stopping,
        };
        revocation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAIN: Duration = Duration::from_secs(5);

    #[test]
    fn assign_starts_only_new_partitions() {
        let mut m = Membership::new(DRAIN);
        assert_eq!(m.assign(&[2, 0, 1]), [2, 0, 1]);
        assert_eq!(m.assign(&[1, 3]), [3], "cooperative: incremental");
        assert_eq!(m.owned(), [0, 1, 2, 3]);
        assert!(m.accepts(3) && !m.accepts(4));
    }

    #[test]
    fn revoke_drains_with_a_deadline_then_commits() {
        let mut m = Membership::new(DRAIN);
        m.assign(&[0, 1, 2]);
        let now = Instant::now();
        let r = m.revoke(&[2, 1, 7], now);
        assert_eq!(r.partitions, [1, 2], "only owned partitions, sorted");
        assert!(r.commit);
        assert_eq!(r.deadline, now + DRAIN);
        assert!(m.accepts(0), "untouched partitions keep flowing");
        assert!(
            !m.accepts(1) && !m.accepts(2),
            "draining partitions take nothing new"
        );
        assert_eq!(m.phase().name(), "draining");
        m.drained();
        assert_eq!(*m.phase(), Phase::Consuming);
        assert_eq!(m.phase().name(), "consuming");
        assert_eq!(m.owned(), [0]);
    }

    #[test]
    fn eager_revoke_all_then_reassign() {
        let mut m = Membership::new(DRAIN);
        m.assign(&[0, 1]);
        m.revoke(&[0, 1], Instant::now());
        m.drained();
        assert!(m.owned().is_empty());
        assert_eq!(m.assign(&[1, 2]), [1, 2]);
    }

    #[test]
    fn lost_partitions_are_not_committed() {
        let mut m = Membership::new(DRAIN);
        m.assign(&[0, 1]);
        let r = m.lose(&[0, 1], Instant::now());
        assert!(!r.commit);
        m.drained();
        assert!(m.owned().is_empty());
    }

    #[test]
    fn shutdown_drains_everything_commits_and_stops() {
        let mut m = Membership::new(DRAIN);
        m.assign(&[3, 1]);
        let r = m.shutdown(Instant::now());
        assert_eq!(r.partitions, [1, 3]);
        assert!(r.commit);
        assert!(m.assign(&[5]).is_empty(), "no new work while stopping");
        m.drained();
        assert_eq!(*m.phase(), Phase::Stopped);
        assert!(!m.accepts(1));
        assert!(m.assign(&[5]).is_empty());
        // close() revokes again after the stop: nothing left to give up.
        assert!(m.revoke(&[1, 3], Instant::now()).partitions.is_empty());
        m.drained();
        assert_eq!(*m.phase(), Phase::Stopped);
    }
}
