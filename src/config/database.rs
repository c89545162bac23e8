//! `[database]`: the PostgreSQL the replicas share, the pool, and the server-side timeouts that
//! bound a stuck session (docs/configuration.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR_MS, Needs, within};

/// How often a replica probes its database (`src/kafka/standing.rs`).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe that has no answer within this fails: a connection whose packets are dropped
/// answers nothing, ever, until TCP gives up on it much later.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// PostgreSQL's timeouts are 32-bit counts of milliseconds.
const POSTGRES_MAX_MS: u64 = i32::MAX as u64;

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

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
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
        }
    }
}

impl DatabaseSettings {
    /// The section's own rules, each error naming its key.
    pub fn validate(&self, needs: Needs) -> Result<(), ConfigError> {
        if needs.database && self.url.trim().is_empty() {
            return Err(ConfigError::key(
                "database.url",
                "required (set DATABASE_URL, INVENTORY_DATABASE__URL or --database-url)",
            ));
        }
        if !self.url.is_empty() {
            // As connections will use it: libpq's TLS parameters, the root certificates' file.
            crate::store::tls::check(&self.url).map_err(|e| ConfigError::key("database.url", e))?;
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(ConfigError::key("database.pool_size", "must be 1..=256"));
        }
        within("database.max_replicas", self.max_replicas, 1, 1_000)?;
        within(
            "database.connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            HOUR_MS,
        )?;
        // Sent to the server as its own settings, which are 32-bit counts of milliseconds: a
        // larger value would be refused by every connection, after the replica joined.
        for (key, value) in [
            ("database.statement_timeout_ms", self.statement_timeout_ms),
            ("database.lock_timeout_ms", self.lock_timeout_ms),
            (
                "database.idle_in_transaction_timeout_ms",
                self.idle_in_transaction_timeout_ms,
            ),
        ] {
            within(key, value, 1, POSTGRES_MAX_MS)?;
        }
        // At least two failed probes. (Past `processing.retry_deadline_ms` the replica exits
        // instead, and waits at start-up without joining: either way it holds nothing.)
        let probes = (PROBE_INTERVAL + PROBE_TIMEOUT).as_millis() as u64;
        within(
            "database.step_out_after_ms",
            self.step_out_after_ms,
            probes,
            HOUR_MS,
        )
    }
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
