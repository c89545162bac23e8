//! `run`: one consumer replica. Migrates (unless told not to), then consumes until SIGTERM or
//! SIGINT (drain, commit, leave the group, exit 0) or a fatal failure (exit 3). A second signal
//! exits at once. On exit it prints its counters as one JSON line on stdout.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{EXIT_CONFIG, EXIT_RUNTIME, runtime};
use crate::config::{ConfigError, Settings, describe_database};
use crate::domain::DeadLetterLimit;
use crate::http::Health;
use crate::kafka::combiner::{Applier, Caps, Combiner};
use crate::kafka::consumer::{Signals, consume};
use crate::kafka::offsets::OffsetTracker;
use crate::kafka::worker::WorkerContext;
use crate::stats::Stats;
use crate::store::{self, Failure};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Do not apply migrations at start-up (when a separate job applies them).
    #[arg(long)]
    pub no_migrate: bool,
    /// Benchmark only: skip advisory locks and the duplicate lookup (unsafe baseline). Only in
    /// builds with the `benchmark-baseline` feature, which `inventory-dev` turns on.
    #[cfg(feature = "benchmark-baseline")]
    #[arg(long, hide = true)]
    pub unguarded_benchmark_baseline: bool,
}

pub fn main(settings: Settings, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    crate::signals::on_termination(shutdown.clone())?;
    let rt = runtime()?;
    let metrics = crate::metrics::install()?;
    let stats = Arc::new(Stats::default());
    let outcome = rt.block_on(run(settings, args, shutdown, stats.clone(), metrics));
    // Every task was stopped and awaited already; this bounds whatever was not (a worker's
    // database call abandoned at the drain deadline). The poll thread is a plain thread: the
    // process does not wait for it.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    // Whatever happens to stdout (a closed pipe), the exit below must be reached.
    if let Ok(counters) = serde_json::to_string(&stats.snapshot()) {
        let _ = writeln!(std::io::stdout(), "{counters}");
    }
    let code = match outcome {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            tracing::error!(error = format!("{e:#}"), "refused the configuration");
            eprintln!("{e:#}");
            EXIT_CONFIG
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "replica stopped on a fatal failure"
            );
            eprintln!("error: {e:#}");
            EXIT_RUNTIME
        }
    };
    // The last spans, within their own bound (the exit runs no destructors).
    crate::traces::shutdown();
    crate::signals::exit_now(code)
}

/// Every exit ends within the drain timeout plus 8 s (10 s with traces) of the shutdown's start (a signal, or a
/// fatal failure), whatever leaving the group does: the poll thread gets the drain plus
/// `STOP_MARGIN` (a commit, serving the unsubscribe's rebalance for up to 5 s, librdkafka's
/// close), the background tasks `BACKGROUND_STOP`, the runtime `RUNTIME_SHUTDOWN`. Past its
/// share the replica goes on without the poll thread: what it applied is in the database with
/// its offsets, and the group notices its departure at the session timeout at worst.
const STOP_MARGIN: Duration = Duration::from_secs(6);
const BACKGROUND_STOP: Duration = Duration::from_secs(1);
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

/// The longest a replica takes from a signal to its exit: the drain timeout plus 8 s, plus the
/// traces' last flush when they are on. A signal
/// during start-up (connecting, migrating) ends it at once, before it joined anything. The
/// orchestrator's grace period must be above this (`config` prints it).
pub fn shutdown_bound(settings: &Settings) -> Duration {
    let traces = if settings.traces.enabled() {
        crate::traces::FLUSH_AT_EXIT
    } else {
        Duration::ZERO
    };
    settings.drain_timeout() + STOP_MARGIN + BACKGROUND_STOP + RUNTIME_SHUTDOWN + traces
}

/// A start-up failure that waiting will not mend.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Fatal(store::Failure);

