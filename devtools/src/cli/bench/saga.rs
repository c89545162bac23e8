//! The saga run: the replies as an order service sees them. A client of bench's own, as an
//! order service would be, sends each order's reserve at a steady rate and its commit as soon
//! as the reserve's reply arrives, and reads the replies off the results topic as they come.
//! Latency runs from sending a request to reading its reply, on the client's clock: the
//! client's producer, the broker twice, the replicas' batch and their relay are all in it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::pipeline::{EMBEDDED_FETCH_WAIT_MS, Histograms, Pipeline, RunSetup, stop_all};
use super::report::{Latency, Measured, report};
use super::{Bench, step, verify};
use crate::embedded::local_kafka::BrokerKind;
use crate::embedded::wait::wait_until;
use crate::producer::EventProducer;
use crate::workload::{Message, Oracle};
use inventory_consumer::config::Settings;
use inventory_consumer::store;

/// Units each SKU is restocked with before the orders: every reserve fits.
const STOCK: i64 = 1_000_000;
/// How long after the last reserve the client waits for the replies still missing.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

impl Bench {
    /// `p.rate` requests per second (half of them reserves, paced; half commits, each sent on
    /// its reserve's reply) for `p.events` requests, against `p.replicas` replicas.
    pub(super) fn saga(&mut self, name: &str, p: Pipeline) -> anyhow::Result<Measured> {
        step(&format!("{name}: {} requests", p.events));
        let RunSetup {
            url,
            broker,
            settings,
            mut replicas,
        } = self.set_up(p)?;

        let producer = Arc::new(EventProducer::new(&settings).context("creating the producer")?);
        let restocks = self.restock(&url, &producer)?;
        let client = Client::connect(&settings, p.broker)?;
        let orders = Orders {
            count: p.events / 2,
            per_second: (p.rate / 2).max(1),
            skus: self.skus,
            prefix: format!("saga{}", self.runs),
        };
        let stats = self.rt.block_on(self.statement_stats());
        let before = self.cpu_reading(&replicas);
        let warm = Histograms::after_warmup(&replicas, p);
        let outcome = client.run(&orders, Arc::clone(&producer), p.warmup())?;
        let cpu = before.per_event(&self.cpu_reading(&replicas), outcome.requests as f64);
        if let Ok((Some(warm), addrs)) = warm.join() {
            report_commit_latency(&warm, &addrs);
        }
        let profile = self.profile(stats.as_ref(), &url);
        Arc::into_inner(producer)
            .context("the producer is still shared")?
            .finish(STOP_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("the order service's requests: {e}"))?;

        stop_all(&mut replicas)?;
        let expected = Oracle::over(restocks.iter().chain(&outcome.sent));
        let verified = self.rt.block_on(verify(&url, &expected))? && outcome.rejected == 0;
        if outcome.rejected > 0 {
            step(&format!(
                "  FAIL {} reserves rejected, with stock for every one",
                outcome.rejected
            ));
        }
        drop(broker);
        self.drop_database(&url);
        let m = Measured {
            name: name.to_owned(),
            events: outcome.requests,
            seconds: outcome.seconds,
            latency: outcome.latency,
            peak_rss: None,
            cpu,
            verified,
            profile,
        };
        report(&m);
        Ok(m)
    }
}

impl Bench {
    /// Restocks every SKU (see [`restocks`]) and waits until the replicas applied it all.
    fn restock(&self, url: &str, producer: &EventProducer) -> anyhow::Result<Vec<Message>> {
        let restocks = restocks(self.skus, self.runs);
        for m in &restocks {
            producer.send(m.key.as_deref().map(str::as_bytes), &m.value)?;
        }
        let skus = restocks.len() as i64;
        self.rt.block_on(async {
            let db = store::connect(url).await?;
            wait_until("the restocks to be applied", STOP_TIMEOUT, || async {
                let done = db
                    .query_one("SELECT count(*) FROM processed_events", &[])
                    .await;
                done.is_ok_and(|row| row.get::<_, i64>(0) >= skus)
            })
            .await
        })?;
        Ok(restocks)
    }
}

