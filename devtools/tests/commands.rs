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

/// `bench` on a small scale: every run (database only in full and small batches, 1 and 3
/// replicas on both brokers,
/// 3 replicas with traces off, at 10% and at 100%, per-event, unsafe, hot SKU, latency, the
/// order service's saga on both brokers, memory)
/// completes and passes its audit, and the report
/// (`--json`) has every run and ratio. Speed is not asserted here: the numbers are for `bench`
/// at full size.
#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_every_mode_and_each_passes_verify() {
    install_apache();
    let db = database().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = dir.path().join("bench.json");
    let json_arg = json.clone();
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
                "--saga-rate",
                "500",
                "--history",
                "20000",
                "--apache",
                "--apache-warmup",
                "1",
            ])
            .arg("--json")
            .arg(&json_arg)
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
    // The traced runs' replicas exported to bench's receiver.
    let exports = report
        .lines()
        .filter_map(|l| {
            l.split("trace receiver: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max();
    assert!(
        exports.is_some_and(|n| n > 0),
        "no spans reached bench's receiver:\n{report}"
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("reading bench's --json ({e}):\n{report}"));
    let figures: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bench's --json ({e}):\n{text}"));
    assert_eq!(figures["verified"].as_bool(), Some(true), "{text}");
    every_run_measured(&figures["runs"], &text);
    every_ratio_reported(&figures["ratios"], &text);
}

/// `bench --json`'s runs (small scale, as above): every one verified, with its figures.
fn every_run_measured(runs: &serde_json::Value, text: &str) {
    let runs = runs.as_array().map(Vec::as_slice).unwrap_or_default();
    // Every run, by its `--only` key, with the events the flags above give it.
    for (key, events) in [
        ("database", 10_000_u64),
        // A twentieth of the events, at least 1,000, in batches of `--small-batch` (5).
        ("database-small", 1_000),
        ("steady", 10_000),
        ("one", 10_000),
        ("three", 10_000),
        ("traces-off", 10_000),
        ("traces-10", 10_000),
        ("traces-100", 10_000),
        ("per-event", 1_000),
        ("unsafe", 10_000),
        ("hot", 10_000),
        ("latency", 1_000),
        // Requests: each order's reserve and its commit.
        ("saga", 1_000),
        // With its second of warm-up at the same rate.
        ("saga-apache", 1_500),
        ("memory", 8_000),
        ("one-apache", 10_000),
        ("three-apache", 10_000),
    ] {
        let run = runs
            .iter()
            .find(|r| r["key"].as_str() == Some(key))
            .unwrap_or_else(|| panic!("no run {key}:\n{text}"));
        assert_eq!(run["verified"].as_bool(), Some(true), "{run}");
        assert_eq!(run["events"].as_u64(), Some(events), "{run}");
        assert!(
            run["events_per_second"].as_f64().is_some_and(|r| r > 0.0),
            "{run}"
        );
        // CPU per event: the replicas' is read off their processes, bench's own (the
        // harness) in the pipeline runs; the server's only when it is the bench's own
        // throwaway one (here it is given).
        let cpu = &run["cpu_seconds_per_event"];
        assert!(cpu["server"].is_null(), "server CPU per event: {run}");
        if matches!(key, "database" | "database-small" | "steady") {
            assert!(cpu["harness"].is_null(), "harness CPU per event: {run}");
        } else {
            // bench's own share can be 0 over these few events (/proc counts 10 ms ticks).
            assert!(
                cpu["harness"].as_f64().is_some(),
                "harness CPU per event: {run}"
            );
            assert!(
                cpu["replicas"].as_f64().is_some_and(|s| s > 0.0),
                "replica CPU per event: {run}"
            );
        }
        match key {
            "latency" | "saga" | "saga-apache" => assert!(
                run["latency_p50_ms"].as_f64().is_some()
                    && run["latency_p99_ms"].as_f64().is_some(),
                "latency percentiles: {run}"
            ),
            "memory" => assert!(
                run["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0),
                "peak RSS: {run}"
            ),
            _ => {}
        }
    }
}

/// `bench --json`'s ratios: every one, by its name and what it compares, with a verdict where
/// it has a target. Not "guarded / unsafe" by CPU time, nor small against full batches by the
/// server's CPU, which need the server's CPU: the server here is given, not bench's own.
fn every_ratio_reported(ratios: &serde_json::Value, text: &str) {
    let ratios = ratios.as_array().map(Vec::as_slice).unwrap_or_default();
    for (name, by, targeted) in [
        ("steady state (history) / database only", Some("rate"), true),
        ("3 replicas / database only", Some("rate"), true),
        ("1 replica / per-event mode", Some("rate"), true),
        ("guarded / unsafe (1 replica)", Some("rate"), true),
        ("hot SKU / uniform (1 replica)", Some("rate"), true),
        ("small / full batches, client CPU", Some("cpu_time"), true),
        ("Apache Kafka / embedded (1 replica)", Some("rate"), false),
        ("Apache Kafka / embedded (3 replicas)", Some("rate"), false),
        ("traces at 10% / off (3 replicas)", Some("rate"), true),
        ("traces at 100% / off (3 replicas)", Some("rate"), false),
        ("peak RSS of the memory run, MiB", None, true),
    ] {
        let ratio = ratios
            .iter()
            .find(|r| r["name"].as_str() == Some(name) && r["by"].as_str() == by)
            .unwrap_or_else(|| panic!("no ratio {name} by {by:?}:\n{text}"));
        assert!(ratio["value"].as_f64().is_some(), "{ratio}");
        assert_eq!(ratio["target"].is_object(), targeted, "{ratio}");
        assert_eq!(ratio["met"].is_boolean(), targeted, "{ratio}");
    }
}
