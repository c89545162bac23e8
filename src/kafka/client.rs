//! librdkafka configuration for the consumer and the producer, from [`Settings`]; and what
//! the operators' commands read of a topic without joining the group.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{GroupProtocol, Settings};

/// The consumer's configuration. Offsets are ours to commit: auto-commit and auto-store are off,
/// because an offset may only be committed after the database commit that holds its effect.
pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let k = &settings.kafka;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Feeds the per-partition lag metric.
        .set("statistics.interval.ms", "5000")
        // Bound what librdkafka prefetches (defaults: 64 MiB, and 100,000 messages per
        // partition) so that a replica stays small however large the backlog. Each queued
        // message also costs a few hundred bytes of bookkeeping beyond its payload; 4 MiB of
        // small events still holds over a second of full-speed consumption.
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
    match k.group_protocol {
        GroupProtocol::Classic => {
            config
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", &k.assignment_strategy);
        }
        GroupProtocol::Consumer => {
            config.set("group.protocol", "consumer");
        }
    }
    for (name, value) in settings.kafka_properties() {
        config.set(name, value);
    }
    config
}

/// The producer's configuration: idempotent, so that retries neither duplicate nor reorder
/// messages within a partition (the oracle relies on per-SKU order).
pub fn producer_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Room for the oversized messages of the bad-input mix (the consumer dead-letters
        // anything over 1 MiB; a real broker may refuse them first: its own limit applies).
        .set("message.max.bytes", "4194304")
        .set("client.id", client_id());
    // Shared with the consumer: librdkafka ignores (and logs) consumer-only properties.
    for (name, value) in settings.kafka_properties() {
        config.set(name, value);
    }
    config
}

/// This process's name towards Kafka, and as a partition's owner in the database.
pub fn client_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("inventory-consumer-{host}-{}", std::process::id())
}

/// The (first, end) offsets Kafka holds of every partition of `topic`, by partition.
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut marks = BTreeMap::new();
    for p in partitions {
        let range = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("reading the watermarks of {topic} [{p}]"))?;
        marks.insert(p, range);
    }
    Ok(marks)
}