/// Where a request's time goes: produce to its batch's commit, read off the replicas (at
/// `addrs`) over the same steady part, since the `warm` reading; the rest is the reply's way
/// out.
fn report_commit_latency(warm: &Histograms, addrs: &[String]) {
    if let Some(commit) = Histograms::read(addrs).and_then(|end| end.since(warm).latency()) {
        step(&format!(
            "  of which request to commit (replicas' histograms): p50 {:.1} ms, p99 {:.1} ms",
            commit.p50 * 1e3,
            commit.p99 * 1e3
        ));
    }
}

/// A restock of [`STOCK`] units for each SKU, keyed by it.
fn restocks(skus: u64, run: u32) -> Vec<Message> {
    (0..skus)
        .map(|i| {
            let sku = format!("SKU-{i:06}");
            let value = serde_json::json!({
                "event_id": format!("saga{run}-restock-{i}"), "type": "restock", "sku": sku,
                "quantity": STOCK, "source": "bench"
            });
            Message {
                key: Some(sku),
                value: value.to_string().into_bytes(),
            }
        })
        .collect()
}

/// The orders the client places: `count` of them, `per_second`, each reserving one unit of a
/// SKU in turn.
struct Orders {
    count: u64,
    per_second: u64,
    skus: u64,
    prefix: String,
}

impl Orders {
    /// Order `i`'s id and its reserve, keyed by the order as the contract asks.
    fn reserve(&self, i: u64) -> (String, Message) {
        let order = format!("{}-{i:08}", self.prefix);
        let value = serde_json::json!({
            "event_id": format!("{order}-r"), "type": "reserve", "order_id": order,
            "sku": format!("SKU-{:06}", i % self.skus.max(1)), "quantity": 1,
            "ttl_seconds": 900, "source": "bench"
        });
        (format!("{order}-r"), keyed(&order, &value))
    }
}

fn commit(order: &str) -> (String, Message) {
    let id = format!("{order}-c");
    let value = serde_json::json!({
        "event_id": id, "type": "commit", "order_id": order, "source": "bench"
    });
    (id, keyed(order, &value))
}

fn keyed(key: &str, value: &serde_json::Value) -> Message {
    Message {
        key: Some(key.to_owned()),
        value: value.to_string().into_bytes(),
    }
}

/// The order service: its consumer of the results topic (its producer is shared).
struct Client {
    consumer: BaseConsumer,
}

/// What the client saw.
struct Outcome {
    /// Requests sent (reserves and commits), in the order sent: the oracle's input.
    sent: Vec<Message>,
    requests: u64,
    /// Reserves refused (none should be: every SKU has stock for all of them).
    rejected: u64,
    /// From the first request to the last reply.
    seconds: f64,
    /// Request to reply, over the requests sent after the run's warm-up.
    latency: Option<Latency>,
}

/// Requests waiting for their reply, by event id: when each was sent.
type Waiting = Mutex<HashMap<String, Instant>>;

