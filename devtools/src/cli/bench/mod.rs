//! `bench`: what the guarantees cost, measured in one run. It starts the embedded broker and a
//! PostgreSQL (a fresh database per run on `--database-url`, else a throwaway durable local
//! cluster) and measures, on the same uniform workload:
//!
//! - the database-only limit: the replicas' batch transaction driven directly, no Kafka;
//! - the pipeline with every guarantee, 1 and 3 replicas (separate processes);
//! - the pipeline in per-event mode (batches of one event);
//! - the unsafe baseline: no advisory locks, no duplicate lookup;
//! - a hot-SKU workload (half the events on one SKU);
//! - produce-to-commit latency at a fixed rate, from the replicas' latency histograms;
//! - an order service's request-to-reply latency at a fixed rate, on its own clock (`saga`);
//! - peak resident memory of one replica working through a large backlog.
//!
//! Every pipeline run lets its replicas share the partitions first; the clock runs from the
//! start of production to the last commit. Every run ends with the audit against the workload's
//! oracle; a failed audit fails the command. Figures are measured, targets only reported. The
//! report is a table for people on stdout and, with `--json PATH`, the same figures for
//! machines.

mod database;
mod pipeline;
mod report;
mod saga;
mod trace_sink;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::runtime::Runtime;

use crate::cli::{given_or_throwaway_database, log_dir};
use crate::embedded::postgres::{PostgresOptions, ThrowawayPostgres};
use crate::embedded::replica::Service;
use crate::workload::{Expectation, WorkloadSpec};
use inventory_consumer::cli::{EXIT_VERIFY_FAILED, GlobalArgs, runtime};
use inventory_consumer::config::Settings;
use inventory_consumer::store::{self, audit};
use pipeline::{Run, check_embedded_retention, pipeline_runs};
use report::{
    Measured, medians, print_profile, print_ratios, print_table, statement_stats, write_json,
};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events of each throughput run (the per-event run takes a twentieth).
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// SKU population of the uniform workload.
    #[arg(long, default_value_t = 10_000)]
    pub skus: u64,
    /// Partitions of the topic in the throughput runs.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Backlog of the memory run (one replica); 0 skips the run.
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: u64,
    /// Events per second of the latency run (3 replicas, produced while they run); 0 skips it.
    /// A second latency run (`latency-half`) produces at half the rate the 3-replica run
    /// measured in this bench, and runs only after it.
    #[arg(long, default_value_t = 5_000)]
    pub latency_rate: u64,
    /// How long the latency and saga runs produce.
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
    /// Requests per second of the saga run (3 replicas): an order service's client reserves
    /// at half this rate and commits each order when its reserve's reply arrives. 0 skips it.
    #[arg(long, default_value_t = 2_000)]
    pub saga_rate: u64,
    /// Deliveries per transaction of the `database-small` run (the database-only run again, on
    /// a twentieth of the events): the median batch of the latency runs, where a transaction's
    /// fixed cost is spread over a few events.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=500))]
    pub small_batch: u64,
    /// Seconds each Apache Kafka run at a set rate (`latency-apache`, `saga-apache`) first
    /// produces at its rate before its latency is measured (added to the run): each run starts
    /// a fresh broker, whose JIT compiler takes a core's fraction for about its first minute,
    /// as no broker in service does.
    #[arg(long, default_value_t = 60)]
    pub apache_warmup: u64,
    /// Rounds of the throughput runs; each run reports its median round.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Also run the 1- and 3-replica pipelines on Apache Kafka (installed by
    /// `kafka/install.sh`), reported beside the embedded broker's (runs `one-apache`,
    /// `three-apache`).
    #[arg(long)]
    pub apache: bool,
    /// History rows (processed events, each with a ledger row; a dead letter per hundred)
    /// already in the tables of the steady-state run: the database-only run again on top of
    /// them, generated in SQL once per bench. 0 skips the run.
    #[arg(long, default_value_t = 0)]
    pub history: u64,
    /// Days the history spans.
    #[arg(long, default_value_t = 30)]
    pub history_days: u64,
    /// `shared_buffers` of the throwaway PostgreSQL server (PostgreSQL's default, 128MB,
    /// unless given; ignored with `--database-url`). A server holding a large history is
    /// given a cache that holds the dedupe horizon's indexes (see docs/performance.md).
    #[arg(long, value_name = "SIZE", default_value = "128MB")]
    pub shared_buffers: String,
    /// Only these runs (comma-separated): database, database-small, steady, one, three,
    /// traces-off, traces-10, traces-100, per-event, unsafe, hot, latency, latency-half, saga,
    /// memory, one-apache, three-apache, latency-apache, saga-apache. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the replicas' logs go (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Also write every run's figures and every ratio to PATH as JSON, for machines (schema in
    /// docs/performance.md); the report on stdout is the same either way.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Runs the pipelines' replicas with this build of the service (an `inventory-consumer`
    /// binary, e.g. an earlier commit's) instead of the one built into this `inventory-dev`: to
    /// compare two builds back to back with one harness. The database-only runs measure this
    /// build's batch transaction either way, and the unsafe baseline needs this build.
    #[arg(long, value_name = "PATH")]
    pub service: Option<PathBuf>,
    /// A setting for every replica of the pipeline runs (`run --set KEY=VALUE`), e.g.
    /// `processing.batch_linger_ms=20`, to compare settings within one build. Repeatable.
    #[arg(long = "replica-set", value_name = "KEY=VALUE")]
    pub replica_settings: Vec<String>,
}

