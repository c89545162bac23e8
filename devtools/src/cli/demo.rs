//! `demo`: the whole system on embedded defaults, in one command. It starts the embedded broker
//! and a PostgreSQL (the one in `DATABASE_URL`, else a throwaway local cluster), runs N
//! replicas as separate processes in one consumer group, and produces a workload (with re-sent
//! duplicates and malformed messages) at a fixed rate while the group changes under it: a
//! replica joins, one leaves gracefully, one is killed, a replacement joins. Then it waits
//! until every message has settled, stops the replicas gracefully, audits the database against
//! the workload's oracle and prints a summary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::runtime::Runtime;
use tokio_postgres::Client;

use crate::cli::produce::send;
use crate::cli::{given_or_throwaway_database, log_dir};
use crate::embedded::local_kafka::{BrokerKind, LocalKafka};
use crate::embedded::postgres::PostgresOptions;
use crate::embedded::replica::{LogSummary, ReplicaProcess, Service, local_env};
use crate::embedded::topic::read_whole_topic;
use crate::workload::{Expectation, Generator, WorkloadSpec};
use inventory_consumer::cli::{EXIT_VERIFY_FAILED, GlobalArgs, runtime};
use inventory_consumer::config::Settings;
use inventory_consumer::stats::StatsSnapshot;
use inventory_consumer::store::audit::AuditReport;
use inventory_consumer::store::{self, audit};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Replicas at the start, each a separate process.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Distinct events in the workload.
    #[arg(long, default_value_t = 60_000)]
    pub events: u64,
    /// SKU population.
    #[arg(long, default_value_t = 2_000)]
    pub skus: u64,
    /// Messages per second the workload is produced at (0: as fast as possible).
    #[arg(long, default_value_t = 4_000)]
    pub rate: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Group protocol of the replicas: `consumer` (KIP-848) or `classic` (cooperative-sticky).
    #[arg(long, default_value = "consumer")]
    pub protocol: String,
    /// The broker: the embedded one, or Apache Kafka (installed by `kafka/install.sh`).
    #[arg(long, value_enum, default_value_t = BrokerKind::Embedded)]
    pub broker: BrokerKind,
    /// Keep the group as it is (no joins, leaves or kills during the run).
    #[arg(long)]
    pub calm: bool,
    /// Where the replicas' logs go (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// For the last expiries (a second each, swept every second) and the outbox to drain.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What happens to the group when this share of the workload has settled.
#[derive(Debug, Clone, Copy)]
enum Change {
    Join,
    Leave,
    Kill,
}

const CHANGES: [(f64, Change); 4] = [
    (0.20, Change::Join),
    (0.40, Change::Leave),
    (0.60, Change::Kill),
    (0.70, Change::Join),
];

pub fn main(cli: &GlobalArgs, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    inventory_consumer::telemetry::init(None, "warn");
    let logs = log_dir(args.logs.as_ref(), "inventory-demo")?;
    let (_server, database_url) =
        given_or_throwaway_database(cli, PostgresOptions::default(), step)?;
    let broker = LocalKafka::start(args.broker, args.partitions)?;
    step(&format!(
        "Kafka: {} at {}, topic inventory-events with {} partitions",
        LocalKafka::describe(args.broker),
        broker.bootstrap_servers(),
        args.partitions
    ));

    let mut settings = Settings::default();
    settings.kafka.brokers = broker.bootstrap_servers().to_owned();
    settings.database.url = database_url.clone();
    let rt = runtime()?;
    rt.block_on(store::migrate::migrate(&database_url))?;
    let mut group = start_group(cli, args, &logs, broker.bootstrap_servers(), &database_url)?;

    let spec = workload(args);
    step(&format!(
        "producing {} events over {} SKUs at {} msg/s (10% start an order; 5% re-sent duplicates, 1% malformed)",
        spec.events, spec.skus, args.rate
    ));
    let results_topic = settings.kafka.results_topic.clone();
    let started = Instant::now();
    let estimate = (spec.events as f64 * 1.06) as u64;
    let rate = args.rate;
    let producer =
        std::thread::spawn(move || send(&settings, Generator::new(spec), estimate, rate, false));

    let changes: Vec<(f64, Change)> = if args.calm {
        Vec::new()
    } else {
        CHANGES.to_vec()
    };
    let db = rt.block_on(store::connect(&database_url))?;
    let (settled, target, expected) = settle(&rt, &db, &mut group, producer, estimate, changes)?;
    let elapsed = started.elapsed();
    step(&format!(
        "{settled} of {target} messages settled in {:.1}s",
        elapsed.as_secs_f64()
    ));
    let replied = wait_for_replies(&rt, &db, &expected)?;

    let total = group.stop_all()?;
    let logged = group.log_summary();
    let report = audit_run(
        &rt,
        &database_url,
        &db,
        &expected,
        broker.bootstrap_servers(),
        &results_topic,
        replied,
    )?;
    Summary {
        expected: &expected,
        elapsed,
        rate: args.rate,
        replicas: group.replicas.len(),
        total,
        logged,
        report: &report,
    }
    .print();
    if report.passed() && settled >= target {
        println!("verdict: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verdict: FAIL (logs in {})", logs.display());
        Ok(ExitCode::from(EXIT_VERIFY_FAILED))
    }
}

