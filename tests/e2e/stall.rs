//! One stalled partition on Apache Kafka: a SKU whose advisory lock another database session
//! holds (a support tool, a long transaction) stalls the partition that carries it, and nothing
//! else: the replica's other partitions drain, rebalances go through, SIGTERM ends replicas
//! within their drain timeout, and memory stays bounded. Afterwards the stalled partition
//! catches up, and the database equals the reference model.

use std::time::{Duration, Instant};

use inventory_consumer::domain::lock_key;
use nix::sys::signal::Signal;
use serde_json::json;

use crate::oracle::{assert_database_matches, truth_of};
use crate::support::{EXIT, SETTLE};
use crate::support::{
    Replica, TestEnv, assert_nothing_applied_twice, http_get, metric, send, terminate_all,
    wait_until,
};

const PARTITIONS: i32 = 12;
const SKUS: usize = 600;
/// Events per SKU: a restock of 100, then sales of 1.
const EVENTS_PER_SKU: usize = 50;
/// The SKU whose lock is held: the first of partition 0, so partition 0 stalls at its start.
const LOCKED: &str = "STALL-0000";
/// The drain timeout of the replicas here, and what a SIGTERM may take beyond it (`run`'s
/// stop margin, 8 s, plus process start-up noise on a shared machine).
const DRAIN_MS: u64 = 4_000;
const EXIT_MARGIN: Duration = Duration::from_secs(10);

/// The operator's workload: 600 SKUs, SKU `i` on partition `i % 12`, each restocked with 100
/// and then sold 49 times, interleaved across the SKUs of a partition. Returns how many events
/// each partition holds.
fn send_workload(env: &TestEnv) -> Vec<i64> {
    let mut messages = Vec::new();
    for round in 0..EVENTS_PER_SKU {
        for i in 0..SKUS {
            let sku = format!("STALL-{i:04}");
            let event = if round == 0 {
                json!({"event_id": format!("{sku}-r"), "type": "restock", "sku": sku, "quantity": 100})
            } else {
                json!({"event_id": format!("{sku}-s{round}"), "type": "sale", "sku": sku, "quantity": 1})
            };
            let partition = (i % PARTITIONS as usize) as i32;
            messages.push((partition, sku, event.to_string().into_bytes()));
        }
    }
    let mut per_partition = vec![0; PARTITIONS as usize];
    for (p, _, _) in &messages {
        per_partition[*p as usize] += 1;
    }
    send(&env.broker.bootstrap, messages);
    per_partition
}

/// Holds `sku`'s advisory lock in a session of its own, as another tool would, until dropped.
async fn hold_lock(env: &TestEnv, sku: &str) -> tokio_postgres::Client {
    let blocker = env.db.client().await;
    blocker
        .execute("SELECT pg_advisory_lock($1)", &[&lock_key(sku)])
        .await
        .expect("taking the SKU's lock");
    blocker
}

async fn processed_in(env: &TestEnv, partition: i32) -> i64 {
    env.db
        .scalar(&format!(
            "SELECT count(*) FROM processed_events WHERE partition = {partition}"
        ))
        .await
}

async fn processed_outside(env: &TestEnv, partition: i32) -> i64 {
    env.db
        .scalar(&format!(
            "SELECT count(*) FROM processed_events WHERE partition <> {partition}"
        ))
        .await
}

/// Waits until the replica has migrated the database and joined the group.
async fn wait_ready(replica: &Replica) {
    let addr = replica.http_addr().await;
    wait_until("the replica to be ready", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 200
    })
    .await;
}

/// Waits until every event of every partition but 0 is in the database, while partition 0
/// has not moved: the lock really holds it.
async fn wait_for_all_but_the_stalled_partition(env: &TestEnv, per_partition: &[i64]) {
    let others: i64 = per_partition[1..].iter().sum();
    wait_until(
        "every event of the 11 partitions not stalled",
        SETTLE,
        || async { processed_outside(env, 0).await == others },
    )
    .await;
    assert_eq!(
        processed_in(env, 0).await,
        0,
        "partition 0 starts with the locked SKU: nothing of it can be applied yet"
    );
}

