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
//! - peak resident memory of one replica working through a large backlog.
//!
//! Every pipeline run lets its replicas share the partitions first; the clock runs from the
//! start of production to the last commit. Every run ends with the audit against the workload's
//! oracle; a failed audit fails the command. Figures are measured, targets only reported.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tokio::runtime::Runtime;

use crate::cli::produce::deliver;
use crate::cli::{given_or_throwaway_database, log_dir};
use crate::embedded::cpu;
use crate::embedded::local_kafka::{BrokerKind, LocalKafka};
use crate::embedded::postgres::{PostgresOptions, ThrowawayPostgres};
use crate::embedded::replica::{ReplicaProcess, Service, local_env};
use crate::embedded::wait::wait_until;
use crate::producer::EventProducer;
use crate::workload::{Expectation, Generator, Message, Oracle, WorkloadSpec};
use inventory_consumer::cli::{EXIT_VERIFY_FAILED, GlobalArgs, runtime};
use inventory_consumer::config::Settings;
use inventory_consumer::domain::batch::MAX_LOCKS_PER_BATCH;
use inventory_consumer::domain::{Batch, Delivery, MAX_LINES_PER_BATCH, lock_key};
use inventory_consumer::store::{self, Guards, Source, apply_batch, audit};

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
    #[arg(long, default_value_t = 5_000)]
    pub latency_rate: u64,
    /// How long the latency run produces.
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
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
    /// Only these runs (comma-separated): database, steady, one, three, per-event, unsafe,
    /// hot, latency, memory, one-apache, three-apache. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the replicas' logs go (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// Deliveries per transaction in the batched runs: the default `processing.batch_max_events`.
const BATCH: usize = 500;
/// Partitions of the memory run: the mock broker keeps about 5 MiB per partition, and a
/// backlog must not outgrow that before it is read.
const BACKLOG_PARTITIONS: i32 = 64;
/// What the embedded broker keeps of a partition (about 5 MiB, librdkafka's mock), with a
/// margin, and about the size of one of the workload's messages.
const EMBEDDED_KEEPS: u64 = 4 << 20;
const MESSAGE_BYTES: u64 = 160;
/// Events of the hot-SKU run at most (see there).
const HOT_EVENTS: u64 = 60_000;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(900);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One pipeline run.
#[derive(Debug, Clone, Copy)]
struct Pipeline {
    replicas: usize,
    batch: usize,
    guards: Guards,
    hot_share: f64,
    events: u64,
    partitions: i32,
    /// Events per second produced while the replicas run; 0: as fast as possible (a backlog).
    rate: u64,
    broker: BrokerKind,
}

/// What a run measured.
#[derive(Debug, Clone)]
struct Measured {
    name: String,
    events: u64,
    seconds: f64,
    /// Produce-to-commit latency percentiles (p50, p99), in seconds.
    latency: Option<(f64, f64)>,
    peak_rss: Option<u64>,
    /// CPU seconds per event over the timed part (user + system): of the replica processes,
    /// and of the PostgreSQL server when it is the throwaway one.
    cpu: Cpu,
    verified: bool,
    /// Where the server's time went, by statement (database-only runs on a server with
    /// `pg_stat_statements`).
    profile: Vec<StatementTime>,
}

/// One statement's share of the server's time in a run.
#[derive(Debug, Clone)]
struct StatementTime {
    query: String,
    calls: i64,
    /// Execution plus planning time, in milliseconds.
    total_ms: f64,
    rows: i64,
}

/// CPU seconds (user + system) of the replica processes, of the PostgreSQL server and, in the
/// pipeline runs, of bench itself (the harness: the producer, and the embedded broker when it
/// is the one used), each `None` where it cannot be read or does not apply: used so far (a
/// reading), or per event (two readings apart).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    replicas: Option<f64>,
    server: Option<f64>,
    harness: Option<f64>,
}

