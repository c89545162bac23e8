//! `inventory-dev`'s command line: one module per subcommand. It takes the service's global
//! options (`--config`, `--brokers`, `--database-url`, `--topic`, `--set`) and its exit codes.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod produce;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use inventory_consumer::cli::{GlobalArgs, exit_code, with_settings};
use inventory_consumer::config::Needs;

use crate::embedded::postgres::{PostgresOptions, ThrowawayPostgres};

#[derive(Debug, Parser)]
#[command(
    name = "inventory-dev",
    version,
    about = "Development tools for inventory-consumer: an embedded broker, a load generator, the demo and the benchmark."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an embedded Kafka-protocol broker (librdkafka's mock cluster) for development and tests.
    Broker(broker::BrokerArgs),
    /// Produce a generated workload or a JSON-lines file, and write the expected outcome.
    Produce(produce::ProduceArgs),
    /// The whole system on embedded defaults: broker, PostgreSQL, replicas, workload, verify.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency and memory against the database's own limit, in one run.
    Bench(bench::BenchArgs),
    /// The service itself, built into this binary: `inventory-dev consumer run` is
    /// `inventory-consumer run` (with the benchmark's unsafe baseline available).
    #[command(disable_help_flag = true)]
    Consumer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    let global = &cli.global;
    let result = match &cli.command {
        Command::Broker(args) => broker::main(args),
        Command::Produce(args) => with_settings(global, Needs::KAFKA, |s| produce::main(&s, args)),
        Command::Demo(args) => demo::main(global, args),
        Command::Bench(args) => bench::main(global, args),
        Command::Consumer { args } => return consumer(args),
    };
    exit_code(result)
}

/// `inventory-dev consumer ARGS` runs `inventory-consumer ARGS`.
fn consumer(args: &[OsString]) -> ExitCode {
    let argv = std::iter::once(OsString::from("inventory-consumer")).chain(args.iter().cloned());
    inventory_consumer::cli::main(inventory_consumer::cli::Cli::parse_from(argv))
}

/// The demo's and the benchmark's PostgreSQL: `--database-url` (or `DATABASE_URL`), else a
/// throwaway local cluster started with `options` (kept running while the handle lives).
/// `say` tells the user which.
pub fn given_or_throwaway_database(
    global: &GlobalArgs,
    options: PostgresOptions,
    say: impl Fn(&str),
) -> anyhow::Result<(Option<ThrowawayPostgres>, String)> {
    let given = global
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok());
    Ok(match given {
        Some(url) => {
            say(&format!(
                "PostgreSQL: using {}",
                inventory_consumer::config::describe_database(&url)
            ));
            (None, url)
        }
        None => {
            say("PostgreSQL: starting a throwaway local cluster");
            let server = ThrowawayPostgres::start(options)?;
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
