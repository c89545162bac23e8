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

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use chrono::{DateTime, Utc};
use inventory_devtools::embedded::replica::{
    LogSummary, ReplicaProcess, Service, local_env, partition_list,
};
use inventory_devtools::embedded::{topic, wait};
use std::time::Duration;

use inventory_consumer::expectation::Expectation;
use inventory_consumer::stats::StatsSnapshot;
use inventory_devtools::embedded::apache;
use inventory_devtools::embedded::postgres::{PostgresOptions, ServerTls, ThrowawayPostgres};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
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

/// A fresh database for one test.
pub struct TestDb {
    pub url: String,
    server: Option<ThrowawayPostgres>,
    /// On a shared server: (admin URL, database name) to drop afterwards.
    shared: Option<(String, String)>,
}

impl TestDb {
    /// Stops a throwaway server for good (its database is lost); `false` on a shared server,
    /// which tests never stop.
    pub fn stop_server(&mut self) -> bool {
        match &mut self.server {
            Some(server) => {
                server.stop();
                true
            }
            None => false,
        }
    }

    /// Restarts the throwaway server (every session ended, committed data kept) on the same
    /// port; `false` on a shared server.
    pub fn restart_server(&mut self) -> bool {
        match &mut self.server {
            Some(server) => {
                server.restart().expect("restarting PostgreSQL");
                true
            }
            None => false,
        }
    }

