//! `broker`: the embedded Kafka-protocol broker for development and tests. Ports are random, so
//! it prints the bootstrap list and, when asked, writes it to a file (atomically, so a reader
//! polling for the file never sees half of it). Runs until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::embedded::broker::{BrokerOptions, EmbeddedBroker};
use crate::embedded::faults::Fault;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Topic to create.
    #[arg(long, default_value = "inventory-events")]
    pub topic: String,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Number of mock brokers.
    #[arg(long = "broker-count", default_value_t = 1)]
    pub broker_count: i32,
    /// Write the bootstrap list to this file once the broker is ready.
    #[arg(long, value_name = "PATH")]
    pub bootstrap_file: Option<PathBuf>,
    /// Classic protocol: delay of the first rebalance of a group.
    #[arg(long, default_value_t = 100)]
    pub initial_rebalance_delay_ms: i32,
    /// KIP-848 groups: session timeout the broker applies to members.
    #[arg(long, default_value_t = 10_000)]
    pub consumer_session_timeout_ms: i32,
    /// KIP-848 groups: heartbeat interval the broker asks members to keep.
    #[arg(long, default_value_t = 500)]
    pub consumer_heartbeat_interval_ms: i32,
    /// Read fault-injection commands from standard input, one per line (`down 2`, `up 2`,
    /// `rtt 1 300`, `errors fetch 5 not-leader`, `leader 3 1`, `coordinator GROUP 2`).
    #[arg(long)]
    pub faults_from_stdin: bool,
}

pub fn main(args: &BrokerArgs) -> anyhow::Result<ExitCode> {
    inventory_consumer::telemetry::init(None, "info");
    if args.partitions < 1 {
        eprintln!("invalid configuration: --partitions: must be at least 1");
        return Ok(ExitCode::from(inventory_consumer::cli::EXIT_CONFIG));
    }
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let broker = EmbeddedBroker::start(&BrokerOptions {
        topic: args.topic.clone(),
        partitions: args.partitions,
        brokers: args.broker_count,
        initial_rebalance_delay_ms: args.initial_rebalance_delay_ms,
        consumer_session_timeout_ms: args.consumer_session_timeout_ms,
        consumer_heartbeat_interval_ms: args.consumer_heartbeat_interval_ms,
    })
    .context("starting the mock cluster")?;
    let bootstrap = broker.bootstrap_servers().to_owned();
    if let Some(path) = &args.bootstrap_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bootstrap).context("writing the bootstrap file")?;
        std::fs::rename(&tmp, path).context("writing the bootstrap file")?;
    }
    println!("{bootstrap}");
    eprintln!(
        "embedded broker ready: topic {} with {} partitions at {bootstrap}; stop with Ctrl-C",
        args.topic, args.partitions
    );
    let broker = std::sync::Arc::new(broker);
    if args.faults_from_stdin {
        let broker = broker.clone();
        // Detached: it blocks on stdin, and the process ends without it at a signal.
        std::thread::spawn(move || inject_from_stdin(&broker));
    }
    if let Some(signal) = signals.forever().next() {
        eprintln!("signal {signal}: stopping the embedded broker");
    }
    drop(broker);
    Ok(ExitCode::SUCCESS)
}

/// Applies each command line of standard input; a bad line is reported and skipped.
fn inject_from_stdin(broker: &EmbeddedBroker) {
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        match line.parse::<Fault>() {
            Ok(fault) => match broker.inject(&fault) {
                Ok(()) => eprintln!("fault injected: {line}"),
                Err(e) => eprintln!("fault `{line}` failed: {e}"),
            },
            Err(e) => eprintln!("fault `{line}` not understood: {e}"),
        }
    }
}