impl Client {
    /// A consumer of every partition of the results topic, from its start (the topic is new),
    /// fetching as the replicas do (see [`EMBEDDED_FETCH_WAIT_MS`]). The partitions are the
    /// broker's: the embedded one creates the results topic on first use, with 4.
    fn connect(settings: &Settings, broker: BrokerKind) -> anyhow::Result<Client> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.kafka.brokers)
            .set("group.id", "bench-order-service")
            .set("enable.auto.commit", "false");
        if broker == BrokerKind::Embedded {
            config.set("fetch.wait.max.ms", EMBEDDED_FETCH_WAIT_MS);
        }
        let consumer: BaseConsumer = config
            .create()
            .context("creating the order service's consumer")?;
        let topic = &settings.kafka.results_topic;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .context("reading the results topic's partitions")?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        anyhow::ensure!(
            tpl.count() > 0,
            "the results topic {topic} has no partitions"
        );
        consumer.assign(&tpl)?;
        Ok(Client { consumer })
    }

    /// Places the orders: reserves paced on this thread, replies read (and commits sent) on
    /// another, until every request has its reply. Latency counts the requests sent after
    /// `warmup`.
    fn run(
        self,
        orders: &Orders,
        producer: Arc<EventProducer>,
        warmup: Duration,
    ) -> anyhow::Result<Outcome> {
        let waiting: Arc<Waiting> = Arc::default();
        let placed = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let reader = {
            let (waiting, placed, producer) = (waiting.clone(), placed.clone(), producer.clone());
            std::thread::spawn(move || self.read_replies(&waiting, &placed, &producer))
        };
        let placing = place(orders, &producer, &waiting, start);
        if placing.is_err() {
            // Nothing more will be answered: let the reader stop at once.
            lock(&waiting).clear();
        }
        placed.store(true, Ordering::Release);
        let replies = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reply reader panicked"))?;
        let mut sent = placing?;
        let replies = replies?;
        let warm = start + warmup;
        let mut latencies: Vec<Duration> = replies
            .latencies
            .iter()
            .filter(|(sent, _)| *sent >= warm)
            .map(|(_, took)| *took)
            .collect();
        latencies.sort_unstable();
        sent.extend(replies.commits);
        Ok(Outcome {
            requests: sent.len() as u64,
            sent,
            rejected: replies.rejected,
            seconds: replies.last.duration_since(start).as_secs_f64(),
            latency: percentiles(&latencies),
        })
    }

    /// Reads replies until every reserve is placed and no request waits; sends each applied
    /// reserve's commit. A reply to a request no longer waiting (a second publication: replies
    /// are at least once) is skipped.
    fn read_replies(
        self,
        waiting: &Waiting,
        placed: &AtomicBool,
        producer: &EventProducer,
    ) -> anyhow::Result<Replies> {
        let mut replies = Replies {
            latencies: Vec::new(),
            commits: Vec::new(),
            rejected: 0,
            last: Instant::now(),
        };
        let mut deadline = None;
        loop {
            if placed.load(Ordering::Acquire) {
                let remaining = lock(waiting).len();
                if remaining == 0 {
                    return Ok(replies);
                }
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + REPLY_TIMEOUT);
                if Instant::now() > deadline {
                    bail!("{remaining} requests had no reply within {REPLY_TIMEOUT:?}");
                }
            }
            let Some(message) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = match message {
                Ok(message) => message,
                Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                    return Err(e).context("reading the results topic");
                }
                // librdkafka goes on by itself (a broker away, a lost connection).
                Err(_) => continue,
            };
            let now = Instant::now();
            let reply: serde_json::Value =
                serde_json::from_slice(message.payload().unwrap_or_default())
                    .context("a reply that is not JSON")?;
            let id = reply["event_id"].as_str().unwrap_or_default();
            let Some(sent) = lock(waiting).remove(id) else {
                continue;
            };
            replies.latencies.push((sent, now - sent));
            replies.last = now;
            if reply["type"] == "reserve" {
                if reply["outcome"] != "applied" {
                    replies.rejected += 1;
                    continue;
                }
                let (id, commit) = commit(reply["order_id"].as_str().unwrap_or_default());
                lock(waiting).insert(id, Instant::now());
                producer.send(commit.key.as_deref().map(str::as_bytes), &commit.value)?;
                replies.commits.push(commit);
            }
        }
    }
}

/// Sends the reserves, paced from `start`: each recorded as waiting before it is sent.
fn place(
    orders: &Orders,
    producer: &EventProducer,
    waiting: &Waiting,
    start: Instant,
) -> anyhow::Result<Vec<Message>> {
    let mut sent = Vec::with_capacity(orders.count as usize * 2);
    for i in 0..orders.count {
        let due = start + Duration::from_secs_f64(i as f64 / orders.per_second as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (id, reserve) = orders.reserve(i);
        lock(waiting).insert(id, Instant::now());
        producer.send(reserve.key.as_deref().map(str::as_bytes), &reserve.value)?;
        sent.push(reserve);
    }
    Ok(sent)
}

struct Replies {
    /// When each request was sent, and how long its reply took.
    latencies: Vec<(Instant, Duration)>,
    commits: Vec<Message>,
    rejected: u64,
    last: Instant,
}

fn lock(waiting: &Waiting) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
    match waiting.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// p50, p99 and p99.9 of sorted durations, by nearest rank.
fn percentiles(sorted: &[Duration]) -> Option<Latency> {
    let at = |q: f64| {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64()
    };
    (!sorted.is_empty()).then(|| Latency {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        let l = percentiles(&ms).unwrap_or_else(|| panic!("some"));
        assert_eq!((l.p50, l.p99, l.p999), (0.5, 0.99, 0.999));
        let one = percentiles(&ms[..1]).unwrap_or_else(|| panic!("some"));
        assert_eq!(one.p999, 0.001);
        assert!(percentiles(&[]).is_none());
    }
}