    pub async fn new() -> TestDb {
        let base = std::env::var("TEST_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .ok();
        match base {
            Some(admin) => {
                let name = format!(
                    "inventory_test_{}_{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                TestDb {
                    url: inventory_consumer::store::create_database(&admin, &name)
                        .await
                        .expect("creating the test database"),
                    server: None,
                    shared: Some((admin, name)),
                }
            }
            None => {
                let server = tokio::task::spawn_blocking(|| {
                    ThrowawayPostgres::start(PostgresOptions::default())
                })
                .await
                .expect("joining")
                .expect("starting a throwaway PostgreSQL (or set TEST_DATABASE_URL)");
                TestDb {
                    url: server.url("postgres"),
                    server: Some(server),
                    shared: None,
                }
            }
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The first column of the first row, as i64.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let client = self.client().await;
        client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    pub async fn stock(&self) -> BTreeMap<String, i64> {
        let client = self.client().await;
        client
            .query("SELECT sku, current_stock FROM products", &[])
            .await
            .expect("reading stock")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Rows in `processed_events` plus `dead_letters`: every message that reached an end. None
    /// while the first replica is still creating the schema (its last migration makes
    /// `history_periods`).
    pub async fn settled(&self) -> i64 {
        let client = self.client().await;
        let migrated: bool = client
            .query_one("SELECT to_regclass('history_periods') IS NOT NULL", &[])
            .await
            .expect("looking for the schema")
            .get(0);
        if !migrated {
            return 0;
        }
        inventory_consumer::store::audit::settled(&client)
            .await
            .expect("counting settled messages")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.shared.take() {
            // Drop runs outside any runtime guarantee: use a small one of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let _ = rt.block_on(inventory_consumer::store::drop_database(&admin, &name));
            })
            .join();
        }
        drop(self.server.take());
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
    tokio::spawn(conn);
    client
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

pub use inventory_devtools::embedded::topic::TopicMessage;

/// A command's standard output and error, for assertions and their messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Each partition's watermarks (low, high) of `topic`.
pub fn watermarks(bootstrap: &str, topic: &str) -> BTreeMap<i32, (i64, i64)> {
    topic::watermarks(bootstrap, topic).expect("watermarks")
}

/// Every message of `topic` up to the high watermarks taken first, partition by partition in
/// offset order, with those watermarks.
pub fn read_whole_topic(
    bootstrap: &str,
    topic: &str,
) -> (Vec<TopicMessage>, BTreeMap<i32, (i64, i64)>) {
    topic::read_whole_topic(bootstrap, topic, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Sends each `(partition, key, payload)` to the topic, in order per partition, and waits for
/// the broker's acknowledgement of all (idempotent, `acks=all`).
pub fn send(bootstrap: &str, messages: impl IntoIterator<Item = (i32, String, Vec<u8>)>) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "4194304")
        .set("log_level", "3")
        .create()
        .expect("test producer");
    for (partition, key, payload) in messages {
        let mut record = BaseRecord::to(TOPIC)
            .partition(partition)
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // The local queue is full: let deliveries drain, then try again.
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("every message acknowledged");
}

/// A `produce` process running while the test acts.
pub struct BackgroundProduce {
    child: Child,
    expected: PathBuf,
}

impl BackgroundProduce {
    /// Waits for the producer to finish and returns its expectation.
    pub fn finish(self) -> Expectation {
        let out = self.child.wait_with_output().expect("waiting for produce");
        assert!(
            out.status.success(),
            "produce failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&self.expected).expect("reading the expectation");
        serde_json::from_str(&text).expect("parsing the expectation")
    }
}

/// The broker of a test: the embedded one (an `inventory-dev broker` process), or Apache
/// Kafka.
pub struct Broker {
    pub bootstrap: String,
    server: Server,
}

enum Server {
    Mock(Child),
    Apache(apache::ApacheKafka),
}

impl Broker {
    pub async fn start(dir: &Path, partitions: i32, brokers: i32) -> Broker {
        let file = dir.join("bootstrap");
        let child = Command::new(dev_bin())
            .arg("broker")
            .arg("--partitions")
            .arg(partitions.to_string())
            .arg("--broker-count")
            .arg(brokers.to_string())
            .arg("--bootstrap-file")
            .arg(&file)
            .arg("--faults-from-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("broker.log")).expect("broker log"))
            .spawn()
            .expect("starting the broker");
        let path = file.clone();
        wait_until(
            "the broker's bootstrap file",
            Duration::from_secs(20),
            || {
                let ready = path.exists();
                async move { ready }
            },
        )
        .await;
        let bootstrap = std::fs::read_to_string(&file).expect("bootstrap file");
        Broker {
            bootstrap,
            server: Server::Mock(child),
        }
    }

    /// Apache Kafka (see [`apache`]), with the topic created; installs the broker first
    /// (`kafka/install.sh`, serialised across test processes) when it is missing.
    pub async fn start_apache(
        dir: &Path,
        partitions: i32,
        options: apache::ClusterOptions,
    ) -> Broker {
        install_apache();
        let nodes = options.nodes;
        let path = dir.to_owned();
        let cluster =
            tokio::task::spawn_blocking(move || apache::ApacheKafka::start(&path, &options))
                .await
                .expect("joining")
                .unwrap_or_else(|e| panic!("starting Apache Kafka: {e:#}"));
        let replication = nodes.min(3) as i32;
        // Topics are not created on use there (as on most production clusters).
        for topic in [TOPIC, RESULTS_TOPIC] {
            cluster
                .create_topic(topic, partitions, replication)
                .await
                .unwrap_or_else(|e| panic!("creating {topic} on Apache Kafka: {e:#}"));
        }
        let bootstrap = cluster.bootstrap().to_owned();
        std::fs::write(dir.join("bootstrap"), &bootstrap).expect("bootstrap file");
        Broker {
            bootstrap,
            server: Server::Apache(cluster),
        }
    }

    /// The Apache Kafka cluster behind this broker, to kill and restart its nodes.
    pub fn apache(&mut self) -> &mut apache::ApacheKafka {
        match &mut self.server {
            Server::Apache(cluster) => cluster,
            Server::Mock(_) => panic!("this test runs on the embedded broker, not Apache Kafka"),
        }
    }

    /// Sends a fault command to the broker (see `devtools/src/embedded/faults.rs`).
    pub fn inject(&mut self, command: &str) {
        use std::io::Write;
        let Server::Mock(child) = &mut self.server else {
            panic!("faults are typed into the embedded broker only");
        };
        let stdin = child.stdin.as_mut().expect("the broker's stdin");
        writeln!(stdin, "{command}").expect("sending a fault command");
        stdin.flush().expect("sending a fault command");
    }

    /// Sum over partitions of high watermark minus the group's committed offset.
    pub fn lag(&self, group: &str) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("log_level", "3")
            .create()
            .expect("lag consumer");
        let metadata = consumer
            .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
            .expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(TOPIC, *p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        partitions
            .iter()
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(TOPIC, *p, Duration::from_secs(10))
                    .expect("watermarks");
                let done = match committed.find_partition(TOPIC, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                high - done
            })
            .sum()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Apache Kafka's nodes are killed by their own drop.
        if let Server::Mock(child) = &mut self.server {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

/// A private CA (its certificate, PEM) and a server certificate it signed for 127.0.0.1 and
/// localhost.
pub fn private_ca() -> (String, ServerTls) {
    // Distinct names: OpenSSL takes a certificate whose issuer equals its subject for a
    // self-signed one (rcgen gives every certificate the same default name).
    let name = |cn: &str| {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        dn
    };
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = name(&format!("test CA {:08x}", rand::random::<u32>()));
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let mut params = rcgen::CertificateParams::new(names).expect("server params");
    params.distinguished_name = name("127.0.0.1");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let server = ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    (ca.pem(), server)
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

/// A `run` process of the test.
pub struct Replica {
    process: ReplicaProcess,
    /// When the test killed it (its ownership ends there at the latest).
    killed_at: Option<DateTime<Utc>>,
}

/// A stretch of time during which a replica owned a partition.
#[derive(Debug, Clone)]
pub struct Ownership {
    pub replica: String,
    pub partition: i32,
    pub from: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
}

/// A committed batch, from a replica's log.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub replica: String,
    pub partition: i32,
    pub at: DateTime<Utc>,
    pub first_offset: i64,
    pub last_offset: i64,
    pub duplicates: u64,
}

impl Replica {
    pub fn name(&self) -> &str {
        &self.process.name
    }

    pub fn pid(&self) -> Pid {
        self.process
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name()))
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// Whether the process is alive: not exited, not a zombie awaiting its parent.
    pub fn is_running(&self) -> bool {
        let Some(pid) = self.process.pid() else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    }

    /// The most memory the process has held resident so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the replica's /proc status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status");
        kib / 1024.0
    }

    /// The partitions the replica owns according to its latest assign/revoke log line.
    pub fn owned(&self) -> Vec<i32> {
        self.process.owned()
    }

    fn log_entries(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Ownership intervals from the replica's assign/revoke/lost log lines; an interval still
    /// open ends when the test killed the replica, or stays open.
    pub fn ownership(&self) -> Vec<Ownership> {
        let mut open: BTreeMap<i32, DateTime<Utc>> = BTreeMap::new();
        let mut done = Vec::new();
        for e in self.log_entries() {
            let (Some(message), Some(at)) = (e["message"].as_str(), timestamp(&e)) else {
                continue;
            };
            let field = match message {
                "partitions assigned" => "assigned",
                "partitions revoked" => "revoked",
                "partitions lost; their offsets are not committed" => "lost",
                _ => continue,
            };
            for p in partition_list(e[field].as_str().unwrap_or("")) {
                if field == "assigned" {
                    open.insert(p, at);
                } else if let Some(from) = open.remove(&p) {
                    done.push(self.interval(p, from, Some(at)));
                }
            }
        }
        for (p, from) in open {
            done.push(self.interval(p, from, self.killed_at));
        }
        done
    }

    fn interval(
        &self,
        partition: i32,
        from: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Ownership {
        Ownership {
            replica: self.name().to_owned(),
            partition,
            from,
            until,
        }
    }

    /// The address the replica's HTTP endpoints listen on (from its start-up log line).
    pub async fn http_addr(&self) -> String {
        let mut addr = String::new();
        wait_until(
            &format!("{} to serve HTTP", self.name()),
            Duration::from_secs(30),
            || {
                addr = self.process.http_addr().unwrap_or_default();
                let found = !addr.is_empty();
                async move { found }
            },
        )
        .await;
        addr
    }

    /// What the replica's log says it did (batches, duplicates, rebalances).
    pub fn log_summary(&self) -> LogSummary {
        self.process.log_summary()
    }

    /// Every batch the replica logged as committed.
    pub fn batches(&self) -> Vec<BatchRecord> {
        self.log_entries()
            .iter()
            .filter(|e| e["message"] == "batch committed")
            .filter_map(|e| {
                Some(BatchRecord {
                    replica: self.name().to_owned(),
                    partition: e["partition"].as_i64()? as i32,
                    at: timestamp(e)?,
                    first_offset: e["first_offset"].as_i64()?,
                    last_offset: e["last_offset"].as_i64()?,
                    duplicates: e["duplicates"].as_u64()?,
                })
            })
            .collect()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the printed counters.
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, StatsSnapshot) {
        let _ = nix::sys::signal::kill(self.pid(), Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for an exit already under way; returns the status and the printed counters.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, StatsSnapshot) {
        let (status, stats) = self
            .process
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
        let stats = stats
            .unwrap_or_else(|| panic!("{} printed no counters; log:\n{}", self.name(), self.log()));
        (status, stats)
    }

    /// Waits for an exit that prints no counters (a second signal); returns its status.
    pub fn wait_abrupt_exit(&mut self, timeout: Duration) -> ExitStatus {
        let (status, _) = self
            .process
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
        status
    }

    /// SIGSTOP: the process freezes as in a long pause (its sessions and connections stay open).
    pub fn pause(&self) {
        nix::sys::signal::kill(self.pid(), Signal::SIGSTOP).expect("pausing a replica");
    }

    /// SIGCONT after [`Replica::pause`].
    pub fn resume(&self) {
        nix::sys::signal::kill(self.pid(), Signal::SIGCONT).expect("resuming a replica");
    }

    /// SIGKILL: no drain, no commit. The replica's log stays readable.
    pub fn kill(&mut self) {
        self.process.kill().expect("killing a replica");
        self.killed_at = Some(Utc::now());
    }
}

fn timestamp(entry: &serde_json::Value) -> Option<DateTime<Utc>> {
    entry["timestamp"].as_str()?.parse::<DateTime<Utc>>().ok()
}

/// `"[0, 3, 5]"` (a Debug-formatted list in a JSON log field) as numbers.
/// Checks that no partition was owned by two replicas at once and that every batch was
/// committed by a replica while it owned the batch's partition.
pub fn assert_exclusive_ownership(replicas: &[&Replica]) {
    let intervals: Vec<Ownership> = replicas.iter().flat_map(|r| r.ownership()).collect();
    let batches: usize = replicas.iter().map(|r| r.batches().len()).sum();
    assert!(
        !intervals.is_empty() && batches > 0,
        "nothing to check: {} ownership intervals and {batches} batches in the logs",
        intervals.len()
    );
    for a in &intervals {
        for b in &intervals {
            if a.replica == b.replica || a.partition != b.partition {
                continue;
            }
            let a_before_b = a.until.is_some_and(|u| u <= b.from);
            let b_before_a = b.until.is_some_and(|u| u <= a.from);
            assert!(
                a_before_b || b_before_a,
                "partition {} owned by two replicas at once: {a:?} and {b:?}",
                a.partition
            );
        }
    }
    for r in replicas {
        for batch in r.batches() {
            let covered = intervals.iter().any(|o| {
                o.replica == batch.replica
                    && o.partition == batch.partition
                    && o.from <= batch.at
                    && o.until.is_none_or(|u| batch.at <= u)
            });
            assert!(
                covered,
                "batch committed outside its replica's ownership: {batch:?}"
            );
        }
    }
}

/// SIGTERMs every replica; each must exit 0. Returns their counters added up.
pub fn terminate_all(replicas: &mut [Replica], timeout: Duration) -> StatsSnapshot {
    let mut total = StatsSnapshot::default();
    for r in replicas {
        let (status, stats) = r.terminate(timeout);
        assert!(status.success(), "{} exited with {status}", r.name());
        total = total + stats;
    }
    total
}

/// Checks that no offset of any partition was committed in two batches, by any replicas: every
/// new owner started where the last commit left the partition, and no stale owner committed
/// after it (what the database fence guarantees).
pub fn assert_nothing_applied_twice(replicas: &[&Replica]) {
    let mut by_partition: BTreeMap<i32, Vec<BatchRecord>> = BTreeMap::new();
    for r in replicas {
        for b in r.batches() {
            by_partition.entry(b.partition).or_default().push(b);
        }
    }
    assert!(
        !by_partition.is_empty(),
        "nothing to check: no committed batch in the replicas' logs"
    );
    for batches in by_partition.values_mut() {
        batches.sort_by_key(|b| (b.first_offset, b.last_offset));
        for pair in batches.windows(2) {
            assert!(
                pair[0].last_offset < pair[1].first_offset,
                "offsets committed twice: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TEST_LOG").is_some() {
            let log = self.log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| !l.contains("batch committed"))
                .take(20)
                .collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.name(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// GET on a replica's HTTP endpoints: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    // 503 is an answer to look at here, not an error.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .expect("requesting from the replica");
    let body = response
        .body_mut()
        .read_to_string()
        .expect("reading the response");
    (response.status().as_u16(), body)
}

/// Sum of a Prometheus metric's samples whose labels contain every one of `labels`
/// (`name{...} value` lines, or `name value`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r),
                None => (series, ""),
            };
            (metric_name == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
