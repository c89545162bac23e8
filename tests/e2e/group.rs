//! The consumer group under rebalances, on Apache Kafka itself, for every protocol the product
//! supports: replicas joining, leaving gracefully, being killed, rolling restarts, and a replica
//! frozen past its session (a zombie). 12 partitions, 60,000 events over 6,000 SKUs with 5%
//! re-sent duplicates, produced at a fixed rate while the group changes.
//!
//! Each scenario ends with the database equal to the tests' own reference model of what is in
//! the topic (`oracle.rs`), one outcome per event, no partition owned by two replicas at once,
//! and no offset committed in two batches. Graceful changes must cause zero redeliveries: the
//! duplicates skipped by all replicas add up to exactly the duplicates in the topic. A crash
//! may cause redeliveries, which are counted and reported; loss and double effect never.

use std::time::{Duration, Instant};

use crate::oracle::{Truth, assert_database_matches, truth_of};
use crate::support::{
    BackgroundProduce, Replica, TestEnv, assert_exclusive_ownership, assert_nothing_applied_twice,
    wait_until,
};
use crate::support::{EXIT, SETTLE_GROUP};
use inventory_consumer::domain::lock_key;
use inventory_consumer::stats::StatsSnapshot;
use inventory_devtools::embedded::wait;
use inventory_devtools::workload::Generator;

const EVENTS: i64 = 60_000;
const SKUS: u64 = 6_000;

#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// Classic protocol, cooperative-sticky assignment, the broker's minimum session (6 s) so
    /// that a frozen member is expelled quickly; the drain's default follows it.
    Cooperative,
    /// Classic protocol, eager `range` assignment: every rebalance revokes everything; the
    /// combiner waits 1 ms for more batches (`processing.combine_gather_us`).
    Eager,
    /// KIP-848 (`group.protocol=consumer`): the broker's own assignor; the session (6 s) is set
    /// on the broker.
    Consumer,
    /// `Cooperative`, each batch in a transaction of its own (`processing.combine_partitions`
    /// off; the others combine a replica's waiting batches).
    CooperativeAlone,
}

impl Protocol {
    fn settings(self) -> Vec<(&'static str, &'static str)> {
        // librdkafka's group debug log in every replica's log, so that a scenario that fails
        // has the client's own account of each rebalance on record (`membership_report`).
        let debug = [
            ("kafka.properties.debug", "cgrp"),
            (
                "log.level",
                "info,inventory_consumer=debug,librdkafka=debug",
            ),
        ];
        let mut settings = self.protocol_settings();
        settings.extend(debug);
        settings
    }

