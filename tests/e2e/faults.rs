//! Faults injected into real processes: the database killing sessions and restarting, bad
//! input, broker faults typed into the embedded broker, and Apache Kafka nodes killed with
//! SIGKILL (one node, and a three-node cluster). Each scenario ends with `verify` against the
//! oracle and prints what was injected and what the replicas counted. (The zombie, a replica
//! frozen past its session, is a group scenario in `group.rs`.)

use std::time::Duration;

use serde_json::json;

use crate::oracle::{Truth, assert_database_matches, truth_of};
use crate::support::{
    BackgroundProduce, GROUP, Replica, TOPIC, TestEnv, assert_nothing_applied_twice, http_get,
    metric, terminate_all, wait_until,
};
use crate::support::{EXIT, SETTLE_GROUP};
use inventory_consumer::stats::StatsSnapshot;
use inventory_devtools::embedded::apache::ApacheKafka;

/// More than 10,000 bad messages of every kind (invalid UTF-8 and JSON, wrong types, missing
/// fields, out-of-range and overflowing quantities, too many lines, over-long and non-ASCII
/// SKUs, SQL in SKUs, 2 MiB values, no key, reused ids with other bodies) mixed into a valid
/// workload, consumed by 2 replicas: every one is dead-lettered with a reason, the valid events
/// end exactly as the oracle says, and both replicas keep going and exit cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_dead_lettered_and_valid_events_are_unaffected() {
    let env = TestEnv::new(12).await;
    let mut replicas = [env.replica("r1", &[]), env.replica("r2", &[])];
    let expected = env.produce(&[
        "--events",
        "40000",
        "--skus",
        "2000",
        "--duplicates",
        "0.02",
        "--invalid",
        "0.27",
        "--seed",
        "1303",
        "--rate",
        "20000",
    ]);
    assert!(expected.dead_letters >= 10_000, "{expected:?}");
    env.wait_processed(
        (expected.events + expected.dead_letters) as i64,
        SETTLE_GROUP,
    )
    .await;
    let total = terminate_all(&mut replicas, EXIT);
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    assert_eq!(total.dead_letters, expected.dead_letters);

    let db = &env.db;
    assert_eq!(
        db.scalar("SELECT count(*) FROM dead_letters").await,
        expected.dead_letters as i64
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM dead_letters WHERE error = '' OR detail = ''")
            .await,
        0,
        "every dead letter has a reason"
    );
    assert!(
        db.scalar("SELECT count(*) FROM dead_letters WHERE key IS NULL")
            .await
            > 0,
        "messages without a key are kept too"
    );
    assert!(
        db.scalar("SELECT count(*) FROM dead_letters WHERE length(payload) > 2 * 1024 * 1024")
            .await
            > 0,
        "a 2 MiB value is kept whole"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM products WHERE sku !~ '^[A-Za-z0-9._/-]{1,64}$'")
            .await,
        0,
        "no SKU outside the contract's alphabet got in (SQL in SKUs stayed inert)"
    );
    let reasons = db
        .client()
        .await
        .query(
            "SELECT error, count(*) FROM dead_letters GROUP BY error ORDER BY count(*) DESC",
            &[],
        )
        .await
        .expect("dead letters by reason");
    let reasons: Vec<(String, i64)> = reasons.iter().map(|r| (r.get(0), r.get(1))).collect();
    println!(
        "hostile input: {} bad messages injected among {} events; dead letters by reason: {reasons:?}; \
         {} duplicates skipped of {} injected; {} retries",
        expected.dead_letters,
        expected.events,
        total.duplicates,
        expected.duplicates,
        total.retries
    );
    assert!(
        reasons.len() >= 10,
        "every kind of bad input has its reason: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|(e, _)| e == "event_id_conflict"),
        "{reasons:?}"
    );
}

