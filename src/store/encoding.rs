//! The database's encoding, checked at start-up (`run`): events are UTF-8 text, and a database
//! that cannot hold every character would refuse some of them.

use anyhow::Context;

use crate::config::ConfigError;

/// Refuses a database that cannot hold every character of an event, unless told to accept it
/// (`database.allow_non_utf8`); then such events are dead-lettered as `unstorable`.
pub async fn check(client: &tokio_postgres::Client, allowed: bool) -> anyhow::Result<()> {
    let encoding: String = client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await
        .context("reading the database's encoding")?
        .try_get(0)?;
    if encoding == "UTF8" {
        return Ok(());
    }
    if allowed {
        tracing::warn!(
            encoding = %encoding,
            "the database's encoding is not UTF-8: events carrying characters it lacks are \
             dead-lettered as unstorable (database.allow_non_utf8)"
        );
        return Ok(());
    }
    Err(ConfigError::key(
        "database.url",
        format!(
            "the database's encoding is {encoding}, not UTF8: events are UTF-8 text, and those \
             with characters {encoding} lacks could not be stored; use a UTF8 database, or set \
             database.allow_non_utf8 = true to dead-letter such events"
        ),
    )
    .into())
}
