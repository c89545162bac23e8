//! Settings, loaded with figment in the order docs/contract.md section 5 gives, later layers
//! winning: defaults, a TOML file (`--config` or `INVENTORY_CONFIG`), the conventional short
//! forms (`DATABASE_URL`, `KAFKA_BROKERS`, `PORT`, the standard `OTEL_*` variables), `INVENTORY_<SECTION>__<KEY>` variables,
//! then command-line flags. [`Settings::validate`] refuses bad values at start-up, naming the
//! key: each section checks its own rules ([`kafka`], [`database`], [`processing`], [`orders`],
//! [`history`], [`server`]), and this module the rules across sections (the drain must fit
//! inside the group's timeouts).
//!
//! Secrets: `database.url` may carry a password and `kafka.properties` SASL credentials; neither
//! is ever logged (see [`describe_database`]).

pub mod database;
pub mod history;
pub mod kafka;
pub mod orders;
pub mod processing;
pub mod server;
#[cfg(test)]
mod tests;
pub mod traces;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Serialize};

pub use database::{DatabaseSettings, describe_database};
pub use history::HistorySettings;
pub use kafka::{GroupProtocol, KafkaSettings};
pub use orders::{ReservationSettings, ResultSettings};
pub use processing::ProcessingSettings;
pub use server::{HttpSettings, LogFormat, LogSettings};
pub use traces::TracesSettings;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    pub processing: ProcessingSettings,
    pub reservations: ReservationSettings,
    pub results: ResultSettings,
    pub history: HistorySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub traces: TracesSettings,
}

const DAY_S: u64 = 86_400;
const HOUR_MS: u64 = 3_600_000;
/// The drain when nothing bounds it lower.
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// How far inside the group's windows a derived drain stays (a commit and a leave after it).
const DRAIN_MARGIN_MS: u64 = 2_000;
/// What `/livez` allows beyond the drain timeout, and the least it allows.
const LIVENESS_MARGIN: Duration = Duration::from_secs(30);
const MIN_LIVENESS_WINDOW: Duration = Duration::from_secs(60);
/// librdkafka's defaults of the group's windows.
const SESSION_TIMEOUT_MS: u64 = 45_000;
const MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Which settings a command cannot do without: `verify` needs no Kafka, `inventory-dev produce` no database.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub kafka: bool,
    pub database: bool,
}

impl Needs {
    pub const KAFKA: Needs = Needs {
        kafka: true,
        database: false,
    };
    pub const DATABASE: Needs = Needs {
        kafka: false,
        database: true,
    };
    pub const BOTH: Needs = Needs {
        kafka: true,
        database: true,
    };
}

/// A configuration problem, naming the key. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub(crate) fn key(key: &str, problem: impl std::fmt::Display) -> Self {
        ConfigError(format!("{key}: {problem}"))
    }
}

