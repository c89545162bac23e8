//! `[history]`: the periods of the history tables and how long each kind of row is kept
//! (docs/design.md, "History and retention").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY_S};

/// The longest history kept short of for ever (0): ten years. Longer is a unit mistake
/// (milliseconds given for seconds) more likely than a wish.
const MAX_RETENTION_S: u64 = 3_650 * DAY_S;

/// Bounded history (src/store/retention.rs): the history tables are partitioned by period, and
/// a period's partitions are dropped once it ended longer ago than their retention. A
/// retention of 0 keeps them for ever.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// The length of a period: how often a new one starts. Every batch reads its recorded ids
    /// in each period kept (an index probe per event and period), so a period of about half
    /// the dedupe horizon keeps that to three or four probes.
    pub period_s: u64,
    /// The dedupe horizon: how long `processed_events` (and replies) are kept. An event id
    /// delivered again within it is a duplicate; after it, it applies again. Must cover the
    /// topic's retention (checked against the broker at start-up).
    pub dedupe_horizon_s: u64,
    /// How long the ledger (`stock_movements`) is kept; what is dropped is carried forward
    /// into `ledger_openings`.
    pub ledger_retention_s: u64,
    /// How long dead letters are kept.
    pub dead_letter_retention_s: u64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            period_s: 7 * DAY_S,
            dedupe_horizon_s: 15 * DAY_S,
            ledger_retention_s: 30 * DAY_S,
            dead_letter_retention_s: 30 * DAY_S,
        }
    }
}

impl HistorySettings {
    /// How often a replica runs maintenance: often enough to start each period on time.
    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_secs((self.period_s / 4).clamp(1, 60))
    }

    /// The section's own rules, each error naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=366 * DAY_S).contains(&self.period_s) {
            return Err(ConfigError::key(
                "history.period_s",
                "must be 1..=31622400 (a year)",
            ));
        }
        for (key, value) in [
            ("history.dedupe_horizon_s", self.dedupe_horizon_s),
            ("history.ledger_retention_s", self.ledger_retention_s),
            (
                "history.dead_letter_retention_s",
                self.dead_letter_retention_s,
            ),
        ] {
            if value != 0 && !(self.period_s..=MAX_RETENTION_S).contains(&value) {
                return Err(ConfigError::key(
                    key,
                    format!(
                        "must be 0 (keep for ever) or history.period_s..={MAX_RETENTION_S} (ten \
                         years), got {value}"
                    ),
                ));
            }
        }
        Ok(())
    }
}
