//! Faults the embedded broker can inject on command (`broker --faults-from-stdin`, one command
//! per line), through librdkafka's mock-cluster API. For fault-tolerance tests and for trying
//! the service's behaviour by hand:
//!
//! ```text
//! down <broker>                      the broker stops answering (its partitions lose their leader)
//! up <broker>                        and comes back on the same port
//! rtt <broker> <ms>                  adds round-trip time to every answer of the broker
//! errors <api> <count> <error>       the next <count> requests of <api> fail with <error>
//! leader <partition> <broker>        moves the leadership of a partition of the topic
//! coordinator <group> <broker>       makes <broker> the coordinator of <group>
//! ```
//!
//! APIs: produce, fetch, list-offsets, metadata, offset-commit, offset-fetch, find-coordinator,
//! join-group, heartbeat, leave-group, sync-group. Errors: not-leader, request-timed-out,
//! network-exception, coordinator-load-in-progress, coordinator-not-available,
//! not-coordinator, illegal-generation, unknown-member-id, rebalance-in-progress.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Down(i32),
    Up(i32),
    RoundTripTime(i32, Duration),
    Errors {
        api: RDKafkaApiKey,
        count: usize,
        error: RDKafkaRespErr,
    },
    Leader {
        partition: i32,
        broker: i32,
    },
    Coordinator {
        group: String,
        broker: i32,
    },
}

const APIS: [(&str, RDKafkaApiKey); 11] = [
    ("produce", RDKafkaApiKey::Produce),
    ("fetch", RDKafkaApiKey::Fetch),
    ("list-offsets", RDKafkaApiKey::ListOffsets),
    ("metadata", RDKafkaApiKey::Metadata),
    ("offset-commit", RDKafkaApiKey::OffsetCommit),
    ("offset-fetch", RDKafkaApiKey::OffsetFetch),
    ("find-coordinator", RDKafkaApiKey::FindCoordinator),
    ("join-group", RDKafkaApiKey::JoinGroup),
    ("heartbeat", RDKafkaApiKey::Heartbeat),
    ("leave-group", RDKafkaApiKey::LeaveGroup),
    ("sync-group", RDKafkaApiKey::SyncGroup),
];

const ERRORS: [(&str, RDKafkaRespErr); 9] = [
    (
        "not-leader",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    ),
    (
        "request-timed-out",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
    ),
    (
        "network-exception",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION,
    ),
    (
        "coordinator-load-in-progress",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
    ),
    (
        "coordinator-not-available",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
    ),
    (
        "not-coordinator",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
    ),
    (
        "illegal-generation",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
    ),
    (
        "unknown-member-id",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
    ),
    (
        "rebalance-in-progress",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
    ),
];

fn lookup<T: Copy>(table: &[(&str, T)], name: &str, what: &str) -> Result<T, String> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!("unknown {what} `{name}` (known: {})", known.join(", "))
        })
}

fn number<T: std::str::FromStr>(word: Option<&str>, what: &str) -> Result<T, String> {
    let word = word.ok_or_else(|| format!("missing {what}"))?;
    word.parse()
        .map_err(|_| format!("{what} must be a number, got `{word}`"))
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(line: &str) -> Result<Fault, String> {
        let mut words = line.split_whitespace();
        let fault = match words.next() {
            Some("down") => Fault::Down(number(words.next(), "broker")?),
            Some("up") => Fault::Up(number(words.next(), "broker")?),
            Some("rtt") => Fault::RoundTripTime(
                number(words.next(), "broker")?,
                Duration::from_millis(number(words.next(), "milliseconds")?),
            ),
            Some("errors") => Fault::Errors {
                api: lookup(&APIS, words.next().unwrap_or(""), "api")?,
                count: number(words.next(), "count")?,
                error: lookup(&ERRORS, words.next().unwrap_or(""), "error")?,
            },
            Some("leader") => Fault::Leader {
                partition: number(words.next(), "partition")?,
                broker: number(words.next(), "broker")?,
            },
            Some("coordinator") => Fault::Coordinator {
                group: words.next().ok_or("missing group")?.to_owned(),
                broker: number(words.next(), "broker")?,
            },
            Some(other) => return Err(format!("unknown fault `{other}`")),
            None => return Err("empty command".into()),
        };
        match words.next() {
            Some(extra) => Err(format!("unexpected `{extra}`")),
            None => Ok(fault),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_and_says_what_is_wrong() {
        assert_eq!("down 2".parse(), Ok(Fault::Down(2)));
        assert_eq!(
            "rtt 1 250".parse(),
            Ok(Fault::RoundTripTime(1, Duration::from_millis(250)))
        );
        assert_eq!(
            "errors offset-commit 3 rebalance-in-progress".parse(),
            Ok(Fault::Errors {
                api: RDKafkaApiKey::OffsetCommit,
                count: 3,
                error: RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            })
        );
        assert_eq!(
            "coordinator g 3".parse(),
            Ok(Fault::Coordinator {
                group: "g".into(),
                broker: 3
            })
        );
        assert_eq!(
            "leader 4 1".parse(),
            Ok(Fault::Leader {
                partition: 4,
                broker: 1
            })
        );
        let err = "errors fetch 2 oops".parse::<Fault>().unwrap_err();
        assert!(err.contains("unknown error `oops`"), "{err}");
        assert!(
            "down"
                .parse::<Fault>()
                .unwrap_err()
                .contains("missing broker")
        );
        assert!("up 1 2".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
    }
}
