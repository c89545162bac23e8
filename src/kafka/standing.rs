//! Whether this replica should be in the consumer group at all: only while it can do the work.
//!
//! Kafka sees a replica that reaches the brokers as a healthy member and leaves its partitions
//! with it, even when the replica cannot reach PostgreSQL (a network policy, a failed proxy,
//! the server full): those partitions would wait while other replicas sit idle. So the replica
//! probes the database: a round trip on a connection of the probe's own (is the server there
//! for us?), then a connection from the replica's pool (can the work get one?). A pool with no
//! free connection for the probe's timeout counts as a failure only if no batch committed
//! meanwhile: busy is not stuck. Once the probe has failed for `database.step_out_after_ms`,
//! the replica steps out of the group (its partitions drain, their offsets are committed, it
//! leaves) and keeps probing; two probes in a row that succeed bring it back in. This module is the decision,
//! free of I/O; [`probe_until`] runs the probe and the poll thread carries the changes out
//! ([`super::consumer`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::config::database::{PROBE_INTERVAL, PROBE_TIMEOUT};
use crate::http::Health;
use crate::stats::Stats;
use crate::store::Pool;

/// What the poll thread is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Leave the group (drain and commit first): the database has not answered since
    /// `reason` began to hold.
    StepOut { reason: String },
    /// Join the group again: the database answers.
    StepIn,
}

/// Probes in a row that must succeed before a replica that stepped out steps back in: one
/// answer after a long silence may be a blip.
const ANSWERS_TO_STEP_IN: u32 = 2;

/// The decision: in the group, or out of it, from the probes' results.
#[derive(Debug)]
pub struct Standing {
    bound: Duration,
    /// Since when the probe has failed, and why it last did.
    failing: Option<(Instant, String)>,
    out: bool,
    /// Probes in a row that succeeded.
    answers: u32,
}

impl Standing {
    pub fn new(bound: Duration) -> Self {
        Standing {
            bound,
            failing: None,
            out: false,
            answers: 0,
        }
    }

    /// The result of a probe that started at `started` and ended at `now`: `Err` with why it
    /// failed. The database has been failing since the first failed probe started. Returns the
    /// change to carry out.
    pub fn probed(
        &mut self,
        result: Result<(), String>,
        started: Instant,
        now: Instant,
    ) -> Option<Change> {
        match result {
            Ok(()) => {
                self.failing = None;
                self.answers += 1;
                if self.out && self.answers >= ANSWERS_TO_STEP_IN {
                    self.out = false;
                    return Some(Change::StepIn);
                }
                None
            }
            Err(why) => {
                self.answers = 0;
                let since = match &self.failing {
                    Some((since, _)) => *since,
                    None => started,
                };
                self.failing = Some((since, why.clone()));
                if self.out || now.duration_since(since) < self.bound {
                    return None;
                }
                self.out = true;
                Some(Change::StepOut {
                    reason: format!(
                        "the database has not answered for {} s: {why}",
                        now.duration_since(since).as_secs()
                    ),
                })
            }
        }
    }
}

/// What a probe needs: the probe's own connection (made again when lost), the replica's pool,
/// and its counters (a batch committed is progress).
struct Prober {
    settings: DatabaseSettings,
    own: Option<tokio_postgres::Client>,
    pool: Pool,
    stats: Arc<Stats>,
    batches: u64,
}

impl Prober {
    /// One probe, each step within [`PROBE_TIMEOUT`].
    async fn probe(&mut self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.round_trip()).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                self.own = None;
                return Err(why);
            }
            Err(_) => {
                self.own = None;
                return Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs()));
            }
        }
        let before = std::mem::replace(&mut self.batches, self.stats.snapshot().batches);
        let checkout = tokio::time::timeout(PROBE_TIMEOUT, self.pool.get()).await;
        // Every connection busy is fine while batches commit.
        let progressed = self.stats.snapshot().batches > before;
        match checkout {
            Ok(Ok(_)) => Ok(()),
            _ if progressed => Ok(()),
            Ok(Err(e)) => Err(format!("no connection from the pool: {e}")),
            Err(_) => Err(format!(
                "no connection of the pool free for {} s, and no batch committed",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// A round trip on the probe's own connection, made first if needed.
    async fn round_trip(&mut self) -> Result<(), String> {
        let client = match self.own.take() {
            Some(client) if !client.is_closed() => client,
            _ => crate::store::connect_bounded(&self.settings)
                .await
                .map_err(|e| crate::logs::chain(&e))?,
        };
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        self.own = Some(client);
        Ok(())
    }
}

/// Probes every [`PROBE_INTERVAL`] until `stop`, keeping `/readyz` honest about the database
/// and sending each change of standing to the poll thread.
pub async fn probe_until(
    settings: DatabaseSettings,
    pool: Pool,
    stats: Arc<Stats>,
    health: Arc<Health>,
    changes: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
) {
    let mut standing = Standing::new(Duration::from_millis(settings.step_out_after_ms));
    let mut prober = Prober {
        settings,
        own: None,
        pool,
        stats,
        batches: 0,
    };
    // A probe that took its whole timeout is followed by the next one at once.
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = prober.probe() => result,
        };
        health.database_reachable(result.as_ref().err().cloned());
        if let Some(change) = standing.probed(result, started, Instant::now()) {
            let _ = changes.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe that starts at `s` seconds and ends 1 s later.
    fn probe(
        standing: &mut Standing,
        t0: Instant,
        s: u64,
        result: Result<(), &str>,
    ) -> Option<Change> {
        let at = |s: u64| t0 + Duration::from_secs(s);
        standing.probed(result.map_err(str::to_owned), at(s), at(s + 1))
    }

    #[test]
    fn steps_out_once_the_probe_has_failed_for_the_bound_and_in_at_the_first_answer() {
        let t0 = Instant::now();
        let mut s = Standing::new(Duration::from_secs(20));
        assert_eq!(probe(&mut s, t0, 0, Ok(())), None);
        assert_eq!(probe(&mut s, t0, 2, Err("timeout")), None);
        assert_eq!(
            probe(&mut s, t0, 20, Err("timeout")),
            None,
            "19 s since the first"
        );
        match probe(&mut s, t0, 21, Err("refused")) {
            Some(Change::StepOut { reason }) => {
                assert!(
                    reason.contains("20 s") && reason.contains("refused"),
                    "{reason}"
                )
            }
            other => panic!("expected a step out, got {other:?}"),
        }
        assert_eq!(probe(&mut s, t0, 40, Err("timeout")), None, "once");
        assert_eq!(
            probe(&mut s, t0, 42, Ok(())),
            None,
            "one answer may be a blip"
        );
        assert_eq!(probe(&mut s, t0, 43, Err("timeout")), None);
        assert_eq!(probe(&mut s, t0, 45, Ok(())), None);
        assert_eq!(
            probe(&mut s, t0, 47, Ok(())),
            Some(Change::StepIn),
            "two in a row"
        );
        assert_eq!(probe(&mut s, t0, 49, Ok(())), None, "once");
    }

    #[test]
    fn a_success_in_between_starts_the_count_again() {
        let t0 = Instant::now();
        let mut s = Standing::new(Duration::from_secs(20));
        assert_eq!(probe(&mut s, t0, 0, Err("x")), None);
        assert_eq!(probe(&mut s, t0, 15, Ok(())), None);
        assert_eq!(probe(&mut s, t0, 16, Err("x")), None);
        assert_eq!(
            probe(&mut s, t0, 30, Err("x")),
            None,
            "15 s since it failed again"
        );
        assert!(probe(&mut s, t0, 36, Err("x")).is_some());
    }
}
