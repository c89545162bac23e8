//! The command line (docs/contract.md section 4): one module per subcommand.
//!
//! Exit codes: 0 success, 1 verification failure, 2 usage or configuration error, 3 runtime
//! failure (so an orchestrator restarts the replica and an operator sees why).

pub mod dead_letters;
pub mod maintain;
pub mod migrate;
pub mod pause;
pub mod replay;
pub mod run;
pub mod settings;
pub mod status;
pub mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Needs, Settings, parse_key_value};

pub const EXIT_VERIFY_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_RUNTIME: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "inventory-consumer",
    version,
    about = "Applies inventory events from Kafka to PostgreSQL, exactly once in effect, with any number of replicas."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The options every command takes: where the settings come from and the most common ones.
/// `inventory-dev` takes the same.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// TOML configuration file (also INVENTORY_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (kafka.brokers; also KAFKA_BROKERS).
    #[arg(long, global = true, value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,
    /// PostgreSQL URL (database.url; also DATABASE_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Kafka topic (kafka.topic).
    #[arg(long, global = true)]
    pub topic: Option<String>,
    /// Any setting, e.g. `--set processing.batch_max_events=100`; wins over every other layer.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one consumer replica (the entry point of the container, the pod and the Procfile).
    Run(run::RunArgs),
    /// Apply pending database migrations and exit.
    Migrate(migrate::MigrateArgs),
    /// Print the settings `run` would use (validated as `run` validates them, secrets masked)
    /// and the bounds derived from them, such as the longest a replica takes to stop.
    Config(settings::ConfigArgs),
    /// One pass of history maintenance (new periods, partitions ahead, retention), as every
    /// replica runs it; for a CronJob, or with replicas stopped.
    Maintain,
    /// Audit the database; exit 0 only if every invariant (and the expectation, if given) holds.
    Verify(verify::VerifyArgs),
    /// List, show and redrive (publish again) the dead letters.
    DeadLetters(dead_letters::DeadLettersArgs),
    /// The group at a glance: owners, epochs, recorded, committed and end offsets, lag, pauses.
    Status(status::StatusArgs),
    /// Stop applying a partition's events (or the whole topic's) on every replica, until `resume`.
    Pause(pause::PauseArgs),
    /// Lift pauses made with `pause`.
    Resume(pause::ResumeArgs),
    /// Read a window again: move the group's recorded offsets back to an offset or a time,
    /// safely while replicas run; says how many events would decide again.
    Replay(replay::ReplayArgs),
}

impl GlobalArgs {
    /// Loads the settings with the command-line layer on top.
    pub fn settings(&self, needs: Needs) -> Result<Settings, ConfigError> {
        let mut overrides = Vec::new();
        for (key, value) in [
            ("kafka.brokers", &self.brokers),
            ("database.url", &self.database_url),
            ("kafka.topic", &self.topic),
        ] {
            if let Some(value) = value {
                overrides.push((key.to_owned(), value.clone()));
            }
        }
        overrides.extend(self.overrides.iter().cloned());
        Settings::load(self.config.as_deref(), &overrides, needs)
    }
}

const DATABASE: Needs = Needs::DATABASE;
const BOTH: Needs = Needs::BOTH;

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    let global = &cli.global;
    let result = match &cli.command {
        Command::Run(args) => with_settings(global, BOTH, |s| run::main(s, args)),
        Command::Migrate(args) => with_settings(global, DATABASE, |s| migrate::main(&s, args)),
        Command::Config(args) => with_settings(global, BOTH, |s| settings::main(&s, args)),
        Command::Maintain => with_settings(global, DATABASE, |s| maintain::main(&s)),
        Command::Verify(args) => with_settings(global, DATABASE, |s| verify::main(&s, args)),
        Command::DeadLetters(args) => {
            let needs = if args.command.sends() { BOTH } else { DATABASE };
            with_settings(global, needs, |s| dead_letters::main(&s, args))
        }
        Command::Status(args) => with_settings(global, BOTH, |s| status::main(&s, args)),
        Command::Pause(args) => with_settings(global, DATABASE, |s| pause::pause(&s, args)),
        Command::Resume(args) => with_settings(global, DATABASE, |s| pause::resume(&s, args)),
        Command::Replay(args) => with_settings(global, BOTH, |s| replay::main(&s, args)),
    };
    exit_code(result)
}

/// A command's exit code; an error is printed, with its causes, and exits 3.
pub fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Loads and validates the settings (exit 2 if they are wrong), starts logging, runs `f`.
pub fn with_settings(
    cli: &GlobalArgs,
    needs: Needs,
    f: impl FnOnce(Settings) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    match cli.settings(needs) {
        Ok(settings) => {
            if let Err(e) = crate::telemetry::init_with_traces(&settings) {
                eprintln!("invalid configuration: traces: {e:#}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            f(settings)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// A multi-threaded runtime for the async commands.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
