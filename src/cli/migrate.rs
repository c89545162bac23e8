//! `migrate`: apply pending migrations and exit.

use std::process::ExitCode;

use crate::cli::runtime;
use crate::config::Settings;
use crate::store;

pub fn main(settings: &Settings) -> anyhow::Result<ExitCode> {
    let applied = runtime()?.block_on(store::migrate::migrate(&settings.database.url))?;
    println!("applied {applied} migration(s); schema is up to date");
    Ok(ExitCode::SUCCESS)
}
