//! The database-only runs: the replicas' batch transaction driven directly, no Kafka, on an
//! empty database or on a copy of the history (the steady state).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::report::{Cpu, Measured, StatementTime, report, statement_profile};
use super::{BATCH, Bench, step, verify};
use crate::workload::{Expectation, Generator, Oracle, WorkloadSpec};
use inventory_consumer::config::Settings;
use inventory_consumer::domain::batch::MAX_LOCKS_PER_BATCH;
use inventory_consumer::domain::{Batch, Delivery, MAX_LINES_PER_BATCH, lock_key};
use inventory_consumer::store::{self, Guards, Source, apply_batch};

impl Bench {
    /// The replicas' transaction driven directly: the workload cut into the batches a worker
    /// would make, partition by partition, each partition applying its batches in order, all
    /// partitions at once through one pool, `batch` deliveries to a transaction (a full
    /// worker batch is [`BATCH`]). Best of 2, 4 and 8 connections. With `history`, on a copy of
    /// the history's database (the steady state).
    pub(super) fn database_only(
        &mut self,
        events: u64,
        partitions: i32,
        batch: usize,
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
            None if batch == BATCH => "database only".to_owned(),
            None => format!("database only, batches of {batch}"),
        };
        let mut best: Option<Measured> = None;
        for connections in [2, 4, 8] {
            let url = self.fresh_database_from(template.as_deref())?;
            let spec = self.spec(events, 0.0);
            step(&format!(
                "{label}, {connections} connections: {events} events"
            ));
            let (batches, expected) = cut_into_batches(spec, partitions, batch);
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

/// The workload as the batches partition workers would cut (of `batch` deliveries), per
/// partition, and its oracle.
fn cut_into_batches(
    spec: WorkloadSpec,
    partitions: i32,
    batch: usize,
) -> (Vec<Vec<Batch>>, Expectation) {
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
        if open[p].is_full(batch, MAX_LINES_PER_BATCH) {
            done[p].push(std::mem::take(&mut open[p]));
        }
        open[p].push(Delivery {
            partition: p as i32,
            offset: next_offset[p],
            key: message.key.map(String::into_bytes),
            payload: Some(message.value),
            timestamp_ms: None,
            trace: None,
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
