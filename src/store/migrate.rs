//! Schema migrations: the SQL files in `migrations/`, embedded at build time and applied with
//! refinery. Replicas that start together all call [`migrate`]; a session-level advisory lock on
//! a dedicated connection makes them take turns, so exactly one applies each migration and the
//! others find it done. (Session locks are fine here: this is one direct connection held for the
//! duration, not the pooled apply path.)

use crate::domain::lock_key;
use crate::store::{Failure, connect};

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
    let report = report.map_err(|e| Failure::Fatal(format!("migration failed: {e}")))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(report.applied_migrations().len())
}