/// The replicas at the start, one consumer group on the demo's broker and database.
fn start_group(
    cli: &GlobalArgs,
    args: &DemoArgs,
    logs: &Path,
    bootstrap: &str,
    database_url: &str,
) -> anyhow::Result<Group> {
    let service = Service::built_in()?;
    let mut env = local_env(bootstrap, database_url);
    env.extend([
        ("INVENTORY_KAFKA__GROUP_PROTOCOL", args.protocol.clone()),
        (
            "INVENTORY_LOG__LEVEL",
            "info,inventory_consumer=debug".into(),
        ),
    ]);
    if args.protocol == "classic" {
        // The mock cluster's classic rounds last about session.timeout.ms: keep it short.
        env.push((
            "INVENTORY_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS",
            "6000".into(),
        ));
        env.push(("INVENTORY_PROCESSING__DRAIN_TIMEOUT_MS", "4000".into()));
    }
    let mut group = Group {
        service,
        logs: logs.to_path_buf(),
        env,
        overrides: cli.overrides.clone(),
        replicas: Vec::new(),
    };
    for _ in 0..args.replicas {
        group.start()?;
    }
    step(&format!(
        "started {} replicas (logs in {})",
        args.replicas,
        logs.display()
    ));
    Ok(group)
}

/// A new workload each run: skewed, with orders, re-sent duplicates and malformed messages.
fn workload(args: &DemoArgs) -> WorkloadSpec {
    WorkloadSpec {
        events: args.events,
        skus: args.skus,
        skew: 0.8,
        hot_share: 0.0,
        duplicate_share: 0.05,
        invalid_share: 0.01,
        order_share: 0.1,
        seed: rand::random(),
        id_prefix: format!("demo{:08x}", rand::random::<u32>()),
    }
}

