//! Apache Kafka itself, for tests, `demo` and `bench`: one KRaft node (broker and controller in
//! one process) or a cluster of them, on free loopback ports, each with its data and log in a
//! directory of the caller's. This is the broker the guarantees are proven on: the group
//! coordinator (generations, member epochs, commit fencing, the KIP-848 assignor) is the real
//! one, unlike librdkafka's mock.
//!
//! The broker's jars come from Maven Central through `kafka/install.sh` (version pinned in
//! `kafka/pom.xml`, read here at compile time so that the two cannot disagree). Nodes are Java
//! processes of `kafka.Kafka`, formatted first with `kafka.tools.StorageTool`; a node killed
//! with [`ApacheKafka::kill`] can be started again on the same ports and data directory.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Partitions of `__consumer_offsets`: few, so that a node starts quickly.
const OFFSETS_PARTITIONS: i32 = 6;

/// The Kafka version of `kafka/pom.xml`.
pub fn version() -> &'static str {
    const POM: &str = include_str!("../../../kafka/pom.xml");
    POM.split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map_or("unknown", |(v, _)| v.trim())
}

/// Where `kafka/install.sh` puts the broker: `$APACHE_KAFKA_HOME`, else a per-user cache.
pub fn home() -> PathBuf {
    match std::env::var_os("APACHE_KAFKA_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/inventory-consumer")
            .join(format!("apache-kafka-{}", version())),
    }
}

/// Whether `kafka/install.sh` has completed in [`home`].
pub fn is_installed() -> bool {
    home().join("installed").is_file()
}

/// Runs `kafka/install.sh` unless the broker is installed already, one process at a time
/// across the machine (tests start in parallel): the first installs, the others wait and find
/// it done.
pub fn install() -> Result<()> {
    if is_installed() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kafka/install.sh");
    let lock = std::env::temp_dir().join("inventory-consumer-kafka-install.lock");
    let status = Command::new("flock")
        .arg(&lock)
        .arg(&script)
        .status()
        .context("running kafka/install.sh")?;
    ensure!(
        status.success() && is_installed(),
        "installing Apache Kafka with kafka/install.sh failed ({status}); it needs Maven and \
         Java 17 or newer"
    );
    Ok(())
}

/// How a cluster is laid out and tuned. The defaults suit tests: quick group formation and
/// short KIP-848 sessions, so that a frozen member is expelled in seconds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// KIP-848 groups: the session the broker gives members (its minimum is lowered to match).
    pub consumer_session_timeout_ms: u32,
    pub consumer_heartbeat_interval_ms: u32,
    /// A second listener on every node, SASL_SSL: TLS with this certificate, SCRAM users.
    pub sasl_ssl: Option<SaslSsl>,
    /// Maximum heap of each node's JVM.
    pub heap_mib: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 1,
            consumer_session_timeout_ms: 6_000,
            consumer_heartbeat_interval_ms: 1_000,
            sasl_ssl: None,
            heap_mib: 320,
        }
    }
}

/// What a SASL_SSL listener needs: the server's certificate and key (PEM, the key PKCS#8 and
/// unencrypted), and the SCRAM-SHA-512 users (name, password) created with the cluster.
#[derive(Debug, Clone)]
pub struct SaslSsl {
    pub cert_pem: String,
    pub key_pem: String,
    pub users: Vec<(String, String)>,
}