impl Fatal {
    /// `e` while doing `what`: retried at start-up if transient, else fatal.
    fn unless_transient(e: store::Failure, what: &'static str) -> anyhow::Error {
        if e.is_transient() {
            anyhow::Error::new(e).context(what)
        } else {
            anyhow::Error::new(Fatal(e)).context(what)
        }
    }
}

/// The longest wait between two start-up attempts on a database that does not answer.
const STARTUP_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Connects, checks the database (encoding, lock table) and migrates it, before the replica
/// joins the group: a replica that cannot work must not take partitions. A database that
/// cannot be used yet (unreachable, full, a password rotated ahead of the replica's secret) is
/// tried again with backoff, for as long as it takes, `/readyz` saying why; what the database
/// says about the settings (its encoding, its lock table) is refused at once (exit 2).
async fn prepare_database(
    settings: &Settings,
    args: &RunArgs,
    health: &Health,
) -> anyhow::Result<store::lock_budget::LockBudget> {
    let db = &settings.database;
    let mut backoff = Duration::from_secs(1);
    loop {
        // Each step but the migrations (which may rightly take long) answers within the
        // connect timeout (for each host the URL names, which are tried in turn), or the
        // attempt fails: a server whose packets are dropped answers nothing, ever.
        let hosts = store::tls::parse(&db.url).map_or(1, |(c, _)| c.get_hosts().len().max(1));
        let bound = Duration::from_millis(db.connect_timeout_ms) * (hosts as u32 + 1);
        let bounded = |step: &'static str| {
            move |_| anyhow::anyhow!("{step}: no answer within {} ms", bound.as_millis())
        };
        let attempt = async {
            let client = tokio::time::timeout(bound, store::connect_bounded(db))
                .await
                .map_err(bounded("connecting to the database"))?
                .context("connecting to the database")?;
            tokio::time::timeout(bound, store::encoding::check(&client, db.allow_non_utf8))
                .await
                .map_err(bounded("reading the database's encoding"))??;
            if db.migrate && !args.no_migrate {
                // A migration that fails (SQL, a schema that diverged) fails the same way next
                // time: an operator must look.
                store::migrate::migrate(&db.url)
                    .await
                    .map_err(|e| Fatal::unless_transient(e, "applying migrations"))?;
            } else {
                // Someone else migrates (the migration Job): wait for it, and never run on a
                // schema a newer release made.
                // A failure other than a transient one (e.g. a role without SELECT on
                // refinery's history) is for an operator.
                let state = tokio::time::timeout(bound, store::migrate::schema_state(&client))
                    .await
                    .map_err(bounded("reading the schema's version"))?
                    .map_err(|e| Fatal::unless_transient(e, "reading the schema's version"))?;
                if let Some(refusal) = state.refusal() {
                    return Err(anyhow::Error::new(Fatal(refusal)));
                }
                if let store::migrate::SchemaState::Behind { at, needs } = state {
                    let at = at.map_or("empty".to_owned(), |v| format!("at migration {v}"));
                    anyhow::bail!(
                        "waiting for migrations: the schema is {at}, this release needs \
                         migration {needs} (applied by `migrate`, e.g. the migration Job; this \
                         replica runs with database.migrate = false)"
                    );
                }
            }
            // After the migrations: the schema's relations count against the budget.
            tokio::time::timeout(bound, store::lock_budget::measure(&client, db))
                .await
                .map_err(bounded("reading the server's lock table"))?
        };
        match attempt.await {
            Ok(budget) => return Ok(budget),
            Err(e) if e.downcast_ref::<ConfigError>().is_some() => return Err(e),
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(
                    event = crate::logs::DATABASE_UNAVAILABLE,
                    error = %why,
                    retry_in_ms = backoff.as_millis() as u64,
                    "the database cannot be used yet; not joining the consumer group until it can"
                );
                health.database_reachable(Some(why));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(STARTUP_BACKOFF_MAX);
            }
        }
    }
}

