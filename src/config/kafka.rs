//! `[kafka]`: where the events come from and go, and how the section maps to librdkafka's
//! configuration of the consumer and the producer (docs/configuration.md).

use std::collections::BTreeMap;

use figment::value::Value;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Needs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), any Kafka version.
    Classic,
    /// KIP-848, `group.protocol=consumer`: broker-side assignment, Kafka 4.0 and later.
    Consumer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    /// Where the replies to order steps are published (docs/contract.md section 7).
    pub results_topic: String,
    pub group_protocol: GroupProtocol,
    /// Classic protocol only: `cooperative-sticky` (incremental) or an eager strategy such as
    /// `range` or `roundrobin`.
    pub assignment_strategy: String,
    /// Passed to librdkafka as they are (TLS, SASL, tuning). In environment variables write
    /// `_` for `.`: `INVENTORY_KAFKA__PROPERTIES__SASL_MECHANISM=PLAIN`.
    pub properties: BTreeMap<String, Value>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: String::new(),
            topic: "inventory-events".into(),
            group_id: "inventory-consumer-group".into(),
            results_topic: "inventory-results".into(),
            group_protocol: GroupProtocol::Classic,
            assignment_strategy: "cooperative-sticky".into(),
            properties: BTreeMap::new(),
        }
    }
}

/// Properties the consumer owns: the value it sets itself, if any (giving that same value is
/// harmless and allowed), and why another would break a guarantee. docs/configuration.md
/// lists them for users.
const MANAGED_PROPERTIES: &[(&str, Option<&str>, &str)] = &[
    (
        "enable.auto.commit",
        Some("false"),
        "offsets are committed only after the database commit that holds their effect",
    ),
    (
        "enable.auto.offset.store",
        Some("false"),
        "offsets are committed only after the database commit that holds their effect",
    ),
    (
        "auto.offset.reset",
        Some("earliest"),
        "the database decides where a partition starts; one with nothing recorded starts at \
         the earliest offset Kafka holds, never past a backlog",
    ),
    (
        "isolation.level",
        Some("read_committed"),
        "the events of a transactional producer's aborted transactions must never be applied",
    ),
    (
        "group.instance.id",
        None,
        "static membership needs an id unique to each replica, which one setting shared by \
         every replica of a Deployment cannot give (they would fence each other in a loop); \
         not supported",
    ),
    (
        "enable.partition.eof",
        Some("false"),
        "the consumer never waits for the end of a partition",
    ),
    ("group.id", None, "set kafka.group_id"),
    ("bootstrap.servers", None, "set kafka.brokers"),
    ("group.protocol", None, "set kafka.group_protocol"),
    (
        "partition.assignment.strategy",
        None,
        "set kafka.assignment_strategy",
    ),
    (
        "enable.idempotence",
        Some("true"),
        "replies are published in order and at least once by an idempotent producer",
    ),
    (
        "acks",
        Some("all"),
        "a reply leaves the outbox only once every in-sync replica has it",
    ),
];

/// Librdkafka rejects these with `group.protocol=consumer`: the broker owns them there.
const CLASSIC_ONLY_PROPERTIES: &[&str] = &["session.timeout.ms", "heartbeat.interval.ms"];