/// The operator's case: one replica, a backlog over 12 partitions, one SKU's lock held by
/// another session. Every event of the other 11 partitions is applied while the lock is held;
/// after its release the stalled partition catches up, and the database equals the model. The
/// buffer is at its smallest, so that every partition pauses and resumes under the backlog
/// (each resume seeks back to the first undelivered offset: nothing skipped, nothing twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_sku_stalls_only_its_own_partition() {
    let env = TestEnv::on_apache(PARTITIONS, 1).await;
    let blocker = hold_lock(&env, LOCKED).await;
    let per_partition = send_workload(&env);
    // The smallest buffer: 1 MiB over 12 partitions, 85 KiB each.
    let mut replica = env.replica("r1", &[("processing.buffer_bytes", "1048576")]);
    let started = Instant::now();
    wait_ready(&replica).await;
    wait_for_all_but_the_stalled_partition(&env, &per_partition).await;
    let others_done = started.elapsed();
    let (_, text) = http_get(&replica.http_addr().await, "/metrics");
    let pauses = metric(&text, "inventory_partition_flow_pauses_total", &[]);
    let resumed = resumed_partitions(&replica);
    assert!(
        resumed.iter().any(|&p| p != 0),
        "partitions other than the stalled one paused and resumed under the backlog: {resumed:?}"
    );
    assert!(replica.is_running());

    drop(blocker);
    let total: i64 = per_partition.iter().sum();
    env.wait_processed(total, SETTLE).await;
    let caught_up = started.elapsed();
    let (status, stats) = replica.terminate(EXIT);
    assert!(status.success(), "{status}");
    assert_nothing_applied_twice(&[&replica]);
    let truth = truth_of(&env);
    assert_database_matches(&env.db, &truth).await;
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
    println!(
        "stall: {} events of 11 partitions applied in {:.1?} while partition 0 was locked; all \
         {total} after the release at {:.1?}; {pauses} flow pauses; {} retries",
        total - per_partition[0],
        others_done,
        caught_up,
        stats.retries
    );
}

/// The partitions a replica's log says it resumed after a pause (seeking back first).
fn resumed_partitions(replica: &Replica) -> std::collections::BTreeSet<i32> {
    replica
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "fetch_resumed")
        .filter_map(|e| e["partition"].as_i64().map(|p| p as i32))
        .collect()
}

/// How many times the replicas logged giving partitions up in a revoke.
fn revokes(replicas: &[Replica]) -> usize {
    replicas
        .iter()
        .map(|r| r.events("partitions_revoked").len())
        .sum()
}

/// Which of `replicas` owns `partition` now.
fn owner_of(replicas: &[Replica], partition: i32) -> Option<usize> {
    replicas.iter().position(|r| r.owned().contains(&partition))
}

/// SIGTERM and how long the exit took; the exit must be 0 and within the drain timeout plus
/// the margin.
fn terminate_within_bound(replica: &mut Replica) -> Duration {
    let at = Instant::now();
    let (status, _) = replica.terminate(EXIT);
    let took = at.elapsed();
    assert!(status.success(), "{} exited {status}", replica.name());
    let bound = Duration::from_millis(DRAIN_MS) + EXIT_MARGIN;
    assert!(
        took <= bound,
        "{} took {took:?} to exit, more than {bound:?}; log:\n{}",
        replica.name(),
        replica.log()
    );
    took
}

/// A stall during rebalances and shutdowns: two replicas share the backlog while partition 0 is
/// locked. A third joins: the group rebalances at once (only the stalled partition's drain may
/// hold it, for at most the drain timeout). A healthy replica given SIGTERM during that
/// rebalance, and then the stalled partition's owner, each exit 0 within the drain timeout plus
/// the margin. After the release, the rest of the group catches up: nothing lost, nothing
/// applied twice.
/// With KIP-848, whose broker-side assignment moves partitions one member at a time.
#[tokio::test(flavor = "multi_thread")]
async fn rebalances_and_sigterm_go_through_a_stall() {
    rebalance_through_a_stall(&[]).await;
}

