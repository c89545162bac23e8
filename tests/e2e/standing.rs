//! A replica that cannot do its work does not keep its partitions. Its traffic to PostgreSQL
//! goes through a relay that can drop it silently (nothing refused, nothing answered), while
//! its Kafka traffic flows: once its database probe has failed for `database.step_out_after_ms`
//! it leaves the group, so that the others take its partitions, and it rejoins when the
//! database answers again. At start-up it does not join at all until the database answers.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::support::blackhole::Blackhole;
use crate::support::{EXIT, SETTLE_SLOW};
use crate::support::{
    Replica, TestEnv, assert_nothing_applied_twice, http_get, metric, terminate_all, wait_until,
};

/// The bound the tests give: `database.step_out_after_ms`.
const BOUND: Duration = Duration::from_secs(10);

/// A relay to the test database's server, and the database URL through it.
async fn relay_to(db_url: &str) -> (Blackhole, String) {
    let mut url = url::Url::parse(db_url).expect("a postgres:// URL");
    let upstream: SocketAddr = (
        url.host_str().expect("a host").to_owned(),
        url.port().unwrap_or(5432),
    )
        .to_socket_addrs()
        .expect("resolving the database's host")
        .next()
        .expect("an address");
    let relay = Blackhole::start(upstream).await;
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(relay.addr.port())).expect("port");
    (relay, url.into())
}

async fn readyz(replica: &Replica) -> (u16, String) {
    http_get(&replica.http_addr().await, "/readyz")
}

