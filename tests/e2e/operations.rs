//! The operator's view of a replica: probes and metrics over HTTP.

use std::time::Duration;

use inventory_consumer::domain::lock_key;
use serde_json::json;

use crate::support::{EXIT, SETTLE};
use crate::support::{TestEnv, http_get, metric, terminate_all, wait_for_group, wait_until};

/// Metrics move as events are processed and as the group rebalances; both replicas become
/// ready and stay live.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_processing_and_rebalances() {
    let env = TestEnv::new(12).await;
    let mut r1 = env.replica("r1", &[]);
    let mut r2 = env.replica("r2", &[]);
    let (a1, a2) = (r1.http_addr().await, r2.http_addr().await);
    for addr in [&a1, &a2] {
        wait_until("the replica to be ready", SETTLE, || async {
            http_get(addr, "/readyz").0 == 200
        })
        .await;
        assert_eq!(http_get(addr, "/livez").0, 200);
    }
    wait_for_group(&[&r1, &r2], 12, SETTLE).await;

    let expected = env.produce(&[
        "--events",
        "5000",
        "--skus",
        "300",
        "--duplicates",
        "0.05",
        "--invalid",
        "0.02",
        "--seed",
        "5",
    ]);
    wait_until("every message to settle", SETTLE, || async {
        env.db.settled().await == (expected.events + expected.dead_letters) as i64
    })
    .await;
    let scrape = || {
        [&a1, &a2]
            .iter()
            .map(|a| http_get(a, "/metrics").1)
            .collect::<Vec<_>>()
    };
    let total = |texts: &[String], name: &str, labels: &[&str]| -> f64 {
        texts.iter().map(|t| metric(t, name, labels)).sum()
    };
    let texts = scrape();
    assert_eq!(
        total(&texts, "inventory_events_total", &["outcome=\"applied\""]),
        expected.applied as f64
    );
    assert_eq!(
        total(&texts, "inventory_events_total", &["outcome=\"rejected\""]),
        expected.rejected as f64
    );
    assert_eq!(
        total(&texts, "inventory_duplicates_skipped_total", &[]),
        expected.duplicates as f64
    );
    assert_eq!(
        total(&texts, "inventory_dead_letters_total", &[]),
        expected.dead_letters as f64
    );
    assert_eq!(total(&texts, "inventory_assigned_partitions", &[]), 12.0);
    assert!(total(&texts, "inventory_apply_duration_seconds_count", &[]) > 0.0);
    assert!(total(&texts, "inventory_advisory_lock_wait_seconds_count", &[]) > 0.0);
    assert!(total(&texts, "inventory_batch_size_sum", &[]) >= expected.messages as f64);
    wait_until("committed offsets to be exported", SETTLE, || async {
        let texts = scrape();
        total(&texts, "inventory_partition_committed_offset", &[]) >= expected.messages as f64
    })
    .await;
    let revokes_before = total(&texts, "inventory_rebalances_total", &["kind=\"revoke\""]);

    // A third replica joins: the others give partitions up, and the metrics say so.
    let mut r3 = env.replica("r3", &[]);
    wait_until("the third replica to own partitions", SETTLE, || async {
        !r3.owned().is_empty()
    })
    .await;
    wait_until("the revocations to show in the metrics", SETTLE, || async {
        let texts = scrape();
        total(&texts, "inventory_rebalances_total", &["kind=\"revoke\""]) > revokes_before
            && total(&texts, "inventory_assigned_partitions", &[]) < 12.0
    })
    .await;
    for r in [&mut r1, &mut r2, &mut r3] {
        assert!(r.terminate(EXIT).0.success());
    }
}

/// `/readyz` turns 503 as soon as a SIGTERM starts the drain, while the in-flight batch is
/// still waiting (here for an advisory lock the test holds), and the replica still exits 0
/// once the batch is through.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_is_503_while_draining() {
    let env = TestEnv::new(3).await;
    let mut r = env.replica("r1", &[("database.lock_timeout_ms", "60000")]);
    let addr = r.http_addr().await;
    wait_until("the replica to be ready", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 200
    })
    .await;

    // Hold the SKU's lock in our own session: the replica's batch will wait for it.
    let blocker = env.db.client().await;
    blocker
        .execute("SELECT pg_advisory_lock($1)", &[&lock_key("HELD-1")])
        .await
        .expect("taking the lock");
    env.produce_json(
        &[json!({"event_id": "held-restock", "type": "restock", "sku": "HELD-1", "quantity": 5})],
        false,
    );
    wait_until(
        "the replica's batch to wait for the lock",
        SETTLE,
        || async {
            env.db
                .scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                .await
                == 1
        },
    )
    .await;

    nix::sys::signal::kill(r.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_until("/readyz to report the drain", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 503
    })
    .await;
    assert!(http_get(&addr, "/readyz").1.contains("draining"));
    assert_eq!(http_get(&addr, "/livez").0, 200, "draining is not dead");
    let (_, text) = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&text, "inventory_membership_phase", &["phase=\"draining\""]),
        1.0,
        "the membership's phase is observable while the poll thread drains"
    );
    assert_eq!(
        metric(
            &text,
            "inventory_membership_phase",
            &["phase=\"consuming\""]
        ),
        0.0
    );

    blocker
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key("HELD-1")])
        .await
        .expect("releasing the lock");
    let (status, stats) = r.wait_exit(EXIT);
    assert!(status.success(), "{status}");
    assert_eq!(
        stats.applied, 1,
        "the in-flight batch finished during the drain"
    );
    assert_eq!(env.db.stock().await["HELD-1"], 5);
}