/// With the classic protocol's cooperative rebalance, in which the whole group waits for every
/// member to revoke (the case where a blocked poll thread once froze the group).
#[tokio::test(flavor = "multi_thread")]
async fn cooperative_rebalances_and_sigterm_go_through_a_stall() {
    rebalance_through_a_stall(&[
        ("kafka.group_protocol", "classic"),
        ("kafka.assignment_strategy", "cooperative-sticky"),
        ("kafka.properties.session.timeout.ms", "6000"),
        ("kafka.properties.heartbeat.interval.ms", "1000"),
    ])
    .await;
}

async fn rebalance_through_a_stall(protocol: &[(&str, &str)]) {
    let env = TestEnv::on_apache(PARTITIONS, 1).await;
    let blocker = hold_lock(&env, LOCKED).await;
    let per_partition = send_workload(&env);
    let drain = DRAIN_MS.to_string();
    let mut settings = vec![("processing.drain_timeout_ms", drain.as_str())];
    settings.extend_from_slice(protocol);
    let mut replicas = vec![env.replica("r1", &settings), env.replica("r2", &settings)];
    for r in &replicas {
        wait_ready(r).await;
    }
    wait_until("both replicas to own partitions", SETTLE, || async {
        replicas.iter().all(|r| !r.owned().is_empty())
    })
    .await;
    wait_for_all_but_the_stalled_partition(&env, &per_partition).await;
    let stalled = owner_of(&replicas, 0).expect("someone owns the stalled partition");

    // A third replica joins; once the rebalance has begun revoking, SIGTERM a healthy member.
    let revoked_before = revokes(&replicas);
    replicas.push(env.replica("r3", &settings));
    let joined_at = Instant::now();
    wait_until("the join to revoke partitions", SETTLE, || async {
        revokes(&replicas[..2]) > revoked_before
    })
    .await;
    let healthy = 1 - stalled;
    let healthy_exit = terminate_within_bound(&mut replicas[healthy]);
    wait_until("r3 to own partitions", SETTLE, || async {
        !replicas[2].owned().is_empty()
    })
    .await;
    let r3_owned_after = joined_at.elapsed();
    assert!(
        r3_owned_after <= Duration::from_millis(DRAIN_MS) + Duration::from_secs(20),
        "the join took {r3_owned_after:?}"
    );

    // SIGTERM whoever owns the stalled partition now (it may have moved to r3).
    let survivors: Vec<usize> = (0..replicas.len()).filter(|&i| i != healthy).collect();
    wait_until("the stalled partition to have an owner", SETTLE, || async {
        survivors.iter().any(|&i| replicas[i].owned().contains(&0))
    })
    .await;
    let owner = *survivors
        .iter()
        .find(|&&i| replicas[i].owned().contains(&0))
        .expect("an owner");
    let stalled_exit = terminate_within_bound(&mut replicas[owner]);

    drop(blocker);
    let remaining = survivors
        .into_iter()
        .find(|&i| i != owner)
        .expect("one replica left");
    let total: i64 = per_partition.iter().sum();
    env.wait_processed(total, SETTLE).await;
    assert!(replicas[remaining].is_running());
    terminate_all(&mut replicas[remaining..=remaining], EXIT);
    assert_nothing_applied_twice(&replicas.iter().collect::<Vec<_>>());
    let truth = truth_of(&env);
    assert_database_matches(&env.db, &truth).await;
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
    println!(
        "stall + rebalance: healthy {} exited in {healthy_exit:.1?} during the join; r3 owned \
         partitions {r3_owned_after:.1?} after starting; the stalled owner {} exited in \
         {stalled_exit:.1?} (drain {DRAIN_MS} ms)",
        replicas[healthy].name(),
        replicas[owner].name(),
    );
}

