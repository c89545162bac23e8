//! What the runs measured and how it is reported: the CPU accounting, each run's median
//! round, the table, the ratios against their targets, where the server's time went, and the
//! same figures and ratios as JSON for machines (`--json`). The table and the JSON are both
//! made from the runs' `Measured` values and the one list of `Ratio`s, so they cannot differ.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::{Bench, step};
use crate::embedded::cpu;
use crate::embedded::replica::ReplicaProcess;
use inventory_consumer::store;

/// What a run measured.
#[derive(Debug, Clone)]
pub(super) struct Measured {
    pub(super) name: String,
    pub(super) events: u64,
    pub(super) seconds: f64,
    /// Produce-to-commit latency percentiles.
    pub(super) latency: Option<Latency>,
    pub(super) peak_rss: Option<u64>,
    /// CPU seconds per event over the timed part (user + system): of the replica processes,
    /// and of the PostgreSQL server when it is the throwaway one.
    pub(super) cpu: Cpu,
    pub(super) verified: bool,
    /// Where the server's time went, by statement (database-only runs on a server with
    /// `pg_stat_statements`).
    pub(super) profile: Vec<StatementTime>,
}

/// Produce-to-commit latency percentiles, in seconds, from the replicas' histograms.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latency {
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
}

/// One statement's share of the server's time in a run.
#[derive(Debug, Clone)]
pub(super) struct StatementTime {
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
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct Cpu {
    replicas: Option<f64>,
    server: Option<f64>,
    harness: Option<f64>,
}

impl Cpu {
    /// Per event, from this reading to a `later` one `events` apart.
    pub(super) fn per_event(&self, later: &Cpu, events: f64) -> Cpu {
        let per = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / events.max(1.0));
        Cpu {
            replicas: per(self.replicas, later.replicas),
            server: per(self.server, later.server),
            harness: per(self.harness, later.harness),
        }
    }
}

impl Measured {
    pub(super) fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds.max(f64::EPSILON)
    }

    /// CPU seconds per event of the whole pipeline, when both parts are known.
    fn cpu_per_event(&self) -> Option<f64> {
        Some(self.cpu.replicas? + self.cpu.server?)
    }
}

/// Each run's median round (by rate), with the median CPU of its rounds, verified only if
/// every round was.
pub(super) fn medians(rounds: Vec<(&'static str, Vec<Measured>)>) -> Vec<(&'static str, Measured)> {
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

/// One line of the report's ratios: two runs compared, or (the memory run's peak RSS) a figure
/// held to a target.
#[derive(Debug, Serialize)]
pub(super) struct Ratio {
    name: &'static str,
    /// What of the two runs is compared; `None` for a figure that is not a ratio.
    by: Option<Basis>,
    value: f64,
    target: Option<Target>,
    /// Whether `value` meets `target` (`None` without one). Targets are reported, not
    /// asserted.
    met: Option<bool>,
}

/// What a ratio compares.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Basis {
    /// Events per second.
    Rate,
    /// CPU time per event. Held to at least a bound, or to none: the second run's over the
    /// first's (as with rates, above 1 means the first run does better). Held to at most one:
    /// the first run's over the second's (what the first costs, in times the second's).
    CpuTime,
}

/// The value a ratio is held to: `{"at_least": 0.8}` or `{"at_most": 64.0}` in the JSON.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met_by(self, value: f64) -> bool {
        match self {
            Target::AtLeast(bound) => value >= bound,
            Target::AtMost(bound) => value <= bound,
        }
    }
}

/// `>= 0.8`, padded as a string is (the report's column).
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Target::AtLeast(bound) => format!(">= {bound}"),
            Target::AtMost(bound) => format!("<= {bound}"),
        };
        f.pad(&text)
    }
}

impl Ratio {
    fn new(name: &'static str, by: Option<Basis>, value: f64, target: Option<Target>) -> Ratio {
        Ratio {
            name,
            by,
            value,
            target,
            met: target.map(|t| t.met_by(value)),
        }
    }
}

