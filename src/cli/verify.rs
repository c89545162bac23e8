//! `verify`: the audit. Prints one line per check; exit 0 only if all pass, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::cli::{EXIT_VERIFY_FAILED, runtime};
use crate::config::Settings;
use crate::expectation::Expectation;
use crate::store::{self, audit};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Expectation written by `inventory-dev produce --expected-out`: also compare stock and counts with it.
    #[arg(long, value_name = "PATH")]
    pub expected: Option<PathBuf>,
}

pub fn main(settings: &Settings, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let expected: Option<Expectation> = match &args.expected {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )
        }
        None => None,
    };
    let report = runtime()?.block_on(async {
        let db = store::connect(&settings.database.url).await?;
        // The audit reads while replicas and maintenance run: a deadlock with a partition
        // being dropped aborts a read (transient); the whole audit runs again.
        let mut tries = 1;
        loop {
            match audit::audit(&db, expected.as_ref()).await {
                Err(e) if e.is_transient() && tries < 3 => {
                    eprintln!("verify: {}; auditing again", crate::logs::chain(&e));
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                result => break result,
            }
        }
    })?;
    for check in &report.checks {
        let verdict = if check.passed { "PASS" } else { "FAIL" };
        println!("{verdict} {}: {}", check.name, check.detail);
    }
    if report.passed() {
        println!("verify: all {} checks passed", report.checks.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verify: FAILED");
        Ok(ExitCode::from(EXIT_VERIFY_FAILED))
    }
}