    fn protocol_settings(self) -> Vec<(&'static str, &'static str)> {
        let classic = |strategy| {
            vec![
                ("kafka.group_protocol", "classic"),
                ("kafka.assignment_strategy", strategy),
                ("kafka.properties.session.timeout.ms", "6000"),
                ("kafka.properties.heartbeat.interval.ms", "1000"),
                // No drain timeout: its default follows the session (4 s here).
            ]
        };
        match self {
            Protocol::Cooperative => classic("cooperative-sticky"),
            Protocol::CooperativeAlone => {
                let mut settings = classic("cooperative-sticky");
                settings.push(("processing.combine_partitions", "false"));
                settings
            }
            Protocol::Eager => {
                // And a combiner that waits a millisecond for more batches (it must still
                // combine, and keep every guarantee through the rebalances).
                let mut settings = classic("range");
                settings.push(("processing.combine_gather_us", "1000"));
                settings
            }
            Protocol::Consumer => vec![
                ("kafka.group_protocol", "consumer"),
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
    name: &'static str,
    running: Vec<usize>,
    extra: Vec<(&'static str, &'static str)>,
    /// A member was frozen past its session: it believed it owned its partitions after the
    /// group gave them away (it cannot know while frozen), so ownership as the replicas saw it
    /// overlaps by design; what must not overlap is commits, which the fence prevents and
    /// [`assert_nothing_applied_twice`] checks.
    frozen_member: bool,
    /// Counters of the replicas that exited gracefully: each one's, and their sum.
    exits: std::collections::BTreeMap<usize, StatsSnapshot>,
    stats: StatsSnapshot,
    /// How long each change of membership took until the group was balanced again.
    rebalances: Vec<Duration>,
}

impl Scenario {
    async fn new(protocol: Protocol, name: &'static str) -> Scenario {
        Scenario {
            env: TestEnv::on_apache(12, 1).await,
            protocol,
            name,
            replicas: Vec::new(),
            running: Vec::new(),
            extra: Vec::new(),
            frozen_member: false,
            exits: Default::default(),
            stats: StatsSnapshot::default(),
            rebalances: Vec::new(),
        }
    }

    /// Starts a replica; returns its index.
    fn start(&mut self) -> usize {
        let name = format!("r{}", self.replicas.len() + 1);
        let mut settings = self.protocol.settings();
        settings.extend(self.extra.iter().copied());
        self.replicas.push(self.env.replica(&name, &settings));
        self.running.push(self.replicas.len() - 1);
        self.replicas.len() - 1
    }

    /// Waits until every running replica owns partitions and together they own all 12, and
    /// records how long that took from `since`.
    async fn wait_balanced(&mut self, since: Instant) {
        let balanced = wait::wait_until("the group to balance", SETTLE_GROUP, || async {
            let owned: Vec<Vec<i32>> = self
                .running
                .iter()
                .map(|&i| self.replicas[i].owned())
                .collect();
            owned.iter().all(|o| !o.is_empty()) && owned.iter().map(Vec::len).sum::<usize>() == 12
        })
        .await;
        if let Err(e) = balanced {
            panic!("{e}\n{}", self.membership_report());
        }
        self.rebalances.push(since.elapsed());
    }

    /// What each running replica last said about its membership, and its warnings: first in
    /// a failure's output, where a CI log's excerpt still shows it.
    fn membership_report(&self) -> String {
        let mut report = String::new();
        for &i in &self.running {
            let replica = &self.replicas[i];
            report.push_str(&format!(
                "{} (running: {}) owns {:?}:\n",
                replica.name(),
                replica.is_running(),
                replica.owned()
            ));
            let log = replica.log();
            let telling: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("\"partitions_")
                        || l.contains("\"level\":\"WARN\"")
                        || l.contains("\"level\":\"ERROR\"")
                })
                .collect();
            for line in &telling[telling.len().saturating_sub(8)..] {
                report.push_str(&format!("  {}\n", &line[..line.len().min(300)]));
            }
            let group_log: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("\"librdkafka\""))
                .collect();
            report.push_str(&format!(
                "  librdkafka's group log (debug=cgrp), last {} of {} lines:\n",
                group_log.len().min(60),
                group_log.len()
            ));
            for line in &group_log[group_log.len().saturating_sub(60)..] {
                report.push_str(&format!("    {}\n", &line[..line.len().min(400)]));
            }
        }
        report
    }

