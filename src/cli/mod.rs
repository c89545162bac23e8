//! The command line (docs/contract.md section 4): one module per subcommand.
//!
//! Exit codes: 0 success, 1 verification failure, 2 usage or configuration error, 3 runtime
//! failure (so an orchestrator restarts the replica and an operator sees why).

pub mod bench;
pub mod broker;
pub mod dead_letters;
pub mod demo;
pub mod maintain;
pub mod migrate;
pub mod pause;
pub mod produce;
pub mod replay;
pub mod run;
pub mod settings;
pub mod status;
pub mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
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
    #[command(subcommand)]
    pub command: Command,
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
    /// Run an embedded Kafka-protocol broker (librdkafka's mock cluster) for development and tests.
    Broker(broker::BrokerArgs),
    /// Produce a generated workload or a JSON-lines file, and write the expected outcome.
    Produce(produce::ProduceArgs),
    /// Audit the database; exit 0 only if every invariant (and the expectation, if given) holds.
    Verify(verify::VerifyArgs),
    /// The whole system on embedded defaults: broker, PostgreSQL, replicas, workload, verify.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency and memory against the database's own limit, in one run.
    Bench(bench::BenchArgs),
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

impl Cli {
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

const KAFKA: Needs = Needs {
    kafka: true,
    database: false,
};
const DATABASE: Needs = Needs {
    kafka: false,
    database: true,
};
const BOTH: Needs = Needs {
    kafka: true,
    database: true,
};

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Run(args) => with_settings(&cli, BOTH, |s| run::main(s, args)),
        Command::Migrate(args) => with_settings(&cli, DATABASE, |s| migrate::main(&s, args)),
        Command::Config(args) => with_settings(&cli, BOTH, |s| settings::main(&s, args)),
        Command::Maintain => with_settings(&cli, DATABASE, |s| maintain::main(&s)),
        Command::Broker(args) => broker::main(args),
        Command::Produce(args) => with_settings(&cli, KAFKA, |s| produce::main(&s, args)),
        Command::Verify(args) => with_settings(&cli, DATABASE, |s| verify::main(&s, args)),
        Command::Demo(args) => demo::main(&cli, args),
        Command::Bench(args) => bench::main(&cli, args),
        Command::DeadLetters(args) => {
            let needs = if args.command.sends() { BOTH } else { DATABASE };
            with_settings(&cli, needs, |s| dead_letters::main(&s, args))
        }
        Command::Status(args) => with_settings(&cli, BOTH, |s| status::main(&s, args)),
        Command::Pause(args) => with_settings(&cli, DATABASE, |s| pause::pause(&s, args)),
        Command::Resume(args) => with_settings(&cli, DATABASE, |s| pause::resume(&s, args)),
        Command::Replay(args) => with_settings(&cli, BOTH, |s| replay::main(&s, args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Loads and validates the settings (exit 2 if they are wrong), starts logging, runs `f`.
fn with_settings(
    cli: &Cli,
    needs: Needs,
    f: impl FnOnce(Settings) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    match cli.settings(needs) {
        Ok(settings) => {
            crate::telemetry::init(settings.log.format, &settings.log.level);
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

/// The demo's and the benchmark's PostgreSQL: `--database-url` (or `DATABASE_URL`), else a
/// throwaway local cluster started with `options` (kept running while the handle lives).
/// `say` tells the user which.
pub fn given_or_throwaway_database(
    cli: &Cli,
    options: crate::embedded::postgres::PostgresOptions,
    say: impl Fn(&str),
) -> anyhow::Result<(Option<crate::embedded::postgres::ThrowawayPostgres>, String)> {
    let given = cli
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok());
    Ok(match given {
        Some(url) => {
            say(&format!(
                "PostgreSQL: using {}",
                crate::config::describe_database(&url)
            ));
            (None, url)
        }
        None => {
            say("PostgreSQL: starting a throwaway local cluster");
            let server = crate::embedded::postgres::ThrowawayPostgres::start(options)?;
            let url = server.url("postgres");
            (Some(server), url)
        }
    })
}

/// `--logs DIR`, else a new directory `<temp>/<prefix>-<pid>`; created.
pub fn log_dir(given: Option<&PathBuf>, prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("{prefix}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the log directory {}", dir.display()))?;
    Ok(dir)
}
