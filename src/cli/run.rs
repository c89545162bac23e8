//! `run`: one consumer replica. Migrates (unless told not to), then consumes until SIGTERM or
//! SIGINT (drain, commit, leave the group, exit 0) or a fatal failure (exit 3). A second signal
//! exits at once. On exit it prints its counters as one JSON line on stdout.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::{EXIT_RUNTIME, runtime};
use crate::config::{Settings, describe_database};
use crate::domain::DeadLetterLimit;
use crate::http::Health;
use crate::kafka::consumer::consume;
use crate::kafka::offsets::OffsetTracker;
use crate::stats::Stats;
use crate::store;
use crate::worker::WorkerContext;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Do not apply migrations at start-up (when a separate job applies them).
    #[arg(long)]
    pub no_migrate: bool,
    /// Benchmark only: skip advisory locks and the duplicate lookup (unsafe baseline).
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
    println!("{}", serde_json::to_string(&stats.snapshot())?);
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "replica stopped on a fatal failure"
            );
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(EXIT_RUNTIME))
        }
    }
}

/// Keeps `/readyz` honest about the database while the replica runs, busy or idle.
async fn watch_database(pool: store::Pool, health: Arc<Health>) {
    const EVERY: Duration = Duration::from_secs(5);
    loop {
        tokio::time::sleep(EVERY).await;
        let reached = match pool.get().await {
            Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        health.database_reachable(reached);
    }
}

async fn run(
    settings: Settings,
    args: &RunArgs,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    metrics: PrometheusHandle,
) -> anyhow::Result<()> {
    let db = &settings.database;
    let health = Arc::new(Health::default());
    // The server outlives the drain (so /readyz can say 503) and stops with the process.
    let addr: SocketAddr = settings.http.addr.parse().context("http.addr")?;
    crate::metrics::spawn_upkeep(metrics.clone());
    let bound = crate::http::serve(addr, health.clone(), metrics, CancellationToken::new())
        .await
        .with_context(|| format!("serving HTTP on {addr}"))?;
    tracing::info!(addr = %bound, "HTTP endpoints listening (/livez, /readyz, /metrics)");
    tracing::info!(database = %describe_database(&db.url), brokers = %settings.kafka.brokers, "starting replica");
    if db.migrate && !args.no_migrate {
        store::migrate::migrate(&db.url)
            .await
            .context("applying migrations")?;
    }
    // Fail fast, with the database's own words, on a database we cannot reach at all, before
    // joining the group (the pool only reports that it timed out).
    drop(
        store::connect(&db.url)
            .await
            .context("connecting to the database")?,
    );
    health.database_reachable(true);
    let pool = store::pool(db).await?;
    tokio::spawn(watch_database(pool.clone(), health.clone()));

    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let (halts_tx, halts_rx) = mpsc::unbounded_channel();
    let ctx = WorkerContext {
        source: store::Source {
            group: settings.kafka.group_id.clone(),
            topic: settings.kafka.topic.clone(),
        },
        owner: crate::kafka::client::client_id(),
        pool,
        batch_max_events: settings.processing.batch_max_events,
        linger: Duration::from_millis(settings.processing.batch_linger_ms),
        backoff_max: Duration::from_millis(settings.processing.retry_backoff_max_ms),
        retry_deadline: Duration::from_millis(settings.processing.retry_deadline_ms),
        offsets: Arc::new(OffsetTracker::default()),
        stats,
        guards: if args.unguarded_benchmark_baseline {
            tracing::warn!(
                "UNSAFE: advisory locks and duplicate detection are off (benchmark baseline)"
            );
            store::Guards::Off
        } else {
            store::Guards::On
        },
        fatal: fatal_tx,
        dead_letter_limit: DeadLetterLimit::new(
            settings.processing.dead_letter_max_share,
            settings.processing.dead_letter_window,
        ),
        halts: halts_tx,
    };
    let runtime = tokio::runtime::Handle::current();
    let drain_timeout = settings.drain_timeout();
    let poll_shutdown = shutdown.clone();
    let poller = std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || consume(&settings, ctx, halts_rx, health, runtime, poll_shutdown))
        .context("starting the poll thread")?;

    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        f = fatal_rx.recv() => f,
    };
    if fatal.is_some() {
        shutdown.cancel();
    }
    // Bounded: a librdkafka close that hangs must not keep a replica from exiting.
    let stop_limit = drain_timeout + Duration::from_secs(30);
    let polled = tokio::time::timeout(
        stop_limit,
        tokio::task::spawn_blocking(move || poller.join()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the consumer did not stop within {stop_limit:?}"))?
    .context("waiting for the poll thread")?;
    // A worker may have failed fatally while draining: that must not end in exit 0.
    let fatal = fatal.or_else(|| fatal_rx.try_recv().ok());
    match (fatal, polled) {
        (Some(f), _) => Err(f.into()),
        (None, Ok(Ok(()))) => {
            tracing::info!("replica stopped");
            Ok(())
        }
        (None, Ok(Err(e))) => Err(anyhow::Error::new(e).context("consuming")),
        (None, Err(_)) => anyhow::bail!("the poll thread panicked"),
    }
}
