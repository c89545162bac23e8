//! `status`: the group at a glance, from the database (who claimed each partition last, its
//! epoch, the offset recorded with its last batch) and from Kafka (the offset committed for the
//! group, the end of the partition). The database's lag, end minus recorded, is what is still
//! to apply; the committed offset follows the recorded one.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::runtime;
use crate::config::Settings;
use crate::kafka::client::watermarks;
use crate::store::pauses::{Pause, WHOLE_TOPIC};
use crate::store::{self, pauses, status::PartitionRecord};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (one object) instead of a table.
    #[arg(long)]
    pub json: bool,
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// One partition, as both sides see it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PartitionStatus {
    pub partition: i32,
    pub owner: Option<String>,
    pub epoch: Option<i64>,
    pub claimed_at: Option<String>,
    /// Next offset recorded in the database.
    pub recorded: Option<i64>,
    pub recorded_at: Option<String>,
    /// Next offset committed to Kafka for the group.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: Option<i64>,
    /// End minus recorded (from the partition's start when nothing is recorded yet).
    pub lag: Option<i64>,
    /// Paused by an operator (`pause`), itself or with the whole topic.
    pub paused: bool,
    /// Messages between the recorded offset and the first one Kafka still holds: retention
    /// deleted them before they were applied (as after restoring an old backup), so the next
    /// owner cannot read them and skips them (an offset reset).
    pub missing: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Status {
    group: String,
    topic: String,
    /// Why Kafka's side is missing, if it is.
    kafka_error: Option<String>,
    /// Each owner (host and process) with the partitions it claimed last.
    owners: BTreeMap<String, Vec<i32>>,
    /// Operators' pauses (partition -1: the whole topic).
    pauses: Vec<Pause>,
    partitions: Vec<PartitionStatus>,
    total_lag: i64,
}

pub fn main(settings: &Settings, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (group, topic) = (&settings.kafka.group_id, &settings.kafka.topic);
    let (recorded, paused) = runtime()?.block_on(async {
        let db = store::connect(&settings.database.url).await?;
        anyhow::Ok((
            store::status::partitions(&db, group, topic).await?,
            pauses::list(&db, group, topic).await?,
        ))
    })?;
    let kafka = kafka_view(settings);
    let status = combine(group, topic, recorded, paused, kafka);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", table(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// Per partition of the topic: (low, high) watermarks and the group's committed offset.
type KafkaView = BTreeMap<i32, (i64, i64, Option<i64>)>;

fn kafka_view(settings: &Settings) -> anyhow::Result<KafkaView> {
    let topic = &settings.kafka.topic;
    // Not subscribed: it reads offsets for the group without joining it.
    let consumer: BaseConsumer = settings
        .kafka
        .consumer_config()
        .create()
        .context("creating a Kafka client")?;
    let marks = watermarks(&consumer, topic, KAFKA_TIMEOUT)?;
    let mut wanted = TopicPartitionList::new();
    for p in marks.keys() {
        wanted.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(wanted, KAFKA_TIMEOUT)
        .context("reading the group's committed offsets")?;
    let mut view = KafkaView::new();
    for (p, (low, high)) in marks {
        let offset = committed
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            });
        view.insert(p, (low, high, offset));
    }
    Ok(view)
}

fn combine(
    group: &str,
    topic: &str,
    recorded: Vec<PartitionRecord>,
    paused: Vec<Pause>,
    kafka: anyhow::Result<KafkaView>,
) -> Status {
    let (view, kafka_error) = match kafka {
        Ok(view) => (view, None),
        Err(e) => (KafkaView::new(), Some(format!("{e:#}"))),
    };
    let mut by_partition: BTreeMap<i32, PartitionStatus> = BTreeMap::new();
    for r in recorded {
        by_partition.insert(
            r.partition,
            PartitionStatus {
                partition: r.partition,
                owner: r.owner,
                epoch: r.epoch,
                claimed_at: r.claimed_at,
                recorded: r.next_offset,
                recorded_at: r.recorded_at,
                ..PartitionStatus::default()
            },
        );
    }
    for (&p, &(low, high, committed)) in &view {
        let s = by_partition.entry(p).or_insert_with(|| PartitionStatus {
            partition: p,
            ..PartitionStatus::default()
        });
        s.committed = committed;
        s.end = Some(high);
        s.lag = Some(high - s.recorded.unwrap_or(low).max(low));
        s.missing = s.recorded.filter(|r| *r < low).map(|r| low - r);
    }
    let whole_topic = paused.iter().any(|p| p.partition == WHOLE_TOPIC);
    for s in by_partition.values_mut() {
        s.paused = whole_topic || paused.iter().any(|p| p.partition == s.partition);
    }
    let mut owners: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for s in by_partition.values() {
        if let Some(owner) = &s.owner {
            owners.entry(owner.clone()).or_default().push(s.partition);
        }
    }
    let partitions: Vec<PartitionStatus> = by_partition.into_values().collect();
    Status {
        group: group.to_owned(),
        topic: topic.to_owned(),
        kafka_error,
        owners,
        pauses: paused,
        total_lag: partitions.iter().filter_map(|p| p.lag).sum(),
        partitions,
    }
}

