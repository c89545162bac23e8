//! `produce`: the load generator and replayer. Sends a generated workload (or a JSON-lines
//! file) to the topic, with a progress bar, and writes the [`Expectation`] a correct consumer
//! must reach, computed by the same decoder and rules the consumer uses.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::producer::EventProducer;
use crate::workload::{Expectation, Generator, Message, Oracle, WorkloadSpec};
use inventory_consumer::config::Settings;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Distinct valid events to generate.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// SKU population.
    #[arg(long, default_value_t = 1_000)]
    pub skus: u64,
    /// Zipf exponent of SKU popularity (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Share of events on one hot SKU (SKU-000000).
    #[arg(long, default_value_t = 0.0)]
    pub hot_share: f64,
    /// Share of events re-sent unchanged later (duplicates the consumer must skip).
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Share of bad messages mixed in, all to be dead-lettered: malformed, hostile (overflowing
    /// numbers, deep nesting, SQL in SKUs, 2 MiB values, no key...) and reused event ids.
    #[arg(long, default_value_t = 0.0)]
    pub invalid: f64,
    /// Share of events that start an order (docs/contract.md section 7): a reserve, then its
    /// commit (half of them), its release (a quarter), nothing (a tenth, left reserved), or
    /// an expiry (the rest: a reservation of one second on a SKU of its own). Each order's
    /// events are keyed by its one SKU, so that they keep their order with that SKU's events.
    #[arg(long, default_value_t = 0.0)]
    pub orders: f64,
    /// Random seed (printed when not given, to reproduce a run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of generated event ids (random when not given, so runs do not collide); at most
    /// 64 characters, so that every generated id and order id is valid.
    #[arg(long, value_parser = short_prefix)]
    pub id_prefix: Option<String>,
    /// Messages per second; 0 sends as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Send this JSON-lines file instead (one message per line, keyed by its `sku`; an order's
    /// commit or release by its reserve's).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["events", "skus"])]
    pub file: Option<PathBuf>,
    /// Write the expectation (final stock per SKU, outcome counts) here instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub expected_out: Option<PathBuf>,
    /// Message keys: `sku` keeps each SKU's events in order in one partition (what the
    /// expectation assumes); `random` spreads them over all partitions.
    #[arg(long, value_enum, default_value_t = KeyMode::Sku)]
    pub keys: KeyMode,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyMode {
    Sku,
    Random,
}

pub fn main(settings: &Settings, args: &ProduceArgs) -> anyhow::Result<ExitCode> {
    let expected = match &args.file {
        Some(path) => {
            let messages = read_lines(path)?;
            let total = messages.len() as u64;
            let keyed = messages.into_iter().map(|m| rekey(m, args.keys));
            send(settings, keyed, total, args.rate, !args.quiet)?
        }
        None => {
            let spec = spec_of(args);
            eprintln!("workload seed {} (pass --seed to reproduce)", spec.seed);
            let estimate =
                (spec.events as f64 * (1.0 + spec.duplicate_share + spec.invalid_share)) as u64;
            let keyed = Generator::new(spec).map(|m| rekey(m, args.keys));
            send(settings, keyed, estimate, args.rate, !args.quiet)?
        }
    };
    let summary = serde_json::json!({
        "messages": expected.messages,
        "events": expected.events,
        "duplicates": expected.duplicates,
        "dead_letters": expected.dead_letters,
        "applied": expected.applied,
        "rejected": expected.rejected,
        "skus": expected.stock.len(),
        "reservations": expected.reservations,
        "replies": expected.replies,
    });
    match &args.expected_out {
        Some(path) => {
            write_expectation(path, &expected)?;
            println!("{summary}");
        }
        None => println!("{}", serde_json::to_string(&expected)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn short_prefix(text: &str) -> Result<String, String> {
    if text.chars().count() <= 64 {
        Ok(text.to_owned())
    } else {
        Err("at most 64 characters".to_owned())
    }
}

pub fn spec_of(args: &ProduceArgs) -> WorkloadSpec {
    WorkloadSpec {
        events: args.events,
        skus: args.skus,
        skew: args.skew,
        hot_share: args.hot_share,
        duplicate_share: args.duplicates,
        invalid_share: args.invalid,
        order_share: args.orders,
        seed: args.seed.unwrap_or_else(rand::random),
        id_prefix: args
            .id_prefix
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>())),
    }
}

pub fn write_expectation(path: &Path, expected: &Expectation) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(expected)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn rekey(mut message: Message, keys: KeyMode) -> Message {
    if keys == KeyMode::Random {
        message.key = Some(format!("{:016x}", rand::random::<u64>()));
    }
    message
}

/// Sends messages in order (at `rate` per second if not 0) and returns the expectation over
/// what was sent. `estimate` sizes the progress bar.
pub fn send(
    settings: &Settings,
    messages: impl Iterator<Item = Message>,
    estimate: u64,
    rate: u64,
    progress: bool,
) -> anyhow::Result<Expectation> {
    let producer = EventProducer::new(settings).context("creating the producer")?;
    let mut oracle = Oracle::default();
    let observed = messages.inspect(|m| oracle.observe(Some(&m.value)));
    deliver(producer, observed, estimate, rate, progress)?;
    Ok(oracle.finish())
}

/// Sends messages in order through `producer` (at `rate` per second if not 0) and waits until
/// every one is acknowledged; the number delivered.
pub fn deliver(
    producer: EventProducer,
    messages: impl Iterator<Item = Message>,
    estimate: u64,
    rate: u64,
    progress: bool,
) -> anyhow::Result<u64> {
    let bar = if progress {
        ProgressBar::with_draw_target(Some(estimate), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} messages, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut sent: u64 = 0;
    for message in messages {
        producer
            .send(message.key.as_deref().map(str::as_bytes), &message.value)
            .context("sending")?;
        sent += 1;
        bar.inc(1);
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let delivered = producer
        .finish(Duration::from_secs(120))
        .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    eprintln!(
        "sent {delivered} messages in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(delivered)
}

/// One message per non-empty line, keyed by the line's `sku` when it has one; an order's later
/// steps (which name no SKU) take the key of its reserve, so that one order's events stay in
/// one partition, in order with that SKU's (else they are keyed by their `order_id`).
fn read_lines(path: &Path) -> anyhow::Result<Vec<Message>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut messages = Vec::new();
    let mut order_keys: std::collections::HashMap<String, String> = Default::default();
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value = serde_json::from_slice::<serde_json::Value>(&line).ok();
        let text = |field: &str| {
            let v = value.as_ref()?.get(field)?;
            v.as_str().map(str::to_owned)
        };
        let key = match (text("type").as_deref(), text("sku"), text("order_id")) {
            (Some("reserve"), Some(sku), Some(order)) => {
                Some(order_keys.entry(order).or_insert(sku).clone())
            }
            (Some("commit" | "release"), _, Some(order)) => {
                Some(order_keys.get(&order).cloned().unwrap_or(order))
            }
            (_, Some(sku), _) => Some(sku),
            (_, None, order) => order,
        };
        messages.push(Message { key, value: line });
    }
    Ok(messages)
}
