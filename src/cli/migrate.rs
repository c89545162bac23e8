//! `migrate`: apply pending migrations and exit.

use std::process::ExitCode;

use clap::Args;

use crate::cli::runtime;
use crate::config::Settings;
use crate::store;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Stop after this migration (its number, `V<N>__...`), e.g. to rehearse an upgrade from
    /// an older schema.
    #[arg(long, value_name = "N")]
    pub to: Option<i32>,
}

pub fn main(settings: &Settings, args: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let applied =
        runtime()?.block_on(store::migrate::migrate_to(&settings.database.url, args.to))?;
    match args.to {
        Some(n) => println!("applied {applied} migration(s); schema is at or past version {n}"),
        None => println!("applied {applied} migration(s); schema is up to date"),
    }
    Ok(ExitCode::SUCCESS)
}
