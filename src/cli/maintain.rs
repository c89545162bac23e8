//! `maintain`: one pass of history maintenance (src/store/retention.rs), the same one every
//! replica runs on its own; safe at any time, next to running replicas.

use std::process::ExitCode;

use crate::cli::runtime;
use crate::config::Settings;
use crate::store::{self, retention};

pub fn main(settings: &Settings) -> anyhow::Result<ExitCode> {
    let done = runtime()?.block_on(async {
        let mut db = store::connect(&settings.database.url).await?;
        // Like every command that writes: never on a schema a newer release made.
        store::migrate::refuse_newer(&db).await?;
        retention::maintain(&mut db, &settings.history).await
    })?;
    println!("history: {}", retention::describe(&settings.history));
    println!(
        "period {}{}",
        done.period,
        if done.started { " (started now)" } else { "" }
    );
    for what in &done.created {
        println!("created the partitions of {what}");
    }
    for period in &done.counted {
        println!("counted the events of period {period}, for its drop to record");
    }
    for table in &done.dropped {
        println!("dropped {table}");
    }
    if done.skipped {
        println!("another session was maintaining: some steps were left to it");
    }
    Ok(ExitCode::SUCCESS)
}
