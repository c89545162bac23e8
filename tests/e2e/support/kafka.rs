//! The test's Kafka: the embedded broker (an `inventory-dev broker` process) or Apache Kafka,
//! reading a topic back, sending raw messages, and `produce` running in the background.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use inventory_consumer::expectation::Expectation;
use inventory_devtools::embedded::{apache, topic};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{RESULTS_TOPIC, TOPIC, dev_bin, install_apache, wait_until};

pub use inventory_devtools::embedded::topic::TopicMessage;

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
    pub(super) child: Child,
    pub(super) expected: PathBuf,
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
