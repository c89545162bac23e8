//! The log events operators, dashboards, the tests and the development tools rely on
//! (docs/contract.md section 6, "Log events"). Each carries its stable name in the `event`
//! field beside its human message: match on the name and the fields, never on the message,
//! which may be reworded. Lists of partitions are JSON arrays ([`list`]). Other log lines are
//! for people and have no name.

// A replica's life.
/// Start-up: fields `version`, `schema`, `database`, `brokers`.
pub const REPLICA_STARTING: &str = "replica_starting";
/// The probes and metrics are served: field `addr` (the bound address).
pub const HTTP_LISTENING: &str = "http_listening";
/// The database cannot be used yet, so the replica stays out of the group: fields `error`,
/// `retry_in_ms`.
pub const DATABASE_UNAVAILABLE: &str = "database_unavailable";
/// The dedupe horizon covers the topic's retention (checked beside the start-up).
pub const HORIZON_COVERED: &str = "horizon_covered";
/// SIGTERM or SIGINT: the replica drains, commits and leaves. Field `signal`.
pub const SHUTDOWN_REQUESTED: &str = "shutdown_requested";
/// The replica stopped after a clean shutdown.
pub const REPLICA_STOPPED: &str = "replica_stopped";
/// A Kafka error that stops the replica (exit 3): field `error`.
pub const KAFKA_FATAL: &str = "kafka_fatal";

// Its partitions.
/// Fields `partitions` (the new ones) and `owned` (all of them after it), JSON arrays.
pub const PARTITIONS_ASSIGNED: &str = "partitions_assigned";
/// Given back after a drain and a commit: `partitions`, `owned`, `drained`.
pub const PARTITIONS_REVOKED: &str = "partitions_revoked";
/// Already someone else's, nothing committed: `partitions`, `owned`, `drained`.
pub const PARTITIONS_LOST: &str = "partitions_lost";
/// Claiming an assignment's partitions took too long; each worker claims before its first
/// batch instead.
pub const CLAIM_TIMED_OUT: &str = "claim_timed_out";
/// A partition fetched ahead of what the database records (a restore, a replay): it is read
/// again from there. Fields `partition`, `reason`.
pub const PARTITION_BEHIND: &str = "partition_behind";
/// Fetching a partition resumed once its worker caught up (flow control): `partition`,
/// `offset`.
pub const FETCH_RESUMED: &str = "fetch_resumed";
/// A batch met an operator's pause (`pause`): `partition`, `first_offset`.
pub const PAUSE_MET: &str = "pause_met";
/// The operator's pause was lifted and the batch went through: `partition`.
pub const PAUSE_LIFTED: &str = "pause_lifted";

// Its batches (DEBUG level for `inventory_consumer`).
/// A batch's transaction committed: `partition`, `first_offset`, `last_offset`, `applied`,
/// `rejected`, `duplicates`, `dead_letters`.
pub const BATCH_COMMITTED: &str = "batch_committed";
/// A transient failure; the batch is retried: `partition`, `first_offset`, `retry_in_ms`,
/// `error`.
pub const BATCH_RETRY: &str = "batch_retry";

/// Every named event, for the check that each is documented.
pub const ALL: &[&str] = &[
    REPLICA_STARTING,
    HTTP_LISTENING,
    DATABASE_UNAVAILABLE,
    HORIZON_COVERED,
    SHUTDOWN_REQUESTED,
    REPLICA_STOPPED,
    KAFKA_FATAL,
    PARTITIONS_ASSIGNED,
    PARTITIONS_REVOKED,
    PARTITIONS_LOST,
    CLAIM_TIMED_OUT,
    PARTITION_BEHIND,
    FETCH_RESUMED,
    PAUSE_MET,
    PAUSE_LIFTED,
    BATCH_COMMITTED,
    BATCH_RETRY,
];

/// Partitions as a JSON array (`[0,3,7]`), for a log field.
pub fn list<'a>(partitions: impl IntoIterator<Item = &'a i32>) -> String {
    let all: Vec<i32> = partitions.into_iter().copied().collect();
    serde_json::to_string(&all).unwrap_or_default()
}

/// An error with its causes, `: `-separated (as anyhow's `{:#}` prints one): the `error`
/// field of a log line, where the error's own message names only what failed.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_says_each_cause_once() {
        use crate::store::Failure;
        let inner = Failure::transient("connection reset");
        let outer = Failure::fatal_from("batch at offset 7 still failing after 30s", inner);
        assert_eq!(
            chain(&outer),
            "fatal database failure: batch at offset 7 still failing after 30s: \
             transient database failure: connection reset"
        );
    }

    #[test]
    fn lists_are_json_arrays() {
        assert_eq!(list(&[0, 3, 7]), "[0,3,7]");
        assert_eq!(list(&[]), "[]");
    }

    /// The contract's table of log events and this module name the same events.
    #[test]
    fn every_event_is_documented_and_every_documented_event_exists() {
        let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/contract.md"));
        let table = docs
            .split("### Log events")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/contract.md has a section \"Log events\"");
        // The rows after the header's separator.
        let documented: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("| ---"))
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        assert!(documented.len() >= 10, "too few rows found: {documented:?}");
        for name in ALL {
            assert!(
                documented.contains(name),
                "{name} is not in docs/contract.md"
            );
        }
        for name in &documented {
            assert!(
                ALL.contains(name),
                "docs/contract.md names {name}, src/logs.rs does not"
            );
        }
    }

    #[test]
    fn names_are_distinct_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for name in ALL {
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
    }
}