/// Waits until every message the producer sent has settled, or the timeout passed, making the
/// group's `changes` on the way; returns the messages settled, how many there are to settle and
/// what the producer's oracle expects.
fn settle(
    rt: &Runtime,
    db: &Client,
    group: &mut Group,
    producer: JoinHandle<anyhow::Result<Expectation>>,
    estimate: u64,
    mut changes: Vec<(f64, Change)>,
) -> anyhow::Result<(i64, i64, Expectation)> {
    let mut producer = Some(producer);
    // Changes are paced by progress: each happens once its share of the workload settled.
    let approx_total = estimate as f64;
    let mut target = i64::MAX;
    let mut expected = None;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let settled = loop {
        let done = rt.block_on(audit::settled(db))?;
        while let Some(&(share, change)) = changes.first() {
            if (done as f64) < share * approx_total {
                break;
            }
            changes.remove(0);
            group.apply(change)?;
        }
        if let Some(finished) = producer.take_if(|p| p.is_finished()) {
            let e = finished
                .join()
                .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
            target = (e.events + e.dead_letters) as i64;
            expected = Some(e);
        }
        if done >= target || Instant::now() > deadline {
            break done;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let expected = expected.context("the producer did not finish")?;
    Ok((settled, target, expected))
}

/// Waits for the reservations `expected` says expire and for the outbox to drain: expiries
/// follow the clock, not the topic; replies leave the outbox after their effect. Whether both
/// happened before the timeout.
fn wait_for_replies(rt: &Runtime, db: &Client, expected: &Expectation) -> anyhow::Result<bool> {
    let expiring = expected.reservations.get("expired").copied().unwrap_or(0) as i64;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let replied = loop {
        let expired = rt.block_on(audit::expired(db))?;
        let queued = rt.block_on(audit::queued_replies(db))?;
        if (expired >= expiring && queued == 0) || Instant::now() > deadline {
            step(&format!(
                "{expired} of {expiring} reservations expired, {queued} replies left to publish"
            ));
            break expired >= expiring && queued == 0;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok(replied)
}

/// The audit against the producer's oracle, on a connection of its own, and whether every
/// recorded reply reached the results topic (and, by `replied`, left the outbox in time).
fn audit_run(
    rt: &Runtime,
    database_url: &str,
    db: &Client,
    expected: &Expectation,
    bootstrap: &str,
    results_topic: &str,
    replied: bool,
) -> anyhow::Result<AuditReport> {
    let mut report = rt.block_on(async {
        let db = store::connect(database_url).await?;
        audit::audit(&db, Some(expected)).await
    })?;
    let (name, passed, detail) = replies_published(
        &rt.block_on(audit::reply_ids(db))?,
        bootstrap,
        results_topic,
    )?;
    report.check(name, passed && replied, detail);
    Ok(report)
}

/// What the run did, as the summary tells it.
struct Summary<'a> {
    expected: &'a Expectation,
    elapsed: Duration,
    /// The producer's rate (0: full speed).
    rate: u64,
    replicas: usize,
    /// The counters of the replicas that exited gracefully.
    total: StatsSnapshot,
    logged: LogSummary,
    report: &'a AuditReport,
}

impl Summary<'_> {
    fn print(&self) {
        let Summary {
            expected,
            elapsed,
            total,
            logged,
            ..
        } = self;
        println!();
        println!("summary");
        println!(
            "  settled           {} messages in {:.1}s: {:.0} messages/s (produced at {}), {} replica processes",
            expected.messages,
            elapsed.as_secs_f64(),
            expected.messages as f64 / elapsed.as_secs_f64(),
            if self.rate == 0 {
                "full speed".to_owned()
            } else {
                format!("{} msg/s", self.rate)
            },
            self.replicas
        );
        println!(
            "  outcomes          {} applied, {} rejected (by replicas that exited gracefully)",
            total.applied, total.rejected
        );
        println!(
            "  duplicates        {} skipped according to the replicas' logs, {} injected by the producer",
            logged.duplicates, expected.duplicates
        );
        println!("  dead letters      {}", expected.dead_letters);
        println!(
            "  orders            {} reservations by status {:?}, {} replies",
            expected.reservations.values().sum::<u64>(),
            expected.reservations,
            expected.replies
        );
        println!(
            "  rebalances        {} assignments, {} revocations, {} losses over {} replicas",
            logged.assignments, logged.revocations, logged.losses, self.replicas
        );
        for check in &self.report.checks {
            println!(
                "  {} {}: {}",
                if check.passed { "PASS" } else { "FAIL" },
                check.name,
                check.detail
            );
        }
    }
}

/// Whether the results topic, read back whole, holds a reply for every recorded one and
/// nothing else (the same reply published twice counts once: at least once is the contract).
fn replies_published(
    recorded: &BTreeSet<String>,
    bootstrap: &str,
    topic: &str,
) -> anyhow::Result<(&'static str, bool, String)> {
    let name = "every reply published";
    // Whether there should be any is "replies equal oracle", in the same report.
    if recorded.is_empty() {
        return Ok((name, true, "no reply recorded".to_owned()));
    }
    let (messages, _) = read_whole_topic(bootstrap, topic, Duration::from_secs(120))?;
    let published: BTreeSet<String> = messages
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(m.payload.as_deref()?).ok())
        .filter_map(|reply| reply["event_id"].as_str().map(str::to_owned))
        .collect();
    let missing = recorded.difference(&published).count();
    let unknown = published.difference(recorded).count();
    Ok((
        name,
        missing == 0 && unknown == 0,
        format!(
            "{} distinct replies in {topic} ({} messages) for {} recorded: {missing} missing, \
             {unknown} unknown",
            published.len(),
            messages.len(),
            recorded.len()
        ),
    ))
}

fn step(text: &str) {
    eprintln!("demo: {text}");
}

/// The replica processes of the demo, started and stopped as the scenario says.
struct Group {
    service: Service,
    logs: PathBuf,
    env: Vec<(&'static str, String)>,
    overrides: Vec<(String, String)>,
    replicas: Vec<ReplicaProcess>,
}

impl Group {
    fn start(&mut self) -> anyhow::Result<()> {
        let name = format!("replica-{}", self.replicas.len() + 1);
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let overrides: Vec<(&str, &str)> = self
            .overrides
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.replicas.push(ReplicaProcess::spawn(
            &self.service,
            &name,
            &self.logs,
            &env,
            &overrides,
        )?);
        Ok(())
    }

    /// The oldest replica still running.
    fn oldest(&mut self) -> Option<&mut ReplicaProcess> {
        self.replicas.iter_mut().find(|r| r.is_running())
    }

    fn apply(&mut self, change: Change) -> anyhow::Result<()> {
        match change {
            Change::Join => {
                self.start()?;
                step(&format!("replica-{} joins the group", self.replicas.len()));
            }
            Change::Leave => {
                if let Some(r) = self.oldest() {
                    let (status, _) = r.terminate(STOP_TIMEOUT)?;
                    step(&format!("{} left gracefully (SIGTERM, {status})", r.name));
                }
            }
            Change::Kill => {
                if let Some(r) = self.oldest() {
                    r.kill()?;
                    step(&format!("{} was killed (SIGKILL)", r.name));
                }
            }
        }
        Ok(())
    }

    /// SIGTERM to every running replica; returns the counters of all that exited gracefully.
    fn stop_all(&mut self) -> anyhow::Result<StatsSnapshot> {
        let mut total = StatsSnapshot::default();
        for r in &mut self.replicas {
            if r.is_running() {
                let (status, _) = r.terminate(STOP_TIMEOUT)?;
                step(&format!("{} stopped ({status})", r.name));
            }
            total = total + r.stats().unwrap_or_default();
        }
        Ok(total)
    }

    fn log_summary(&self) -> LogSummary {
        self.replicas
            .iter()
            .map(ReplicaProcess::log_summary)
            .fold(LogSummary::default(), |a, b| LogSummary {
                batches: a.batches + b.batches,
                duplicates: a.duplicates + b.duplicates,
                assignments: a.assignments + b.assignments,
                revocations: a.revocations + b.revocations,
                losses: a.losses + b.losses,
            })
    }
}