fn table(s: &Status) -> String {
    let mut out = format!(
        "group {} on topic {}: {} partitions, {} owners, lag {}\n",
        s.group,
        s.topic,
        s.partitions.len(),
        s.owners.len(),
        s.total_lag
    );
    if let Some(e) = &s.kafka_error {
        out.push_str(&format!(
            "Kafka: unreachable ({e}); committed and end offsets unknown\n"
        ));
    }
    for p in s.partitions.iter().filter(|p| p.missing.is_some()) {
        out.push_str(&format!(
            "MISSING: partition {} resumes at offset {}, but Kafka keeps only from {}: {} message(s) were deleted before they were applied, and will be skipped; re-send them from their source\n",
            p.partition,
            p.recorded.unwrap_or_default(),
            p.recorded.unwrap_or_default() + p.missing.unwrap_or_default(),
            p.missing.unwrap_or_default(),
        ));
    }
    for p in &s.pauses {
        let what = match p.partition {
            WHOLE_TOPIC => "the whole topic".to_owned(),
            n => format!("partition {n}"),
        };
        out.push_str(&format!(
            "PAUSED: {what}, since {} by {}{}\n",
            p.paused_at,
            p.paused_by,
            p.reason
                .as_deref()
                .map_or(String::new(), |r| format!(" ({r})"))
        ));
    }
    out.push_str("\nowner (host-process)                          partitions\n");
    for (owner, partitions) in &s.owners {
        let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
        out.push_str(&format!("{owner:<45} {}\n", list.join(",")));
    }
    out.push_str(&format!(
        "\n{:>9}  {:<45} {:>5}  {:>10}  {:>10}  {:>10}  {:>8}  {:<6}  {}\n",
        "partition",
        "owner",
        "epoch",
        "recorded",
        "committed",
        "end",
        "lag",
        "state",
        "recorded at"
    ));
    let or_dash = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
    for p in &s.partitions {
        out.push_str(&format!(
            "{:>9}  {:<45} {:>5}  {:>10}  {:>10}  {:>10}  {:>8}  {:<6}  {}\n",
            p.partition,
            p.owner.as_deref().unwrap_or("-"),
            or_dash(p.epoch),
            or_dash(p.recorded),
            or_dash(p.committed),
            or_dash(p.end),
            or_dash(p.lag),
            if p.paused { "paused" } else { "-" },
            p.recorded_at.as_deref().unwrap_or("-"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, owner: &str, next_offset: Option<i64>) -> PartitionRecord {
        PartitionRecord {
            partition,
            owner: Some(owner.to_owned()),
            epoch: Some(2),
            claimed_at: None,
            next_offset,
            recorded_at: None,
        }
    }

    #[test]
    fn lag_is_end_minus_recorded_and_counts_from_the_start_when_nothing_is_recorded() {
        let kafka = KafkaView::from([
            (0, (0, 100, Some(90))),
            (1, (40, 50, None)),
            (2, (0, 7, None)),
        ]);
        let pause = Pause {
            partition: 1,
            paused_at: "2026-12-02T00:00:00.000Z".into(),
            paused_by: "ops@host".into(),
            reason: Some("reindex".into()),
        };
        let s = combine(
            "g",
            "t",
            vec![record(0, "a", Some(95)), record(1, "b", None)],
            vec![pause],
            Ok(kafka),
        );
        let paused: Vec<bool> = s.partitions.iter().map(|p| p.paused).collect();
        assert_eq!(paused, [false, true, false]);
        assert!(
            table(&s).contains(
                "PAUSED: partition 1, since 2026-12-02T00:00:00.000Z by ops@host (reindex)"
            )
        );
        let lags: Vec<Option<i64>> = s.partitions.iter().map(|p| p.lag).collect();
        assert_eq!(lags, [Some(5), Some(10), Some(7)]);
        assert_eq!(s.total_lag, 22);
        assert_eq!(s.owners["a"], [0]);
        assert_eq!(
            s.partitions[2].owner, None,
            "a partition nobody claimed yet"
        );
        assert_eq!(s.partitions[0].committed, Some(90));
        assert_eq!(s.partitions[0].missing, None);
    }

    #[test]
    fn messages_deleted_before_they_were_applied_are_shown_as_missing() {
        let kafka = KafkaView::from([(0, (500, 900, None)), (1, (500, 900, None))]);
        let s = combine(
            "g",
            "t",
            vec![record(0, "a", Some(120)), record(1, "a", Some(600))],
            vec![],
            Ok(kafka),
        );
        let missing: Vec<Option<i64>> = s.partitions.iter().map(|p| p.missing).collect();
        assert_eq!(missing, [Some(380), None]);
        assert!(
            table(&s).contains("MISSING: partition 0 resumes at offset 120, but Kafka keeps only from 500: 380 message(s)"),
            "{}",
            table(&s)
        );
    }

    #[test]
    fn without_kafka_the_database_side_is_still_shown() {
        let whole = Pause {
            partition: WHOLE_TOPIC,
            paused_at: "2026-12-02T00:00:00.000Z".into(),
            paused_by: "ops@host".into(),
            reason: None,
        };
        let s = combine(
            "g",
            "t",
            vec![record(3, "a", Some(9))],
            vec![whole],
            Err(anyhow::anyhow!("down")),
        );
        assert!(s.partitions[0].paused, "the whole topic is paused");
        assert_eq!(s.partitions.len(), 1);
        assert_eq!(
            (s.partitions[0].recorded, s.partitions[0].lag),
            (Some(9), None)
        );
        assert!(table(&s).contains("Kafka: unreachable (down)"));
    }
}