/// While 3 replicas work through a workload, the database kills their sessions again and
/// again (`pg_terminate_backend`), then the server restarts once. The replicas retry with
/// capped backoff, keep their partitions, and the database ends as the oracle says.
#[tokio::test(flavor = "multi_thread")]
async fn database_faults_are_retried_without_loss_or_double_effect() {
    let mut env = TestEnv::new(12).await;
    let settings = [("processing.retry_backoff_max_ms", "1000")];
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| env.replica(&format!("r{i}"), &settings))
        .collect();
    wait_until("the group to form", SETTLE_GROUP, || async {
        replicas.iter().all(|r| !r.owned().is_empty())
    })
    .await;
    let producer = env.produce_in_background(&[
        "--events",
        "60000",
        "--skus",
        "5000",
        "--duplicates",
        "0.05",
        "--invalid",
        "0.01",
        "--seed",
        "99",
        "--rate",
        "4000",
    ]);
    wait_until("5,000 messages to settle", SETTLE_GROUP, || async {
        env.db.settled().await >= 5_000
    })
    .await;

    let killer = env.db.client().await;
    let mut terminated = 0;
    // Sessions in a transaction or a statement: a batch is cut off midway (an idle pooled
    // connection killed is only replaced). Batches are short, so look often.
    for _ in 0..200 {
        // In the select list, so that only the rows the WHERE kept are terminated.
        let rows = killer
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'inventory-consumer' AND pid <> pg_backend_pid()
                   AND state <> 'idle'",
                &[],
            )
            .await
            .expect("terminating the replicas' sessions");
        terminated += rows.iter().filter(|r| r.get::<_, bool>(0)).count();
        if terminated >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(killer);
    let restarted = env.db.restart_server();

    let expected = producer.finish();
    env.wait_processed(
        (expected.events + expected.dead_letters) as i64,
        SETTLE_GROUP,
    )
    .await;
    let total = terminate_all(&mut replicas, EXIT);
    assert_nothing_applied_twice(&replicas.iter().collect::<Vec<_>>());
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    println!(
        "database faults: {terminated} sessions terminated mid-transaction, server restarted: \
         {restarted}; {} batch retries, {} partitions lost; {} duplicates skipped of {} \
         injected; {} dead letters",
        total.retries,
        total.partitions_lost,
        total.duplicates,
        expected.duplicates,
        total.dead_letters
    );
    assert!(terminated > 0, "no session was cut off mid-transaction");
    // A session cut off in a combined transaction costs no retry (its batches are applied
    // alone), so only the restart, which fails every connection, is sure to cause one.
    if restarted {
        assert!(total.retries > 0, "the restart was felt: {total:?}");
    } else {
        crate::support::skip_unless_ci("the server restart (a shared server is never restarted)");
    }
    assert_eq!(
        total.partitions_lost, 0,
        "database faults cost no partition"
    );
    assert_eq!(total.dead_letters, expected.dead_letters);
}

/// A database that stays away is fatal only after `processing.retry_deadline_ms`: the replica
/// then exits non-zero with a clear error, for the orchestrator to restart it, within the bound
/// of every exit.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_gone_for_good_is_fatal_after_the_retry_deadline() {
    let mut env = TestEnv::new(3).await;
    let mut replica = env.replica("r1", &[("processing.retry_deadline_ms", "3000")]);
    wait_until("the replica to own partitions", SETTLE_GROUP, || async {
        !replica.owned().is_empty()
    })
    .await;
    if !env.db.stop_server() {
        crate::support::skip_unless_ci(
            "tests do not stop a shared database server (TEST_DATABASE_URL)",
        );
        return;
    }
    env.produce(&["--events", "50", "--skus", "5", "--seed", "5"]);
    wait_until("the batch to be declared fatal", SETTLE_GROUP, || async {
        replica.log().contains("still failing after")
    })
    .await;
    // The fatal path ends the process like a shutdown does: within the drain timeout (10 s by
    // default) plus `run`'s 8 s stop margin, with the database still gone.
    let fatal_at = std::time::Instant::now();
    let (status, _) = replica.wait_exit(Duration::from_secs(60));
    let took = fatal_at.elapsed();
    assert!(!status.success(), "exit {status}");
    assert!(
        took <= Duration::from_secs(20),
        "exited {took:?} after the fatal failure"
    );
    let log = replica.log();
    assert!(
        log.contains("still failing after"),
        "the error says what happened: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
}

/// A producer that starts sending garbage: once more than half of a partition's last 100
/// messages are bad, the partition halts (paused, its offset at the message that crossed the
/// limit) instead of dead-lettering everything, and the replica stays up. After a restart with
/// the limit lifted, everything is processed and the database matches the oracle.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_of_mostly_bad_messages_halts_at_its_dead_letter_limit() {
    let env = TestEnv::new(3).await;
    let restock = |i: usize| json!({"event_id": format!("ok-{i}"), "type": "restock", "sku": format!("SKU-{}", i % 30), "quantity": 1});
    // Restocks only, so the result does not depend on order across random keys.
    let mut events: Vec<serde_json::Value> = (0..600).map(restock).collect();
    events.extend((0..900).map(|i| json!({"broken_producer": i})));
    events.extend((600..900).map(restock));
    let expected = env.produce_json(&events, true);
    assert_eq!(expected.dead_letters, 900);

    let limit = [
        ("processing.dead_letter_window", "100"),
        ("processing.dead_letter_max_share", "0.5"),
    ];
    let mut halting = env.replica("halting", &limit);
    wait_until("all 3 partitions to halt", SETTLE_GROUP, || async {
        halting.log_summary().batches > 0
            && halting.log().matches("dead-letter limit exceeded").count() == 3
    })
    .await;
    let dead_letters = env.db.scalar("SELECT count(*) FROM dead_letters").await;
    let addr = halting.http_addr().await;
    let (_, metrics) = http_get(&addr, "/metrics");
    let (status, stats) = halting.terminate(EXIT);
    assert!(
        status.success(),
        "a halted partition is no reason to exit: {status}"
    );
    assert_eq!(stats.partitions_halted, 3, "{stats:?}");
    assert_eq!(
        metric(&metrics, "inventory_partitions_halted_total", &[]),
        3.0
    );
    // Each partition took at most about 51 bad messages before halting, not its ~300.
    assert!(
        (3 * 40..=3 * 60).contains(&dead_letters),
        "{dead_letters} dead letters before the halt"
    );

    // The operator lifts the limit (the bad messages are known now) and restarts.
    let mut lifted = env.replica("lifted", &[("processing.dead_letter_max_share", "1")]);
    wait_until("everything to settle", SETTLE_GROUP, || async {
        env.db.settled().await >= (expected.events + expected.dead_letters) as i64
    })
    .await;
    let (status, _) = lifted.terminate(EXIT);
    assert!(status.success());
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    println!(
        "dead-letter limit: 900 bad messages among 900 valid; {dead_letters} dead-lettered \
         before 3 partitions halted; all {} after the limit was lifted",
        expected.dead_letters
    );
}