impl Settings {
    /// Loads every layer. `file` is `--config`; `overrides` are command-line `key=value` pairs.
    pub fn load(
        file: Option<&Path>,
        overrides: &[(String, String)],
        needs: Needs,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("INVENTORY_CONFIG").map(PathBuf::from));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::key(
                    "--config",
                    format!("no such file: {}", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        for (var, key) in [
            ("DATABASE_URL", "database.url"),
            ("KAFKA_BROKERS", "kafka.brokers"),
        ] {
            if let Ok(value) = std::env::var(var) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        for (key, value) in traces::short_forms(|name| std::env::var(name).ok()) {
            let value = match key {
                "traces.sampler_arg" => parse_override(&value),
                _ => Value::from(value),
            };
            figment = figment.merge(Serialized::default(key, value));
        }
        if let Ok(port) = std::env::var("PORT") {
            figment = figment.merge(Serialized::default("http.addr", format!("0.0.0.0:{port}")));
        }
        // Only `INVENTORY_<SECTION>__<KEY>`: other INVENTORY_ variables (such as the
        // INVENTORY_CONSUMER_SERVICE_HOST Kubernetes injects for a Service) are not settings.
        figment = figment.merge(
            Env::prefixed("INVENTORY_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        for (key, value) in overrides {
            figment = figment.merge(Serialized::default(key, parse_override(value)));
        }
        let settings: Settings = figment.extract().map_err(describe_figment_error)?;
        settings.validate(needs)?;
        Ok(settings)
    }

    /// Every section's rules, then the rules across sections; each error names the key.
    pub fn validate(&self, needs: Needs) -> Result<(), ConfigError> {
        self.kafka.validate(needs)?;
        self.database.validate(needs)?;
        self.history.validate()?;
        self.processing.validate()?;
        self.validate_drain()?;
        self.reservations.validate()?;
        self.http.validate()?;
        self.log.validate()?;
        self.traces.validate()?;
        if needs.kafka {
            self.kafka.check_with_librdkafka()?;
        }
        Ok(())
    }

    /// A drain that outlives the group's patience would be pointless: the member is expelled
    /// and the partitions reassigned while we still wait. (A batch retried for long does not
    /// hold the poll thread: its partition is paused, so the retry deadline is free.)
    fn validate_drain(&self) -> Result<(), ConfigError> {
        let drain_timeout_ms = self.drain_timeout_ms()?;
        if drain_timeout_ms == 0 {
            return Err(ConfigError::key(
                "processing.drain_timeout_ms",
                "must be > 0",
            ));
        }
        let mut bounds = vec![(
            "max.poll.interval.ms",
            self.property_ms("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)?,
        )];
        if self.kafka.group_protocol == GroupProtocol::Classic {
            bounds.push((
                "session.timeout.ms",
                self.property_ms("session.timeout.ms", SESSION_TIMEOUT_MS)?,
            ));
        }
        for (name, bound) in bounds {
            if drain_timeout_ms >= bound {
                return Err(ConfigError::key(
                    "processing.drain_timeout_ms",
                    format!("must be below {name} ({bound} ms), got {drain_timeout_ms}"),
                ));
            }
        }
        Ok(())
    }

    /// Whether rebalances are incremental: KIP-848, or a cooperative classic strategy.
    pub fn incremental_rebalancing(&self) -> bool {
        self.kafka.group_protocol == GroupProtocol::Consumer
            || self.kafka.assignment_strategy.contains("cooperative")
    }

    /// `processing.drain_timeout_ms`, or when unset 10 s, shortened to stay 2 s inside the
    /// windows after which the group gives the member's partitions away: `session.timeout.ms`
    /// (classic protocol; KIP-848's session is the broker's) and `max.poll.interval.ms`. A user
    /// who lowers the session thus gets a drain that fits it, not a refusal at start-up.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms().unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS))
    }

    /// How long the poll loop may be silent before `/livez` fails. The loop never waits for a
    /// worker; its longest legitimate silence is a rebalance callback: a revoke drains for up
    /// to the drain timeout and then commits, an assignment claims its partitions for up to
    /// 5 s. So the window follows the drain timeout, with room for those, and never below
    /// a minute (a probe that restarts a replica in the middle of a slow rebalance helps
    /// nobody).
    pub fn liveness_window(&self) -> Duration {
        (self.drain_timeout() + LIVENESS_MARGIN).max(MIN_LIVENESS_WINDOW)
    }

    fn drain_timeout_ms(&self) -> Result<u64, ConfigError> {
        if let Some(ms) = self.processing.drain_timeout_ms {
            return Ok(ms);
        }
        let mut ms = DEFAULT_DRAIN_TIMEOUT_MS.min(
            self.property_ms("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)?
                .saturating_sub(DRAIN_MARGIN_MS),
        );
        if self.kafka.group_protocol == GroupProtocol::Classic {
            let session = self.property_ms("session.timeout.ms", SESSION_TIMEOUT_MS)?;
            ms = ms.min(session.saturating_sub(DRAIN_MARGIN_MS));
        }
        Ok(ms)
    }

    /// A millisecond property of `kafka.properties`, or librdkafka's default.
    fn property_ms(&self, name: &str, default_ms: u64) -> Result<u64, ConfigError> {
        match self.kafka.flat_properties().get(name) {
            Some(v) => v.parse::<u64>().map_err(|_| {
                ConfigError::key(&format!("kafka.properties.{name}"), "must be a number")
            }),
            None => Ok(default_ms),
        }
    }
}

/// `key` must lie in `min..=max`.
pub(crate) fn within(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            format!("must be {min}..={max}, got {value}"),
        ))
    }
}

/// `key: problem (source)` for each error figment found, keys as documented (lowercase).
fn describe_figment_error(e: figment::Error) -> ConfigError {
    let lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            format!("{key}: {}{source}", e.kind)
        })
        .collect();
    ConfigError(lines.join("; "))
}

/// `--set key=value` values are typed like TOML (numbers, booleans), else taken as strings.
fn parse_override(value: &str) -> Value {
    value
        .parse::<Value>()
        .unwrap_or_else(|_| Value::from(value.to_owned()))
}

/// Splits `key=value` for `--set`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))
}