/// The runs compared, against their targets where they have one: those whose runs were
/// measured, in the order they are printed.
pub(super) fn ratios(results: &[(&str, Measured)]) -> Vec<Ratio> {
    let get = |key: &str| results.iter().find(|(k, _)| *k == key).map(|(_, m)| m);
    let rate = |a: &str, b: &str| Some(get(a)?.per_second() / get(b)?.per_second());
    // The same comparison by CPU time per event: the machine is CPU-bound, so rates follow the
    // inverse of it, and it is far steadier than a rate on a shared machine.
    let cpu_time = |a: &str, b: &str| Some(get(b)?.cpu_per_event()? / get(a)?.cpu_per_event()?);
    let at_least = |bound: f64| Some(Target::AtLeast(bound));
    let (by_rate, by_cpu_time) = (Some(Basis::Rate), Some(Basis::CpuTime));
    let peak_rss = get("memory").and_then(|m| m.peak_rss).map(mib);
    let all = [
        (
            "steady state (history) / database only",
            by_rate,
            rate("steady", "database"),
            at_least(0.8),
        ),
        (
            "3 replicas / database only",
            by_rate,
            rate("three", "database"),
            at_least(0.5),
        ),
        (
            "1 replica / per-event mode",
            by_rate,
            rate("one", "per-event"),
            at_least(20.0),
        ),
        (
            "guarded / unsafe (1 replica)",
            by_rate,
            rate("one", "unsafe"),
            at_least(0.95),
        ),
        (
            "hot SKU / uniform (1 replica)",
            by_rate,
            rate("hot", "one"),
            at_least(0.5),
        ),
        (
            "guarded / unsafe (1 replica)",
            by_cpu_time,
            cpu_time("one", "unsafe"),
            None,
        ),
        (
            "Apache Kafka / embedded (1 replica)",
            by_rate,
            rate("one-apache", "one"),
            None,
        ),
        (
            "Apache Kafka / embedded (3 replicas)",
            by_rate,
            rate("three-apache", "three"),
            None,
        ),
        (
            "traces at 10% / off (3 replicas)",
            by_rate,
            rate("traces-10", "traces-off"),
            at_least(0.9),
        ),
        (
            "traces at 100% / off (3 replicas)",
            by_rate,
            rate("traces-100", "traces-off"),
            None,
        ),
        (
            "peak RSS of the memory run, MiB",
            None,
            peak_rss,
            Some(Target::AtMost(64.0)),
        ),
    ];
    all.into_iter()
        .chain(small_batch_cost(results))
        .filter_map(|(name, by, value, target)| Some(Ratio::new(name, by, value?, target)))
        .collect()
}

/// A ratio before it is computed: its name, what it compares, its value if both runs were
/// measured, and its target.
type RatioRow = (&'static str, Option<Basis>, Option<f64>, Option<Target>);

/// A transaction's fixed cost: CPU per event of the small batches' run over the full ones',
/// the server's and the client's apart, each held to the latency runs' CPU bound (at most 2
/// times), for the database alone.
fn small_batch_cost(results: &[(&str, Measured)]) -> [RatioRow; 2] {
    let get = |key: &str| results.iter().find(|(k, _)| *k == key).map(|(_, m)| m.cpu);
    let small_over_full = |cpu: fn(&Cpu) -> Option<f64>| {
        Some(cpu(&get("database-small")?)? / cpu(&get("database")?)?)
    };
    let (by, target) = (Some(Basis::CpuTime), Some(Target::AtMost(2.0)));
    [
        (
            "small / full batches, server CPU",
            by,
            small_over_full(|c| c.server),
            target,
        ),
        (
            "small / full batches, client CPU",
            by,
            small_over_full(|c| c.replicas),
            target,
        ),
    ]
}

/// The ratios, as the report prints them.
pub(super) fn print_ratios(ratios: &[Ratio]) {
    println!();
    println!("ratios (targets are reported, not asserted)");
    for r in ratios {
        let (name, value) = (r.name, r.value);
        match (r.target, r.met, r.by) {
            (Some(target), Some(met), _) => println!(
                "  {name:<40} {value:>8.2}   target {target:<8} {}",
                if met { "met" } else { "MISSED" }
            ),
            (_, _, Some(Basis::CpuTime)) => {
                println!("  {name:<40} {value:>8.2}   (by CPU time per event)");
            }
            _ => println!("  {name:<40} {value:>8.2}"),
        }
    }
}

/// What `bench --json` writes: every run's figures and every ratio, the ones the table and the
/// ratios print (the schema is in docs/performance.md, "Results for machines").
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    /// Whether every run passed its audit.
    verified: bool,
    runs: Vec<RunFigures<'a>>,
    ratios: &'a [Ratio],
}

