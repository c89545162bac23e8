//! The development tools' commands as a developer runs them: the README's `demo`, and `bench`
//! on a small scale. Each runs the service built into `inventory-dev` (`inventory-dev
//! consumer`) as its replicas, as separate processes, on a broker and a PostgreSQL of its own.

use inventory_devtools::embedded::apache;
use inventory_devtools::embedded::postgres::{PostgresOptions, ThrowawayPostgres};

const DEV_BIN: &str = env!("CARGO_BIN_EXE_inventory-dev");

/// A throwaway PostgreSQL server for one test, given to the command as `--database-url` (so
/// that the command does not start its own, and the bench counts the server's CPU as a given
/// server's: not at all).
struct Db {
    url: String,
    _server: ThrowawayPostgres,
}

async fn database() -> Db {
    let server =
        tokio::task::spawn_blocking(|| ThrowawayPostgres::start(PostgresOptions::default()))
            .await
            .expect("joining")
            .expect("starting a throwaway PostgreSQL");
    Db {
        url: server.url("postgres"),
        _server: server,
    }
}

fn install_apache() {
    apache::install().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The README's "run it" command: the whole system on embedded defaults, with replicas
/// joining, leaving and being killed, ends with a passing verdict.
#[tokio::test(flavor = "multi_thread")]
async fn demo_ends_with_a_passing_verdict() {
    demo_passes(&[]).await;
}

/// The same on Apache Kafka (`--broker apache`).
#[tokio::test(flavor = "multi_thread")]
async fn demo_on_apache_kafka_ends_with_a_passing_verdict() {
    install_apache();
    let output = demo_passes(&["--broker", "apache"]).await;
    assert!(output.contains("demo: Kafka: Apache Kafka 4."), "{output}");
}

async fn demo_passes(extra: &[&str]) -> String {
    let db = database().await;
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(DEV_BIN)
            .args([
                "demo", "--events", "20000", "--skus", "500", "--rate", "2500",
            ])
            .args(&extra)
            .arg("--database-url")
            .arg(&db.url)
            .output()
            .expect("running demo");
        drop(db);
        out
    })
    .await
    .expect("joining");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verdict: PASS"),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "PASS stock and reserved stock equal oracle",
        "PASS reservations equal oracle",
        "PASS replies equal oracle",
        "PASS every reply published",
    ] {
        assert!(stdout.contains(check), "{check}:\n{stdout}");
    }
    assert!(
        !stdout.contains("reservations by status {}"),
        "the demo has orders: {stdout}"
    );
    // Progress lines (`demo: ...`) go to stderr.
    format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
}

/// `bench` refuses, before any run, a backlog the embedded broker would delete before the
/// replicas read it.
#[tokio::test(flavor = "multi_thread")]
async fn bench_refuses_a_backlog_the_embedded_broker_cannot_keep() {
    let db = database().await;
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(DEV_BIN)
            .args(["bench", "--only", "one", "--events", "1000000"])
            .arg("--database-url")
            .arg(&url)
            .output()
            .expect("running bench")
    })
    .await
    .expect("joining");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "bench ran a backlog the broker deletes"
    );
    assert!(
        stderr.contains("more than the embedded broker keeps"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("events/s"),
        "a run started before the refusal"
    );
}

/// `bench` on a small scale: every run (database only, 1 and 3 replicas on both brokers,
/// per-event, unsafe, hot SKU, latency, memory) completes and passes its audit, and the report
/// has every row and ratio. Speed is not asserted here: the numbers are for `bench` at full
/// size.
#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_every_mode_and_each_passes_verify() {
    install_apache();
    let db = database().await;
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(DEV_BIN)
            .args([
                "bench",
                "--events",
                "10000",
                "--skus",
                "500",
                "--backlog",
                "8000",
                "--latency-rate",
                "500",
                "--latency-seconds",
                "2",
                "--history",
                "20000",
                "--apache",
            ])
            .arg("--database-url")
            .arg(&db.url)
            .output()
            .expect("running bench");
        drop(db);
        out
    })
    .await
    .expect("joining");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench failed:\n{report}");
    assert!(stdout.contains("verify: PASS in every run"), "{report}");
    for run in [
        "database only",
        "steady state, 20000 events of history",
        "pipeline, 1 replica",
        "pipeline, 3 replicas",
        "per-event mode",
        "unsafe: no locks, no dedupe",
        "hot SKU",
        "latency at 500 events/s",
        "memory: 8000 backlog",
        "1 replica on Apache Kafka 4.",
        "3 replicas on Apache Kafka 4.",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(run))
            .unwrap_or_else(|| panic!("no row for {run}:\n{report}"));
        assert!(row.ends_with("PASS"), "{row}");
        // CPU per event: the replicas' is read off their processes, bench's own (the
        // harness) in the pipeline runs; the server's only when it is the bench's own
        // throwaway one (here it is given).
        let mut columns = row.split_whitespace().rev().skip(1);
        let harness = columns.next();
        assert_eq!(columns.next(), Some("-"), "{row}");
        if run.starts_with("database only") || run.starts_with("steady state") {
            assert_eq!(harness, Some("-"), "{row}");
        } else {
            // bench's own share can round to 0 over these few events (/proc counts 10 ms ticks).
            let number = |c: Option<&str>| c.and_then(|c| c.parse::<f64>().ok());
            assert!(number(harness).is_some(), "harness CPU per event: {row}");
            let replicas = number(columns.next()).unwrap_or(0.0);
            assert!(replicas > 0.0, "replica CPU per event: {row}");
        }
    }
    for ratio in [
        "steady state (history) / database only",
        "3 replicas / database only",
        "1 replica / per-event mode",
        "guarded / unsafe",
        "hot SKU / uniform",
        "peak RSS",
        "Apache Kafka / embedded (1 replica)",
        "Apache Kafka / embedded (3 replicas)",
    ] {
        assert!(stdout.contains(ratio), "no {ratio} ratio:\n{report}");
    }
}
