//! A replica of the test (a real `run` process): its log read back as ownerships and
//! committed batches, the assertions the group scenarios share, its HTTP endpoints.

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::time::Duration;

use chrono::{DateTime, Utc};
use inventory_consumer::stats::StatsSnapshot;
use inventory_devtools::embedded::replica::{LogSummary, ReplicaProcess, partition_list};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::wait_until;

/// A `run` process of the test.
pub struct Replica {
    pub(super) process: ReplicaProcess,
    /// When the test killed it (its ownership ends there at the latest).
    pub(super) killed_at: Option<DateTime<Utc>>,
}

/// A stretch of time during which a replica owned a partition.
#[derive(Debug, Clone)]
pub struct Ownership {
    pub replica: String,
    pub partition: i32,
    pub from: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
}

/// A committed batch, from a replica's log.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub replica: String,
    pub partition: i32,
    pub at: DateTime<Utc>,
    pub first_offset: i64,
    pub last_offset: i64,
    pub duplicates: u64,
}

impl Replica {
    pub fn name(&self) -> &str {
        &self.process.name
    }

    pub fn pid(&self) -> Pid {
        self.process
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name()))
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// Whether the process is alive: not exited, not a zombie awaiting its parent.
    pub fn is_running(&self) -> bool {
        let Some(pid) = self.process.pid() else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    }

    /// The most memory the process has held resident so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the replica's /proc status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status");
        kib / 1024.0
    }

    /// The partitions the replica owns according to its latest assign/revoke log line.
    pub fn owned(&self) -> Vec<i32> {
        self.process.owned()
    }

    fn log_entries(&self) -> Vec<serde_json::Value> {
        self.process.log_entries()
    }

    /// Ownership intervals from the replica's assign/revoke/lost log lines; an interval still
    /// open ends when the test killed the replica, or stays open.
    pub fn ownership(&self) -> Vec<Ownership> {
        let mut open: BTreeMap<i32, DateTime<Utc>> = BTreeMap::new();
        let mut done = Vec::new();
        for e in self.log_entries() {
            let (Some(event), Some(at)) = (e["event"].as_str(), timestamp(&e)) else {
                continue;
            };
            if ![
                "partitions_assigned",
                "partitions_revoked",
                "partitions_lost",
            ]
            .contains(&event)
            {
                continue;
            }
            for p in partition_list(e["partitions"].as_str().unwrap_or("")) {
                if event == "partitions_assigned" {
                    open.insert(p, at);
                } else if let Some(from) = open.remove(&p) {
                    done.push(self.interval(p, from, Some(at)));
                }
            }
        }
        for (p, from) in open {
            done.push(self.interval(p, from, self.killed_at));
        }
        done
    }

    fn interval(
        &self,
        partition: i32,
        from: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Ownership {
        Ownership {
            replica: self.name().to_owned(),
            partition,
            from,
            until,
        }
    }

    /// The address the replica's HTTP endpoints listen on (from its start-up log line).
    pub async fn http_addr(&self) -> String {
        let mut addr = String::new();
        wait_until(
            &format!("{} to serve HTTP", self.name()),
            Duration::from_secs(30),
            || {
                addr = self.process.http_addr().unwrap_or_default();
                let found = !addr.is_empty();
                async move { found }
            },
        )
        .await;
        addr
    }

    /// The entries of the named log event (docs/contract.md, "Log events"), oldest first.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        self.process.events(name)
    }

    /// Whether the replica has logged the named event.
    pub fn has_event(&self, name: &str) -> bool {
        !self.events(name).is_empty()
    }

    /// What the replica's log says it did (batches, duplicates, rebalances).
    pub fn log_summary(&self) -> LogSummary {
        self.process.log_summary()
    }

    /// Every batch the replica logged as committed.
    pub fn batches(&self) -> Vec<BatchRecord> {
        self.log_entries()
            .iter()
            .filter(|e| e["event"] == "batch_committed")
            .filter_map(|e| {
                Some(BatchRecord {
                    replica: self.name().to_owned(),
                    partition: e["partition"].as_i64()? as i32,
                    at: timestamp(e)?,
                    first_offset: e["first_offset"].as_i64()?,
                    last_offset: e["last_offset"].as_i64()?,
                    duplicates: e["duplicates"].as_u64()?,
                })
            })
            .collect()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the printed counters.
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, StatsSnapshot) {
        let _ = nix::sys::signal::kill(self.pid(), Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for an exit already under way; returns the status and the printed counters.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, StatsSnapshot) {
        let (status, stats) = self
            .process
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
        let stats = stats
            .unwrap_or_else(|| panic!("{} printed no counters; log:\n{}", self.name(), self.log()));
        (status, stats)
    }

    /// Waits for an exit that prints no counters (a second signal); returns its status.
    pub fn wait_abrupt_exit(&mut self, timeout: Duration) -> ExitStatus {
        let (status, _) = self
            .process
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
        status
    }

    /// SIGSTOP: the process freezes as in a long pause (its sessions and connections stay open).
    pub fn pause(&self) {
        nix::sys::signal::kill(self.pid(), Signal::SIGSTOP).expect("pausing a replica");
    }

    /// SIGCONT after [`Replica::pause`].
    pub fn resume(&self) {
        nix::sys::signal::kill(self.pid(), Signal::SIGCONT).expect("resuming a replica");
    }

    /// SIGKILL: no drain, no commit. The replica's log stays readable.
    pub fn kill(&mut self) {
        self.process.kill().expect("killing a replica");
        self.killed_at = Some(Utc::now());
    }
}