/// Broker faults from the mock cluster while 2 replicas work through a workload on 3 brokers:
/// high round-trip time, failing fetch and commit requests, a broker (the leader of a third of
/// the partitions) down for 5 s, the group coordinator down for 10 s. The replicas ride them
/// out; nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn broker_faults_are_ridden_out_without_loss_or_double_effect() {
    let mut env = TestEnv::with_brokers(12, 3).await;
    env.broker.inject("coordinator inventory-consumer-group 3");
    let mut replicas = [env.replica("r1", &[]), env.replica("r2", &[])];
    wait_until("the group to form", SETTLE_GROUP, || async {
        replicas.iter().all(|r| !r.owned().is_empty())
    })
    .await;
    let producer = env.produce_in_background(&[
        "--events",
        "50000",
        "--skus",
        "5000",
        "--duplicates",
        "0.05",
        "--seed",
        "31",
        "--rate",
        "2500",
    ]);
    wait_until("5,000 messages to settle", SETTLE_GROUP, || async {
        env.db.settled().await >= 5_000
    })
    .await;

    let pause = |seconds| tokio::time::sleep(Duration::from_secs(seconds));
    let mut injected = 0;
    let mut inject = |env: &mut TestEnv, command: &str| {
        env.broker.inject(command);
        injected += 1;
    };
    for broker in 1..=3 {
        inject(&mut env, &format!("rtt {broker} 300"));
    }
    pause(4).await;
    for broker in 1..=3 {
        inject(&mut env, &format!("rtt {broker} 0"));
    }
    inject(&mut env, "errors fetch 20 not-leader");
    inject(&mut env, "errors offset-commit 10 request-timed-out");
    inject(
        &mut env,
        "errors offset-fetch 5 coordinator-load-in-progress",
    );
    pause(3).await;
    inject(&mut env, "down 2");
    pause(5).await;
    inject(&mut env, "up 2");
    pause(2).await;
    inject(&mut env, "down 3");
    pause(10).await;
    inject(&mut env, "up 3");

    let expected = producer.finish();
    env.wait_processed(expected.events as i64, SETTLE_GROUP)
        .await;
    let total = terminate_all(&mut replicas, EXIT);
    assert_nothing_applied_twice(&replicas.iter().collect::<Vec<_>>());
    // The tests' own model of what the topic holds, apart from `produce`'s oracle.
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    println!(
        "broker faults: {injected} injected; {} partitions lost, {} revoked, {} batches \
         fenced, {} retries; {} duplicates skipped of {} injected",
        total.partitions_lost,
        total.partitions_revoked,
        total.fenced_batches,
        total.retries,
        total.duplicates,
        expected.duplicates
    );
}

/// Two replicas (KIP-848) in a formed group on `env`.
async fn two_replicas_in_a_group(env: &TestEnv) -> Vec<Replica> {
    let replicas = vec![env.replica("r1", &[]), env.replica("r2", &[])];
    wait_until("the group to form", SETTLE_GROUP, || async {
        replicas.iter().all(|r| !r.owned().is_empty())
    })
    .await;
    replicas
}

/// After the faults: everything produced is settled and committed, both replicas rode the
/// faults out and exit 0, no offset was committed twice, and the database equals the
/// reference model. Returns the model's answer and the replicas' counters.
async fn assert_rode_it_out(
    env: &TestEnv,
    mut replicas: Vec<Replica>,
    producer: BackgroundProduce,
) -> (Truth, StatsSnapshot) {
    let expected = producer.finish();
    env.wait_processed(expected.events as i64, SETTLE_GROUP)
        .await;
    for r in &replicas {
        assert!(r.is_running(), "{} rode the faults out", r.name());
    }
    let total = terminate_all(&mut replicas, EXIT);
    assert_nothing_applied_twice(&replicas.iter().collect::<Vec<_>>());
    let truth = truth_of(env);
    assert_database_matches(&env.db, &truth).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    (truth, total)
}

