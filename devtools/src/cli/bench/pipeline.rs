//! The pipeline runs: which there are, starting their broker and replicas, producing the
//! workload, and timing it to the last commit, with the latency read off the replicas.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::report::{Latency, Measured, StatementTime, report, statement_profile};
use super::trace_sink::TraceSink;
use super::{BATCH, Bench, BenchArgs, small_run_events, step, verify};
use crate::cli::produce::deliver;
use crate::embedded::local_kafka::{BrokerKind, LocalKafka};
use crate::embedded::replica::{ReplicaProcess, local_env};
use crate::embedded::wait::wait_until;
use crate::producer::EventProducer;
use crate::workload::{Generator, Message, Oracle};
use inventory_consumer::config::Settings;
use inventory_consumer::store::{self, Guards};

/// Partitions of the memory run: the mock broker keeps about 5 MiB per partition, and a
/// backlog must not outgrow that before it is read.
const BACKLOG_PARTITIONS: i32 = 64;
/// What the embedded broker keeps of a partition (about 5 MiB, librdkafka's mock), with a
/// margin, and about the size of one of the workload's messages.
const EMBEDDED_KEEPS: u64 = 4 << 20;
const MESSAGE_BYTES: u64 = 160;
/// Events of the hot-SKU run at most (see there).
const HOT_EVENTS: u64 = 60_000;
/// `fetch.wait.max.ms` of consumers of the embedded broker. It answers a fetch with no data
/// waiting only after the full wait (500 ms by default), even when data arrives meanwhile
/// (Kafka answers at once): shortened so that latency measures the pipeline, not the mock.
/// Consumers of Apache Kafka keep the default, as users run them.
pub(super) const EMBEDDED_FETCH_WAIT_MS: &str = "20";
const SETTLE_TIMEOUT: Duration = Duration::from_secs(900);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One pipeline run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pipeline {
    pub(super) replicas: usize,
    batch: usize,
    guards: Guards,
    hot_share: f64,
    /// Events (requests, in a saga run) produced.
    pub(super) events: u64,
    pub(super) partitions: i32,
    /// Events per second produced while the replicas run; 0: as fast as possible (a backlog).
    pub(super) rate: u64,
    pub(super) broker: BrokerKind,
    /// Orders placed by a client instead of the workload (see `super::saga`).
    saga: bool,
    /// Events with a `traceparent` each, and the replicas' traces sampled at this percentage
    /// (0: off) to bench's own OTLP receiver ([`super::trace_sink`]).
    pub(super) traces: Option<u32>,
    /// Seconds of a rate run produced before its latency is measured (0: its first fifth).
    warmup: u64,
}

/// A pipeline run: its key (for `--only`), its name in the report, and what it runs.
pub(super) type Run = (&'static str, String, Pipeline);

impl Pipeline {
    /// This run (3 replicas) producing `rate` events per second for `seconds`.
    pub(super) fn at_rate(self, rate: u64, seconds: u64) -> Pipeline {
        Pipeline {
            events: rate * seconds,
            rate,
            ..self
        }
    }

    /// This run at a rate, its first `seconds` at that rate not measured (and added).
    fn warmed_for(self, seconds: u64) -> Pipeline {
        Pipeline {
            events: self.events + self.rate * seconds,
            warmup: seconds,
            ..self
        }
    }

    /// How long a rate run produces before its latency is measured: without the producer's and
    /// the consumers' first fetches (at most a few hundred ms), and on Apache Kafka without a
    /// freshly started broker's JIT compilation.
    pub(super) fn warmup(&self) -> Duration {
        if self.warmup > 0 {
            Duration::from_secs(self.warmup)
        } else {
            Duration::from_secs_f64(self.events as f64 / self.rate.max(1) as f64 / 5.0)
        }
    }

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
            saga: false,
            traces: None,
            warmup: 0,
        }
    }
}

/// Every pipeline run, each a variation of the reference run (the Apache Kafka ones with
/// `--apache` only).
pub(super) fn pipeline_runs(args: &BenchArgs) -> Vec<Run> {
    let batched = Pipeline::batched(args);
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
                events: small_run_events(args),
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
    // The paced runs after the hot SKU's, the traces runs after the 3-replica one.
    runs.splice(5..5, paced_runs(batched, args));
    runs.splice(2..2, traces_runs(batched));
    if args.apache {
        runs.extend(apache_runs(batched, args));
    }
    runs
}