/// One run's row of the table.
#[derive(Debug, Serialize)]
struct RunFigures<'a> {
    /// Its name for `--only`.
    key: &'a str,
    name: &'a str,
    events: u64,
    seconds: f64,
    events_per_second: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_p999_ms: Option<f64>,
    peak_rss_bytes: Option<u64>,
    cpu_seconds_per_event: Cpu,
    verified: bool,
}

impl<'a> RunFigures<'a> {
    fn of(key: &'a str, m: &'a Measured) -> RunFigures<'a> {
        RunFigures {
            key,
            name: &m.name,
            events: m.events,
            seconds: m.seconds,
            events_per_second: m.per_second(),
            latency_p50_ms: m.latency.map(|l| l.p50 * 1e3),
            latency_p99_ms: m.latency.map(|l| l.p99 * 1e3),
            latency_p999_ms: m.latency.map(|l| l.p999 * 1e3),
            peak_rss_bytes: m.peak_rss,
            cpu_seconds_per_event: m.cpu,
            verified: m.verified,
        }
    }
}

/// The runs' figures and the ratios, as JSON, to `path`.
pub(super) fn write_json(
    path: &Path,
    results: &[(&str, Measured)],
    ratios: &[Ratio],
    verified: bool,
) -> anyhow::Result<()> {
    let report = JsonReport {
        verified,
        runs: results
            .iter()
            .map(|(key, m)| RunFigures::of(key, m))
            .collect(),
        ratios,
    };
    let text = serde_json::to_string_pretty(&report).context("encoding the report as JSON")?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("writing the report to {}", path.display()))
}

impl Bench {
    /// CPU read off the throwaway server, the given replica processes and, when there are
    /// replicas, this process as their harness (`None` for a part that cannot be read: a
    /// server elsewhere, a replica gone).
    pub(super) fn cpu_reading(&self, replicas: &[ReplicaProcess]) -> Cpu {
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
    pub(super) fn own_cpu_reading(&self) -> Cpu {
        Cpu {
            replicas: cpu::process_seconds(std::process::id() as i32),
            ..self.cpu_reading(&[])
        }
    }
}

/// A connection to the server's maintenance database with `pg_stat_statements` ready and its
/// counters reset, or `None` where it is not loaded (a given server, usually).
pub(super) async fn statement_stats(admin_url: &str) -> Option<tokio_postgres::Client> {
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
pub(super) async fn statement_profile(
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
pub(super) fn print_profile(m: &Measured) {
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub(super) fn report(m: &Measured) {
    step(&format!(
        "  {:.0} events/s ({} events in {:.2}s), verify {}",
        m.per_second(),
        m.events,
        m.seconds,
        if m.verified { "PASS" } else { "FAIL" }
    ));
}

pub(super) fn print_table<'a>(results: impl Iterator<Item = &'a Measured>) {
    println!();
    println!(
        "{:<60} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>6}",
        "run",
        "events",
        "seconds",
        "events/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "RSS MiB",
        "rep µs",
        "pg µs",
        "bench µs",
        "verify"
    );
    for m in results {
        let ms = |pick: fn(&Latency) -> f64| {
            m.latency
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", pick(l) * 1e3))
        };
        println!(
            "{:<60} {:>9} {:>8.2} {:>10.0} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>6}",
            m.name,
            m.events,
            m.seconds,
            m.per_second(),
            ms(|l| l.p50),
            ms(|l| l.p99),
            ms(|l| l.p999),
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
