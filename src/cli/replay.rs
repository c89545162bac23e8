//! `replay`: read a window of the topic again, by moving the group's recorded offsets back to an
//! offset or to a time (the broker's offsets-for-times), per partition or for all.
//!
//! Safe while replicas run: the rewind fences the partitions' owners, which claim them again and
//! fetch from the new offsets ([`crate::store::replay`], [`crate::kafka::rewinds`]); no running
//! worker keeps its old position. Offsets only move back: a target past the recorded offset
//! leaves the partition alone, since moving forward would skip events.
//!
//! Events read again that are already recorded change nothing (dedupe). Before it moves
//! anything, the command reads the window and counts the events whose ids are *not* recorded:
//! those decide again (older than the dedupe horizon, or lost with a restored database), so
//! a sale would sell twice. It then refuses to move anything unless `--force` is given, and
//! names the periods whose ids retention dropped. `--dry-run` prints the same and moves nothing.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::{EXIT_CONFIG, runtime};
use crate::config::Settings;
use crate::domain::event::decode;
use crate::kafka::client::watermarks;
use crate::store::{self, replay};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading the window gives up when no message arrives for this long.
const READ_STALL: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_offset", "to_time"])))]
pub struct ReplayArgs {
    /// Read again from this offset (the same for every partition chosen).
    #[arg(long, value_name = "OFFSET")]
    pub to_offset: Option<i64>,
    /// Read again from the first message at or after this time: RFC 3339
    /// (`2026-12-02T05:00:00Z`) or milliseconds since the Unix epoch.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to_time: Option<i64>,
    /// A partition to rewind (repeat for more); none: every partition with a recorded offset.
    #[arg(long = "partition", value_name = "P")]
    pub partitions: Vec<i32>,
    /// Print what would move, and how many events would decide again; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replay even when some events of the window are no longer recorded (past the dedupe
    /// horizon, or lost with a restored database): they apply a second time.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (one object) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds since the Unix epoch, from RFC 3339 or from a number of milliseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("not RFC 3339 (e.g. 2026-12-02T05:00:00Z) nor milliseconds: {e}"))
}

/// One partition of the replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionReplay {
    pub partition: i32,
    /// Next offset recorded in the database now.
    pub recorded: Option<i64>,
    /// Where reading starts again.
    pub target: Option<i64>,
    /// Why it is left alone, if it is.
    pub unchanged: Option<String>,
    /// Messages read again: from the target to the recorded offset.
    pub messages: u64,
    /// Of those, the events (the rest are bad messages, dead-lettered already).
    pub events: u64,
    /// Distinct event ids among them that are neither recorded nor dead-lettered at their
    /// offset: these decide again.
    pub again: u64,
}

#[derive(Debug, Serialize)]
struct Replay {
    group: String,
    topic: String,
    dry_run: bool,
    partitions: Vec<PartitionReplay>,
    messages: u64,
    events: u64,
    again: u64,
    /// The periods whose event ids retention dropped, and that may have held the window's.
    periods_gone: Vec<replay::GonePeriod>,
    /// The partitions moved back (empty on a dry run): the offsets as the rewind found them.
    rewound: Vec<replay::Rewound>,
}

/// Decides each chosen partition: moved back to its target, or left alone and why.
/// `low`: the first offset Kafka still holds, per partition of the topic.
pub fn plan(
    chosen: &[i32],
    recorded: &BTreeMap<i32, i64>,
    targets: &BTreeMap<i32, i64>,
    low: &BTreeMap<i32, i64>,
) -> Result<Vec<PartitionReplay>, String> {
    let mut plans = Vec::with_capacity(chosen.len());
    for &partition in chosen {
        let Some(&first) = low.get(&partition) else {
            return Err(format!("the topic has no partition {partition}"));
        };
        let recorded = recorded.get(&partition).copied();
        let target = targets.get(&partition).copied();
        let unchanged = match (recorded, target) {
            (None, _) => Some("nothing recorded: this group never processed it".to_owned()),
            (_, None) => Some("no target offset".to_owned()),
            (Some(_), Some(t)) if t < first => {
                return Err(format!(
                    "partition {partition}: offset {t} is no longer in Kafka (the first kept is {first})"
                ));
            }
            (Some(r), Some(t)) if t >= r => Some(format!(
                "already at or before the target (recorded {r}); moving forward would skip events"
            )),
            _ => None,
        };
        plans.push(PartitionReplay {
            partition,
            recorded,
            target,
            unchanged,
            ..PartitionReplay::default()
        });
    }
    Ok(plans)
}