/// The runs at a set rate, 3 replicas: latency at `--latency-rate` and at half the 3-replica
/// rate, and the order service's saga.
fn paced_runs(batched: Pipeline, args: &BenchArgs) -> [Run; 3] {
    let rate = args.latency_rate;
    [
        (
            "latency",
            format!("latency at {rate} events/s, 3 replicas"),
            Pipeline {
                replicas: 3,
                ..batched
            }
            .at_rate(rate, args.latency_seconds),
        ),
        (
            // Its rate is set when it runs: half of what `three` measured.
            "latency-half",
            String::new(),
            Pipeline {
                replicas: 3,
                ..batched
            },
        ),
        (
            "saga",
            format!(
                "saga at {} requests/s (reserve, then commit), 3 replicas",
                args.saga_rate
            ),
            saga(batched, args),
        ),
    ]
}

/// The 3-replica run on events that each carry a `traceparent`: traces off, and sampled at
/// 10% and 100% to bench's own receiver; reported after the 3-replica run.
fn traces_runs(batched: Pipeline) -> [Run; 3] {
    let traced = |percent| Pipeline {
        replicas: 3,
        traces: Some(percent),
        ..batched
    };
    [
        (
            "traces-off",
            "3 replicas, traced events, traces off".to_owned(),
            traced(0),
        ),
        (
            "traces-10",
            "3 replicas, traced events, traces at 10%".to_owned(),
            traced(10),
        ),
        (
            "traces-100",
            "3 replicas, traced events, traces at 100%".to_owned(),
            traced(100),
        ),
    ]
}

/// The 1- and 3-replica pipelines again, on Apache Kafka, and the latency run: the embedded
/// broker's fetch waits out its whole `fetch.wait.max.ms` when no data is there (see
/// [`Bench::start_replica`]), Kafka's answers as data arrives.
fn apache_runs(batched: Pipeline, args: &BenchArgs) -> [Run; 4] {
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
        (
            "latency-apache",
            format!(
                "latency at {} events/s, 3 replicas {on_apache}",
                args.latency_rate
            ),
            Pipeline {
                replicas: 3,
                ..apache
            }
            .at_rate(args.latency_rate, args.latency_seconds)
            .warmed_for(args.apache_warmup),
        ),
        (
            "saga-apache",
            format!(
                "saga at {} requests/s, 3 replicas {on_apache}",
                args.saga_rate
            ),
            Pipeline {
                broker: BrokerKind::Apache,
                ..saga(batched, args)
            }
            .warmed_for(args.apache_warmup),
        ),
    ]
}

/// The saga run: 3 replicas answering an order service's requests at `--saga-rate`.
fn saga(batched: Pipeline, args: &BenchArgs) -> Pipeline {
    Pipeline {
        replicas: 3,
        saga: true,
        ..batched
    }
    .at_rate(args.saga_rate, args.latency_seconds)
}

