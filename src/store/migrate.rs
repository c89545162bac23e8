//! Schema migrations: the SQL files in `migrations/`, embedded at build time and applied with
//! refinery. Replicas that start together all call [`migrate`]; a session-level advisory lock on
//! a dedicated connection makes them take turns, so exactly one applies each migration and the
//! others find it done. (Session locks are fine here: this is one direct connection held for the
//! duration, not the pooled apply path.)
//!
//! A release runs only on the schema it was built for: one migrated by a newer release (a
//! migration this build does not have) is refused before anything is written, whether this
//! process migrates or not ([`SchemaState`]). The rule that lets the previous release run on
//! this one's schema during a rolling update is in docs/operations.md ("Upgrades and migrations").

use tokio_postgres::Client;

use crate::domain::lock_key;
use crate::store::{Failure, connect};

/// Where the database's schema stands against this build's migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// Every migration this build has is applied, and no other.
    Current,
    /// Migrations are pending: `at` is the newest applied (none: an empty database).
    Behind { at: Option<i32>, needs: i32 },
    /// A newer release migrated the database: `at` is a migration this build does not know.
    Ahead { at: i32, knows: i32 },
}

impl SchemaState {
    /// What to tell an operator about a schema this build must not run on.
    pub fn refusal(self) -> Option<Failure> {
        let SchemaState::Ahead { at, knows } = self else {
            return None;
        };
        Some(Failure::fatal(format!(
            "the database's schema is at migration {at}, which this release ({}) does not have \
             (its newest is {knows}): a newer release migrated it. Run that release or a newer \
             one; a release never runs on a schema newer than its own (see CHANGELOG.md)",
            env!("CARGO_PKG_VERSION")
        )))
    }
}

/// The newest migration in this build.
pub fn newest_known() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// The newest migration applied to the database (refinery's history), none on an empty one.
pub async fn applied_version(client: &Client) -> Result<Option<i32>, Failure> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await?
        .try_get(0)?)
}

/// Refuses (fatal) a schema a newer release made: for the commands that write.
pub async fn refuse_newer(client: &Client) -> Result<(), Failure> {
    match schema_state(client).await?.refusal() {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

/// Compares the database's schema with this build's migrations.
pub async fn schema_state(client: &Client) -> Result<SchemaState, Failure> {
    let knows = newest_known();
    Ok(match applied_version(client).await? {
        Some(at) if at > knows => SchemaState::Ahead { at, knows },
        Some(at) if at == knows => SchemaState::Current,
        at => SchemaState::Behind { at, needs: knows },
    })
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies pending migrations; returns how many were applied by this call.
pub async fn migrate(url: &str) -> Result<usize, Failure> {
    migrate_to(url, None).await
}

/// Applies pending migrations up to version `to` (all if `None`).
pub async fn migrate_to(url: &str, to: Option<i32>) -> Result<usize, Failure> {
    let mut client = connect(url).await?;
    // No SKU contains a space, so this key is outside the SKU lock space.
    let key = lock_key("schema migrations");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await?;
    // Refused before refinery runs: its own refusal (a migration "missing from the
    // filesystem") does not say what to do.
    if let Err(refusal) = refuse_newer(&client).await {
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await;
        return Err(refusal);
    }
    let mut runner = embedded::migrations::runner();
    if let Some(to) = to {
        runner = runner.set_target(refinery::Target::Version(to));
    }
    let report = runner
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await;
    // Closing the connection would release the lock too; unlock explicitly to say so.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await;
    let report = report.map_err(|e| Failure::fatal_from("migration failed", e.to_string()))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(report.applied_migrations().len())
}
