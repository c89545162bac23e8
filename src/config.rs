//! Settings, loaded with figment in the order docs/contract.md section 5 gives, later layers winning:
//! defaults, a TOML file (`--config` or `INVENTORY_CONFIG`), the conventional short forms
//! (`DATABASE_URL`, `KAFKA_BROKERS`, `PORT`), `INVENTORY_<SECTION>__<KEY>` variables, then
//! command-line flags. [`Settings::validate`] refuses bad values at start-up, naming the key,
//! including the cross-field rules (the drain must fit inside the group's timeouts).
//!
//! Secrets: `database.url` may carry a password and `kafka.properties` SASL credentials; neither
//! is ever logged (see [`describe_database`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), any Kafka version.
    Classic,
    /// KIP-848, `group.protocol=consumer`: broker-side assignment, Kafka 4.0 and later.
    Consumer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    /// Where the replies to order steps are published (docs/contract.md section 7).
    pub results_topic: String,
    pub group_protocol: GroupProtocol,
    /// Classic protocol only: `cooperative-sticky` (incremental) or an eager strategy such as
    /// `range` or `roundrobin`.
    pub assignment_strategy: String,
    /// Passed to librdkafka as they are (TLS, SASL, tuning). In environment variables write
    /// `_` for `.`: `INVENTORY_KAFKA__PROPERTIES__SASL_MECHANISM=PLAIN`.
    pub properties: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: u32,
    /// Whether `run` applies pending migrations before consuming.
    pub migrate: bool,
    pub connect_timeout_ms: u64,
    /// Longest a statement may run; beyond it the batch fails transiently and is retried.
    pub statement_timeout_ms: u64,
    /// Longest a statement may wait for a lock (an advisory lock held by a stuck session).
    pub lock_timeout_ms: u64,
    /// Longest a session may sit inside a transaction doing nothing before the server ends it,
    /// releasing its locks: a replica paused mid-batch blocks the others no longer than this.
    pub idle_in_transaction_timeout_ms: u64,
    /// Whether `run` accepts a database whose encoding is not UTF-8. Events are UTF-8; such a
    /// database cannot hold every character, and an event carrying one is dead-lettered as
    /// `unstorable`. Off: the replica refuses to start on it.
    pub allow_non_utf8: bool,
    /// The most replicas that run against this database at once (the Deployment's replicas,
    /// or the autoscaler's maximum): together they take at most half of the server's lock
    /// table, each its share (`src/store/lock_budget.rs`).
    pub max_replicas: u64,
    /// A replica whose database probe has failed this long (unreachable, or its pool
    /// exhausted) steps out of the consumer group, so that its partitions go to replicas that
    /// can serve them, and steps back in once the database answers (`src/kafka/standing.rs`).
    pub step_out_after_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    pub batch_max_events: usize,
    pub batch_linger_ms: u64,
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

/// What is published to `kafka.results_topic` (docs/contract.md section 7).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultSettings {
    /// Also the outcomes of `restock`, `sale` and `adjustment`, keyed by their first SKU
    /// (order steps and expiries are always published).
    pub all_events: bool,
}

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

impl HistorySettings {
    /// How often a replica runs maintenance: often enough to start each period on time.
    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_secs((self.period_s / 4).clamp(1, 60))
    }
}