/// The embedded broker deletes a partition's oldest messages past about 5 MiB, read or not:
/// a backlog larger than that would lose messages before a replica reads them (the replica
/// logs the offset reset and the audit fails). Refused up front, with what to do instead.
pub(super) fn check_embedded_retention(args: &BenchArgs, runs: &[Run]) -> anyhow::Result<()> {
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

impl Bench {
    pub(super) fn pipeline(&mut self, name: &str, p: Pipeline) -> anyhow::Result<Measured> {
        if p.saga {
            return self.saga(name, p);
        }
        step(&format!("{name}: {} events", p.events));
        let RunSetup {
            url,
            broker,
            settings,
            mut replicas,
        } = self.set_up(p)?;
        let spec = self.spec(p.events, p.hot_share);
        let stats = self.rt.block_on(self.statement_stats());
        // The workload and its expectation are made, and the producer connected, before the
        // clock starts: they are the harness's work, on the same cores as the pipeline.
        let messages: Vec<Message> = Generator::new(spec).collect();
        let expected = Oracle::over(&messages);
        let producer = EventProducer::new(&settings)
            .context("creating the producer")?
            .traced(p.traces.is_some());
        // The clock starts with production: at full speed for a backlog run (the producer
        // outpaces the pipeline, so the backlog builds up at once), at `rate` otherwise.
        let before = self.cpu_reading(&replicas);
        let producer = {
            let (events, rate) = (messages.len() as u64, p.rate);
            std::thread::spawn(move || deliver(producer, messages.into_iter(), events, rate, false))
        };
        let warm = (p.rate > 0).then(|| Histograms::after_warmup(&replicas, p));
        let (seconds, timed) = self.rt.block_on(time_to_settle(&url, p.events as i64))?;
        let cpu = before.per_event(&self.cpu_reading(&replicas), timed);
        // In a backlog run latency is mostly time spent waiting in the backlog: not reported.
        let latency = match warm.map(std::thread::JoinHandle::join) {
            Some(Ok((Some(warm), addrs))) => {
                Histograms::read(&addrs).and_then(|end| end.since(&warm).latency())
            }
            _ => None,
        };
        let profile = self.profile(stats.as_ref(), &url);
        let peak_rss = replicas.iter().filter_map(|r| r.peak_rss_bytes()).max();
        stop_all(&mut replicas)?;
        if let (Some(percent), Some(sink)) = (p.traces, &self.trace_sink)
            && percent > 0
        {
            step(&format!("{name}: {}", sink.received()));
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

    /// A run's fresh database, its broker, the settings that name both, and its replicas once
    /// they share the partitions.
    pub(super) fn set_up(&mut self, p: Pipeline) -> anyhow::Result<RunSetup> {
        if p.traces.is_some_and(|percent| percent > 0) && self.trace_sink.is_none() {
            self.trace_sink = Some(TraceSink::start(&self.rt)?);
        }
        let url = self.fresh_database()?;
        let broker = LocalKafka::start(p.broker, p.partitions)?;
        let mut settings = Settings::default();
        settings.kafka.brokers = broker.bootstrap_servers().to_owned();
        settings.database.url = url.clone();
        let replicas = self.start_group(&settings, p)?;
        Ok(RunSetup {
            url,
            broker,
            settings,
            replicas,
        })
    }

    /// The run's server time by statement, when `stats` (bench's own server) is there.
    pub(super) fn profile(
        &self,
        stats: Option<&tokio_postgres::Client>,
        url: &str,
    ) -> Vec<StatementTime> {
        stats.map_or_else(Vec::new, |admin| {
            self.rt
                .block_on(statement_profile(admin, url))
                .unwrap_or_default()
        })
    }

    /// The run's replicas, once they share the partitions: every partition owned, every
    /// replica with its share. Joining is not what is measured (and latency counts from
    /// production).
    pub(super) fn start_group(
        &self,
        settings: &Settings,
        p: Pipeline,
    ) -> anyhow::Result<Vec<ReplicaProcess>> {
        let replicas = (0..p.replicas)
            .map(|i| self.start_replica(&format!("run{}-r{}", self.runs, i + 1), settings, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
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
        Ok(replicas)
    }

    fn start_replica(
        &self,
        name: &str,
        settings: &Settings,
        p: Pipeline,
    ) -> anyhow::Result<ReplicaProcess> {
        let mut env = local_env(&settings.kafka.brokers, &settings.database.url);
        env.push(("INVENTORY_KAFKA__GROUP_PROTOCOL", "consumer".to_owned()));
        if p.broker == BrokerKind::Embedded {
            env.push((
                "INVENTORY_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS",
                EMBEDDED_FETCH_WAIT_MS.to_owned(),
            ));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let batch = p.batch.to_string();
        let flags: &[&str] = match p.guards {
            Guards::On => &[],
            Guards::Off => &["--unguarded-benchmark-baseline"],
        };
        let mut settings = vec![
            ("processing.batch_max_events", batch.as_str()),
            ("database.migrate", "false"),
        ];
        let (endpoint, ratio);
        if let (Some(percent), Some(sink)) = (p.traces, &self.trace_sink)
            && percent > 0
        {
            (endpoint, ratio) = (sink.url.clone(), (f64::from(percent) / 100.0).to_string());
            settings.extend([
                ("traces.endpoint", endpoint.as_str()),
                ("traces.sampler", "traceidratio"),
                ("traces.sampler_arg", ratio.as_str()),
            ]);
        }
        settings.extend(
            self.replica_settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        ReplicaProcess::spawn_with_flags(&self.service, name, &self.logs, &env, &settings, flags)
    }
}

/// What [`Bench::set_up`] makes for a run.
pub(super) struct RunSetup {
    pub(super) url: String,
    pub(super) broker: LocalKafka,
    pub(super) settings: Settings,
    pub(super) replicas: Vec<ReplicaProcess>,
}

/// Stops the run's replicas (SIGTERM); each must exit 0.
pub(super) fn stop_all(replicas: &mut [ReplicaProcess]) -> anyhow::Result<()> {
    for r in replicas {
        let (status, _) = r.terminate(STOP_TIMEOUT)?;
        if !status.success() {
            bail!("{} exited with {status}; log: {}", r.name, r.log.display());
        }
    }
    Ok(())
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

/// The replicas' histograms of the metrics a latency run reports, read at one moment.
#[derive(Debug, Default)]
pub(super) struct Histograms {
    latency: Cumulative,
    batch_size: Cumulative,
    apply: Cumulative,
    /// Partitions per combined transaction (`processing.combine_partitions`; empty when off).
    partitions: Cumulative,
}

/// A histogram's cumulative counts by upper bound, added up over the replicas.
type Cumulative = Vec<(f64, f64)>;

impl Histograms {
    /// A reading taken once a rate run is warm ([`Pipeline::warmup`]), on a thread of its own,
    /// and the addresses read: latency is read over the run's steady part.
    pub(super) fn after_warmup(
        replicas: &[ReplicaProcess],
        p: Pipeline,
    ) -> std::thread::JoinHandle<(Option<Histograms>, Vec<String>)> {
        let addrs: Vec<String> = replicas.iter().filter_map(|r| r.http_addr()).collect();
        let warmup = p.warmup();
        std::thread::spawn(move || {
            std::thread::sleep(warmup);
            (Histograms::read(&addrs), addrs)
        })
    }

    /// Reads the replicas listening at `addrs` (their `/metrics`).
    pub(super) fn read(addrs: &[String]) -> Option<Histograms> {
        use inventory_consumer::metrics::{
            APPLY_SECONDS, BATCH_SIZE, LATENCY_SECONDS, TRANSACTION_PARTITIONS,
        };
        let mut all = Histograms::default();
        for addr in addrs {
            let text = ureq::get(format!("http://{addr}/metrics"))
                .call()
                .ok()?
                .body_mut()
                .read_to_string()
                .ok()?;
            let lines = text.lines().map(|l| Ok(l.to_owned()));
            let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
            for sample in scrape.samples {
                let into = match sample.metric.as_str() {
                    m if m == LATENCY_SECONDS => &mut all.latency,
                    m if m == BATCH_SIZE => &mut all.batch_size,
                    m if m == APPLY_SECONDS => &mut all.apply,
                    m if m == TRANSACTION_PARTITIONS => &mut all.partitions,
                    _ => continue,
                };
                if let prometheus_parse::Value::Histogram(buckets) = sample.value {
                    for b in buckets {
                        match into.iter_mut().find(|(le, _)| *le == b.less_than) {
                            Some((_, count)) => *count += b.count,
                            None => into.push((b.less_than, b.count)),
                        }
                    }
                }
            }
        }
        for h in [
            &mut all.latency,
            &mut all.batch_size,
            &mut all.apply,
            &mut all.partitions,
        ] {
            h.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Some(all)
    }

    /// What was recorded after `earlier`, a reading of the same replicas.
    pub(super) fn since(&self, earlier: &Histograms) -> Histograms {
        let minus = |now: &Cumulative, then: &Cumulative| -> Cumulative {
            now.iter()
                .map(|&(le, count)| {
                    let before = then.iter().find(|(l, _)| *l == le).map_or(0.0, |b| b.1);
                    (le, count - before)
                })
                .collect()
        };
        Histograms {
            latency: minus(&self.latency, &earlier.latency),
            batch_size: minus(&self.batch_size, &earlier.batch_size),
            apply: minus(&self.apply, &earlier.apply),
            partitions: minus(&self.partitions, &earlier.partitions),
        }
    }

    /// p50, p99 and p99.9 of produce-to-commit latency, linear within a bucket as Prometheus'
    /// `histogram_quantile` is. Also says where a batch's time goes: its size and its
    /// transaction's duration, at their medians.
    pub(super) fn latency(&self) -> Option<Latency> {
        if let (Some(size), Some(apply), Some(apply_p99)) = (
            quantile(&self.batch_size, 0.5),
            quantile(&self.apply, 0.5),
            quantile(&self.apply, 0.99),
        ) {
            step(&format!(
                "batches: median size {size:.0}, transaction p50 {:.1} ms, p99 {:.1} ms",
                apply * 1e3,
                apply_p99 * 1e3
            ));
        }
        if let (Some(p50), Some(p99)) = (
            quantile(&self.partitions, 0.5),
            quantile(&self.partitions, 0.99),
        ) {
            step(&format!(
                "combined transactions: partitions p50 {p50:.1}, p99 {p99:.1}"
            ));
        }
        Some(Latency {
            p50: quantile(&self.latency, 0.5)?,
            p99: quantile(&self.latency, 0.99)?,
            p999: quantile(&self.latency, 0.999)?,
        })
    }
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
