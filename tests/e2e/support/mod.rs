//! Test harness: a fresh PostgreSQL database and a broker per test (the embedded one, or Apache
//! Kafka: one node or a cluster), replicas as real processes of the real binary, and helpers to wait for conditions (never a bare sleep as a
//! proof). Logs of each process go to files in the test's temporary directory, printed when a
//! test fails an assertion through [`Replica::log`]; set `TEST_LOG=1` to echo them always.
//!
//! Database: with `TEST_DATABASE_URL` (or `DATABASE_URL`) set, each test creates a uniquely
//! named database on that server and drops it afterwards; otherwise each test starts a
//! throwaway cluster from the PostgreSQL binaries on the machine.
#![allow(dead_code)]

pub mod blackhole;
mod db;
pub mod history;
mod kafka;
pub mod orders;
mod replica;

pub use db::{TestDb, batch, connect, migrated_store, partition_batch, private_ca, source};
pub use kafka::{BackgroundProduce, Broker, read_whole_topic, send, watermarks};
pub use replica::{
    Replica, assert_exclusive_ownership, assert_nothing_applied_twice, http_get, metric,
    terminate_all,
};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use inventory_devtools::embedded::replica::{ReplicaProcess, Service, local_env};
use inventory_devtools::embedded::wait;
use std::time::Duration;

use inventory_consumer::expectation::Expectation;
use inventory_devtools::embedded::apache;
use tempfile::TempDir;

/// The service's binary, as users run it.
pub const BIN: &str = env!("CARGO_BIN_EXE_inventory-consumer");

/// `inventory-dev` (the workspace's development tools: `broker`, `produce`), built beside
/// [`BIN`] by `cargo nextest run --workspace`, the README's test command.
pub fn dev_bin() -> PathBuf {
    let dev = Path::new(BIN).with_file_name("inventory-dev");
    assert!(
        dev.exists(),
        "{} is missing: the tests run from the workspace (`cargo nextest run --workspace`), \
         which builds it",
        dev.display()
    );
    dev
}
/// How long a test waits for a workload to be decided on one replica or a steady group.
pub const SETTLE: Duration = Duration::from_secs(120);
/// ... with a restore, a cut from the database or a replay on the way.
pub const SETTLE_SLOW: Duration = Duration::from_secs(180);
/// ... through the group scenarios' rebalances and faults on Apache Kafka.
pub const SETTLE_GROUP: Duration = Duration::from_secs(240);
/// How long a replica may take to exit after SIGTERM (drain, commit, leave the group).
pub const EXIT: Duration = Duration::from_secs(30);

pub const TOPIC: &str = "inventory-events";
/// Where replies go (`kafka.results_topic`'s default).
pub const RESULTS_TOPIC: &str = "inventory-results";
pub const GROUP: &str = "inventory-consumer-group";

/// [`wait::wait_until`], the harness's bounded wait, failing the test when it times out.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(e) = wait::wait_until(what, timeout, condition).await {
        panic!("{e}");
    }
}

/// Waits until each of `replicas` owns partitions and together they own all `partitions`: the
/// group has formed, so the work sent next is shared, and none of it is a backlog that one
/// replica drained alone before the others joined.
pub async fn wait_for_group(replicas: &[&Replica], partitions: usize, timeout: Duration) {
    wait_until("every replica to own partitions", timeout, || async {
        let owned: Vec<usize> = replicas.iter().map(|r| r.owned().len()).collect();
        owned.iter().all(|&n| n > 0) && owned.iter().sum::<usize>() == partitions
    })
    .await;
}

/// One test's world: a database, an embedded broker, a directory for files and logs.
pub struct TestEnv {
    pub db: TestDb,
    pub broker: Broker,
    pub dir: TempDir,
}

impl TestEnv {
    pub async fn new(partitions: i32) -> TestEnv {
        Self::with_brokers(partitions, 1).await
    }

    /// The same world on Apache Kafka: a cluster of `nodes` KRaft nodes (replication factor
    /// and `min.insync.replicas` follow: 3 and 2 from three nodes on), installed first if needed.
    pub async fn on_apache(partitions: i32, nodes: usize) -> TestEnv {
        let options = apache::ClusterOptions {
            nodes,
            ..Default::default()
        };
        Self::on_apache_with(partitions, options).await
    }

    /// [`TestEnv::on_apache`] with every cluster option (e.g. a SASL_SSL listener).
    pub async fn on_apache_with(partitions: i32, options: apache::ClusterOptions) -> TestEnv {
        let dir = tempfile::Builder::new()
            .disable_cleanup(std::env::var_os("TEST_KEEP_DIR").is_some())
            .tempdir()
            .expect("tempdir");
        let broker = Broker::start_apache(dir.path(), partitions, options).await;
        let db = TestDb::new().await;
        TestEnv { db, broker, dir }
    }

