//! The dedupe horizon against the topic's retention, read from the broker at start-up.
//!
//! An event id is a duplicate only while its `processed_events` row is kept: for
//! `history.dedupe_horizon_s` after its period ended. Any message the topic still holds can be
//! read again (a new consumer group, an offset reset, a replay), so the horizon must outlast
//! every message's stay in the topic: `retention.ms`, plus up to `segment.ms`, because Kafka
//! deletes a whole segment only once its newest message is past `retention.ms`, plus
//! [`MARGIN`] for the broker's retention check (every 5 minutes by default) and producers'
//! clocks (retention follows the timestamps they set). A horizon shorter than that is refused
//! (exit 2); a topic that keeps messages for ever
//! (`retention.ms = -1`, or compaction) needs a horizon of for ever (0). Where the broker
//! cannot say (librdkafka's mock broker, missing DescribeConfigs rights), the replica warns and
//! goes on.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::config::ConfigError;

/// How long the broker may take to answer.
const ANSWER: Duration = Duration::from_secs(10);

/// Beyond retention and a segment: the broker's retention check interval
/// (`log.retention.check.interval.ms`, 5 minutes by default) and producer clocks running late.
pub const MARGIN: Duration = Duration::from_secs(3600);

/// How long a message can stay readable in a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readable {
    For(Duration),
    Forever,
}

/// What the topic's settings say (`retention.ms`, `segment.ms`, `cleanup.policy`).
pub fn readable(retention_ms: i64, segment_ms: i64, cleanup_policy: &str) -> Readable {
    if retention_ms < 0 || cleanup_policy.contains("compact") {
        return Readable::Forever;
    }
    let ms = retention_ms.saturating_add(segment_ms.max(0));
    Readable::For(Duration::from_millis(ms as u64) + MARGIN)
}

/// Refuses a horizon (seconds, 0 = for ever) shorter than the topic keeps its messages.
pub fn check(horizon_s: u64, topic: &str, readable: Readable) -> Result<(), ConfigError> {
    if horizon_s == 0 {
        return Ok(());
    }
    let horizon = Duration::from_secs(horizon_s);
    let needed = match readable {
        Readable::Forever => {
            return Err(ConfigError::key(
                "history.dedupe_horizon_s",
                format!(
                    "topic {topic} keeps its messages for ever (retention.ms = -1 or compaction): \
                     any of them can be read again, so the horizon must be 0 (keep processed \
                     events for ever), or give the topic a retention"
                ),
            ));
        }
        Readable::For(needed) => needed,
    };
    if horizon < needed {
        return Err(ConfigError::key(
            "history.dedupe_horizon_s",
            format!(
                "{horizon_s} s is shorter than topic {topic} may keep a message (retention.ms \
                 plus segment.ms plus an hour's margin: {} s): an event read again after the \
                 horizon would apply twice; set at least that",
                needed.as_millis().div_ceil(1000)
            ),
        ));
    }
    Ok(())
}

/// Reads the topic's retention from the broker and checks the horizon against it. `Ok(false)`:
/// the broker could not tell (logged as a warning).
pub async fn verify(
    client: &ClientConfig,
    topic: &str,
    horizon_s: u64,
) -> Result<bool, ConfigError> {
    if horizon_s == 0 {
        return Ok(true);
    }
    match topic_readable(client, topic).await {
        Ok(readable) => {
            check(horizon_s, topic, readable)?;
            tracing::info!(
                event = crate::logs::HORIZON_COVERED,
                topic,
                horizon_s,
                ?readable,
                "dedupe horizon covers the topic's retention"
            );
            Ok(true)
        }
        Err(why) => {
            tracing::warn!(
                topic,
                horizon_s,
                error = %why,
                "cannot read the topic's retention from the broker: the dedupe horizon is NOT \
                 checked against it; make sure it is at least retention.ms plus segment.ms"
            );
            Ok(false)
        }
    }
}

async fn topic_readable(client: &ClientConfig, topic: &str) -> Result<Readable, String> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| format!("admin client: {e}"))?;
    let options = AdminOptions::new().request_timeout(Some(ANSWER));
    let results = tokio::time::timeout(
        ANSWER + Duration::from_secs(1),
        admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &options),
    )
    .await
    .map_err(|_| "no answer".to_owned())?
    .map_err(|e| e.to_string())?;
    let resource = results
        .into_iter()
        .next()
        .ok_or("no result")?
        .map_err(|e| e.to_string())?;
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|e| e.value.clone())
            .ok_or_else(|| format!("no {name} in the answer"))
    };
    let number = |name: &str| -> Result<i64, String> {
        value(name)?.parse().map_err(|e| format!("{name}: {e}"))
    };
    Ok(readable(
        number("retention.ms")?,
        number("segment.ms")?,
        &value("cleanup.policy")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn a_message_stays_for_its_retention_plus_a_segment() {
        assert_eq!(
            readable(7 * DAY_MS, 7 * DAY_MS, "delete"),
            Readable::For(Duration::from_secs(14 * 86_400) + MARGIN)
        );
        assert_eq!(readable(-1, DAY_MS, "delete"), Readable::Forever);
        assert_eq!(
            readable(DAY_MS, DAY_MS, "compact,delete"),
            Readable::Forever
        );
    }

    #[test]
    fn the_horizon_must_cover_it() {
        let kafka_default = readable(7 * DAY_MS, 7 * DAY_MS, "delete");
        assert!(check(15 * 86_400, "t", kafka_default).is_ok());
        assert!(check(14 * 86_400, "t", kafka_default).is_err(), "no margin");
        let refused = check(7 * 86_400, "t", kafka_default).unwrap_err();
        assert!(
            refused.to_string().contains("history.dedupe_horizon_s"),
            "{refused}"
        );
        assert!(
            check(0, "t", Readable::Forever).is_ok(),
            "for ever covers anything"
        );
        assert!(check(100 * 86_400, "t", Readable::Forever).is_err());
    }
}