/// Tasks that serve the replica while it runs: the HTTP server, the database watch, the
/// metrics upkeep. They run until the consumer has stopped (so that `/readyz` says 503 through
/// the drain), then stop together and are awaited.
struct Background {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    fn push(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    async fn stop(self) {
        self.stop.cancel();
        let stopped = tokio::time::timeout(BACKGROUND_STOP, async {
            for task in self.tasks {
                let _ = task.await;
            }
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("background tasks did not stop within {BACKGROUND_STOP:?}");
        }
    }
}

async fn run(
    settings: Settings,
    args: &RunArgs,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    metrics: PrometheusHandle,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut background = Background {
        tasks: vec![crate::metrics::spawn_upkeep(metrics.clone(), stop.clone())],
        stop,
    };
    let outcome = replica(settings, args, shutdown, stats, metrics, &mut background).await;
    background.stop().await;
    outcome
}

fn log_start(settings: &Settings) {
    tracing::info!(
        event = crate::logs::REPLICA_STARTING,
        version = env!("CARGO_PKG_VERSION"),
        schema = store::migrate::newest_known(),
        database = %describe_database(&settings.database.url),
        brokers = %settings.kafka.brokers,
        "starting replica"
    );
}

async fn replica(
    settings: Settings,
    args: &RunArgs,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    metrics: PrometheusHandle,
    background: &mut Background,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::new(settings.liveness_window()));
    serve_http(&settings, &health, metrics, background).await?;
    log_start(&settings);
    // A signal during start-up stops it there: nothing is joined yet, and a migration cut
    // short is rolled back with its connection.
    let budget = tokio::select! {
        prepared = prepare_database(&settings, args, &health) => prepared?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    let lock_holders = Arc::new(tokio::sync::Semaphore::new(budget.holders));
    health.database_reachable(None);
    let pool = store::pool(&settings.database).await?;
    let (standing_tx, standing_rx) = mpsc::unbounded_channel();
    background.push(tokio::spawn(crate::kafka::standing::probe_until(
        settings.database.clone(),
        pool.clone(),
        stats.clone(),
        health.clone(),
        standing_tx,
        background.stop.clone(),
    )));
    let horizon = check_horizon(&settings);
    let replies_queued = Arc::new(tokio::sync::Notify::new());
    start_upkeep(
        &settings,
        &pool,
        (&lock_holders, &budget),
        &replies_queued,
        background,
    )?;

    let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
    let (halts_tx, halts_rx) = mpsc::unbounded_channel();
    let source = source(&settings, &budget);
    let (rewinds_tx, rewinds_rx) = mpsc::unbounded_channel();
    background.push(tokio::spawn(crate::kafka::rewinds::watch_until(
        pool.clone(),
        source.clone(),
        rewinds_tx,
        background.stop.clone(),
    )));
    let combiner = start_combiner(&settings, (&pool, &source), args, &lock_holders, background);
    let ctx = WorkerContext {
        source,
        owner: crate::config::kafka::client_id(),
        pool,
        batch_max_events: settings.processing.batch_max_events,
        lock_holders,
        linger: Duration::from_millis(settings.processing.batch_linger_ms),
        backoff_max: Duration::from_millis(settings.processing.retry_backoff_max_ms),
        retry_deadline: Duration::from_millis(settings.processing.retry_deadline_ms),
        offsets: Arc::new(OffsetTracker::default()),
        stats,
        guards: guards(args),
        fatal: fatal_tx,
        dead_letter_limit: DeadLetterLimit::new(
            settings.processing.dead_letter_max_share,
            settings.processing.dead_letter_window,
        ),
        halts: halts_tx,
        replies_queued,
        combiner,
    };
    let stop_limit = settings.drain_timeout() + STOP_MARGIN;
    let signals = Signals {
        halts: halts_rx,
        rewinds: rewinds_rx,
        standing: standing_rx,
    };
    let polled_rx = start_polling(settings, ctx, signals, health, shutdown.clone())?;
    let stopping = Stopping {
        shutdown,
        fatal_rx,
        horizon,
        polled_rx,
        stop_limit,
    };
    stopping.wait().await
}

/// `/livez`, `/readyz` and `/metrics`, from before the start-up on.
async fn serve_http(
    settings: &Settings,
    health: &Arc<Health>,
    metrics: PrometheusHandle,
    background: &mut Background,
) -> anyhow::Result<()> {
    let addr: SocketAddr = settings.http.addr.parse().context("http.addr")?;
    let (bound, server) =
        crate::http::serve(addr, health.clone(), metrics, background.stop.clone())
            .await
            .with_context(|| format!("serving HTTP on {addr}"))?;
    background.push(server);
    tracing::info!(
        event = crate::logs::HTTP_LISTENING,
        addr = %bound,
        "HTTP endpoints listening (/livez, /readyz, /metrics)"
    );
    Ok(())
}

/// Beside the start-up, not before it: a broker that cannot answer (the embedded one knows no
/// DescribeConfigs) takes the whole request timeout to say so. A refusal stops the replica
/// like a fatal failure, with exit 2.
fn check_horizon(settings: &Settings) -> JoinHandle<Result<bool, ConfigError>> {
    let (config, topic) = (
        settings.kafka.producer_config(),
        settings.kafka.topic.clone(),
    );
    let horizon_s = settings.history.dedupe_horizon_s;
    tokio::spawn(async move { crate::kafka::horizon::verify(&config, &topic, horizon_s).await })
}

/// The work beside the batches: the expiry of reservations (one of the lock-holding
/// transactions, within the lock budget), history maintenance (its first pass now: a new
/// period starts on time even after a long stop) and the relay of replies.
fn start_upkeep(
    settings: &Settings,
    pool: &store::Pool,
    (lock_holders, budget): (
        &Arc<tokio::sync::Semaphore>,
        &store::lock_budget::LockBudget,
    ),
    replies_queued: &Arc<tokio::sync::Notify>,
    background: &mut Background,
) -> anyhow::Result<()> {
    background.push(tokio::spawn(store::expiry::sweep_until(
        pool.clone(),
        settings.kafka.topic.clone(),
        Duration::from_millis(settings.reservations.sweep_interval_ms),
        lock_holders.clone(),
        budget.locks_per_batch,
        replies_queued.clone(),
        background.stop.clone(),
    )));
    tracing::info!(history = %store::retention::describe(&settings.history), "history retention");
    background.push(tokio::spawn(store::retention::maintain_until(
        pool.clone(),
        settings.history.clone(),
        background.stop.clone(),
    )));
    let relay_config = crate::kafka::relay::producer_config(settings);
    let replies: rdkafka::producer::FutureProducer = relay_config
        .create()
        .context("creating the reply producer")?;
    // On a thread of its own: a replica stopped at once does not wait for its answer.
    let (probe, topic) = (replies.clone(), settings.kafka.results_topic.clone());
    std::thread::spawn(move || crate::kafka::relay::check_topic(&probe, &topic));
    background.push(tokio::spawn(crate::kafka::relay::relay_until(
        pool.clone(),
        relay_config,
        replies,
        settings.kafka.results_topic.clone(),
        replies_queued.clone(),
        background.stop.clone(),
    )));
    Ok(())
}

/// The combiner of this replica's transactions, when `processing.combine_partitions` is on
/// (and batches hold more than one event). It runs until the workers have ended.
fn start_combiner(
    settings: &Settings,
    (pool, source): (&store::Pool, &store::Source),
    args: &RunArgs,
    lock_holders: &Arc<tokio::sync::Semaphore>,
    background: &mut Background,
) -> Option<Combiner> {
    let processing = &settings.processing;
    if !processing.combine_partitions || processing.batch_max_events < 2 {
        return None;
    }
    let combiner = Combiner::default();
    let applier = Applier {
        pool: pool.clone(),
        source: source.clone(),
        guards: guards(args),
        caps: Caps::of(processing.batch_max_events, source.max_locks),
        lock_timeout: Duration::from_millis(settings.database.lock_timeout_ms),
        gather: Duration::from_micros(processing.combine_gather_us),
    };
    background.push(tokio::spawn(combiner.clone().run(
        applier,
        lock_holders.clone(),
        background.stop.clone(),
    )));
    Some(combiner)
}

/// Where this replica's batches come from and the rules they keep.
fn source(settings: &Settings, budget: &store::lock_budget::LockBudget) -> store::Source {
    store::Source {
        group: settings.kafka.group_id.clone(),
        topic: settings.kafka.topic.clone(),
        reservation_ttl: settings.reservations.default_ttl(),
        reservation_max_ttl: settings.reservations.max_ttl(),
        max_locks: budget.locks_per_batch,
        reply_all: settings.results.all_events,
    }
}

/// The consumer on a thread of its own (see [`consume`]); its outcome arrives on the channel.
fn start_polling(
    settings: Settings,
    ctx: WorkerContext,
    signals: Signals,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<oneshot::Receiver<Result<(), rdkafka::error::KafkaError>>> {
    let runtime = tokio::runtime::Handle::current();
    let (polled_tx, polled_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || {
            let polled = consume(&settings, ctx, signals, health, runtime, shutdown);
            let _ = polled_tx.send(polled);
        })
        .context("starting the poll thread")?;
    Ok(polled_rx)
}

/// What ends a running replica: a signal, a fatal failure, or the horizon check's refusal.
struct Stopping {
    shutdown: CancellationToken,
    fatal_rx: mpsc::UnboundedReceiver<Failure>,
    horizon: JoinHandle<Result<bool, ConfigError>>,
    polled_rx: oneshot::Receiver<Result<(), rdkafka::error::KafkaError>>,
    stop_limit: Duration,
}

impl Stopping {
    /// Waits for the first of them, stops the consumer, and says how the replica ended.
    async fn wait(mut self) -> anyhow::Result<()> {
        let (fatal, refused) = tokio::select! {
            _ = self.shutdown.cancelled() => (None, None),
            f = self.fatal_rx.recv() => (f, None),
            Ok(Err(refused)) = &mut self.horizon => (None, Some(refused)),
        };
        if fatal.is_some() || refused.is_some() {
            self.shutdown.cancel();
        }
        // Bounded: a librdkafka close that hangs (a group stuck in a rebalance) must not keep
        // a replica from exiting.
        let stop_limit = self.stop_limit;
        let polled = match tokio::time::timeout(stop_limit, self.polled_rx).await {
            Ok(Ok(polled)) => Some(polled),
            Ok(Err(_)) => anyhow::bail!("the poll thread panicked"),
            Err(_) => {
                tracing::warn!(
                    limit_ms = stop_limit.as_millis() as u64,
                    "the consumer did not finish leaving the group in time; exiting without it \
                     (applied work and its offsets are in the database)"
                );
                None
            }
        };
        if let Some(refused) = refused {
            return Err(refused.into());
        }
        // A worker may have failed fatally while draining: that must not end in exit 0.
        let fatal = fatal.or_else(|| self.fatal_rx.try_recv().ok());
        match (fatal, polled) {
            (Some(f), _) => Err(f.into()),
            (None, Some(Err(e))) => Err(anyhow::Error::new(e).context("consuming")),
            (None, _) => {
                tracing::info!(event = crate::logs::REPLICA_STOPPED, "replica stopped");
                Ok(())
            }
        }
    }
}

/// Always [`store::Guards::On`], except in a benchmark build asked for its unsafe baseline.
fn guards(args: &RunArgs) -> store::Guards {
    #[cfg(feature = "benchmark-baseline")]
    if args.unguarded_benchmark_baseline {
        tracing::warn!(
            "UNSAFE: advisory locks and duplicate detection are off (benchmark baseline)"
        );
        return store::Guards::Off;
    }
    let _ = args;
    store::Guards::On
}