impl Cpu {
    /// Per event, from this reading to a `later` one `events` apart.
    fn per_event(&self, later: &Cpu, events: f64) -> Cpu {
        let per = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / events.max(1.0));
        Cpu {
            replicas: per(self.replicas, later.replicas),
            server: per(self.server, later.server),
            harness: per(self.harness, later.harness),
        }
    }
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds.max(f64::EPSILON)
    }

    /// CPU seconds per event of the whole pipeline, when both parts are known.
    fn cpu_per_event(&self) -> Option<f64> {
        Some(self.cpu.replicas? + self.cpu.server?)
    }
}

struct Bench {
    rt: Runtime,
    /// Where each run's database is created.
    admin_url: String,
    server: Option<ThrowawayPostgres>,
    service: Service,
    logs: PathBuf,
    runs: u32,
    skus: u64,
    /// The database holding the steady-state run's history, filled on first use and copied
    /// for each of its runs.
    history: Option<History>,
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
    for (_, m) in results
        .iter()
        .filter(|(k, _)| matches!(*k, "database" | "steady" | "three"))
    {
        print_profile(m);
    }
    print_ratios(&results);
    bench.drop_history();
    let results: Vec<Measured> = results.into_iter().map(|(_, m)| m).collect();
    if results.iter().all(|r| r.verified) {
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

/// A pipeline run: its key (for `--only`), its name in the report, and what it runs.
type Run = (&'static str, String, Pipeline);

impl Pipeline {
    /// The reference run: one replica with every guarantee, batches of the default size, the
    /// uniform workload, on the embedded broker.
    fn batched(args: &BenchArgs) -> Pipeline {
        Pipeline {
            replicas: 1,
            batch: BATCH,
            guards: Guards::On,
            hot_share: 0.0,
            events: args.events,
            partitions: args.partitions,
            rate: 0,
            broker: BrokerKind::Embedded,
        }
    }
}

/// Every pipeline run, each a variation of the reference run (the Apache Kafka ones with
/// `--apache` only).
fn pipeline_runs(args: &BenchArgs) -> Vec<Run> {
    let batched = Pipeline::batched(args);
    let rate = args.latency_rate;
    let mut runs = vec![
        ("one", "pipeline, 1 replica".to_owned(), batched),
        (
            "three",
            "pipeline, 3 replicas".to_owned(),
            Pipeline {
                replicas: 3,
                ..batched
            },
        ),
        (
            "per-event",
            "per-event mode (batch of 1), 1 replica".to_owned(),
            Pipeline {
                batch: 1,
                events: (args.events / 20).max(1_000),
                ..batched
            },
        ),
        (
            "unsafe",
            "unsafe: no locks, no dedupe, 1 replica".to_owned(),
            Pipeline {
                guards: Guards::Off,
                ..batched
            },
        ),
        (
            "hot",
            "hot SKU (50% of events), 1 replica".to_owned(),
            Pipeline {
                hot_share: 0.5,
                // Half the events in one partition: kept within what the embedded broker
                // retains per partition (about 5 MiB) until it is read.
                events: args.events.min(HOT_EVENTS),
                ..batched
            },
        ),
        (
            "latency",
            format!("latency at {rate} events/s, 3 replicas"),
            Pipeline {
                replicas: 3,
                events: rate * args.latency_seconds,
                rate,
                ..batched
            },
        ),
        (
            "memory",
            format!(
                "memory: {} backlog, 1 replica, {BACKLOG_PARTITIONS} partitions",
                args.backlog
            ),
            Pipeline {
                events: args.backlog,
                partitions: BACKLOG_PARTITIONS,
                ..batched
            },
        ),
    ];
    if args.apache {
        runs.extend(apache_runs(batched));
    }
    runs
}

/// The 1- and 3-replica pipelines again, on Apache Kafka.
fn apache_runs(batched: Pipeline) -> [Run; 2] {
    let on_apache = format!("on {}", LocalKafka::describe(BrokerKind::Apache));
    let apache = Pipeline {
        broker: BrokerKind::Apache,
        ..batched
    };
    [
        ("one-apache", format!("1 replica {on_apache}"), apache),
        (
            "three-apache",
            format!("3 replicas {on_apache}"),
            Pipeline {
                replicas: 3,
                ..apache
            },
        ),
    ]
}

/// The embedded broker deletes a partition's oldest messages past about 5 MiB, read or not:
/// a backlog larger than that would lose messages before a replica reads them (the replica
/// logs the offset reset and the audit fails). Refused up front, with what to do instead.
fn check_embedded_retention(args: &BenchArgs, runs: &[Run]) -> anyhow::Result<()> {
    for (key, _, p) in runs {
        let per_partition = p.events * MESSAGE_BYTES / p.partitions.max(1) as u64;
        if args.wants(key) && p.broker == BrokerKind::Embedded && per_partition > EMBEDDED_KEEPS {
            anyhow::bail!(
                "run `{key}`: {} events over {} partitions is about {} MiB a partition, more \
                 than the embedded broker keeps (about 5 MiB): messages would be deleted before \
                 they are read. Use more --partitions, fewer --events, or Apache Kafka \
                 (--apache --only one-apache,three-apache)",
                p.events,
                p.partitions,
                per_partition >> 20
            );
        }
    }
    Ok(())
}

/// Every wanted run, `--repeat` rounds of them: each run's measurements by its key. Rounds
/// interleave the runs, so that a noisy moment of a shared machine does not land on one run
/// only. Latency and memory run once.
fn measure_rounds(
    bench: &mut Bench,
    args: &BenchArgs,
    runs: &[Run],
) -> anyhow::Result<Vec<(&'static str, Vec<Measured>)>> {
    let mut rounds: Vec<(&'static str, Vec<Measured>)> = Vec::new();
    let mut record =
        |key: &'static str, m: Measured| match rounds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, all)) => all.push(m),
            None => rounds.push((key, vec![m])),
        };
    for round in 0..args.repeat.max(1) {
        if args.wants("database") {
            record(
                "database",
                bench.database_only(args.events, args.partitions, false)?,
            );
        }
        if args.wants("steady") && bench.history.is_some() {
            record(
                "steady",
                bench.database_only(args.events, args.partitions, true)?,
            );
        }
        // Odd rounds go backwards, so that no run always follows the same one.
        let mut order: Vec<_> = runs.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (key, name, pipeline) in order {
            let once = matches!(*key, "latency" | "memory");
            if args.wants(key) && pipeline.events > 0 && (round == 0 || !once) {
                record(key, bench.pipeline(name, *pipeline)?);
            }
        }
    }
    Ok(rounds)
}

/// Each run's median round (by rate), with the median CPU of its rounds, verified only if
/// every round was.
fn medians(rounds: Vec<(&'static str, Vec<Measured>)>) -> Vec<(&'static str, Measured)> {
    rounds
        .into_iter()
        .map(|(key, mut all)| {
            let verified = all.iter().all(|m| m.verified);
            let cpu = Cpu {
                replicas: median_of(all.iter().map(|m| m.cpu.replicas)),
                server: median_of(all.iter().map(|m| m.cpu.server)),
                harness: median_of(all.iter().map(|m| m.cpu.harness)),
            };
            all.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
            let mut median = all.swap_remove(all.len() / 2);
            median.verified = verified;
            median.cpu = cpu;
            (key, median)
        })
        .collect()
}

/// The runs compared, against their targets where they have one.
fn print_ratios(results: &[(&str, Measured)]) {
    let get = |key: &str| results.iter().find(|(k, _)| *k == key).map(|(_, m)| m);
    let ratio = |a: &str, b: &str| Some(get(a)?.per_second() / get(b)?.per_second());
    println!();
    println!("ratios (targets are reported, not asserted)");
    let targets = [
        (
            "steady state (history) / database only",
            ratio("steady", "database"),
            ">= 0.8",
            0.8,
        ),
        (
            "3 replicas / database only",
            ratio("three", "database"),
            ">= 0.5",
            0.5,
        ),
        (
            "1 replica / per-event mode",
            ratio("one", "per-event"),
            ">= 20",
            20.0,
        ),
        (
            "guarded / unsafe (1 replica)",
            ratio("one", "unsafe"),
            ">= 0.95",
            0.95,
        ),
        (
            "hot SKU / uniform (1 replica)",
            ratio("hot", "one"),
            ">= 0.5",
            0.5,
        ),
    ];
    for (name, value, wanted, at_least) in targets {
        if let Some(value) = value {
            target(name, value, wanted, value >= at_least);
        }
    }
    // The same comparison by CPU time per event: the machine is CPU-bound, so rates follow the
    // inverse of it, and it is far steadier than a rate on a shared machine.
    let cpu_ratio = |a: &str, b: &str| Some(get(b)?.cpu_per_event()? / get(a)?.cpu_per_event()?);
    if let Some(value) = cpu_ratio("one", "unsafe") {
        println!(
            "  {:<40} {value:>8.2}   (by CPU time per event)",
            "guarded / unsafe (1 replica)"
        );
    }
    for (apache, embedded, name) in [
        ("one-apache", "one", "Apache Kafka / embedded (1 replica)"),
        (
            "three-apache",
            "three",
            "Apache Kafka / embedded (3 replicas)",
        ),
    ] {
        if let Some(value) = ratio(apache, embedded) {
            println!("  {name:<40} {value:>8.2}");
        }
    }
    if let Some(rss) = get("memory").and_then(|m| m.peak_rss) {
        target(
            "peak RSS of the memory run, MiB",
            mib(rss),
            "<= 64",
            mib(rss) <= 64.0,
        );
    }
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
        let (server, admin_url) = given_or_throwaway_database(cli, durable, step)?;
        Ok(Bench {
            rt: runtime()?,
            admin_url,
            server,
            service: Service::built_in()?,
            logs,
            runs: 0,
            skus: args.skus,
            history: (args.history > 0).then_some(History {
                rows: args.history,
                days: args.history_days,
                template: None,
            }),
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

    /// CPU read off the throwaway server, the given replica processes and, when there are
    /// replicas, this process as their harness (`None` for a part that cannot be read: a
    /// server elsewhere, a replica gone).
    fn cpu_reading(&self, replicas: &[ReplicaProcess]) -> Cpu {
        let server = self.server.as_ref().and_then(|s| s.server_pid());
        let (replicas, harness) = if replicas.is_empty() {
            (None, None)
        } else {
            let replicas = replicas
                .iter()
                .map(|r| cpu::process_seconds(r.pid()?.as_raw()))
                .sum::<Option<f64>>();
            (replicas, cpu::process_seconds(std::process::id() as i32))
        };
        Cpu {
            replicas,
            server: server.and_then(cpu::tree_seconds),
            harness,
        }
    }

    /// The server's CPU and, in the replicas' place, this process's own: in the database-only
    /// runs it drives the batch transaction itself (planning, encoding, the driver).
    fn own_cpu_reading(&self) -> Cpu {
        Cpu {
            replicas: cpu::process_seconds(std::process::id() as i32),
            ..self.cpu_reading(&[])
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
    fn fresh_database(&mut self) -> anyhow::Result<String> {
        self.fresh_database_from(None)
    }

    fn fresh_database_from(&mut self, template: Option<&str>) -> anyhow::Result<String> {
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
            store::migrate::migrate(&url).await?;
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

    /// The replicas' transaction driven directly: the workload cut into the batches a worker
    /// would make, partition by partition, each partition applying its batches in order, all
    /// partitions at once through one pool. Best of 2, 4 and 8 connections. With `history`,
    /// on a copy of the history's database (the steady state).
    fn database_only(
        &mut self,
        events: u64,
        partitions: i32,
        history: bool,
    ) -> anyhow::Result<Measured> {
        let (template, base) = if history {
            let (name, base) = self.history_template()?;
            (Some(name), Some(base))
        } else {
            (None, None)
        };
        let label = match &base {
            Some(b) => format!("steady state, {} events of history", b.events),
            None => "database only".to_owned(),
        };
        let mut best: Option<Measured> = None;
        for connections in [2, 4, 8] {
            let url = self.fresh_database_from(template.as_deref())?;
            let spec = self.spec(events, 0.0);
            step(&format!(
                "{label}, {connections} connections: {events} events"
            ));
            let (batches, expected) = cut_into_batches(spec, partitions);
            let expected = match &base {
                Some(base) => expected.on_top_of(base.clone()),
                None => expected,
            };
            let run = DirectRun {
                url: &url,
                connections,
                events,
                batches,
                expected: &expected,
                retention: history,
            };
            let (seconds, cpu, verified, profile) = self.rt.block_on(self.apply_directly(run))?;
            self.drop_database(&url);
            let m = Measured {
                name: format!("{label} ({connections} connections)"),
                events,
                seconds,
                latency: None,
                peak_rss: None,
                cpu,
                verified,
                profile,
            };
            report(&m);
            if best
                .as_ref()
                .is_none_or(|b| m.per_second() > b.per_second())
            {
                best = Some(m);
            }
        }
        best.context("no database-only run")
    }

    /// One database-only run: its batches applied through a pool of its connections, timed,
    /// then the audit. Returns the seconds, the CPU per event, whether the audit passed and
    /// where the server's time went.
    async fn apply_directly(
        &self,
        run: DirectRun<'_>,
    ) -> anyhow::Result<(f64, Cpu, bool, Vec<StatementTime>)> {
        let DirectRun {
            url,
            connections,
            events,
            batches,
            expected,
            retention,
        } = run;
        let mut settings = Settings::default().database;
        settings.url = url.to_owned();
        settings.pool_size = connections;
        let pool = store::pool(&settings).await?;
        let source = direct_source();
        let all: Vec<i32> = (0..batches.len() as i32).collect();
        let claims = store::claim(&pool, &source, "bench", &all).await?;
        let stats = self.statement_stats().await;
        // The steady state has retention working (see `retention_during_run`).
        let stop = tokio_util::sync::CancellationToken::new();
        let upkeep =
            retention.then(|| tokio::spawn(retention_during_run(url.to_owned(), stop.clone())));
        let before = self.own_cpu_reading();
        let started = Instant::now();
        apply_in_partitions(&pool, &source, &claims, batches).await?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = before.per_event(&self.own_cpu_reading(), events as f64);
        stop.cancel();
        if let Some(upkeep) = upkeep {
            let (started, dropped) = upkeep.await??;
            step(&format!(
                "  retention during the run: {started} periods started, {dropped} partitions dropped"
            ));
        }
        let profile = match &stats {
            Some(admin) => statement_profile(admin, url).await.unwrap_or_default(),
            None => Vec::new(),
        };
        Ok((seconds, cpu, verify(url, expected).await?, profile))
    }

    fn pipeline(&mut self, name: &str, p: Pipeline) -> anyhow::Result<Measured> {
        let url = self.fresh_database()?;
        let spec = self.spec(p.events, p.hot_share);
        step(&format!("{name}: {} events", p.events));
        let broker = LocalKafka::start(p.broker, p.partitions)?;
        let mut settings = Settings::default();
        settings.kafka.brokers = broker.bootstrap_servers().to_owned();
        settings.database.url = url.clone();

        let mut replicas = (0..p.replicas)
            .map(|i| self.start_replica(&format!("run{}-r{}", self.runs, i + 1), &settings, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The group settles on the empty topic first: every partition owned, every replica with
        // its share. Joining is not what is measured (and latency counts from production).
        let shared = || {
            let owned: Vec<usize> = replicas.iter().map(|r| r.owned().len()).collect();
            owned.iter().sum::<usize>() == p.partitions as usize
                && owned
                    .iter()
                    .all(|&n| n > 0 || p.replicas > p.partitions as usize)
        };
        self.rt.block_on(wait_until(
            "the replicas to share every partition",
            Duration::from_secs(60),
            || {
                let done = shared();
                async move { done }
            },
        ))?;
        let stats = self.rt.block_on(self.statement_stats());
        // The workload and its expectation are made, and the producer connected, before the
        // clock starts: they are the harness's work, on the same cores as the pipeline.
        let messages: Vec<Message> = Generator::new(spec).collect();
        let expected = Oracle::over(&messages);
        let producer = EventProducer::new(&settings).context("creating the producer")?;
        // The clock starts with production: at full speed for a backlog run (the producer
        // outpaces the pipeline, so the backlog builds up at once), at `rate` otherwise.
        let before = self.cpu_reading(&replicas);
        let producer = {
            let (events, rate) = (messages.len() as u64, p.rate);
            std::thread::spawn(move || deliver(producer, messages.into_iter(), events, rate, false))
        };
        let (seconds, timed) = self.rt.block_on(time_to_settle(&url, p.events as i64))?;
        let cpu = before.per_event(&self.cpu_reading(&replicas), timed);
        // In a backlog run latency is mostly time spent waiting in the backlog: not reported.
        let latency = (p.rate > 0)
            .then(|| latency_percentiles(&replicas))
            .flatten();
        let profile = match &stats {
            Some(admin) => self
                .rt
                .block_on(statement_profile(admin, &url))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let peak_rss = replicas.iter().filter_map(|r| r.peak_rss_bytes()).max();
        for r in &mut replicas {
            let (status, _) = r.terminate(STOP_TIMEOUT)?;
            if !status.success() {
                bail!("{} exited with {status}; log: {}", r.name, r.log.display());
            }
        }
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
        let verified = self.rt.block_on(verify(&url, &expected))?;
        drop(broker);
        self.drop_database(&url);
        let m = Measured {
            name: name.to_owned(),
            events: p.events,
            seconds,
            latency,
            peak_rss,
            cpu,
            verified,
            profile,
        };
        report(&m);
        Ok(m)
    }

    fn start_replica(
        &self,
        name: &str,
        settings: &Settings,
        p: Pipeline,
    ) -> anyhow::Result<ReplicaProcess> {
        let mut env = local_env(&settings.kafka.brokers, &settings.database.url);
        env.extend([
            ("INVENTORY_KAFKA__GROUP_PROTOCOL", "consumer".to_owned()),
            // The embedded broker answers a fetch with no data waiting only after the full
            // fetch.wait.max.ms (500 ms by default), even when data arrives meanwhile (Kafka
            // answers at once): shortened so that latency measures the pipeline, not the mock.
            (
                "INVENTORY_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS",
                "20".to_owned(),
            ),
        ]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let batch = p.batch.to_string();
        let flags: &[&str] = match p.guards {
            Guards::On => &[],
            Guards::Off => &["--unguarded-benchmark-baseline"],
        };
        ReplicaProcess::spawn_with_flags(
            &self.service,
            name,
            &self.logs,
            &env,
            &[
                ("processing.batch_max_events", batch.as_str()),
                ("database.migrate", "false"),
            ],
            flags,
        )
    }
}

/// One database-only run, as `Bench::apply_directly` takes it.
struct DirectRun<'a> {
    url: &'a str,
    connections: u32,
    events: u64,
    /// Each partition's batches, in order.
    batches: Vec<Vec<Batch>>,
    expected: &'a Expectation,
    /// With retention working beside the batches (the steady state).
    retention: bool,
}

/// What the database-only runs apply as: a replica's source with the default settings.
fn direct_source() -> Source {
    Source {
        group: "bench".into(),
        topic: "bench".into(),
        reservation_ttl: Settings::default().reservations.default_ttl(),
        reservation_max_ttl: Settings::default().reservations.max_ttl(),
        max_locks: MAX_LOCKS_PER_BATCH,
        reply_all: false,
    }
}

/// Every partition's batches applied through `pool`, all partitions at once, each applying
/// its batches in order with the epoch of its claim, as the replicas' workers do.
async fn apply_in_partitions(
    pool: &store::Pool,
    source: &Source,
    claims: &HashMap<i32, store::Claim>,
    batches: Vec<Vec<Batch>>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (partition, batches) in batches.into_iter().enumerate() {
        let (pool, source) = (pool.clone(), source.clone());
        let epoch = claims
            .get(&(partition as i32))
            .map(|c| c.epoch)
            .context("a partition left unclaimed")?;
        tasks.spawn(async move {
            // Each batch freed once applied, as a replica does.
            for batch in batches {
                apply_batch(&pool, &source, &batch, Guards::On, epoch).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// A connection to the server's maintenance database with `pg_stat_statements` ready and its
/// counters reset, or `None` where it is not loaded (a given server, usually).
async fn statement_stats(admin_url: &str) -> Option<tokio_postgres::Client> {
    let admin = store::connect(admin_url).await.ok()?;
    admin
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             SELECT pg_stat_statements_reset();",
        )
        .await
        .ok()?;
    Some(admin)
}

/// The statements of the database of `url` by the server's time spent on them, most first.
async fn statement_profile(
    admin: &tokio_postgres::Client,
    url: &str,
) -> anyhow::Result<Vec<StatementTime>> {
    let name = url::Url::parse(url)?
        .path()
        .trim_start_matches('/')
        .to_owned();
    let rows = admin
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls,
                    total_exec_time + total_plan_time, rows
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
             WHERE d.datname = $1
             ORDER BY 3 DESC LIMIT 12",
            &[&name],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(StatementTime {
                query: r.try_get(0)?,
                calls: r.try_get(1)?,
                total_ms: r.try_get(2)?,
                rows: r.try_get(3)?,
            })
        })
        .collect()
}

/// Where the server's time went in a run, per event.
fn print_profile(m: &Measured) {
    if m.profile.is_empty() {
        return;
    }
    let total: f64 = m.profile.iter().map(|s| s.total_ms).sum();
    println!();
    println!(
        "server time by statement, {} (pg_stat_statements; µs per event, share of the top 12)",
        m.name
    );
    for s in &m.profile {
        println!(
            "  {:>7.2} µs {:>5.1}% {:>8} calls {:>9} rows  {}",
            s.total_ms * 1e3 / m.events.max(1) as f64,
            100.0 * s.total_ms / total.max(f64::EPSILON),
            s.calls,
            s.rows,
            s.query
        );
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

/// The workload as the batches partition workers would cut, per partition, and its oracle.
fn cut_into_batches(spec: WorkloadSpec, partitions: i32) -> (Vec<Vec<Batch>>, Expectation) {
    let n = partitions.max(1) as usize;
    let mut oracle = Oracle::default();
    let mut done: Vec<Vec<Batch>> = (0..n).map(|_| Vec::new()).collect();
    let mut open: Vec<Batch> = (0..n).map(|_| Batch::default()).collect();
    let mut next_offset = vec![0_i64; n];
    for message in Generator::new(spec) {
        oracle.observe(Some(&message.value));
        // Keyed by SKU, as the producer keys them: one SKU stays in one partition.
        let key = message.key.clone().unwrap_or_default();
        let p = lock_key(&key).rem_euclid(n as i64) as usize;
        if open[p].is_full(BATCH, MAX_LINES_PER_BATCH) {
            done[p].push(std::mem::take(&mut open[p]));
        }
        open[p].push(Delivery {
            partition: p as i32,
            offset: next_offset[p],
            key: message.key.map(String::into_bytes),
            payload: Some(message.value),
            timestamp_ms: None,
        });
        next_offset[p] += 1;
    }
    for (p, batch) in open.into_iter().enumerate() {
        if !batch.is_empty() {
            done[p].push(batch);
        }
    }
    (done, oracle.finish())
}

/// Seconds from now to the batch that completes `messages`, watching the partitions' recorded
/// offsets (offsets of a fresh topic start at 0, so they sum to the messages done), scaled to
/// the whole run from the part done after the first observation; and how many messages that
/// part held.
async fn time_to_settle(url: &str, messages: i64) -> anyhow::Result<(f64, f64)> {
    let db = store::connect(url).await?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut first = None;
    loop {
        let done: i64 = db
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM partition_offsets",
                &[],
            )
            .await?
            .try_get(0)?;
        let now = Instant::now();
        let (start, done_then) = *first.get_or_insert((now, done));
        if done_then * 10 > messages * 9 {
            bail!(
                "{done_then} of {messages} messages settled before the clock started: too few \
                 to time (raise --events)"
            );
        }
        if done >= messages {
            let seconds = now.duration_since(start).as_secs_f64();
            // Scale to the whole run: the share done before the first look is not timed.
            let timed = (messages - done_then).max(1) as f64;
            return Ok((seconds * messages as f64 / timed, timed));
        }
        if now > deadline {
            bail!("only {done} of {messages} messages settled within {SETTLE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// p50 and p99 of the replicas' produce-to-commit histograms, added up: linear within a
/// bucket, as Prometheus' `histogram_quantile` does.
fn latency_percentiles(replicas: &[ReplicaProcess]) -> Option<(f64, f64)> {
    let mut cumulative: Vec<(f64, f64)> = Vec::new();
    for r in replicas {
        let text = ureq::get(format!("http://{}/metrics", r.http_addr()?))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
        for sample in scrape.samples {
            if sample.metric != inventory_consumer::metrics::LATENCY_SECONDS {
                continue;
            }
            if let prometheus_parse::Value::Histogram(buckets) = sample.value {
                for b in buckets {
                    match cumulative.iter_mut().find(|(le, _)| *le == b.less_than) {
                        Some((_, count)) => *count += b.count,
                        None => cumulative.push((b.less_than, b.count)),
                    }
                }
            }
        }
    }
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some((quantile(&cumulative, 0.5)?, quantile(&cumulative, 0.99)?))
}

fn quantile(cumulative: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in cumulative {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let share = (rank - lower.1) / (count - lower.1).max(f64::EPSILON);
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    None
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn step(text: &str) {
    eprintln!("bench: {text}");
}

fn report(m: &Measured) {
    step(&format!(
        "  {:.0} events/s ({} events in {:.2}s), verify {}",
        m.per_second(),
        m.events,
        m.seconds,
        if m.verified { "PASS" } else { "FAIL" }
    ));
}

fn print_table<'a>(results: impl Iterator<Item = &'a Measured>) {
    println!();
    println!(
        "{:<60} {:>9} {:>8} {:>10} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>6}",
        "run",
        "events",
        "seconds",
        "events/s",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "rep µs",
        "pg µs",
        "bench µs",
        "verify"
    );
    for m in results {
        let (p50, p99) = m.latency.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{:.1}", a * 1e3), format!("{:.1}", b * 1e3))
        });
        println!(
            "{:<60} {:>9} {:>8.2} {:>10.0} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>6}",
            m.name,
            m.events,
            m.seconds,
            m.per_second(),
            p50,
            p99,
            m.peak_rss.map_or("-".into(), |b| format!("{:.1}", mib(b))),
            micros(m.cpu.replicas),
            micros(m.cpu.server),
            micros(m.cpu.harness),
            if m.verified { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "(rep µs, pg µs, bench µs: CPU time, user + system, per event over the timed part: of the \
         replica processes (database only: of bench, driving the batch transaction), of the \
         PostgreSQL server, of bench as the pipeline's harness (its producer, and the embedded \
         broker when that is the one used), all on the same cores)"
    );
}

fn micros(seconds: Option<f64>) -> String {
    seconds.map_or("-".into(), |s| format!("{:.1}", s * 1e6))
}

/// The median of the values that are known.
fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut known: Vec<f64> = values.flatten().collect();
    known.sort_by(f64::total_cmp);
    known.get(known.len() / 2).copied()
}

fn target(name: &str, value: f64, wanted: &str, met: bool) {
    println!(
        "  {name:<40} {value:>8.2}   target {wanted:<8} {}",
        if met { "met" } else { "MISSED" }
    );
}

/// History maintenance as the replicas run it, every 250 ms until `stop`, with the default
/// settings: what of the history is past its retention (with `--history-days` 22, its oldest
/// week of events, past the 14-day dedupe horizon) is dropped while the batches run. Returns
/// (periods started, partitions dropped).
async fn retention_during_run(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(u64, usize)> {
    let settings = Settings::default().history;
    let mut db = store::connect(&url).await?;
    let (mut started, mut dropped) = (0, 0);
    while !stop.is_cancelled() {
        let m = store::retention::maintain(&mut db, &settings).await?;
        started += u64::from(m.started);
        dropped += m.dropped.len();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    Ok((started, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let buckets = [
            (0.01, 50.0),
            (0.1, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(&buckets, 0.5), Some(0.01));
        let p99 = quantile(&buckets, 0.99).unwrap_or_default();
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
    }
}
