//! Reading a topic back whole, as the demo's audit and the tests do: every message up to the
//! high watermarks taken first, with a consumer of its own that joins no group.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers as _;
use rdkafka::{Message, Offset, TopicPartitionList};

/// One message read back from a topic.
pub struct TopicMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Its headers, as (key, value) text (values that are not UTF-8 are left out).
    pub headers: Vec<(String, String)>,
}

/// Each partition's watermarks (low, high).
pub type Watermarks = BTreeMap<i32, (i64, i64)>;

fn reader(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "inventory-topic-reader")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .context("creating a topic reader")
}

/// Each partition's watermarks of `topic`.
pub fn watermarks(bootstrap: &str, topic: &str) -> anyhow::Result<Watermarks> {
    watermarks_of(&reader(bootstrap)?, topic)
}

fn watermarks_of(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Watermarks> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let Some(found) = metadata.topics().first() else {
        bail!("no metadata for {topic}");
    };
    found
        .partitions()
        .iter()
        .map(|p| {
            let marks = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .with_context(|| format!("reading the watermarks of {topic} [{}]", p.id()))?;
            Ok((p.id(), marks))
        })
        .collect()
}

/// Every message of `topic` up to the high watermarks taken first, partition by partition in
/// offset order, with those watermarks; fails if that takes more than `timeout`.
pub fn read_whole_topic(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<(Vec<TopicMessage>, Watermarks)> {
    let consumer = reader(bootstrap)?;
    let marks = watermarks_of(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for (&p, &(low, high)) in &marks {
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    let mut left: i64 = marks.values().map(|(low, high)| high - low).sum();
    let mut messages = Vec::new();
    if left > 0 {
        consumer.assign(&tpl)?;
    }
    let deadline = Instant::now() + timeout;
    while left > 0 {
        if Instant::now() > deadline {
            bail!("could not read {topic} back within {timeout:?} ({left} messages missing)");
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.with_context(|| format!("reading {topic}"))?;
        messages.push(TopicMessage {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .filter_map(|h| {
                            let value = std::str::from_utf8(h.value?).ok()?;
                            Some((h.key.to_owned(), value.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
        left -= 1;
    }
    messages.sort_by_key(|m| (m.partition, m.offset));
    Ok((messages, marks))
}