/// `/readyz` turns 503 once the database cannot be reached, while `/livez` stays 200: a lost
/// database takes a replica out of rotation, it is no reason to restart it. When the database
/// is back, so is readiness.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_database() {
    let mut env = TestEnv::new(3).await;
    let r = env.replica("r1", &[]);
    let addr = r.http_addr().await;
    wait_until("the replica to be ready", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 200
    })
    .await;
    if !env.db.stop_server() {
        crate::support::skip_unless_ci(
            "tests do not stop a shared database server (TEST_DATABASE_URL)",
        );
        return;
    }
    wait_until("/readyz to report the database", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 503
    })
    .await;
    let (_, reason) = http_get(&addr, "/readyz");
    assert!(reason.contains("database"), "{reason}");
    assert_eq!(
        http_get(&addr, "/livez").0,
        200,
        "a lost database is not a dead replica"
    );
    env.db.restart_server();
    wait_until("/readyz to recover with the database", SETTLE, || async {
        http_get(&addr, "/readyz").0 == 200
    })
    .await;
}

/// The Procfile, started with honcho: the embedded broker and three replicas come up and share
/// the partitions, then stop together. Needs honcho (`pip install honcho`, or `HONCHO=path`):
/// CI installs it; elsewhere the test says it is skipped.
#[tokio::test(flavor = "multi_thread")]
async fn procfile_runs_a_group_with_honcho() {
    let Some(honcho) = find_honcho() else {
        crate::support::skip_unless_ci("honcho not found (pip install honcho, or set HONCHO)");
        return;
    };
    let db = crate::support::TestDb::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let procfile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Procfile");
    let out_path = dir.path().join("honcho.out");
    let child = std::process::Command::new(&honcho)
        .arg("start")
        .arg("-f")
        .arg(&procfile)
        .arg("-d")
        .arg(dir.path())
        .current_dir(dir.path())
        // honcho is Python: without this its output reaches the file only in blocks.
        .env("PYTHONUNBUFFERED", "1")
        .env("INVENTORY_BIN", crate::support::BIN)
        .env("INVENTORY_DEV_BIN", crate::support::dev_bin())
        .env("DATABASE_URL", &db.url)
        .env("INVENTORY_LOG__FORMAT", "json")
        .env("INVENTORY_KAFKA__GROUP_PROTOCOL", "consumer")
        .stdout(std::fs::File::create(&out_path).expect("output file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting honcho");
    // Stopped even if an assertion fails: honcho would otherwise outlive the test.
    let mut honcho = Stopper(child);

    // honcho prefixes each line with its process name: `09:48:23 replica2.1 | {json}`.
    let owned_by = |name: &str| -> usize {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        text.lines()
            .rev()
            .filter(|l| l.contains(&format!(" {name}.")) && l.contains("\"owned\""))
            .filter_map(|l| l.split_once("| ").map(|(_, json)| json.to_owned()))
            .find_map(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
            .map(|e| {
                // A JSON array in a string field (docs/contract.md, "Log events").
                serde_json::from_str::<Vec<i32>>(e["owned"].as_str().unwrap_or("[]"))
                    .map_or(0, |owned| owned.len())
            })
            .unwrap_or(0)
    };
    let shared = || {
        let counts: Vec<usize> = ["replica1", "replica2", "replica3"]
            .iter()
            .map(|r| owned_by(r))
            .collect();
        counts.iter().all(|c| *c > 0) && counts.iter().sum::<usize>() == 12
    };
    let deadline = std::time::Instant::now() + SETTLE;
    while !shared() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replicas did not share the partitions; honcho's output:\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = honcho.stop();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert_eq!(
        text.matches("\"message\":\"left the consumer group\"")
            .count(),
        3,
        "every replica left gracefully ({status}):\n{text}"
    );
    drop(db);
}

/// A process that gets SIGTERM and is waited for when dropped.
struct Stopper(std::process::Child);

impl Stopper {
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.0.wait().expect("waiting for the process")
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

fn find_honcho() -> Option<std::path::PathBuf> {
    // Named explicitly (as CI does): then it must be there, never a silent skip.
    if let Some(path) = std::env::var_os("HONCHO").map(std::path::PathBuf::from) {
        assert!(path.is_file(), "HONCHO={} is not a file", path.display());
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("honcho"))
        .find(|p| p.is_file())
}

/// The Grafana dashboard and the alert rules in `deploy/` name only metrics that a replica
/// really exports: read off a live `/metrics` after some traffic (bad messages included), not
/// off the code's constants. (`.ci/validate-deploy` has promtool parse every expression.)
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let env = TestEnv::new(2).await;
    let mut r = env.replica("r1", &[]);
    let addr = r.http_addr().await;
    let expected = env.produce(&[
        "--events",
        "300",
        "--skus",
        "20",
        "--invalid",
        "0.05",
        "--seed",
        "3",
    ]);
    env.wait_processed((expected.events + expected.dead_letters) as i64, SETTLE)
        .await;
    // End offsets come with librdkafka's statistics, every 5 s.
    wait_until("the end offsets to be exported", SETTLE, || async {
        http_get(&addr, "/metrics")
            .1
            .contains("inventory_partition_end_offset{")
    })
    .await;
    let scraped = http_get(&addr, "/metrics").1;
    let exported: std::collections::BTreeSet<&str> = scraped
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for file in [
        "deploy/overlays/monitoring/prometheusrule.yaml",
        "deploy/overlays/monitoring/dashboards/inventory-consumer.json",
    ] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let named: std::collections::BTreeSet<&str> = text
            .match_indices("inventory_")
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(named.len() >= 8, "{file} names only {named:?}");
        let unknown: Vec<&&str> = named.iter().filter(|n| !exported.contains(**n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics no replica exports: {unknown:?}\nexported: {exported:?}"
        );
    }
    assert!(r.terminate(EXIT).0.success());
}

/// `status` against the database and the broker: after two replicas applied a workload, each
/// partition's owner, epoch and recorded offset are the database's, its end offset the
/// broker's, the committed offset equals the recorded one and the lag is 0; the table names
/// every owner.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_what_the_database_and_the_broker_hold() {
    let env = TestEnv::new(6).await;
    let mut replicas = vec![env.replica("r1", &[]), env.replica("r2", &[])];
    wait_for_group(&[&replicas[0], &replicas[1]], 6, SETTLE).await;
    let expected = env.produce(&["--events", "2000", "--skus", "100", "--seed", "8"]);
    env.wait_processed(expected.events as i64, SETTLE).await;

    let json = env.command_ok("status", &["--json"]);
    let shown: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    let partitions = shown["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 6, "{json}");
    let ends = crate::support::watermarks(&env.broker.bootstrap, crate::support::TOPIC);
    let db = env.db.client().await;
    for p in partitions {
        let partition = p["partition"].as_i64().expect("partition") as i32;
        let row = db
            .query_one(
                "SELECT o.owner, o.epoch, f.next_offset
                 FROM partition_owners o JOIN partition_offsets f USING (consumer_group, topic, partition)
                 WHERE o.partition = $1",
                &[&partition],
            )
            .await
            .expect("the partition's records");
        let (owner, epoch, recorded): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(p["owner"].as_str(), Some(owner.as_str()), "{p}");
        assert_eq!(p["epoch"].as_i64(), Some(epoch), "{p}");
        assert_eq!(p["recorded"].as_i64(), Some(recorded), "{p}");
        assert_eq!(p["end"].as_i64(), Some(ends[&partition].1), "{p}");
        assert_eq!(p["committed"].as_i64(), Some(recorded), "{p}");
        assert_eq!(p["lag"].as_i64(), Some(0), "{p}");
    }
    assert_eq!(shown["total_lag"].as_i64(), Some(0), "{json}");
    let owners = db
        .query("SELECT DISTINCT owner FROM partition_owners", &[])
        .await
        .expect("owners");
    assert_eq!(owners.len(), 2);
    let table = env.command_ok("status", &[]);
    for row in owners {
        let owner: String = row.get(0);
        assert!(table.contains(&owner), "{table}");
    }
    assert!(table.contains("6 partitions, 2 owners, lag 0"), "{table}");
    terminate_all(&mut replicas, EXIT);
}