struct Node {
    id: usize,
    port: u16,
    /// The SASL_SSL listener's port, when the cluster has one.
    secure_port: Option<u16>,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running Apache Kafka cluster; dropping it kills every node.
pub struct ApacheKafka {
    nodes: Vec<Node>,
    bootstrap: String,
    /// Each node's JVM heap, kept for restarts.
    heap_mib: u32,
}

impl ApacheKafka {
    /// Formats and starts `options.nodes` nodes under `dir` and waits until every one serves
    /// metadata. Fails with what to do when the broker is not installed.
    pub fn start(dir: &Path, options: &ClusterOptions) -> Result<ApacheKafka> {
        ensure!(
            is_installed(),
            "Apache Kafka {} is not installed in {}: run kafka/install.sh (needs Maven and Java 17+)",
            version(),
            home().display()
        );
        ensure!(options.nodes >= 1, "a cluster needs at least one node");
        // Ports held until all are chosen, so that no two come out the same.
        let mut held = Vec::new();
        let mut free_port = || -> Result<u16> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            held.push(listener);
            Ok(port)
        };
        let mut nodes = Vec::new();
        for id in 1..=options.nodes {
            nodes.push(Node {
                id,
                port: free_port()?,
                secure_port: match options.sasl_ssl {
                    Some(_) => Some(free_port()?),
                    None => None,
                },
                controller_port: free_port()?,
                dir: dir.join(format!("kafka-{id}")),
                child: None,
            });
        }
        drop(held);
        let voters = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let bootstrap = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = "aW52ZW50b3J5LWNvbnN1bQ"; // 16 bytes, base64url: any fixed id will do
        for node in &nodes {
            std::fs::create_dir_all(&node.dir)
                .with_context(|| format!("creating {}", node.dir.display()))?;
            write_config(node, &voters, options)?;
            let mut format = java(options.heap_mib);
            format
                .arg("kafka.tools.StorageTool")
                .args(["format", "-t", cluster_id, "-c"])
                .arg(node.dir.join("server.properties"));
            for (name, password) in options.sasl_ssl.iter().flat_map(|s| &s.users) {
                format
                    .arg("--add-scram")
                    .arg(format!("SCRAM-SHA-512=[name={name},password={password}]"));
            }
            let out = format.output().context("running Kafka's StorageTool")?;
            ensure!(
                out.status.success(),
                "formatting node {}: {}",
                node.id,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut cluster = ApacheKafka {
            nodes,
            bootstrap,
            heap_mib: options.heap_mib,
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(cluster.nodes.len(), Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// The bootstrap list of every node (PLAINTEXT listeners).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The bootstrap list of the SASL_SSL listeners, when the cluster has them.
    pub fn secure_bootstrap(&self) -> Option<String> {
        let ports: Option<Vec<String>> = self
            .nodes
            .iter()
            .map(|n| n.secure_port.map(|p| format!("127.0.0.1:{p}")))
            .collect();
        ports.map(|p| p.join(","))
    }

    /// The client port of node `id`.
    pub fn port(&self, id: usize) -> u16 {
        self.nodes[id - 1].port
    }

    /// Creates `topic` with `partitions` and `replication` copies (at most the node count),
    /// waiting until the broker confirms it. Messages up to 3 MiB are accepted (Kafka's
    /// default is 1 MiB), so that what refuses a larger value is the consumer's own limit
    /// (`payload_too_large`), as on a topic configured for large messages.
    pub async fn create_topic(&self, topic: &str, partitions: i32, replication: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "3")
            .create()
            .context("creating an admin client")?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
            .set("max.message.bytes", "3145728");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics(&[new], &options).await? {
            if let Err((name, code)) = result {
                bail!("creating topic {name}: {code}");
            }
        }
        Ok(())
    }

    /// SIGKILL to node `id`: no controlled shutdown, its log unflushed, as in a crash.
    pub fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.nodes[id - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether node `id` is running (started and not killed).
    pub fn is_running(&self, id: usize) -> bool {
        self.nodes[id - 1].child.is_some()
    }

    /// Starts node `id` again on its ports and data directory and waits until the cluster
    /// serves metadata with every running node in it.
    pub fn restart(&mut self, id: usize) -> Result<()> {
        ensure!(!self.is_running(id), "node {id} is still running");
        self.spawn(id - 1)?;
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        self.wait_ready(running, Duration::from_secs(60))
    }

    /// The node that leads `partition` of `topic` now, from the metadata.
    pub fn leader(&self, topic: &str, partition: i32) -> Result<usize> {
        let metadata = self
            .client()?
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let leader = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .context("no such partition")?;
        ensure!(leader >= 1, "partition {partition} has no leader now");
        Ok(leader as usize)
    }

    /// The node coordinating `group` now: the leader of its `__consumer_offsets` partition,
    /// chosen as Kafka does (Java's `String.hashCode`, made non-negative, modulo the count).
    pub fn coordinator(&self, group: &str) -> Result<usize> {
        let hash = group
            .encode_utf16()
            .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
        // Kafka's `Utils.abs`: `Math.abs`, and 0 for the one value it cannot negate.
        let abs = if hash == i32::MIN { 0 } else { hash.abs() };
        self.leader("__consumer_offsets", abs % OFFSETS_PARTITIONS)
    }

    fn client(&self) -> Result<BaseConsumer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "3")
            .create()?)
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let heap_mib = self.heap_mib;
        let node = &mut self.nodes[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("server.log"))
            .context("opening the broker's log")?;
        let child = java(heap_mib)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                node.dir.join("log4j2.properties").display()
            ))
            .arg("kafka.Kafka")
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a Kafka node (is Java 17 or newer installed?)")?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until metadata lists `brokers` brokers; fails early if a node exits.
    fn wait_ready(&mut self, brokers: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for node in &mut self.nodes {
                if let Some(child) = &mut node.child
                    && let Some(status) = child.try_wait()?
                {
                    bail!(
                        "Kafka node {} exited with {status}; see {}",
                        node.id,
                        node.dir.join("server.log").display()
                    );
                }
            }
            // Every running node listens (a restarted one too: metadata can still list it
            // from before its kill until the controller fences it).
            let up = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .all(|n| TcpStream::connect(("127.0.0.1", n.port)).is_ok());
            if up
                && let Ok(metadata) = self.client()?.fetch_metadata(None, Duration::from_secs(2))
                && metadata.brokers().len() >= brokers
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "Apache Kafka did not serve {brokers} brokers within {timeout:?}; see {}",
                self.nodes[0].dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        // Tests and demos throw the cluster away: no controlled shutdown to wait for.
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

fn java(heap_mib: u32) -> Command {
    let java = std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"));
    let mut cmd = Command::new(java);
    cmd.arg(format!("-Xmx{heap_mib}m"))
        // One GC thread: the machines that run tests have two cores, shared with replicas.
        .arg("-XX:+UseSerialGC")
        .arg("-cp")
        .arg(home().join("libs/*"));
    cmd
}

fn write_config(node: &Node, voters: &str, options: &ClusterOptions) -> Result<()> {
    let mut props = server_properties(node, voters, options);
    if let Some(tls) = &options.sasl_ssl {
        props.extend(sasl_ssl_properties(node, tls)?);
    }
    let text: String = props.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(node.dir.join("server.properties"), text)?;
    std::fs::write(
        node.dir.join("log4j2.properties"),
        "rootLogger.level = INFO\n\
         rootLogger.appenderRef.out.ref = out\n\
         appender.out.type = Console\n\
         appender.out.name = out\n\
         appender.out.layout.type = PatternLayout\n\
         appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
         logger.state.name = state.change.logger\n\
         logger.state.level = WARN\n",
    )?;
    Ok(())
}

/// The node's `server.properties` without the SASL_SSL listener's: a combined broker and
/// controller of a KRaft cluster, replicated as far as its size allows.
fn server_properties(
    node: &Node,
    voters: &str,
    options: &ClusterOptions,
) -> Vec<(&'static str, String)> {
    let replication = options.nodes.min(3);
    let min_isr = if replication >= 3 { 2 } else { 1 };
    let mut listeners = format!("PLAINTEXT://127.0.0.1:{}", node.port);
    if let Some(port) = node.secure_port {
        listeners.push_str(&format!(",SASL_SSL://127.0.0.1:{port}"));
    }
    vec![
        ("process.roles", "broker,controller".to_owned()),
        ("node.id", node.id.to_string()),
        ("controller.quorum.voters", voters.to_owned()),
        (
            "listeners",
            format!(
                "{listeners},CONTROLLER://127.0.0.1:{}",
                node.controller_port
            ),
        ),
        ("advertised.listeners", listeners),
        ("controller.listener.names", "CONTROLLER".to_owned()),
        (
            "listener.security.protocol.map",
            "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT".to_owned(),
        ),
        ("inter.broker.listener.name", "PLAINTEXT".to_owned()),
        ("log.dirs", node.dir.join("data").display().to_string()),
        ("auto.create.topics.enable", "false".to_owned()),
        (
            "offsets.topic.num.partitions",
            OFFSETS_PARTITIONS.to_string(),
        ),
        ("offsets.topic.replication.factor", replication.to_string()),
        (
            "transaction.state.log.replication.factor",
            replication.to_string(),
        ),
        ("transaction.state.log.min.isr", min_isr.to_string()),
        ("default.replication.factor", replication.to_string()),
        ("min.insync.replicas", min_isr.to_string()),
        // Classic groups form at once instead of after 3 s.
        ("group.initial.rebalance.delay.ms", "0".to_owned()),
        (
            "group.consumer.session.timeout.ms",
            options.consumer_session_timeout_ms.to_string(),
        ),
        (
            "group.consumer.min.session.timeout.ms",
            options.consumer_session_timeout_ms.min(45_000).to_string(),
        ),
        (
            "group.consumer.heartbeat.interval.ms",
            options.consumer_heartbeat_interval_ms.to_string(),
        ),
        (
            "group.consumer.min.heartbeat.interval.ms",
            options
                .consumer_heartbeat_interval_ms
                .min(5_000)
                .to_string(),
        ),
    ]
}

/// The SASL_SSL listener's properties, with its keystore written beside the node's config.
fn sasl_ssl_properties(node: &Node, tls: &SaslSsl) -> Result<Vec<(&'static str, String)>> {
    // One PEM file with the key and the certificate: Kafka's PEM keystore.
    let keystore = node.dir.join("server-keystore.pem");
    std::fs::write(&keystore, format!("{}\n{}", tls.key_pem, tls.cert_pem))?;
    Ok(vec![
        ("sasl.enabled.mechanisms", "SCRAM-SHA-512".to_owned()),
        (
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config",
            "org.apache.kafka.common.security.scram.ScramLoginModule required;".to_owned(),
        ),
        ("ssl.keystore.type", "PEM".to_owned()),
        ("ssl.keystore.location", keystore.display().to_string()),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_comes_from_the_pom() {
        let v = super::version();
        assert!(v.starts_with("4."), "{v}");
    }
}
