//! `demo`: the whole system on embedded defaults, in one command. It starts the embedded broker
//! and a PostgreSQL (the one in `DATABASE_URL`, else a throwaway local cluster), runs N
//! replicas as separate processes in one consumer group, produces a workload with duplicates
//! and malformed messages, waits until every message has settled, stops the replicas
//! gracefully, audits the database against the workload's oracle and prints a summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::cli::produce::send;
use crate::cli::{Cli, EXIT_VERIFY_FAILED, runtime};
use crate::config::Settings;
use crate::embedded::broker::{BrokerOptions, EmbeddedBroker};
use crate::embedded::postgres::{PostgresOptions, ThrowawayPostgres};
use crate::embedded::replica::ReplicaProcess;
use crate::stats::StatsSnapshot;
use crate::store::{self, audit};
use crate::workload::{Generator, WorkloadSpec};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Replicas to run, each a separate process.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Distinct events in the workload.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// SKU population.
    #[arg(long, default_value_t = 2_000)]
    pub skus: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Group protocol of the replicas: `consumer` (KIP-848) or `classic`.
    #[arg(long, default_value = "consumer")]
    pub protocol: String,
    /// Where the replicas' logs go (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn main(cli: &Cli, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(None, "warn");
    let logs = match &args.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("inventory-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&logs).context("creating the log directory")?;

    let database_url = cli
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok());
    let (_server, database_url) = match database_url {
        Some(url) => {
            step(&format!(
                "PostgreSQL: using {}",
                crate::config::describe_database(&url)
            ));
            (None, url)
        }
        None => {
            step("PostgreSQL: starting a throwaway local cluster");
            let server = ThrowawayPostgres::start(PostgresOptions::default())?;
            let url = server.url("postgres");
            (Some(server), url)
        }
    };
    let broker = EmbeddedBroker::start(&BrokerOptions {
        partitions: args.partitions,
        ..BrokerOptions::default()
    })
    .context("starting the embedded broker")?;
    step(&format!(
        "Kafka: embedded broker at {}, topic inventory-events with {} partitions",
        broker.bootstrap_servers(),
        args.partitions
    ));

    let mut settings = Settings::default();
    settings.kafka.brokers = broker.bootstrap_servers().to_owned();
    settings.database.url = database_url.clone();
    let rt = runtime()?;
    rt.block_on(store::migrate::migrate(&database_url))?;

    let exe = std::env::current_exe().context("locating this executable")?;
    let env = [
        ("KAFKA_BROKERS", broker.bootstrap_servers()),
        ("DATABASE_URL", database_url.as_str()),
        ("INVENTORY_KAFKA__GROUP_PROTOCOL", args.protocol.as_str()),
        ("INVENTORY_KAFKA__PROPERTIES__FETCH_QUEUE_BACKOFF_MS", "0"),
        ("INVENTORY_LOG__FORMAT", "json"),
    ];
    let overrides: Vec<(&str, &str)> = cli
        .overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut replicas = (1..=args.replicas)
        .map(|i| ReplicaProcess::spawn(&exe, &format!("replica-{i}"), &logs, &env, &overrides))
        .collect::<anyhow::Result<Vec<_>>>()?;
    step(&format!(
        "started {} replicas (logs in {})",
        replicas.len(),
        logs.display()
    ));

    let spec = WorkloadSpec {
        events: args.events,
        skus: args.skus,
        skew: 0.8,
        hot_share: 0.0,
        duplicate_share: 0.05,
        invalid_share: 0.01,
        seed: rand::random(),
        id_prefix: format!("demo{:08x}", rand::random::<u32>()),
    };
    step(&format!(
        "producing {} events over {} SKUs (5% re-sent duplicates, 1% malformed)",
        spec.events, spec.skus
    ));
    let started = Instant::now();
    let estimate = (spec.events as f64 * 1.06) as u64;
    let expected = send(&settings, Generator::new(spec), estimate, 0, true)?;

    let target = (expected.events + expected.dead_letters) as i64;
    let settled = rt.block_on(async {
        let db = store::connect(&database_url).await?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let done: i64 = db
                .query_one(
                    "SELECT (SELECT count(*) FROM processed_events) + (SELECT count(*) FROM dead_letters)",
                    &[],
                )
                .await?
                .try_get(0)?;
            if done >= target || Instant::now() > deadline {
                return Ok::<_, anyhow::Error>(done);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })?;
    let elapsed = started.elapsed();
    step(&format!(
        "{settled} of {target} messages settled in {:.1}s",
        elapsed.as_secs_f64()
    ));

    let mut total = StatsSnapshot::default();
    for r in &mut replicas {
        let (status, stats) = r.terminate(STOP_TIMEOUT)?;
        let stats = stats.unwrap_or_default();
        step(&format!(
            "{} stopped ({status}): applied {}, rejected {}, duplicates {}, dead letters {}",
            r.name, stats.applied, stats.rejected, stats.duplicates, stats.dead_letters
        ));
        total = total + stats;
    }

    let report = rt.block_on(async {
        let db = store::connect(&database_url).await?;
        audit::audit(&db, Some(&expected)).await
    })?;
    println!();
    println!("summary");
    println!(
        "  throughput        {:.0} events/s ({} messages in {:.1}s, {} replicas)",
        expected.messages as f64 / elapsed.as_secs_f64(),
        expected.messages,
        elapsed.as_secs_f64(),
        args.replicas
    );
    println!(
        "  outcomes          {} applied, {} rejected",
        total.applied, total.rejected
    );
    println!(
        "  duplicates        {} skipped ({} injected by the producer)",
        total.duplicates, expected.duplicates
    );
    println!("  dead letters      {}", total.dead_letters);
    for check in &report.checks {
        println!(
            "  {} {}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    if report.passed() && settled >= target {
        println!("verdict: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verdict: FAIL (logs in {})", logs.display());
        Ok(ExitCode::from(EXIT_VERIFY_FAILED))
    }
}

fn step(text: &str) {
    eprintln!("demo: {text}");
}
