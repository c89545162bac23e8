//! `[reservations]` and `[results]`: order sagas' reservations and their replies
//! (docs/contract.md section 7).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY_S, within};

/// Order sagas (docs/contract.md section 7).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationSettings {
    /// The expiry of a reserve that gives neither `ttl_seconds` nor `expires_at`.
    pub default_ttl_s: u64,
    /// The longest a reservation may hold stock: a reserve whose `ttl_seconds` or `expires_at`
    /// lies further ahead (by the database's clock) is rejected, so that no order holds units
    /// for ever.
    pub max_ttl_s: u64,
    /// How often each replica releases the reservations whose expiry has passed.
    pub sweep_interval_ms: u64,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        ReservationSettings {
            default_ttl_s: 900,
            max_ttl_s: 7 * DAY_S,
            sweep_interval_ms: 1_000,
        }
    }
}

impl ReservationSettings {
    pub fn default_ttl(&self) -> Duration {
        Duration::from_secs(self.default_ttl_s)
    }

    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.max_ttl_s)
    }

    /// The section's own rules, each error naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        within(
            "reservations.max_ttl_s",
            self.max_ttl_s,
            1,
            crate::domain::event::MAX_TTL_SECONDS as u64,
        )?;
        if !(1..=self.max_ttl_s).contains(&self.default_ttl_s) {
            return Err(ConfigError::key(
                "reservations.default_ttl_s",
                format!(
                    "must be 1..=reservations.max_ttl_s ({}), got {}",
                    self.max_ttl_s, self.default_ttl_s
                ),
            ));
        }
        if !(10..=3_600_000).contains(&self.sweep_interval_ms) {
            return Err(ConfigError::key(
                "reservations.sweep_interval_ms",
                "must be 10..=3600000",
            ));
        }
        Ok(())
    }
}

/// What is published to `kafka.results_topic` (docs/contract.md section 7).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultSettings {
    /// Also the outcomes of `restock`, `sale` and `adjustment`, keyed by their first SKU
    /// (order steps and expiries are always published).
    pub all_events: bool,
}