/// A producer (`acks=all`, idempotent) sending `events` events at 4,000/s while the test
/// injects its faults.
fn stream(env: &TestEnv, events: u64, seed: u64) -> BackgroundProduce {
    env.produce_in_background(&[
        "--events",
        &events.to_string(),
        "--skus",
        "4000",
        "--duplicates",
        "0.05",
        "--seed",
        &seed.to_string(),
        "--rate",
        "4000",
    ])
}

/// The single Apache Kafka broker killed with SIGKILL in the middle of the stream, down for
/// 5 s, then started again on its data directory, while 2 replicas (KIP-848) consume and the
/// producer keeps sending. The replicas stay up and ride it out: nothing lost, nothing applied
/// twice, the database equal to the reference model.
#[tokio::test(flavor = "multi_thread")]
async fn apache_broker_killed_and_restarted_loses_nothing() {
    let mut env = TestEnv::on_apache(12, 1).await;
    let replicas = two_replicas_in_a_group(&env).await;
    let producer = stream(&env, 40_000, 77);
    wait_until("10,000 messages to settle", SETTLE_GROUP, || async {
        env.db.settled().await >= 10_000
    })
    .await;

    let port = env.broker.apache().port(1);
    env.broker.apache().kill(1);
    let settled_at_kill = env.db.settled().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the broker is down"
    );
    // The outage's length is the fault's parameter, not a proof of anything.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled = env.db.settled().await - settled_at_kill;
    tokio::task::block_in_place(|| env.broker.apache().restart(1)).expect("restarting the broker");

    let (truth, total) = assert_rode_it_out(&env, replicas, producer).await;
    println!(
        "apache broker SIGKILL: down 5 s at {settled_at_kill} settled ({stalled} more settled \
         meanwhile, from fetched batches); {} messages; {} duplicates skipped of {} in the topic; \
         {} partitions lost, {} revoked; {} retries",
        truth.messages,
        total.duplicates,
        truth.duplicates,
        total.partitions_lost,
        total.partitions_revoked,
        total.retries
    );
}

/// Three Apache Kafka nodes (replication factor 3, `min.insync.replicas` 2) while 2 replicas
/// (KIP-848) consume and the producer sends: the leader of a share of the partitions is
/// killed with SIGKILL and later restarted, then the node coordinating the group. Leadership
/// and coordination move to the survivors, the replicas stay up, and nothing is lost or
/// applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn apache_cluster_survives_a_leader_and_the_coordinator_killed() {
    let mut env = TestEnv::on_apache(12, 3).await;
    let replicas = two_replicas_in_a_group(&env).await;
    let producer = stream(&env, 48_000, 78);
    let mut progress = 8_000;
    wait_until("8,000 messages to settle", SETTLE_GROUP, || async {
        env.db.settled().await >= progress
    })
    .await;

    // Who holds a role now: the leader of partition 0, or the group's coordinator.
    let holder = |cluster: &ApacheKafka, role: &str| {
        if role == "leader" {
            cluster.leader(TOPIC, 0)
        } else {
            cluster.coordinator(GROUP)
        }
    };
    let mut killed = Vec::new();
    for role in ["leader", "coordinator"] {
        let cluster = env.broker.apache();
        let victim = holder(cluster, role).expect("the role's holder");
        let led = (0..12)
            .filter(|p| cluster.leader(TOPIC, *p).is_ok_and(|l| l == victim))
            .count();
        cluster.kill(victim);
        // The fault took effect: the survivors elect a new holder.
        wait_until(
            &format!("the {role} to move off node {victim}"),
            SETTLE_GROUP,
            || {
                let moved = holder(env.broker.apache(), role).is_ok_and(|n| n != victim);
                async move { moved }
            },
        )
        .await;
        progress += 8_000;
        wait_until("progress without the node", SETTLE_GROUP, || async {
            env.db.settled().await >= progress
        })
        .await;
        tokio::task::block_in_place(|| env.broker.apache().restart(victim))
            .expect("restarting the node");
        killed.push(format!(
            "{role} node {victim} (leading {led} of 12 partitions)"
        ));
    }

    let (truth, total) = assert_rode_it_out(&env, replicas, producer).await;
    println!(
        "apache 3-node failover: killed {killed:?}; {} messages; {} duplicates skipped of {} in \
         the topic; {} partitions lost, {} revoked; {} retries",
        truth.messages,
        total.duplicates,
        truth.duplicates,
        total.partitions_lost,
        total.partitions_revoked,
        total.retries
    );
}