/// Deliveries per transaction in the batched runs: the default `processing.batch_max_events`.
const BATCH: usize = 500;

struct Bench {
    rt: Runtime,
    /// Where each run's database is created.
    admin_url: String,
    server: Option<ThrowawayPostgres>,
    service: Service,
    logs: PathBuf,
    runs: u32,
    skus: u64,
    /// `--replica-set`: settings every pipeline replica runs with.
    replica_settings: Vec<(String, String)>,
    /// The database holding the steady-state run's history, filled on first use and copied
    /// for each of its runs.
    history: Option<History>,
    /// Where the traces runs' replicas send their spans, started on first use.
    trace_sink: Option<trace_sink::TraceSink>,
    /// `--service`: the replicas are another build's.
    external_service: bool,
}

struct History {
    rows: u64,
    days: u64,
    /// Its database, once filled.
    template: Option<String>,
}

pub fn main(cli: &GlobalArgs, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    inventory_consumer::telemetry::init(None, "warn");
    let mut bench = Bench::start(cli, args)?;
    let runs = pipeline_runs(args);
    check_embedded_retention(args, &runs)?;
    let results = medians(measure_rounds(&mut bench, args, &runs)?);

    print_table(results.iter().map(|(_, m)| m));
    for (_, m) in results.iter().filter(|(k, _)| {
        matches!(
            *k,
            "database" | "database-small" | "steady" | "three" | "saga" | "saga-apache"
        )
    }) {
        print_profile(m);
    }
    let ratios = report::ratios(&results);
    print_ratios(&ratios);
    bench.drop_history();
    let verified = results.iter().all(|(_, m)| m.verified);
    if let Some(path) = &args.json {
        write_json(path, &results, &ratios, verified)?;
    }
    if verified {
        println!("verify: PASS in every run");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verify: FAIL (logs in {})", bench.logs.display());
        Ok(ExitCode::from(EXIT_VERIFY_FAILED))
    }
}

impl BenchArgs {
    /// Whether `--only` asks for the run `key` (no `--only`: every run).
    fn wants(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == key)
    }
}

/// Every wanted run, `--repeat` rounds of them: each run's measurements by its key. Rounds
/// interleave the runs, so that a noisy moment of a shared machine does not land on one run
/// only. Latency and memory run once.
fn measure_rounds(bench: &mut Bench, args: &BenchArgs, runs: &[Run]) -> anyhow::Result<Rounds> {
    let mut rounds: Rounds = Vec::new();
    for round in 0..args.repeat.max(1) {
        if args.wants("database") {
            record(
                &mut rounds,
                "database",
                bench.database_only(args.events, args.partitions, BATCH, false)?,
            );
        }
        if args.wants("database-small") {
            let small = usize::try_from(args.small_batch).unwrap_or(BATCH);
            record(
                &mut rounds,
                "database-small",
                bench.database_only(small_run_events(args), args.partitions, small, false)?,
            );
        }
        if args.wants("steady") && bench.history.is_some() {
            record(
                &mut rounds,
                "steady",
                bench.database_only(args.events, args.partitions, BATCH, true)?,
            );
        }
        // Odd rounds go backwards, so that no run always follows the same one.
        let mut order: Vec<_> = runs.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (key, name, pipeline) in order {
            let once = matches!(
                *key,
                "latency" | "latency-half" | "latency-apache" | "saga" | "saga-apache" | "memory"
            );
            if !args.wants(key) || (round > 0 && once) {
                continue;
            }
            let (name, pipeline) = if *key == "latency-half" {
                let three = rounds.iter().find(|(k, _)| *k == "three");
                let Some(rate) = three.and_then(|(_, m)| m.first()).map(half_rate) else {
                    println!("latency-half: skipped, it needs the 3-replica run (`three`) first");
                    continue;
                };
                (
                    format!("latency at {rate} events/s (half of 3 replicas), 3 replicas"),
                    pipeline.at_rate(rate, args.latency_seconds),
                )
            } else {
                (name.clone(), *pipeline)
            };
            if pipeline.events > 0 {
                let m = bench.pipeline(&name, pipeline)?;
                record(&mut rounds, key, m);
            }
        }
    }
    Ok(rounds)
}