/// An operator who will not wait for a drain that a stalled partition holds up sends a second
/// signal: the replica exits 130 at once (without the C library's exit handlers, which ran
/// under librdkafka's threads), and what it applied stays applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_ends_a_stalled_drain_at_once() {
    let env = TestEnv::new(PARTITIONS).await;
    let blocker = hold_lock(&env, LOCKED).await;
    let per_partition = send_workload(&env);
    let mut replica = env.replica("r1", &[("processing.drain_timeout_ms", "120000")]);
    wait_ready(&replica).await;
    wait_for_all_but_the_stalled_partition(&env, &per_partition).await;

    let _ = nix::sys::signal::kill(replica.pid(), Signal::SIGTERM);
    wait_until("the drain to begin", SETTLE, || async {
        replica.has_event("shutdown_requested")
    })
    .await;
    let second = Instant::now();
    let _ = nix::sys::signal::kill(replica.pid(), Signal::SIGINT);
    let status = replica.wait_abrupt_exit(EXIT);
    let took = second.elapsed();
    assert_eq!(
        status.code(),
        Some(130),
        "exit after a second signal; log:\n{}",
        replica.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after the second signal; the drain would have waited 120 s"
    );
    assert!(replica.log().contains("second termination signal"));
    drop(blocker);
    let others: i64 = per_partition[1..].iter().sum();
    assert_eq!(processed_outside(&env, 0).await, others);
    assert_eq!(processed_in(&env, 0).await, 0);
    println!("a second signal during a stalled drain: exit 130 after {took:.1?}");
}

/// Messages of about 1 MB over 64 partitions, one of them stalled by a held lock: the replica's
/// peak resident memory stays within the bound docs/design.md documents, computed here from the
/// settings, although far more data than that passes through it.
#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_with_1_mib_messages_and_a_stalled_partition() {
    const PARTITIONS: i32 = 64;
    const PER_PARTITION: usize = 6;
    const PADDING: usize = 1_000_000;
    let env = TestEnv::on_apache(PARTITIONS, 1).await;
    let blocker = hold_lock(&env, "BIG-00").await;
    let padding = "x".repeat(PADDING);
    let messages = (0..PER_PARTITION).flat_map(|n| {
        let padding = &padding;
        (0..PARTITIONS).map(move |p| {
            let sku = format!("BIG-{p:02}");
            let event = json!({
                "event_id": format!("{sku}-{n}"), "type": "restock", "sku": sku, "quantity": 1,
                "padding": padding,
            });
            (p, sku, event.to_string().into_bytes())
        })
    });
    send(&env.broker.bootstrap, messages);
    let sent_mib = (PARTITIONS as usize * PER_PARTITION * PADDING) as f64 / (1 << 20) as f64;

    let mut replica = env.replica("r1", &[]);
    wait_ready(&replica).await;
    let others = (PARTITIONS as i64 - 1) * PER_PARTITION as i64;
    wait_until(
        "every event of the 63 partitions not stalled",
        SETTLE,
        || async { processed_outside(&env, 0).await == others },
    )
    .await;
    assert_eq!(processed_in(&env, 0).await, 0, "partition 0 is stalled");
    let peak = replica.peak_rss_mib();
    drop(blocker);
    env.wait_processed(PARTITIONS as i64 * PER_PARTITION as i64, SETTLE)
        .await;
    let peak_after = replica.peak_rss_mib();
    assert!(replica.terminate(EXIT).0.success());
    let stock = env.db.stock().await;
    assert_eq!(stock.len(), PARTITIONS as usize);
    assert!(
        stock.values().all(|&s| s == PER_PARTITION as i64),
        "{stock:?}"
    );

    // docs/design.md's bound: 64 MiB for the process itself, librdkafka's prefetch (4 MiB queued
    // plus one fetch response of at most 8 MiB), and per owned partition its queue (its share
    // of the 16 MiB buffer, 256 KiB here, or one message when larger) plus the batch its worker
    // holds (512 KiB plus one message).
    let message_mib = PADDING as f64 / (1 << 20) as f64 + 0.01;
    let share_mib = 16.0 / PARTITIONS as f64;
    let per_partition = share_mib.max(message_mib) + 0.5 + message_mib;
    let bound = 64.0 + 4.0 + 8.0 + PARTITIONS as f64 * per_partition;
    println!(
        "memory: {sent_mib:.0} MiB in 1 MB messages over {PARTITIONS} partitions, one stalled: \
         peak RSS {peak:.0} MiB while stalled, {peak_after:.0} MiB at the end; bound {bound:.0} MiB"
    );
    assert!(
        peak_after <= bound,
        "peak RSS {peak_after:.0} MiB above the documented bound of {bound:.0} MiB"
    );
}
