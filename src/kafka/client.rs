//! What the operators' commands read of a topic without joining the group. (The clients'
//! configuration is the settings' own: [`crate::config::KafkaSettings::consumer_config`].)

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};

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