    /// A cluster of `brokers` mock brokers, which takes fault commands ([`Broker::inject`]).
    pub async fn with_brokers(partitions: i32, brokers: i32) -> TestEnv {
        // TEST_KEEP_DIR keeps the logs and files of every test for a look afterwards.
        let dir = tempfile::Builder::new()
            .disable_cleanup(std::env::var_os("TEST_KEEP_DIR").is_some())
            .tempdir()
            .expect("tempdir");
        let broker = Broker::start(dir.path(), partitions, brokers).await;
        let db = TestDb::new().await;
        TestEnv { db, broker, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A replica process with the test defaults (KIP-848 group protocol, which rebalances in
    /// about a second on the mock, JSON logs) and `settings` on top.
    pub fn replica(&self, name: &str, settings: &[(&str, &str)]) -> Replica {
        self.replica_with_env(name, &[], settings)
    }

    /// [`TestEnv::replica`] with more environment variables (later ones win).
    pub fn replica_with_env(
        &self,
        name: &str,
        extra_env: &[(&str, &str)],
        settings: &[(&str, &str)],
    ) -> Replica {
        self.replica_of(Path::new(BIN), name, extra_env, settings)
    }

    /// [`TestEnv::replica_with_env`] of another build of the service (the previous release).
    pub fn replica_of(
        &self,
        bin: &Path,
        name: &str,
        extra_env: &[(&str, &str)],
        settings: &[(&str, &str)],
    ) -> Replica {
        let mut env: Vec<(&str, String)> = local_env(&self.broker.bootstrap, &self.db.url);
        env.extend([
            (
                "INVENTORY_LOG__LEVEL",
                "info,inventory_consumer=debug".to_owned(),
            ),
            ("INVENTORY_KAFKA__GROUP_PROTOCOL", "consumer".to_owned()),
        ]);
        env.extend(extra_env.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let process =
            ReplicaProcess::spawn(&Service::binary(bin), name, self.dir.path(), &env, settings)
                .expect("starting a replica");
        Replica {
            process,
            killed_at: None,
        }
    }

    /// Runs `produce` with `args` and returns the expectation it wrote.
    pub fn produce(&self, args: &[&str]) -> Expectation {
        self.produce_in_background(args).finish()
    }

    /// Starts `produce` with `args` as a background process (use `--rate` to make it last).
    pub fn produce_in_background(&self, args: &[&str]) -> BackgroundProduce {
        let expected = self.path(&format!("expected-{:08x}.json", rand::random::<u32>()));
        let child = Command::new(dev_bin())
            .arg("produce")
            .args(args)
            .arg("--quiet")
            .arg("--expected-out")
            .arg(&expected)
            .env("KAFKA_BROKERS", &self.broker.bootstrap)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting produce");
        BackgroundProduce { child, expected }
    }

    /// Sends JSON values as messages, one per line of a file; `random_keys` spreads them over
    /// the partitions instead of keying them by SKU.
    pub fn produce_json(&self, events: &[serde_json::Value], random_keys: bool) -> Expectation {
        let file = self.path(&format!("events-{:08x}.jsonl", rand::random::<u32>()));
        let lines: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        std::fs::write(&file, lines.join("\n")).expect("writing events");
        let file = file.to_string_lossy().into_owned();
        let mut args = vec!["--file", file.as_str()];
        if random_keys {
            args.extend(["--keys", "random"]);
        }
        self.produce(&args)
    }

    /// Runs `inventory-consumer <command> <args>` on this world's database and broker.
    pub fn command(&self, command: &str, args: &[&str]) -> Output {
        self.command_of(Path::new(BIN), command, args)
    }

    /// [`TestEnv::command`] of another build of the service (the previous release).
    pub fn command_of(&self, bin: &Path, command: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .arg(command)
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("KAFKA_BROKERS", &self.broker.bootstrap)
            .output()
            .unwrap_or_else(|e| panic!("running {command}: {e}"))
    }

    /// [`TestEnv::command`], which must succeed; returns its standard output.
    pub fn command_ok(&self, command: &str, args: &[&str]) -> String {
        let out = self.command(command, args);
        assert!(
            out.status.success(),
            "{command} {args:?} failed:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `verify`, optionally against an expectation; returns (success, output).
    pub fn verify(&self, expected: Option<&Expectation>) -> (bool, String) {
        let mut cmd = Command::new(BIN);
        cmd.arg("verify").env("DATABASE_URL", &self.db.url);
        if let Some(e) = expected {
            let path = self.path("verify-expected.json");
            std::fs::write(&path, serde_json::to_vec(e).expect("json")).expect("writing");
            cmd.arg("--expected").arg(path);
        }
        let out = cmd.output().expect("running verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Waits until at least `rows` events and dead letters are in the database and the group
    /// has committed every offset to Kafka.
    pub async fn wait_processed(&self, rows: i64, timeout: Duration) {
        wait_until(&format!("{rows} messages to settle"), timeout, || async {
            self.db.settled().await >= rows
        })
        .await;
        wait_until("offsets to be committed", timeout, || async {
            self.lag() == 0
        })
        .await;
    }

    /// Messages not yet committed by the group, over all partitions.
    pub fn lag(&self) -> i64 {
        self.broker.lag(GROUP)
    }
}

/// A command's standard output and error, for assertions and their messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `kafka/install.sh` unless the broker is installed; one test process at a time (flock).
pub fn install_apache() {
    apache::install().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A test that cannot run here says so and passes, except in CI (`CI` set), where every lane
/// must run: there a missing tool fails the test.
pub fn skip_unless_ci(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run every test, but: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
}

/// The previous release: the newest section of CHANGELOG.md that names its commit, built from
/// this repository's history once per machine by `scripts/previous-release` (which `.ci/run`
/// calls before the tests, so that a cold build is timed on its own). Returns (commit, binary).
pub fn previous_release() -> (String, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/previous-release");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/previous-release");
    assert!(
        out.status.success(),
        "scripts/previous-release failed ({})",
        out.status
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let commit = bin
        .parent()
        .and_then(Path::file_name)
        .map(|c| c.to_string_lossy().into_owned())
        .expect("the binary's directory names its commit");
    (commit, bin)
}