/// At start-up, a database that does not answer keeps the replica out of the group, not ready
/// and saying why, for as long as it lasts; once it answers, the replica joins and works.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_joins_only_once_its_database_answers() {
    let env = TestEnv::new(4).await;
    let (relay, url) = relay_to(&env.db.url).await;
    relay.cut();
    let mut replica = env.replica_with_env("r1", &[("DATABASE_URL", &url)], &[]);
    let expected = env.produce(&["--events", "2000", "--skus", "100", "--seed", "3"]);
    wait_until(
        "the replica to say it cannot use the database",
        SETTLE_SLOW,
        || async {
            let (status, body) = readyz(&replica).await;
            status == 503
                && body.contains("database not reached")
                && replica.has_event("database_unavailable")
        },
    )
    .await;
    assert!(replica.owned().is_empty(), "it took no partition");
    assert_eq!(env.db.settled().await, 0);
    // A replica stopped while it waits exits at once, cleanly: it holds nothing.
    let mut quitter = env.replica_with_env("quitter", &[("DATABASE_URL", &url)], &[]);
    wait_until(
        "the second replica to wait for the database",
        SETTLE_SLOW,
        || async { quitter.has_event("database_unavailable") },
    )
    .await;
    let asked = Instant::now();
    let (status, _) = quitter.terminate(EXIT);
    assert!(status.success(), "{status}: {}", quitter.log());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "stopped during start-up in {:?}",
        asked.elapsed()
    );

    relay.heal();
    env.wait_processed(expected.messages as i64, SETTLE_SLOW)
        .await;
    assert_eq!(readyz(&replica).await.0, 200);
    let (status, stats) = replica.terminate(EXIT);
    assert!(status.success(), "replica exit: {status}");
    assert_eq!(stats.applied + stats.rejected, expected.events);
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// Three replicas on Apache Kafka under a steady stream; the third one's packets to PostgreSQL
/// are dropped for 90 s while its Kafka traffic flows. Its partitions go to the other two
/// within the bound plus a rebalance; it says why it is not ready; it rejoins after the
/// database comes back; every event is decided once and the database equals the model.
async fn a_replica_cut_from_its_database_hands_its_partitions_over(protocol: &[(&str, &str)]) {
    let env = TestEnv::on_apache(12, 1).await;
    let (relay, url) = relay_to(&env.db.url).await;
    let bound_ms = BOUND.as_millis().to_string();
    let mut settings = protocol.to_vec();
    settings.push(("database.step_out_after_ms", &bound_ms));
    let mut replicas = vec![
        env.replica("r1", &settings),
        env.replica("r2", &settings),
        env.replica_with_env("r3", &[("DATABASE_URL", &url)], &settings),
    ];
    let balanced = |replicas: &[Replica], members: usize| {
        let owned: Vec<usize> = replicas.iter().map(|r| r.owned().len()).collect();
        owned.iter().filter(|&&n| n > 0).count() == members && owned.iter().sum::<usize>() == 12
    };
    wait_until(
        "three replicas to share the partitions",
        SETTLE_SLOW,
        || async { balanced(&replicas, 3) },
    )
    .await;
    let producing = env.produce_in_background(&[
        "--events",
        "150000",
        "--skus",
        "3000",
        "--duplicates",
        "0.02",
        "--rate",
        "1200",
        "--seed",
        "37",
    ]);
    wait_until("some events applied", SETTLE_SLOW, || async {
        env.db.settled().await >= 3_000
    })
    .await;

    let cut_at = Instant::now();
    relay.cut();
    wait_until(
        "the cut replica's partitions to move to the other two",
        BOUND + Duration::from_secs(40),
        || async { replicas[2].owned().is_empty() && balanced(&replicas[..2], 2) },
    )
    .await;
    let moved_after = cut_at.elapsed();
    eprintln!("partitions moved {moved_after:?} after the cut (bound {BOUND:?})");
    assert!(
        moved_after >= BOUND,
        "not before the bound: {moved_after:?}"
    );
    let (status, body) = readyz(&replicas[2]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stepped out of the consumer group"), "{body}");
    let (_, metrics) = http_get(&replicas[2].http_addr().await, "/metrics");
    assert_eq!(metric(&metrics, "inventory_group_stepped_out", &[]), 1.0);
    assert_eq!(
        metric(&metrics, "inventory_group_step_outs_total", &[]),
        1.0
    );
    // The others go on with the whole stream meanwhile.
    let during = env.db.settled().await;
    wait_until("the others to apply more", SETTLE_SLOW, || async {
        env.db.settled().await > during + 5_000
    })
    .await;

    tokio::time::sleep_until((cut_at + Duration::from_secs(90)).into()).await;
    let healed_at = chrono::Utc::now();
    relay.heal();
    wait_until("the replica to rejoin", SETTLE_SLOW, || async {
        !replicas[2].owned().is_empty() && balanced(&replicas, 3)
    })
    .await;
    wait_until(
        "the rejoined replica to apply the stream",
        SETTLE_SLOW,
        || async { replicas[2].batches().iter().any(|b| b.at > healed_at) },
    )
    .await;
    assert_eq!(readyz(&replicas[2]).await.0, 200);

    let expected = producing.finish();
    // Re-sent duplicates leave no row: events and dead letters do.
    env.wait_processed(
        (expected.events + expected.dead_letters) as i64,
        SETTLE_SLOW,
    )
    .await;
    let stats = terminate_all(&mut replicas, EXIT);
    // The cut replica's last commit may have reached the server with its answer held by the
    // cut: applied, but counted by no replica. So the replicas count at most every event, and
    // the database holds each exactly once.
    assert!(
        stats.applied + stats.rejected <= expected.events,
        "no event decided twice: {stats:?}"
    );
    assert_eq!(
        env.db.scalar("SELECT count(*) FROM processed_events").await,
        expected.events as i64,
        "each event decided once"
    );
    assert_nothing_applied_twice(&replicas.iter().collect::<Vec<_>>());
    assert_eq!(env.db.stock().await, expected.stock);
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_cooperative_replica_cut_from_its_database_steps_out_and_back() {
    a_replica_cut_from_its_database_hands_its_partitions_over(&[
        ("kafka.group_protocol", "classic"),
        ("kafka.assignment_strategy", "cooperative-sticky"),
        ("kafka.properties.session.timeout.ms", "6000"),
        ("kafka.properties.heartbeat.interval.ms", "1000"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_consumer_protocol_replica_cut_from_its_database_steps_out_and_back() {
    a_replica_cut_from_its_database_hands_its_partitions_over(&[
        ("kafka.group_protocol", "consumer"),
        ("processing.drain_timeout_ms", "4000"),
    ])
    .await;
}
