//! The consumer group under rebalances, for both group protocols: replicas joining, leaving
//! gracefully, being killed, and rolling restarts. 12 partitions, 100,000 events over 10,000
//! SKUs with 5% re-sent duplicates, produced at a fixed rate while the group changes.
//!
//! Graceful changes must cause zero redeliveries: the duplicates skipped by all replicas add
//! up to exactly the duplicates the producer injected. A crash may cause redeliveries, which
//! are counted and reported; loss and double effect are never allowed.

use std::time::Duration;

use crate::support::{
    BackgroundProduce, Replica, TestEnv, assert_exclusive_ownership, assert_nothing_applied_twice,
    wait_until,
};
use inventory_consumer::stats::StatsSnapshot;
use inventory_consumer::workload::Expectation;

const SETTLE: Duration = Duration::from_secs(240);
const EXIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// Classic protocol, cooperative-sticky assignment. On the mock cluster every classic
    /// rebalance round waits about `session.timeout.ms` minus one second, so the session is
    /// kept at the broker's minimum (6 s) and the drain below it.
    Cooperative,
    /// KIP-848 (`group.protocol=consumer`).
    Consumer,
    /// Classic protocol, eager `range` assignment: every rebalance revokes everything. The
    /// mock cluster refuses commits made while another member triggered the rebalance (real
    /// Kafka accepts them); the offsets recorded in the database make that harmless, so no
    /// tolerance is needed here either.
    Eager,
}

impl Protocol {
    fn settings(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Protocol::Cooperative => vec![
                ("kafka.group_protocol", "classic"),
                ("kafka.assignment_strategy", "cooperative-sticky"),
                ("kafka.properties.session.timeout.ms", "6000"),
                ("kafka.properties.heartbeat.interval.ms", "1000"),
                ("processing.drain_timeout_ms", "4000"),
            ],
            Protocol::Consumer => vec![("kafka.group_protocol", "consumer")],
            Protocol::Eager => vec![
                ("kafka.group_protocol", "classic"),
                ("kafka.assignment_strategy", "range"),
                ("kafka.properties.session.timeout.ms", "6000"),
                ("kafka.properties.heartbeat.interval.ms", "1000"),
                ("processing.drain_timeout_ms", "4000"),
            ],
        }
    }
}

struct Scenario {
    /// Every replica started, running or not: the ownership check needs all their logs.
    /// (Declared before `env`, so that they drop while their log files still exist.)
    replicas: Vec<Replica>,
    env: TestEnv,
    protocol: Protocol,
    running: Vec<usize>,
    /// Counters of the replicas that exited gracefully.
    stats: StatsSnapshot,
}

impl Scenario {
    async fn new(protocol: Protocol) -> Scenario {
        Self::in_env(TestEnv::new(12).await, protocol)
    }

    /// On nisshi instead of the mock cluster; `None` when nisshi is not installed.
    async fn on_nisshi(protocol: Protocol) -> Option<Scenario> {
        Some(Self::in_env(TestEnv::on_nisshi(12).await?, protocol))
    }

    fn in_env(env: TestEnv, protocol: Protocol) -> Scenario {
        Scenario {
            env,
            protocol,
            replicas: Vec::new(),
            running: Vec::new(),
            stats: StatsSnapshot::default(),
        }
    }

    /// Starts a replica; returns its index.
    fn start(&mut self) -> usize {
        let name = format!("r{}", self.replicas.len() + 1);
        self.replicas
            .push(self.env.replica(&name, &self.protocol.settings()));
        self.running.push(self.replicas.len() - 1);
        self.replicas.len() - 1
    }

    /// Waits until every running replica owns partitions and together they own all 12.
    async fn wait_balanced(&self) {
        wait_until("the group to balance", SETTLE, || async {
            let owned: Vec<Vec<i32>> = self
                .running
                .iter()
                .map(|&i| self.replicas[i].owned())
                .collect();
            owned.iter().all(|o| !o.is_empty()) && owned.iter().map(Vec::len).sum::<usize>() == 12
        })
        .await;
    }

    async fn wait_settled(&self, at_least: i64) {
        wait_until(
            &format!("{at_least} messages to settle"),
            SETTLE,
            || async { self.env.db.settled().await >= at_least },
        )
        .await;
    }

    /// SIGTERM: the replica must drain, commit, leave and exit 0.
    fn stop(&mut self, i: usize) {
        self.running.retain(|&r| r != i);
        let replica = &mut self.replicas[i];
        let (status, stats) = replica.terminate(EXIT);
        assert!(status.success(), "{} exited with {status}", replica.name());
        self.stats = self.stats + stats;
    }

    /// SIGKILL: no drain, no commit, no counters.
    fn kill(&mut self, i: usize) {
        self.running.retain(|&r| r != i);
        self.replicas[i].kill();
    }

    fn stop_all(&mut self) {
        for i in self.running.clone() {
            self.stop(i);
        }
    }

    fn produce(&self) -> BackgroundProduce {
        self.env.produce_in_background(&[
            "--events",
            "100000",
            "--skus",
            "10000",
            "--duplicates",
            "0.05",
            "--seed",
            "2026",
            "--rate",
            "4000",
        ])
    }