fn timestamp(entry: &serde_json::Value) -> Option<DateTime<Utc>> {
    entry["timestamp"].as_str()?.parse::<DateTime<Utc>>().ok()
}

/// `"[0, 3, 5]"` (a Debug-formatted list in a JSON log field) as numbers.
/// Checks that no partition was owned by two replicas at once and that every batch was
/// committed by a replica while it owned the batch's partition.
pub fn assert_exclusive_ownership(replicas: &[&Replica]) {
    let intervals: Vec<Ownership> = replicas.iter().flat_map(|r| r.ownership()).collect();
    let batches: usize = replicas.iter().map(|r| r.batches().len()).sum();
    assert!(
        !intervals.is_empty() && batches > 0,
        "nothing to check: {} ownership intervals and {batches} batches in the logs",
        intervals.len()
    );
    for a in &intervals {
        for b in &intervals {
            if a.replica == b.replica || a.partition != b.partition {
                continue;
            }
            let a_before_b = a.until.is_some_and(|u| u <= b.from);
            let b_before_a = b.until.is_some_and(|u| u <= a.from);
            assert!(
                a_before_b || b_before_a,
                "partition {} owned by two replicas at once: {a:?} and {b:?}",
                a.partition
            );
        }
    }
    for r in replicas {
        for batch in r.batches() {
            let covered = intervals.iter().any(|o| {
                o.replica == batch.replica
                    && o.partition == batch.partition
                    && o.from <= batch.at
                    && o.until.is_none_or(|u| batch.at <= u)
            });
            assert!(
                covered,
                "batch committed outside its replica's ownership: {batch:?}"
            );
        }
    }
}

/// SIGTERMs every replica; each must exit 0. Returns their counters added up.
pub fn terminate_all(replicas: &mut [Replica], timeout: Duration) -> StatsSnapshot {
    let mut total = StatsSnapshot::default();
    for r in replicas {
        let (status, stats) = r.terminate(timeout);
        assert!(status.success(), "{} exited with {status}", r.name());
        total = total + stats;
    }
    total
}

/// Checks that no offset of any partition was committed in two batches, by any replicas: every
/// new owner started where the last commit left the partition, and no stale owner committed
/// after it (what the database fence guarantees).
pub fn assert_nothing_applied_twice(replicas: &[&Replica]) {
    let mut by_partition: BTreeMap<i32, Vec<BatchRecord>> = BTreeMap::new();
    for r in replicas {
        for b in r.batches() {
            by_partition.entry(b.partition).or_default().push(b);
        }
    }
    assert!(
        !by_partition.is_empty(),
        "nothing to check: no committed batch in the replicas' logs"
    );
    for batches in by_partition.values_mut() {
        batches.sort_by_key(|b| (b.first_offset, b.last_offset));
        for pair in batches.windows(2) {
            assert!(
                pair[0].last_offset < pair[1].first_offset,
                "offsets committed twice: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TEST_LOG").is_some() {
            let log = self.log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| !l.contains("\"batch_committed\""))
                .take(20)
                .collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.name(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// GET on a replica's HTTP endpoints: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    // 503 is an answer to look at here, not an error.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .expect("requesting from the replica");
    let body = response
        .body_mut()
        .read_to_string()
        .expect("reading the response");
    (response.status().as_u16(), body)
}

/// Sum of a Prometheus metric's samples whose labels contain every one of `labels`
/// (`name{...} value` lines, or `name value`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r),
                None => (series, ""),
            };
            (metric_name == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