impl ReservationSettings {
    pub fn default_ttl(&self) -> Duration {
        Duration::from_secs(self.default_ttl_s)
    }

    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.max_ttl_s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` or `pretty`; unset: pretty on a terminal, JSON otherwise.
    pub format: Option<LogFormat>,
    /// A tracing filter, e.g. `info` or `inventory_consumer=debug,rdkafka=warn`.
    pub level: String,
}

const DAY_S: u64 = 86_400;
const HOUR_MS: u64 = 3_600_000;
/// PostgreSQL's timeouts are 32-bit counts of milliseconds.
const POSTGRES_MAX_MS: u64 = i32::MAX as u64;
/// The longest history kept short of for ever (0): ten years. Longer is a unit mistake
/// (milliseconds given for seconds) more likely than a wish.
const MAX_RETENTION_S: u64 = 3_650 * DAY_S;
/// The drain when nothing bounds it lower.
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// How far inside the group's windows a derived drain stays (a commit and a leave after it).
const DRAIN_MARGIN_MS: u64 = 2_000;
/// What `/livez` allows beyond the drain timeout, and the least it allows.
const LIVENESS_MARGIN: Duration = Duration::from_secs(30);
const MIN_LIVENESS_WINDOW: Duration = Duration::from_secs(60);
/// Bounds of `processing.buffer_bytes`.
const MIN_BUFFER_BYTES: usize = 1 << 20;
const MAX_BUFFER_BYTES: usize = 4 << 30;
/// librdkafka's defaults of the group's windows.
const SESSION_TIMEOUT_MS: u64 = 45_000;
const MAX_POLL_INTERVAL_MS: u64 = 300_000;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kafka: KafkaSettings {
                brokers: String::new(),
                topic: "inventory-events".into(),
                group_id: "inventory-consumer-group".into(),
                results_topic: "inventory-results".into(),
                group_protocol: GroupProtocol::Classic,
                assignment_strategy: "cooperative-sticky".into(),
                properties: BTreeMap::new(),
            },
            database: DatabaseSettings {
                url: String::new(),
                pool_size: 4,
                migrate: true,
                connect_timeout_ms: 10_000,
                statement_timeout_ms: 30_000,
                lock_timeout_ms: 10_000,
                idle_in_transaction_timeout_ms: 10_000,
                allow_non_utf8: false,
                max_replicas: 6,
                step_out_after_ms: 20_000,
            },
            processing: ProcessingSettings {
                batch_max_events: 500,
                batch_linger_ms: 20,
                drain_timeout_ms: None,
                dead_letter_max_share: 0.5,
                dead_letter_window: 1_000,
                commit_interval_ms: 1_000,
                retry_backoff_max_ms: 5_000,
                retry_deadline_ms: 120_000,
                buffer_bytes: 16 << 20,
            },
            reservations: ReservationSettings {
                default_ttl_s: 900,
                max_ttl_s: 7 * DAY_S,
                sweep_interval_ms: 1_000,
            },
            results: ResultSettings { all_events: false },
            history: HistorySettings {
                period_s: 7 * DAY_S,
                dedupe_horizon_s: 15 * DAY_S,
                ledger_retention_s: 30 * DAY_S,
                dead_letter_retention_s: 30 * DAY_S,
            },
            http: HttpSettings {
                addr: "0.0.0.0:8080".into(),
            },
            log: LogSettings {
                format: None,
                level: "info".into(),
            },
        }
    }
}

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

/// Properties the consumer owns: the value it sets itself, if any (giving that same value is
/// harmless and allowed), and why another would break a guarantee. docs/configuration.md
/// lists them for users.
const MANAGED_PROPERTIES: &[(&str, Option<&str>, &str)] = &[
    (
        "enable.auto.commit",
        Some("false"),
        "offsets are committed only after the database commit that holds their effect",
    ),
    (
        "enable.auto.offset.store",
        Some("false"),
        "offsets are committed only after the database commit that holds their effect",
    ),
    (
        "auto.offset.reset",
        Some("earliest"),
        "the database decides where a partition starts; one with nothing recorded starts at \
         the earliest offset Kafka holds, never past a backlog",
    ),
    (
        "isolation.level",
        Some("read_committed"),
        "the events of a transactional producer's aborted transactions must never be applied",
    ),
    (
        "group.instance.id",
        None,
        "static membership needs an id unique to each replica, which one setting shared by \
         every replica of a Deployment cannot give (they would fence each other in a loop); \
         not supported",
    ),
    (
        "enable.partition.eof",
        Some("false"),
        "the consumer never waits for the end of a partition",
    ),
    ("group.id", None, "set kafka.group_id"),
    ("bootstrap.servers", None, "set kafka.brokers"),
    ("group.protocol", None, "set kafka.group_protocol"),
    (
        "partition.assignment.strategy",
        None,
        "set kafka.assignment_strategy",
    ),
    (
        "enable.idempotence",
        Some("true"),
        "replies are published in order and at least once by an idempotent producer",
    ),
    (
        "acks",
        Some("all"),
        "a reply leaves the outbox only once every in-sync replica has it",
    ),
];

/// Librdkafka rejects these with `group.protocol=consumer`: the broker owns them there.
const CLASSIC_ONLY_PROPERTIES: &[&str] = &["session.timeout.ms", "heartbeat.interval.ms"];

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

    /// The cross-field and range rules; each error names the key.
    pub fn validate(&self, needs: Needs) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if needs.kafka && k.brokers.trim().is_empty() {
            return Err(ConfigError::key(
                "kafka.brokers",
                "required (set KAFKA_BROKERS, INVENTORY_KAFKA__BROKERS or --brokers)",
            ));
        }
        if k.results_topic == k.topic {
            return Err(ConfigError::key(
                "kafka.results_topic",
                "must differ from kafka.topic (replies are not events)",
            ));
        }
        for (key, value) in [
            ("kafka.topic", &k.topic),
            ("kafka.group_id", &k.group_id),
            ("kafka.results_topic", &k.results_topic),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::key(key, "must not be empty"));
            }
        }
        let properties = self.kafka_properties();
        for (name, ours, why) in MANAGED_PROPERTIES {
            let Some(given) = properties.get(*name) else {
                continue;
            };
            if ours.is_some_and(|ours| same_value(name, given, ours)) {
                continue;
            }
            return Err(ConfigError::key(
                &format!("kafka.properties.{name}"),
                format!("managed by the consumer: {why}"),
            ));
        }
        if k.group_protocol == GroupProtocol::Consumer {
            for name in CLASSIC_ONLY_PROPERTIES {
                if properties.contains_key(*name) {
                    return Err(ConfigError::key(
                        &format!("kafka.properties.{name}"),
                        "not allowed with kafka.group_protocol = consumer (the broker sets it)",
                    ));
                }
            }
        }
        let db = &self.database;
        if needs.database && db.url.trim().is_empty() {
            return Err(ConfigError::key(
                "database.url",
                "required (set DATABASE_URL, INVENTORY_DATABASE__URL or --database-url)",
            ));
        }
        if !db.url.is_empty() {
            // As connections will use it: libpq's TLS parameters, the root certificates' file.
            crate::store::tls::check(&db.url).map_err(|e| ConfigError::key("database.url", e))?;
        }
        if !(1..=256).contains(&db.pool_size) {
            return Err(ConfigError::key("database.pool_size", "must be 1..=256"));
        }
        within("database.max_replicas", db.max_replicas, 1, 1_000)?;
        within(
            "database.connect_timeout_ms",
            db.connect_timeout_ms,
            1,
            HOUR_MS,
        )?;
        // Sent to the server as its own settings, which are 32-bit counts of milliseconds: a
        // larger value would be refused by every connection, after the replica joined.
        for (key, value) in [
            ("database.statement_timeout_ms", db.statement_timeout_ms),
            ("database.lock_timeout_ms", db.lock_timeout_ms),
            (
                "database.idle_in_transaction_timeout_ms",
                db.idle_in_transaction_timeout_ms,
            ),
        ] {
            within(key, value, 1, POSTGRES_MAX_MS)?;
        }
        let h = &self.history;
        if !(1..=366 * DAY_S).contains(&h.period_s) {
            return Err(ConfigError::key(
                "history.period_s",
                "must be 1..=31622400 (a year)",
            ));
        }
        for (key, value) in [
            ("history.dedupe_horizon_s", h.dedupe_horizon_s),
            ("history.ledger_retention_s", h.ledger_retention_s),
            ("history.dead_letter_retention_s", h.dead_letter_retention_s),
        ] {
            if value != 0 && !(h.period_s..=MAX_RETENTION_S).contains(&value) {
                return Err(ConfigError::key(
                    key,
                    format!(
                        "must be 0 (keep for ever) or history.period_s..={MAX_RETENTION_S} (ten \
                         years), got {value}"
                    ),
                ));
            }
        }
        let p = &self.processing;
        if !(p.dead_letter_max_share > 0.0 && p.dead_letter_max_share <= 1.0) {
            return Err(ConfigError::key(
                "processing.dead_letter_max_share",
                "must be in (0, 1] (1 never halts)",
            ));
        }
        if !(10..=100_000).contains(&p.dead_letter_window) {
            return Err(ConfigError::key(
                "processing.dead_letter_window",
                "must be 10..=100000",
            ));
        }
        if !(1..=10_000).contains(&p.batch_max_events) {
            return Err(ConfigError::key(
                "processing.batch_max_events",
                "must be 1..=10000",
            ));
        }
        if p.batch_linger_ms > 60_000 {
            return Err(ConfigError::key(
                "processing.batch_linger_ms",
                "must be at most 60000",
            ));
        }
        let drain_timeout_ms = self.drain_timeout_ms()?;
        if drain_timeout_ms == 0 {
            return Err(ConfigError::key(
                "processing.drain_timeout_ms",
                "must be > 0",
            ));
        }
        // A drain that outlives the group's patience would be pointless: the member is expelled
        // and the partitions reassigned while we still wait. (A batch retried for long does not
        // hold the poll thread: its partition is paused, so the retry deadline is free.)
        let poll_interval = self.property_ms("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)?;
        let mut bounds = vec![(
            "processing.drain_timeout_ms",
            drain_timeout_ms,
            "max.poll.interval.ms",
            poll_interval,
        )];
        if k.group_protocol == GroupProtocol::Classic {
            let session = self.property_ms("session.timeout.ms", SESSION_TIMEOUT_MS)?;
            bounds.push((
                "processing.drain_timeout_ms",
                drain_timeout_ms,
                "session.timeout.ms",
                session,
            ));
        }
        for (key, value, name, bound) in bounds {
            if value >= bound {
                return Err(ConfigError::key(
                    key,
                    format!("must be below {name} ({bound} ms), got {value}"),
                ));
            }
        }
        if !(MIN_BUFFER_BYTES..=MAX_BUFFER_BYTES).contains(&p.buffer_bytes) {
            return Err(ConfigError::key(
                "processing.buffer_bytes",
                format!("must be {MIN_BUFFER_BYTES}..={MAX_BUFFER_BYTES}"),
            ));
        }
        let r = &self.reservations;
        within(
            "reservations.max_ttl_s",
            r.max_ttl_s,
            1,
            crate::domain::event::MAX_TTL_SECONDS as u64,
        )?;
        if !(1..=r.max_ttl_s).contains(&r.default_ttl_s) {
            return Err(ConfigError::key(
                "reservations.default_ttl_s",
                format!(
                    "must be 1..=reservations.max_ttl_s ({}), got {}",
                    r.max_ttl_s, r.default_ttl_s
                ),
            ));
        }
        if !(10..=3_600_000).contains(&r.sweep_interval_ms) {
            return Err(ConfigError::key(
                "reservations.sweep_interval_ms",
                "must be 10..=3600000",
            ));
        }
        within(
            "processing.commit_interval_ms",
            p.commit_interval_ms,
            1,
            HOUR_MS,
        )?;
        within(
            "processing.retry_backoff_max_ms",
            p.retry_backoff_max_ms,
            1,
            HOUR_MS,
        )?;
        within(
            "processing.retry_deadline_ms",
            p.retry_deadline_ms,
            1,
            DAY_S * 1_000,
        )?;
        // At least two failed probes. (Past `processing.retry_deadline_ms` the replica exits
        // instead, and waits at start-up without joining: either way it holds nothing.)
        let probes = (crate::kafka::standing::PROBE_INTERVAL
            + crate::kafka::standing::PROBE_TIMEOUT)
            .as_millis() as u64;
        within(
            "database.step_out_after_ms",
            db.step_out_after_ms,
            probes,
            HOUR_MS,
        )?;
        self.http
            .addr
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::key("http.addr", format!("not a socket address: {e}")))?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::key("log.level", e))?;
        if needs.kafka {
            // librdkafka checks names and values of its properties when the config is built.
            crate::kafka::client::consumer_config(self)
                .create_native_config()
                .map_err(|e| ConfigError::key("kafka.properties", e))?;
        }
        Ok(())
    }

    /// `kafka.properties` flattened to librdkafka's dotted names. Nested tables (from
    /// environment variables, where `__` nests) are joined with dots, `_` becomes `.`.
    pub fn kafka_properties(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (name, value) in &self.kafka.properties {
            flatten(&name.replace('_', "."), value, &mut out);
        }
        out
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
        match self.kafka_properties().get(name) {
            Some(v) => v.parse::<u64>().map_err(|_| {
                ConfigError::key(&format!("kafka.properties.{name}"), "must be a number")
            }),
            None => Ok(default_ms),
        }
    }
}

/// Whether librdkafka reads `given` for property `name` as `ours`: its aliases
/// (`smallest` for `earliest`, `-1` for `all`) and spellings of booleans.
fn same_value(name: &str, given: &str, ours: &str) -> bool {
    let given = given.trim().to_ascii_lowercase();
    let given = match (name, given.as_str()) {
        ("auto.offset.reset", "smallest" | "beginning") => "earliest",
        ("acks", "-1") => "all",
        (_, "1" | "t") if ours == "true" => "true",
        (_, "0" | "f") if ours == "false" => "false",
        (_, other) => other,
    };
    given == ours
}

/// `key` must lie in `min..=max`.
fn within(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
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

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Dict(_, dict) => {
            for (name, v) in dict {
                flatten(&format!("{prefix}.{}", name.replace('_', ".")), v, out);
            }
        }
        Value::String(_, s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        Value::Char(_, c) => {
            out.insert(prefix.to_owned(), c.to_string());
        }
        Value::Bool(_, b) => {
            out.insert(prefix.to_owned(), b.to_string());
        }
        Value::Num(_, n) => {
            // Num keeps the width and sign it was parsed with (env "0" is a U8).
            let text = n
                .to_u128()
                .map(|u| u.to_string())
                .or_else(|| n.to_i128().map(|i| i.to_string()))
                .or_else(|| n.to_f64().map(|f| f.to_string()))
                .unwrap_or_default();
            out.insert(prefix.to_owned(), text);
        }
        Value::Empty(..) | Value::Array(..) => {}
    }
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

/// `user@host:port/dbname` of a database URL or key=value string, for logs and messages:
/// built from the parsed settings, so no password can slip through, whatever the format.
pub fn describe_database(url: &str) -> String {
    let Ok((config, _)) = crate::store::tls::parse(url) else {
        return "(unparsable database URL)".into();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Needs = Needs {
        kafka: true,
        database: true,
    };

    fn valid() -> Settings {
        let mut s = Settings::default();
        s.kafka.brokers = "localhost:9092".into();
        s.database.url = "postgres://app:secret@localhost/inventory".into();
        s
    }

    fn error_of(s: &Settings) -> String {
        s.validate(ALL).unwrap_err().to_string()
    }

    #[test]
    fn defaults_plus_required_values_are_valid() {
        valid().validate(ALL).unwrap();
        assert!(error_of(&Settings::default()).contains("kafka.brokers"));
    }

    #[test]
    fn errors_name_the_key() {
        let mut s = valid();
        s.processing.batch_max_events = 0;
        assert!(error_of(&s).contains("processing.batch_max_events"));

        let mut s = valid();
        s.processing.drain_timeout_ms = Some(50_000);
        assert!(error_of(&s).contains("processing.drain_timeout_ms"));

        let mut s = valid();
        s.kafka
            .properties
            .insert("enable.auto.commit".into(), Value::from("true"));
        assert!(error_of(&s).contains("kafka.properties.enable.auto.commit"));

        let mut s = valid();
        s.kafka
            .properties
            .insert("enable.idempotence".into(), Value::from("false"));
        assert!(error_of(&s).contains("kafka.properties.enable.idempotence"));

        let mut s = valid();
        s.kafka.group_protocol = GroupProtocol::Consumer;
        s.kafka
            .properties
            .insert("session.timeout.ms".into(), Value::from(6000));
        assert!(error_of(&s).contains("kafka.properties.session.timeout.ms"));

        let mut s = valid();
        s.kafka
            .properties
            .insert("no.such.property".into(), Value::from("1"));
        assert!(error_of(&s).contains("kafka.properties"));

        let mut s = valid();
        s.database.connect_timeout_ms = 0;
        assert!(error_of(&s).contains("database.connect_timeout_ms"));

        let mut s = valid();
        s.processing.buffer_bytes = 100;
        assert!(error_of(&s).contains("processing.buffer_bytes"));

        let mut s = valid();
        s.database.url = "mysql:/nope".into();
        assert!(error_of(&s).contains("database.url"));

        let mut s = valid();
        s.http.addr = "nowhere".into();
        assert!(error_of(&s).contains("http.addr"));
    }

    #[test]
    fn managed_properties_accept_the_consumers_own_value_in_any_spelling() {
        for (name, given) in [
            ("auto.offset.reset", "earliest"),
            ("auto.offset.reset", "smallest"),
            ("auto.offset.reset", "Beginning"),
            ("isolation.level", "read_committed"),
            ("enable.auto.commit", "false"),
            ("enable.auto.commit", "0"),
            ("enable.idempotence", "1"),
            ("acks", "-1"),
            ("acks", "all"),
        ] {
            let mut s = valid();
            s.kafka.properties.insert(name.into(), Value::from(given));
            assert!(s.validate(ALL).is_ok(), "{name}={given}");
        }
        for (name, given) in [
            ("auto.offset.reset", "latest"),
            ("auto.offset.reset", "largest"),
            ("isolation.level", "read_uncommitted"),
            ("enable.auto.commit", "true"),
            ("acks", "1"),
            ("group.instance.id", "replica-0"),
        ] {
            let mut s = valid();
            s.kafka.properties.insert(name.into(), Value::from(given));
            assert!(
                error_of(&s).contains(&format!("kafka.properties.{name}")),
                "{name}={given}"
            );
        }
    }

    #[test]
    fn drain_must_fit_inside_the_session_timeout() {
        let mut s = valid();
        s.kafka
            .properties
            .insert("session.timeout.ms".into(), Value::from(6000));
        s.processing.drain_timeout_ms = Some(6000);
        assert!(error_of(&s).contains("below session.timeout.ms"));
        s.processing.drain_timeout_ms = Some(5000);
        s.validate(ALL).unwrap();
    }

    #[test]
    fn a_retry_deadline_past_the_poll_interval_is_allowed_now_that_retries_do_not_hold_the_poll_loop()
     {
        let mut s = valid();
        s.processing.retry_deadline_ms = 600_000;
        s.validate(ALL).unwrap();
    }

    #[test]
    fn liveness_allows_the_longest_rebalance_callback() {
        let mut s = valid();
        assert_eq!(s.liveness_window(), Duration::from_secs(60), "the floor");
        s.kafka.group_protocol = GroupProtocol::Consumer;
        s.processing.drain_timeout_ms = Some(100_000);
        s.validate(ALL).unwrap();
        assert!(s.liveness_window() >= s.drain_timeout() + Duration::from_secs(30));
    }

    #[test]
    fn an_unset_drain_follows_the_session_timeout() {
        let mut s = valid();
        assert_eq!(s.drain_timeout(), Duration::from_secs(10));
        s.kafka
            .properties
            .insert("session.timeout.ms".into(), Value::from(6000));
        s.validate(ALL).unwrap();
        assert_eq!(s.drain_timeout(), Duration::from_secs(4));
        // KIP-848: the session is the broker's, not the client's.
        let mut s = valid();
        s.kafka.group_protocol = GroupProtocol::Consumer;
        assert_eq!(s.drain_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn properties_flatten_from_nested_and_underscored_names() {
        let mut s = valid();
        let nested = figment::value::Dict::from([("mechanism".to_owned(), Value::from("PLAIN"))]);
        s.kafka
            .properties
            .insert("sasl".into(), Value::from(nested));
        s.kafka
            .properties
            .insert("fetch_queue_backoff_ms".into(), Value::from(0));
        let p = s.kafka_properties();
        assert_eq!(p["sasl.mechanism"], "PLAIN");
        assert_eq!(p["fetch.queue.backoff.ms"], "0");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail returns figment::Error
    fn layers_apply_in_the_documented_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[kafka]\nbrokers = \"file:9092\"\ntopic = \"from-file\"\n[processing]\nbatch_max_events = 7\n",
            )?;
            jail.set_env("DATABASE_URL", "postgres://u:pw@short/db");
            jail.set_env("INVENTORY_KAFKA__TOPIC", "from-env");
            // Injected by Kubernetes for a Service named inventory-consumer: not a setting.
            jail.set_env("INVENTORY_CONSUMER_SERVICE_HOST", "10.0.0.1");
            jail.set_env("INVENTORY_KAFKA__PROPERTIES__SASL_MECHANISM", "PLAIN");
            jail.set_env("INVENTORY_KAFKA__PROPERTIES__FETCH_QUEUE_BACKOFF_MS", "0");
            let s = Settings::load(
                Some(Path::new("c.toml")),
                &[("processing.batch_max_events".into(), "9".into())],
                ALL,
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(s.kafka.brokers, "file:9092");
            assert_eq!(s.kafka.topic, "from-env");
            assert_eq!(s.database.url, "postgres://u:pw@short/db");
            assert_eq!(s.processing.batch_max_events, 9);
            assert_eq!(s.kafka_properties()["sasl.mechanism"], "PLAIN");
            assert_eq!(s.kafka_properties()["fetch.queue.backoff.ms"], "0");

            jail.set_env("INVENTORY_PROCESSING__BATCH_MAX_EVENTS", "lots");
            let err = Settings::load(Some(Path::new("c.toml")), &[], ALL).unwrap_err();
            assert!(
                err.to_string()
                    .contains("processing.batch_max_events: invalid type"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn database_descriptions_hold_no_password() {
        for url in [
            "postgres://app:secret@db:5432/x",
            "postgres://app@db/x?password=secret",
            "host=db user=app password=secret dbname=x",
        ] {
            let d = describe_database(url);
            assert!(!d.contains("secret"), "{d}");
            assert!(d.starts_with("app@db:") && d.ends_with("/x"), "{d}");
        }
    }
}