    /// Duplicates skipped according to every replica's batch log, killed ones included.
    fn logged_duplicates(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| r.log_summary().duplicates)
            .sum()
    }

    /// Waits until everything is settled and committed, stops the replicas, and checks the
    /// database against the oracle and the ownership intervals.
    async fn finish(&mut self, expected: &Expectation) {
        self.env
            .wait_processed(expected.events as i64, SETTLE)
            .await;
        self.stop_all();
        let replicas: Vec<&Replica> = self.replicas.iter().collect();
        assert_exclusive_ownership(&replicas);
        assert_nothing_applied_twice(&replicas);
        assert_eq!(
            self.env
                .db
                .scalar("SELECT count(*) FROM processed_events")
                .await,
            expected.events as i64,
            "one outcome per distinct event"
        );
        assert_eq!(
            self.env.db.stock().await,
            expected.stock,
            "stock equals the oracle"
        );
        let (ok, report) = self.env.verify(Some(expected));
        assert!(ok, "verify failed:\n{report}");
    }
}

/// Start 1 replica, add 2 during the run, then stop 2 with SIGTERM: zero redeliveries.
async fn scale_out_and_in(mut s: Scenario) {
    s.start();
    s.wait_balanced().await;
    let producer = s.produce();
    s.wait_settled(10_000).await;
    let second = s.start();
    let third = s.start();
    s.wait_balanced().await;
    s.wait_settled(40_000).await;
    s.stop(second);
    s.wait_balanced().await;
    s.wait_settled(60_000).await;
    s.stop(third);
    s.wait_balanced().await;
    let expected = producer.finish();
    s.finish(&expected).await;
    assert_eq!(
        s.stats.duplicates, expected.duplicates,
        "graceful rebalances redeliver nothing: skipped duplicates equal injected ones"
    );
    assert_eq!(s.logged_duplicates(), expected.duplicates);
    assert!(s.stats.partitions_revoked >= 12, "{:?}", s.stats);
}

/// SIGKILL one of 3 replicas mid-run and start a new one: no loss, no double effect;
/// redeliveries are allowed and counted.
async fn crash_and_replace(mut s: Scenario) {
    for _ in 0..3 {
        s.start();
    }
    s.wait_balanced().await;
    let producer = s.produce();
    s.wait_settled(30_000).await;
    let victim = s.running[1];
    s.kill(victim);
    s.start();
    s.wait_balanced().await;
    let expected = producer.finish();
    s.finish(&expected).await;
    // Counted from the logs, because the killed replica prints no counters; it may also have
    // died between a commit and that batch's log line, so this is a report, not an exact sum.
    let skipped = s.logged_duplicates();
    println!(
        "{:?} crash: {} duplicates injected, {skipped} skipped per the replicas' logs, \
         about {} redelivered",
        s.protocol,
        expected.duplicates,
        skipped.saturating_sub(expected.duplicates)
    );
}

/// Replace each of 3 replicas in turn (SIGTERM, then a new one): zero redeliveries.
async fn rolling_restart(mut s: Scenario) {
    for _ in 0..3 {
        s.start();
    }
    s.wait_balanced().await;
    let producer = s.produce();
    for step in 1..=3 {
        s.wait_settled(step * 20_000).await;
        let oldest = s.running[0];
        s.stop(oldest);
        s.start();
        s.wait_balanced().await;
    }
    let expected = producer.finish();
    s.finish(&expected).await;
    assert_eq!(
        s.stats.duplicates, expected.duplicates,
        "a rolling restart redelivers nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cooperative_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Scenario::new(Protocol::Cooperative).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_protocol_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Scenario::new(Protocol::Consumer).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cooperative_crash_loses_nothing() {
    crash_and_replace(Scenario::new(Protocol::Cooperative).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_protocol_crash_loses_nothing() {
    crash_and_replace(Scenario::new(Protocol::Consumer).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cooperative_rolling_restart_redelivers_nothing() {
    rolling_restart(Scenario::new(Protocol::Cooperative).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_protocol_rolling_restart_redelivers_nothing() {
    rolling_restart(Scenario::new(Protocol::Consumer).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eager_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Scenario::new(Protocol::Eager).await).await;
}

// The same scenarios on nisshi, an independently written broker (classic protocol only): what
// passes here does not rest on the mock cluster's behaviour. Skipped, with a message, where
// nisshi is not installed; CI installs it.

#[tokio::test(flavor = "multi_thread")]
async fn nisshi_cooperative_scale_out_and_in_redelivers_nothing() {
    if let Some(s) = Scenario::on_nisshi(Protocol::Cooperative).await {
        scale_out_and_in(s).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nisshi_cooperative_crash_loses_nothing() {
    if let Some(s) = Scenario::on_nisshi(Protocol::Cooperative).await {
        crash_and_replace(s).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nisshi_cooperative_rolling_restart_redelivers_nothing() {
    if let Some(s) = Scenario::on_nisshi(Protocol::Cooperative).await {
        rolling_restart(s).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nisshi_eager_scale_out_and_in_redelivers_nothing() {
    if let Some(s) = Scenario::on_nisshi(Protocol::Eager).await {
        scale_out_and_in(s).await;
    }
}
