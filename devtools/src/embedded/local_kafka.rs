//! The broker `demo` and `bench` run on, behind one type: the embedded one (librdkafka's mock:
//! nothing to install, up in milliseconds) or Apache Kafka itself (installed by
//! `kafka/install.sh`, up in seconds), so that published numbers and verdicts can be checked
//! against the real broker.

use anyhow::Context;
use tempfile::TempDir;

use crate::embedded::apache::{self, ApacheKafka, ClusterOptions};
use crate::embedded::broker::{BrokerOptions, EmbeddedBroker};

/// Which broker to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// librdkafka's mock cluster, in this process.
    Embedded,
    /// Apache Kafka, one KRaft node in a Java process.
    Apache,
}

pub enum LocalKafka {
    Embedded(EmbeddedBroker),
    /// The cluster is dropped (its node killed) before its data directory.
    Apache {
        cluster: ApacheKafka,
        _dir: TempDir,
    },
}

impl LocalKafka {
    /// Starts the broker with the topic `inventory-events` of `partitions` partitions.
    pub fn start(kind: BrokerKind, partitions: i32) -> anyhow::Result<LocalKafka> {
        match kind {
            BrokerKind::Embedded => Ok(LocalKafka::Embedded(
                EmbeddedBroker::start(&BrokerOptions {
                    partitions,
                    ..BrokerOptions::default()
                })
                .context("starting the embedded broker")?,
            )),
            BrokerKind::Apache => {
                let dir = tempfile::Builder::new()
                    .prefix("inventory-kafka")
                    .tempdir()
                    .context("creating the broker's directory")?;
                let cluster = ApacheKafka::start(dir.path(), &ClusterOptions::default())?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(async {
                        // The replies' topic too: Apache Kafka creates none on use here.
                        let settings = inventory_consumer::config::Settings::default();
                        for topic in [&settings.kafka.topic, &settings.kafka.results_topic] {
                            cluster.create_topic(topic, partitions, 1).await?;
                        }
                        anyhow::Ok(())
                    })?;
                Ok(LocalKafka::Apache { cluster, _dir: dir })
            }
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        match self {
            LocalKafka::Embedded(broker) => broker.bootstrap_servers(),
            LocalKafka::Apache { cluster, .. } => cluster.bootstrap(),
        }
    }

    /// What it is, for people: "embedded broker" or "Apache Kafka 4.4.0".
    pub fn describe(kind: BrokerKind) -> String {
        match kind {
            BrokerKind::Embedded => "embedded broker".to_owned(),
            BrokerKind::Apache => format!("Apache Kafka {}", apache::version()),
        }
    }
}
