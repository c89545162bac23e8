//! `[processing]`: batches, the drain, dead-letter limits, offsets' commits, retries and the
//! bytes a replica buffers (docs/configuration.md). The drain's bounds, which depend on the
//! Kafka section, are [`super::Settings::drain_timeout`]'s.

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY_S, HOUR_MS, within};

/// Bounds of `processing.buffer_bytes`.
const MIN_BUFFER_BYTES: usize = 1 << 20;
const MAX_BUFFER_BYTES: usize = 4 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    pub batch_max_events: usize,
    /// How long a partial batch may wait for more deliveries once its worker is free. 0: none;
    /// a batch is what waits when the worker is free (more under load, by itself).
    pub batch_linger_ms: u64,
    /// Apply the small batches of this replica's partitions that wait at the same time in one
    /// transaction (`crate::kafka::combiner`): fewer transactions at low and medium rates.
    pub combine_partitions: bool,
    /// How long the combiner, when no transaction of its runs, waits after the first batch for
    /// others before it starts one (microseconds; 0: at once).
    pub combine_gather_us: u64,
    /// How long a revoke or a shutdown waits for in-flight batches before giving up on them.
    /// Unset: [`Settings::drain_timeout`] derives it from the group's timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// A partition halts when more than this share of its last `dead_letter_window` messages
    /// are malformed (a broken producer), instead of dead-lettering everything. 1.0: never.
    pub dead_letter_max_share: f64,
    pub dead_letter_window: usize,
    /// How often database-committed offsets are committed to Kafka while consuming.
    pub commit_interval_ms: u64,
    /// Cap of the exponential backoff between retries of a transient failure.
    pub retry_backoff_max_ms: u64,
    /// A batch that keeps failing transiently for this long is a fatal failure.
    pub retry_deadline_ms: u64,
    /// Bytes of deliveries (payload, key and bookkeeping) that may wait for the workers of this
    /// replica, split evenly over the partitions it owns (64 KiB each at least); a partition
    /// whose worker falls behind by its share stops fetching until it catches up, while the
    /// others flow on.
    pub buffer_bytes: usize,
}

impl Default for ProcessingSettings {
    fn default() -> Self {
        ProcessingSettings {
            batch_max_events: 500,
            batch_linger_ms: 0,
            combine_partitions: true,
            combine_gather_us: 0,
            drain_timeout_ms: None,
            dead_letter_max_share: 0.5,
            dead_letter_window: 1_000,
            commit_interval_ms: 1_000,
            retry_backoff_max_ms: 5_000,
            retry_deadline_ms: 120_000,
            buffer_bytes: 16 << 20,
        }
    }
}

impl ProcessingSettings {
    /// The section's own rules, each error naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.dead_letter_max_share > 0.0 && self.dead_letter_max_share <= 1.0) {
            return Err(ConfigError::key(
                "processing.dead_letter_max_share",
                "must be in (0, 1] (1 never halts)",
            ));
        }
        if !(10..=100_000).contains(&self.dead_letter_window) {
            return Err(ConfigError::key(
                "processing.dead_letter_window",
                "must be 10..=100000",
            ));
        }
        if !(1..=10_000).contains(&self.batch_max_events) {
            return Err(ConfigError::key(
                "processing.batch_max_events",
                "must be 1..=10000",
            ));
        }
        if self.batch_linger_ms > 60_000 {
            return Err(ConfigError::key(
                "processing.batch_linger_ms",
                "must be at most 60000",
            ));
        }
        if self.combine_gather_us > 100_000 {
            return Err(ConfigError::key(
                "processing.combine_gather_us",
                "must be at most 100000",
            ));
        }
        if !(MIN_BUFFER_BYTES..=MAX_BUFFER_BYTES).contains(&self.buffer_bytes) {
            return Err(ConfigError::key(
                "processing.buffer_bytes",
                format!("must be {MIN_BUFFER_BYTES}..={MAX_BUFFER_BYTES}"),
            ));
        }
        within(
            "processing.commit_interval_ms",
            self.commit_interval_ms,
            1,
            HOUR_MS,
        )?;
        within(
            "processing.retry_backoff_max_ms",
            self.retry_backoff_max_ms,
            1,
            HOUR_MS,
        )?;
        within(
            "processing.retry_deadline_ms",
            self.retry_deadline_ms,
            1,
            DAY_S * 1_000,
        )
    }
}