pub fn main(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let (group, topic) = (&settings.kafka.group_id, &settings.kafka.topic);
    let rt = runtime()?;
    let mut db = rt.block_on(store::connect(&settings.database.url))?;
    // Before anything is read or moved: never on a schema a newer release made.
    rt.block_on(store::migrate::refuse_newer(&db))?;
    let recorded: BTreeMap<i32, i64> = rt
        .block_on(store::status::partitions(&db, group, topic))?
        .into_iter()
        .filter_map(|r| Some((r.partition, r.next_offset?)))
        .collect();

    let consumer: BaseConsumer = settings
        .kafka
        .consumer_config()
        .set("enable.partition.eof", "true")
        .create()
        .context("creating a Kafka client")?;
    // The first offset Kafka still holds, per partition of the topic.
    let low: BTreeMap<i32, i64> = watermarks(&consumer, topic, KAFKA_TIMEOUT)?
        .into_iter()
        .map(|(p, (first, _))| (p, first))
        .collect();
    let chosen: Vec<i32> = if args.partitions.is_empty() {
        recorded.keys().copied().collect()
    } else {
        args.partitions.clone()
    };
    let targets: BTreeMap<i32, i64> = match (args.to_offset, args.to_time) {
        (Some(offset), _) => chosen.iter().map(|&p| (p, offset)).collect(),
        (None, Some(time)) => offsets_for_time(&consumer, topic, &chosen, time)?,
        (None, None) => bail!("--to-offset or --to-time is required"),
    };
    let mut plans = match plan(&chosen, &recorded, &targets, &low) {
        Ok(plans) => plans,
        Err(refused) => {
            eprintln!("replay refused, nothing moved: {refused}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let first_timestamp = read_windows(&consumer, topic, &mut plans, |partition, events| {
        rt.block_on(replay::count_again(&db, topic, partition, events))
            .map_err(anyhow::Error::from)
    })?;
    let periods_gone = match first_timestamp {
        Some(since) => rt.block_on(replay::gone_periods(&db, since))?,
        None => Vec::new(),
    };
    let again: u64 = plans.iter().map(|p| p.again).sum();
    let refused = again > 0 && !args.force && !args.dry_run;

    let moving: BTreeMap<i32, i64> = plans
        .iter()
        .filter(|p| p.unchanged.is_none())
        .filter_map(|p| p.target.map(|t| (p.partition, t)))
        .collect();
    let rewound = if args.dry_run || refused || moving.is_empty() {
        Vec::new()
    } else {
        rt.block_on(replay::rewind(&mut db, group, topic, &moving))?
    };
    let report = Replay {
        group: group.clone(),
        topic: topic.clone(),
        dry_run: args.dry_run,
        messages: plans.iter().map(|p| p.messages).sum(),
        events: plans.iter().map(|p| p.events).sum(),
        again,
        partitions: plans,
        periods_gone,
        rewound,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    if refused {
        eprintln!(
            "replay refused, nothing moved: {again} event(s) of the window are no longer \
             recorded and would apply a second time; give --force to replay anyway"
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    Ok(ExitCode::SUCCESS)
}

/// Per partition, the first offset whose message is at or after `time` (ms), from the broker;
/// the partition's end when none is.
fn offsets_for_time(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    time: i64,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(time))
            .context("building the offsets-for-times request")?;
    }
    let found = consumer
        .offsets_for_times(tpl, KAFKA_TIMEOUT)
        .context("asking the broker for the offsets at that time")?;
    let mut targets = BTreeMap::new();
    for e in found.elements() {
        e.error().with_context(|| {
            format!(
                "the broker cannot say the offset at that time of {topic} [{}]",
                e.partition()
            )
        })?;
        let offset = match e.offset() {
            Offset::Offset(n) => n,
            // No message at or after that time: from the end, that is, nothing to read again.
            Offset::End => {
                consumer
                    .fetch_watermarks(topic, e.partition(), KAFKA_TIMEOUT)
                    .with_context(|| format!("reading the end of {topic} [{}]", e.partition()))?
                    .1
            }
            other => bail!(
                "the broker answered {other:?} for the offset at that time of {topic} [{}]",
                e.partition()
            ),
        };
        targets.insert(e.partition(), offset);
    }
    Ok(targets)
}

/// Reads each moving partition's window (target to recorded offset), counting its messages,
/// its events, and the distinct event ids that would decide again (`count_again` says how
/// many of a partition's `(offset, id)` would). Returns the earliest timestamp among the
/// windows' messages (ms), if any.
fn read_windows(
    consumer: &BaseConsumer,
    topic: &str,
    plans: &mut [PartitionReplay],
    count_again: impl Fn(i32, &[(i64, String)]) -> anyhow::Result<u64>,
) -> anyhow::Result<Option<i64>> {
    // Partition -> (index in plans, end of its window).
    let mut open: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (i, p) in plans.iter().enumerate() {
        if let (None, Some(recorded), Some(target)) = (&p.unchanged, p.recorded, p.target) {
            tpl.add_partition_offset(topic, p.partition, Offset::Offset(target))?;
            open.insert(p.partition, (i, recorded));
        }
    }
    if open.is_empty() {
        return Ok(None);
    }
    let mut first_timestamp: Option<i64> = None;
    // Assigned, not subscribed: this reads without joining the group.
    consumer
        .assign(&tpl)
        .context("assigning the partitions to read")?;
    let mut events: BTreeMap<i32, Vec<(i64, String)>> = BTreeMap::new();
    let mut last_message = Instant::now();
    while !open.is_empty() {
        if last_message.elapsed() > READ_STALL {
            bail!(
                "reading the window stalled: no message for {}s (partitions still open: {:?})",
                READ_STALL.as_secs(),
                open.keys().collect::<Vec<_>>()
            );
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // The end of the partition: the window (which ends at or before it) is read.
                close(consumer, topic, &mut open, p);
                continue;
            }
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                return Err(e).context("the window's first messages were deleted meanwhile");
            }
            // librdkafka retries the rest (a broker restarting, a connection dropped); the
            // stall bound above ends a wait that does not recover.
            Some(Err(e)) => {
                eprintln!("replay: Kafka: {e} (retrying)");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let Some(&(i, end)) = open.get(&message.partition()) else {
            continue;
        };
        last_message = Instant::now();
        if message.offset() >= end {
            close(consumer, topic, &mut open, message.partition());
            continue;
        }
        if let Some(t) = message.timestamp().to_millis() {
            first_timestamp = Some(first_timestamp.map_or(t, |f| f.min(t)));
        }
        let plan = &mut plans[i];
        plan.messages += 1;
        if let Ok(event) = decode(message.payload()) {
            plan.events += 1;
            events
                .entry(plan.partition)
                .or_default()
                .push((message.offset(), event.id));
        }
        if message.offset() + 1 >= end {
            close(consumer, topic, &mut open, message.partition());
        }
    }
    for plan in plans.iter_mut() {
        if let Some(events) = events.get(&plan.partition) {
            plan.again = count_again(plan.partition, events)?;
        }
    }
    Ok(first_timestamp)
}

/// A partition's window is read: stop fetching it.
fn close(consumer: &BaseConsumer, topic: &str, open: &mut BTreeMap<i32, (usize, i64)>, p: i32) {
    open.remove(&p);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let _ = consumer.pause(&tpl);
}

fn table(r: &Replay) -> String {
    let mut out = format!(
        "{} group {} on topic {}: {} messages to read again, {} of them events; {} event(s) not recorded will decide again, the others change nothing\n",
        if r.dry_run {
            "DRY RUN (nothing moved):"
        } else {
            "replay:"
        },
        r.group,
        r.topic,
        r.messages,
        r.events,
        r.again,
    );
    out.push_str(&format!(
        "{:>9} {:>12} {:>12} {:>10} {:>10} {:>8}  note\n",
        "partition", "recorded", "target", "messages", "events", "again"
    ));
    let show = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
    for p in &r.partitions {
        out.push_str(&format!(
            "{:>9} {:>12} {:>12} {:>10} {:>10} {:>8}  {}\n",
            p.partition,
            show(p.recorded),
            show(p.target),
            p.messages,
            p.events,
            p.again,
            p.unchanged.as_deref().unwrap_or("")
        ));
    }
    for w in &r.rewound {
        out.push_str(&format!(
            "partition {} rewound from {} to {}: its owner reads it again from there within a few seconds\n",
            w.partition, w.from, w.to
        ));
    }
    for g in &r.periods_gone {
        out.push_str(&format!(
            "period {} ({} to {}): its event ids were dropped (past the dedupe horizon); events of the window decided then are forgotten\n",
            g.period,
            g.started_at.as_deref().unwrap_or("the beginning"),
            g.ended_at
        ));
    }
    if r.again > 0 {
        out.push_str(&format!(
            "note: {} event(s) are not recorded (older than the dedupe horizon, or missing from a restored database): they apply again\n",
            r.again
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn offsets_only_move_back_and_never_before_what_kafka_holds() {
        let low = map(&[(0, 0), (1, 0), (2, 100), (3, 0)]);
        let recorded = map(&[(0, 50), (1, 10), (2, 500)]);
        let plans = plan(
            &[0, 1, 3],
            &recorded,
            &map(&[(0, 20), (1, 20), (3, 20)]),
            &low,
        )
        .expect("a valid plan");
        assert_eq!(plans[0].unchanged, None, "50 -> 20 moves back");
        assert!(
            plans[1]
                .unchanged
                .as_deref()
                .is_some_and(|w| w.contains("skip")),
            "10 -> 20 would skip"
        );
        assert!(
            plans[2]
                .unchanged
                .as_deref()
                .is_some_and(|w| w.contains("never processed")),
            "nothing recorded"
        );
        let too_early = plan(&[2], &recorded, &map(&[(2, 20)]), &low).expect_err("refused");
        assert!(too_early.contains("first kept is 100"), "{too_early}");
        let unknown = plan(&[9], &recorded, &map(&[(9, 0)]), &low).expect_err("refused");
        assert!(unknown.contains("no partition 9"), "{unknown}");
    }

    #[test]
    fn times_parse_as_rfc3339_or_milliseconds() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1_000));
        assert_eq!(
            parse_time("2026-12-02T05:00:00+01:00"),
            Ok(1_796_184_000_000)
        );
        assert!(parse_time("yesterday").is_err());
    }
}
