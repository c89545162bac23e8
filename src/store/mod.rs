//! PostgreSQL: the connection pool, the migrations, the batch transaction, the expiry of
//! reservations, the retention of history and the audit.

pub mod apply;
pub mod audit;
pub mod dead_letters;
pub mod encoding;
pub mod expiry;
pub mod failure;
pub mod lock_budget;
pub mod migrate;
pub mod ownership;
pub mod pauses;
pub mod replay;
pub mod retention;
pub mod statements;
pub mod status;
pub mod tls;

use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;

pub use apply::{BatchOutcome, Guards, Part, Source, apply_batch, apply_parts};
pub use failure::Failure;
pub use ownership::{Claim, claim};

use crate::config::DatabaseSettings;

pub type Pool = bb8::Pool<statements::Manager>;

/// Builds the pool. Connections are made lazily, so this succeeds without a database; the first
/// checkout reports what is wrong.
pub async fn pool(settings: &DatabaseSettings) -> Result<Pool, Failure> {
    let tls::Target { config, tls } = session(settings)?;
    let manager = statements::Manager(PostgresConnectionManager::new(config, tls));
    Ok(bb8::Pool::builder()
        .max_size(settings.pool_size)
        .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .build_unchecked(manager))
}

/// One connection as the pool makes them (every wait bounded), outside the pool: `run`'s
/// checks at start-up, and the database probe's own connection.
pub async fn connect_bounded(
    settings: &DatabaseSettings,
) -> Result<tokio_postgres::Client, Failure> {
    open(session(settings)?).await
}

/// The settings of every session of a replica.
fn session(settings: &DatabaseSettings) -> Result<tls::Target, Failure> {
    let tls::Target { mut config, tls } = tls::target(&settings.url)?;
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
    if config.get_application_name().is_none() {
        config.application_name("inventory-consumer");
    }
    // Bound every wait: a lock held by a stuck session, a runaway statement, a peer that
    // vanished without closing the connection. Each surfaces as a transient failure. And a
    // session of ours that stalls inside a transaction (process paused) is ended by the server.
    // And one plan per prepared statement, made for parameters of any value: the batch's
    // statements probe by key whatever the length of their arrays (`statements`).
    let timeouts = format!(
        "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={} \
         -c plan_cache_mode=force_generic_plan",
        settings.statement_timeout_ms,
        settings.lock_timeout_ms,
        settings.idle_in_transaction_timeout_ms
    );
    let options = match config.get_options() {
        Some(existing) => format!("{existing} {timeouts}"),
        None => timeouts,
    };
    config
        .options(&options)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .tcp_user_timeout(Duration::from_millis(settings.statement_timeout_ms + 5_000));
    Ok(tls::Target { config, tls })
}

/// SQL that renders timestamp `column` as RFC 3339 text in UTC, to the millisecond (the
/// driver is built without a date-time type).
pub(crate) fn utc_text(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// `url` (a `postgres://` URL) naming database `name` instead.
pub fn with_database(url: &str, name: &str) -> Result<String, Failure> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        Failure::fatal_from(
            "not a postgres:// URL: a database cannot be named in it",
            e.to_string(),
        )
    })?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.into())
}

/// Creates the empty database `name` on the server of `admin_url` and returns its URL: tests,
/// `demo` and `bench` each work in a database of their own.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, Failure> {
    let url = with_database(admin_url, name)?;
    connect(admin_url)
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(url)
}

/// Creates database `name` as a copy of `template` (which nobody may be connected to).
pub async fn create_database_from(
    admin_url: &str,
    name: &str,
    template: &str,
) -> Result<String, Failure> {
    let url = with_database(admin_url, name)?;
    let admin = connect(admin_url).await?;
    // A file copy (PostgreSQL 15 and later) is much faster than the default's WAL-logged copy
    // of every block of a large template; older servers know only the latter.
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .try_get(0)?;
    let strategy = if version >= 150_000 {
        " STRATEGY FILE_COPY"
    } else {
        ""
    };
    let create = format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\"{strategy}");
    // The template's last sessions may still be closing: "being accessed by other users".
    let mut tries = 0;
    loop {
        match admin.batch_execute(&create).await {
            Ok(()) => return Ok(url),
            Err(e)
                if tries < 50
                    && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Drops database `name` of the server of `admin_url`, ending its sessions.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), Failure> {
    connect(admin_url)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// One connection outside any pool, with its driver task spawned.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, Failure> {
    open(tls::target(url)?).await
}

/// Connects to `target` and spawns the connection's driver task.
async fn open(target: tls::Target) -> Result<tokio_postgres::Client, Failure> {
    let tls::Target { config, tls } = target;
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_name() {
        assert_eq!(
            with_database("postgres://u:p@db:5432/admin?sslmode=require", "run_1").ok(),
            Some("postgres://u:p@db:5432/run_1?sslmode=require".to_owned())
        );
        assert!(with_database("host=db user=u", "x").is_err());
    }
}