    async fn wait_settled(&self, at_least: i64) {
        wait_until(
            &format!("{at_least} messages to settle"),
            SETTLE_GROUP,
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
        self.exits.insert(i, stats);
    }

    /// SIGKILL: no drain, no commit, no counters.
    fn kill(&mut self, i: usize) {
        self.running.retain(|&r| r != i);
        self.replicas[i].kill();
    }

    fn produce(&self) -> BackgroundProduce {
        self.env.produce_in_background(&[
            "--events",
            &EVENTS.to_string(),
            "--skus",
            &SKUS.to_string(),
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

    /// Waits until the producer is done and everything is settled and committed, stops the
    /// replicas, and checks the database against the reference model and the logs against
    /// each other. Returns the model's answer.
    async fn finish(&mut self, producer: BackgroundProduce) -> Truth {
        let expected = producer.finish();
        self.env
            .wait_processed(expected.events as i64, SETTLE_GROUP)
            .await;
        for i in self.running.clone() {
            self.stop(i);
        }
        let replicas: Vec<&Replica> = self.replicas.iter().collect();
        if !self.frozen_member {
            assert_exclusive_ownership(&replicas);
        }
        assert_nothing_applied_twice(&replicas);
        let combined = replicas
            .iter()
            .flat_map(|r| r.events("batch_committed"))
            .filter(|e| e["transaction_partitions"].as_u64().is_some_and(|n| n > 1))
            .count();
        match self.protocol {
            Protocol::CooperativeAlone => assert_eq!(combined, 0),
            _ => assert!(combined > 0, "no batch shared a transaction with another"),
        }
        let truth = truth_of(&self.env);
        assert_database_matches(&self.env.db, &truth).await;
        assert_eq!(
            truth.duplicates, expected.duplicates,
            "the topic holds the duplicates the producer says it sent"
        );
        let (ok, report) = self.env.verify(Some(&expected));
        assert!(ok, "verify failed:\n{report}");
        truth
    }

    fn report(&self, truth: &Truth, skipped: u64) {
        let rebalances: Vec<String> = self
            .rebalances
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect();
        println!(
            "apache {:?} {}: {} messages, {} events; {} duplicates in the topic, {skipped} \
             skipped, {} redelivered; {} partitions revoked, {} lost; balanced after [{}]",
            self.protocol,
            self.name,
            truth.messages,
            truth.events,
            truth.duplicates,
            skipped.saturating_sub(truth.duplicates),
            self.stats.partitions_revoked,
            self.stats.partitions_lost,
            rebalances.join(", ")
        );
    }
}

/// Start 1 replica, add 2 during the run, then stop 2 with SIGTERM: zero redeliveries.
async fn scale_out_and_in(protocol: Protocol) {
    let mut s = Scenario::new(protocol, "scale 1-3-1").await;
    let t = Instant::now();
    s.start();
    s.wait_balanced(t).await;
    let producer = s.produce();
    s.wait_settled(EVENTS / 6).await;
    let t = Instant::now();
    let second = s.start();
    let third = s.start();
    s.wait_balanced(t).await;
    s.wait_settled(EVENTS / 2).await;
    let t = Instant::now();
    s.stop(second);
    s.wait_balanced(t).await;
    s.wait_settled(EVENTS * 2 / 3).await;
    let t = Instant::now();
    s.stop(third);
    s.wait_balanced(t).await;
    let truth = s.finish(producer).await;
    s.report(&truth, s.stats.duplicates);
    assert_eq!(
        s.stats.duplicates, truth.duplicates,
        "graceful rebalances redeliver nothing: skipped duplicates equal those in the topic"
    );
    assert_eq!(s.logged_duplicates(), truth.duplicates);
    assert!(s.stats.partitions_revoked >= 12, "{:?}", s.stats);
}

/// SIGKILL one of 3 replicas mid-run and start a new one: no loss, no double effect;
/// redeliveries are allowed and counted.
async fn crash_and_replace(protocol: Protocol) {
    let mut s = Scenario::new(protocol, "SIGKILL and replace").await;
    let t = Instant::now();
    for _ in 0..3 {
        s.start();
    }
    s.wait_balanced(t).await;
    let producer = s.produce();
    s.wait_settled(EVENTS / 3).await;
    let t = Instant::now();
    let victim = s.running[1];
    s.kill(victim);
    s.start();
    s.wait_balanced(t).await;
    let truth = s.finish(producer).await;
    // Counted from the logs, because the killed replica prints no counters; it may also have
    // died between a commit and that batch's log line, so this is a report, not an exact sum.
    s.report(&truth, s.logged_duplicates());
    assert!(
        s.replicas[victim].log_summary().batches > 0,
        "the victim had done work before it was killed"
    );
}

/// Replace each of 3 replicas in turn (SIGTERM, then a new one): zero redeliveries.
async fn rolling_restart(protocol: Protocol) {
    let mut s = Scenario::new(protocol, "rolling restart").await;
    let t = Instant::now();
    for _ in 0..3 {
        s.start();
    }
    s.wait_balanced(t).await;
    let producer = s.produce();
    for step in 1..=3 {
        s.wait_settled(step * EVENTS / 4).await;
        let t = Instant::now();
        let oldest = s.running[0];
        s.stop(oldest);
        s.start();
        s.wait_balanced(t).await;
    }
    let truth = s.finish(producer).await;
    s.report(&truth, s.stats.duplicates);
    assert_eq!(
        s.stats.duplicates, truth.duplicates,
        "a rolling restart redelivers nothing"
    );
}

/// A replica frozen with SIGSTOP for longer than its session loses its partitions to the other
/// replica, which claims them in the database. When it wakes it still holds deliveries and
/// believes it owns the partitions: nothing it does commits after the new owner's claim.
/// Proven by the committed batches (no offset committed twice), the model, and its counters.
async fn zombie(protocol: Protocol) {
    let mut s = Scenario::new(protocol, "zombie (SIGSTOP past the session)").await;
    // A paused replica's open transaction is ended by the server after 3 s idle.
    s.extra = vec![("database.idle_in_transaction_timeout_ms", "3000")];
    let t = Instant::now();
    let zombie = s.start();
    let other = s.start();
    s.wait_balanced(t).await;
    let producer = s.produce();
    s.wait_settled(EVENTS / 6).await;

    // Catch the zombie mid-transaction: hold every SKU's advisory lock until both replicas'
    // connections wait on one (each inside a batch, holding its partition's row), pause the
    // zombie, then let go. Its transactions then sit idle until the server ends them.
    let blocker = s.env.db.client().await;
    let mut keys: Vec<i64> = (0..SKUS)
        .map(|i| lock_key(&Generator::sku_name(i)))
        .collect();
    keys.sort_unstable(); // the replicas' order: no deadlock with them
    keys.dedup();
    blocker
        .execute(
            "SELECT pg_advisory_lock(k) FROM unnest($1::bigint[]) AS t(k)",
            &[&keys],
        )
        .await
        .expect("taking every SKU's lock");
    wait_until(
        "both replicas to wait on the locks",
        SETTLE_GROUP,
        || async {
            s.env
                .db
                .scalar(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event = 'advisory' AND datname = current_database()",
                )
                .await
                >= 8
        },
    )
    .await;
    s.replicas[zombie].pause();
    s.frozen_member = true;
    let t = Instant::now();
    blocker
        .execute("SELECT pg_advisory_unlock_all()", &[])
        .await
        .expect("releasing the locks");
    wait_until(
        "the other replica to take every partition",
        SETTLE_GROUP,
        || async { s.replicas[other].owned().len() == 12 },
    )
    .await;
    s.rebalances.push(t.elapsed());
    let claimed_by_other = s
        .env
        .db
        .scalar(&format!(
            "SELECT count(*) FROM partition_owners WHERE owner LIKE '%-{}'",
            s.replicas[other].pid()
        ))
        .await;
    assert_eq!(
        claimed_by_other, 12,
        "the other replica claimed every partition"
    );
    s.replicas[zombie].resume();

    let truth = s.finish(producer).await;
    s.report(&truth, s.stats.duplicates);
    let zombie_stats = s.exits[&zombie];
    println!(
        "apache {protocol:?} zombie: {} partitions lost, {} batches fenced, {} abandoned",
        zombie_stats.partitions_lost, zombie_stats.fenced_batches, zombie_stats.abandoned_batches,
    );
    assert!(zombie_stats.partitions_lost > 0, "{zombie_stats:?}");
    // The batches caught by the pause (their sessions ended by the server) were retried into
    // the fence, or abandoned when the replica learned of the loss: none committed.
    assert!(
        zombie_stats.fenced_batches + zombie_stats.abandoned_batches > 0,
        "{zombie_stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Protocol::Cooperative).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_eager_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_consumer_protocol_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Protocol::Consumer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_crash_loses_nothing() {
    crash_and_replace(Protocol::Cooperative).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_eager_crash_loses_nothing() {
    crash_and_replace(Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_consumer_protocol_crash_loses_nothing() {
    crash_and_replace(Protocol::Consumer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_rolling_restart_redelivers_nothing() {
    rolling_restart(Protocol::Cooperative).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_eager_rolling_restart_redelivers_nothing() {
    rolling_restart(Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_consumer_protocol_rolling_restart_redelivers_nothing() {
    rolling_restart(Protocol::Consumer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_zombie_is_fenced() {
    zombie(Protocol::Cooperative).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_eager_zombie_is_fenced() {
    zombie(Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_consumer_protocol_zombie_is_fenced() {
    zombie(Protocol::Consumer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_alone_scale_out_and_in_redelivers_nothing() {
    scale_out_and_in(Protocol::CooperativeAlone).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_alone_crash_loses_nothing() {
    crash_and_replace(Protocol::CooperativeAlone).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_alone_zombie_is_fenced() {
    zombie(Protocol::CooperativeAlone).await;
}