impl KafkaSettings {
    /// The section's own rules: the names it needs, and no property the consumer manages.
    pub fn validate(&self, needs: Needs) -> Result<(), ConfigError> {
        if needs.kafka && self.brokers.trim().is_empty() {
            return Err(ConfigError::key(
                "kafka.brokers",
                "required (set KAFKA_BROKERS, INVENTORY_KAFKA__BROKERS or --brokers)",
            ));
        }
        if self.results_topic == self.topic {
            return Err(ConfigError::key(
                "kafka.results_topic",
                "must differ from kafka.topic (replies are not events)",
            ));
        }
        for (key, value) in [
            ("kafka.topic", &self.topic),
            ("kafka.group_id", &self.group_id),
            ("kafka.results_topic", &self.results_topic),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::key(key, "must not be empty"));
            }
        }
        let properties = self.flat_properties();
        for (name, ours, why) in MANAGED_PROPERTIES {
            let Some(given) = properties.get(*name) else {
                continue;
            };
            if ours.is_some_and(|ours| same_value(name, given, ours)) {
                continue;
            }
            return Err(ConfigError::key(
                &format!("kafka.properties.{name}"),
                format!("managed by the consumer: {why}"),
            ));
        }
        if self.group_protocol == GroupProtocol::Consumer {
            for name in CLASSIC_ONLY_PROPERTIES {
                if properties.contains_key(*name) {
                    return Err(ConfigError::key(
                        &format!("kafka.properties.{name}"),
                        "not allowed with kafka.group_protocol = consumer (the broker sets it)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// librdkafka checks names and values of its properties when the config is built.
    pub fn check_with_librdkafka(&self) -> Result<(), ConfigError> {
        self.consumer_config()
            .create_native_config()
            .map(|_| ())
            .map_err(|e| ConfigError::key("kafka.properties", e))
    }

    /// `properties` flattened to librdkafka's dotted names. Nested tables (from environment
    /// variables, where `__` nests) are joined with dots, `_` becomes `.`.
    pub fn flat_properties(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (name, value) in &self.properties {
            flatten(&name.replace('_', "."), value, &mut out);
        }
        out
    }

    /// The consumer's configuration. Offsets are ours to commit: auto-commit and auto-store
    /// are off, because an offset may only be committed after the database commit that holds
    /// its effect.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Feeds the per-partition lag metric.
            .set("statistics.interval.ms", "5000")
            // Bound what librdkafka prefetches (defaults: 64 MiB, and 100,000 messages per
            // partition) so that a replica stays small however large the backlog. Each queued
            // message also costs a few hundred bytes of bookkeeping beyond its payload; 4 MiB
            // of small events still holds over a second of full-speed consumption.
            .set("queued.max.messages.kbytes", "4096")
            .set("queued.min.messages", "10000")
            // When that queue is full, look again soon (default 1 s: the queue can run dry
            // meanwhile), but not at once: 0 makes the fetcher spin, burning the CPU the
            // pipeline needs for as long as the database is the bottleneck.
            .set("fetch.queue.backoff.ms", "20")
            // One fetch response at most (default 50 MiB): with large messages over many
            // partitions a single response would otherwise dwarf the queue bound above.
            .set("fetch.max.bytes", "8388608")
            .set("client.id", client_id());
        match self.group_protocol {
            GroupProtocol::Classic => {
                config
                    .set("group.protocol", "classic")
                    .set("partition.assignment.strategy", &self.assignment_strategy);
            }
            GroupProtocol::Consumer => {
                config.set("group.protocol", "consumer");
            }
        }
        for (name, value) in self.flat_properties() {
            config.set(name, value);
        }
        config
    }

    /// The producer's configuration: idempotent, so that retries neither duplicate nor
    /// reorder messages within a partition (replies keep their order per order).
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // Room for the oversized messages of the bad-input mix (the consumer dead-letters
            // anything over 1 MiB; a real broker may refuse them first: its own limit applies).
            .set("message.max.bytes", "4194304")
            .set("client.id", client_id());
        // Shared with the consumer: librdkafka ignores (and logs) consumer-only properties.
        for (name, value) in self.flat_properties() {
            config.set(name, value);
        }
        config
    }
}

/// This process's name towards Kafka, and as a partition's owner in the database.
pub fn client_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("inventory-consumer-{host}-{}", std::process::id())
}

/// Whether librdkafka reads `given` for property `name` as `ours`: its aliases
/// (`smallest` for `earliest`, `-1` for `all`) and spellings of booleans.
fn same_value(name: &str, given: &str, ours: &str) -> bool {
    let given = given.trim().to_ascii_lowercase();
    let given = match (name, given.as_str()) {
        ("auto.offset.reset", "smallest" | "beginning") => "earliest",
        ("acks", "-1") => "all",
        (_, "1" | "t") if ours == "true" => "true",
        (_, "0" | "f") if ours == "false" => "false",
        (_, other) => other,
    };
    given == ours
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Dict(_, dict) => {
            for (name, v) in dict {
                flatten(&format!("{prefix}.{}", name.replace('_', ".")), v, out);
            }
        }
        Value::String(_, s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        Value::Char(_, c) => {
            out.insert(prefix.to_owned(), c.to_string());
        }
        Value::Bool(_, b) => {
            out.insert(prefix.to_owned(), b.to_string());
        }
        Value::Num(_, n) => {
            // Num keeps the width and sign it was parsed with (env "0" is a U8).
            let text = n
                .to_u128()
                .map(|u| u.to_string())
                .or_else(|| n.to_i128().map(|i| i.to_string()))
                .or_else(|| n.to_f64().map(|f| f.to_string()))
                .unwrap_or_default();
            out.insert(prefix.to_owned(), text);
        }
        Value::Empty(..) | Value::Array(..) => {}
    }
}