/// Each run's measurements, by its key, in the order first measured.
type Rounds = Vec<(&'static str, Vec<Measured>)>;

fn record(rounds: &mut Rounds, key: &'static str, m: Measured) {
    match rounds.iter_mut().find(|(k, _)| *k == key) {
        Some((_, all)) => all.push(m),
        None => rounds.push((key, vec![m])),
    }
}

/// Events of the runs in small transactions (`per-event`, `database-small`): a twentieth of
/// `--events`, at least 1,000; small transactions are slow.
pub(super) fn small_run_events(args: &BenchArgs) -> u64 {
    (args.events / 20).max(1_000)
}

/// Half the rate a run measured, rounded down to a hundred events per second.
fn half_rate(m: &Measured) -> u64 {
    ((m.per_second() / 2.0) as u64 / 100 * 100).max(100)
}

impl Bench {
    /// The database server (a fresh database per run on it) and what every run shares.
    fn start(cli: &GlobalArgs, args: &BenchArgs) -> anyhow::Result<Bench> {
        let logs = log_dir(args.logs.as_ref(), "inventory-bench")?;
        // Durable (fsync on), for honest numbers; each run gets a fresh database on it.
        let durable = PostgresOptions {
            durable: true,
            statement_stats: true,
            shared_buffers: args.shared_buffers.clone(),
            ..PostgresOptions::default()
        };
        anyhow::ensure!(
            !args.shared_buffers.is_empty()
                && args
                    .shared_buffers
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric()),
            "--shared-buffers takes a size such as 128MB or 4GB"
        );
        let replica_settings = args
            .replica_settings
            .iter()
            .map(|s| match s.split_once('=') {
                Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
                None => anyhow::bail!("--replica-set takes KEY=VALUE, not `{s}`"),
            })
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(
            args.service.is_none() || !args.wants("unsafe"),
            "the unsafe run needs this build's replicas (their switch exists only in \
             `inventory-dev`): leave it out with --only when --service is given"
        );
        let (server, admin_url) = given_or_throwaway_database(cli, durable, step)?;
        Ok(Bench {
            rt: runtime()?,
            admin_url,
            server,
            service: match &args.service {
                Some(path) => Service::binary(path),
                None => Service::built_in()?,
            },
            logs,
            runs: 0,
            skus: args.skus,
            replica_settings,
            history: (args.history > 0).then_some(History {
                rows: args.history,
                days: args.history_days,
                template: None,
            }),
            trace_sink: None,
            external_service: args.service.is_some(),
        })
    }

    fn spec(&mut self, events: u64, hot_share: f64) -> WorkloadSpec {
        WorkloadSpec {
            events,
            skus: self.skus,
            skew: 0.0,
            hot_share,
            // Every run sees the same kind of workload, one the unsafe baseline can apply
            // correctly too (duplicates are what it cannot handle).
            duplicate_share: 0.0,
            invalid_share: 0.0,
            order_share: 0.0,
            seed: 2026 + u64::from(self.runs),
            id_prefix: format!("bench{}", self.runs),
        }
    }

    /// The history's database, filled on first use: its name and what it holds.
    fn history_template(&mut self) -> anyhow::Result<(String, Expectation)> {
        let history = self.history.as_mut().context("no history asked for")?;
        let rows = history.rows as i64;
        let expected = crate::history::expectation(rows);
        if let Some(name) = &history.template {
            return Ok((name.clone(), expected));
        }
        let name = format!("inventory_bench_{}_history", std::process::id());
        step(&format!(
            "steady state: generating a history of {rows} events over {} days in SQL",
            history.days
        ));
        let days = history.days as i64;
        let started = Instant::now();
        self.rt.block_on(async {
            let url = store::create_database(&self.admin_url, &name)
                .await
                .context("creating the history's database")?;
            store::migrate::migrate(&url).await?;
            let db = store::connect(&url).await?;
            crate::history::fill(
                &db,
                rows,
                days,
                Some(Settings::default().history.period_s),
                |done| {
                    if done % 10_000_000 == 0 || done == rows {
                        step(&format!(
                            "  {done} events of history ({:.0}s)",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                },
            )
            .await?;
            anyhow::Ok(())
        })?;
        history.template = Some(name.clone());
        Ok((name, expected))
    }

    fn drop_history(&mut self) {
        if let Some(name) = self.history.as_mut().and_then(|h| h.template.take()) {
            let _ = self
                .rt
                .block_on(store::drop_database(&self.admin_url, &name));
        }
    }

    /// The server's statement counters, reset, for a run's profile: only on bench's own
    /// server (resetting them is nobody else's business).
    async fn statement_stats(&self) -> Option<tokio_postgres::Client> {
        self.server.as_ref()?;
        statement_stats(&self.admin_url).await
    }

    /// A new, migrated database for the next run: empty, or a copy of `template`.
    /// A pipeline run's database, migrated by the replicas' own build: another build
    /// (`--service`) may be at an older migration than this one, and refuses a newer schema.
    fn fresh_database(&mut self) -> anyhow::Result<String> {
        if !self.external_service {
            return self.fresh_database_from(None);
        }
        let url = self.fresh_database_unmigrated(None)?;
        let out = self
            .service
            .command()
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env_remove("INVENTORY_DATABASE__URL")
            .output()
            .context("running the service's migrate")?;
        anyhow::ensure!(
            out.status.success(),
            "the service's migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(url)
    }

    /// A run's database, migrated by this build.
    fn fresh_database_from(&mut self, template: Option<&str>) -> anyhow::Result<String> {
        let url = self.fresh_database_unmigrated(template)?;
        self.rt.block_on(store::migrate::migrate(&url))?;
        Ok(url)
    }

    fn fresh_database_unmigrated(&mut self, template: Option<&str>) -> anyhow::Result<String> {
        self.runs += 1;
        let name = format!("inventory_bench_{}_{}", std::process::id(), self.runs);
        self.rt.block_on(async {
            let url = match template {
                None => store::create_database(&self.admin_url, &name).await,
                Some(template) => {
                    store::create_database_from(&self.admin_url, &name, template).await
                }
            }
            .context("creating the run's database")?;
            // Start every run from clean buffers: the previous run's dirty pages are not
            // written back on this run's time. (Needs superuser or pg_checkpoint; skipped
            // without.)
            let admin = store::connect(&self.admin_url).await?;
            let _ = admin.batch_execute("CHECKPOINT").await;
            // And from a quiet disk: a copy of a large history, and the previous run's
            // database dropped, can leave the kernel gigabytes to write back or discard, which
            // would otherwise happen during the timed run.
            let settling = Instant::now();
            tokio::task::spawn_blocking(nix::unistd::sync).await?;
            if settling.elapsed() > Duration::from_secs(1) {
                step(&format!(
                    "  waited {:.0}s for the disk to write back the copy",
                    settling.elapsed().as_secs_f64()
                ));
            }
            anyhow::Ok(url)
        })
    }

    fn drop_database(&self, url: &str) {
        let Some(name) = url::Url::parse(url)
            .ok()
            .map(|u| u.path().trim_start_matches('/').to_owned())
        else {
            return;
        };
        let _ = self
            .rt
            .block_on(store::drop_database(&self.admin_url, &name));
    }
}

/// The audit against the oracle; failed checks are printed.
async fn verify(url: &str, expected: &Expectation) -> anyhow::Result<bool> {
    let db = store::connect(url).await?;
    let report = audit::audit(&db, Some(expected)).await?;
    for check in report.checks.iter().filter(|c| !c.passed) {
        step(&format!("  FAIL {}: {}", check.name, check.detail));
    }
    Ok(report.passed())
}

fn step(text: &str) {
    eprintln!("bench: {text}");
}
