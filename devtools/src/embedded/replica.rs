//! A replica as a separate OS process (`inventory-consumer run`), as the demo, the benchmark and
//! the tests run them: its own log file, its counters read from its stdout when it exits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use inventory_consumer::logs;
use inventory_consumer::stats::StatsSnapshot;

/// What a replica's log says it did; unlike its exit counters, available after a SIGKILL.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogSummary {
    pub batches: u64,
    pub duplicates: u64,
    pub assignments: u64,
    pub revocations: u64,
    pub losses: u64,
}

/// The environment every locally run replica gets (tests, `demo`, `bench`): where the broker
/// and the database are, JSON logs (read back as records), probes on a free port (logged at
/// start-up). Callers add their own settings after it (later entries win).
pub fn local_env(bootstrap: &str, database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", bootstrap.to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("INVENTORY_LOG__FORMAT", "json".to_owned()),
        ("INVENTORY_HTTP__ADDR", "127.0.0.1:0".to_owned()),
    ]
}

/// The program that runs the service: its own binary, or this one (`inventory-dev consumer`).
#[derive(Debug, Clone)]
pub struct Service {
    program: PathBuf,
    prefix: Vec<OsString>,
}

impl Service {
    /// The service's binary (`inventory-consumer`), or any release of it.
    pub fn binary(path: &Path) -> Service {
        Service {
            program: path.to_owned(),
            prefix: Vec::new(),
        }
    }

    /// The service built into this `inventory-dev`, which the demo and the benchmark run: the
    /// very service they were built with, never a stale binary beside them.
    pub fn built_in() -> anyhow::Result<Service> {
        Ok(Service {
            program: std::env::current_exe().context("locating this executable")?,
            prefix: vec!["consumer".into()],
        })
    }

    /// `<service> <args>`: a command of the service, to be given its arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix);
        cmd
    }
}

pub struct ReplicaProcess {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    out: PathBuf,
}

impl ReplicaProcess {
    /// Starts `<service> run` with the environment `env` (on top of a clean one that keeps only
    /// PATH) and `--set` overrides `settings`; output goes to `<dir>/<name>.log` and `.out`.
    pub fn spawn(
        service: &Service,
        name: &str,
        dir: &Path,
        env: &[(&str, &str)],
        settings: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_with_flags(service, name, dir, env, settings, &[])
    }

    /// [`ReplicaProcess::spawn`] with extra flags for `run`.
    pub fn spawn_with_flags(
        service: &Service,
        name: &str,
        dir: &Path,
        env: &[(&str, &str)],
        settings: &[(&str, &str)],
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = dir.join(format!("{name}.out"));
        let mut cmd = service.command();
        cmd.arg("run")
            .args(flags)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).context("creating the replica's output file")?)
            .stderr(std::fs::File::create(&log).context("creating the replica's log file")?);
        for (key, value) in settings {
            cmd.arg("--set").arg(format!("{key}={value}"));
        }
        let child = cmd.spawn().context("starting a replica")?;
        Ok(ReplicaProcess {
            name: name.to_owned(),
            child: Some(child),
            log,
            out,
        })
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every entry of its JSON log (it must run with `log.format = json`).
    pub fn log_entries(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The entries of the named log event (`inventory_consumer::logs`), oldest first.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        let mut entries = self.log_entries();
        entries.retain(|e| e["event"] == name);
        entries
    }

    /// Tallies the replica's JSON log (batch events are logged at debug level for
    /// `inventory_consumer`).
    pub fn log_summary(&self) -> LogSummary {
        let mut summary = LogSummary::default();
        for entry in self.log_entries() {
            match entry["event"].as_str().unwrap_or_default() {
                logs::BATCH_COMMITTED => {
                    summary.batches += 1;
                    summary.duplicates += entry["duplicates"].as_u64().unwrap_or(0);
                }
                logs::PARTITIONS_ASSIGNED => summary.assignments += 1,
                logs::PARTITIONS_REVOKED => summary.revocations += 1,
                logs::PARTITIONS_LOST => summary.losses += 1,
                _ => {}
            }
        }
        summary
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after that). Returns the exit
    /// status and the counters the replica printed, if it got to print them.
    pub fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, Option<StatsSnapshot>)> {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for an exit already under way (SIGKILL after that).
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, Option<StatsSnapshot>)> {
        let status = self.wait(timeout)?;
        Ok((status, self.stats()))
    }

    /// SIGKILL: no drain, no commit, no counters.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.wait(Duration::from_secs(10))
    }

    /// The counters line the replica printed on exit.
    pub fn stats(&self) -> Option<StatsSnapshot> {
        let out = std::fs::read_to_string(&self.out).ok()?;
        out.lines().rev().find_map(|l| serde_json::from_str(l).ok())
    }

    fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} is not running", self.name))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                anyhow::bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory so far (VmHWM), in bytes; Linux only.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The address of its HTTP endpoints, from its start-up log event.
    pub fn http_addr(&self) -> Option<String> {
        let listening = self.events(logs::HTTP_LISTENING);
        listening.first()?["addr"].as_str().map(str::to_owned)
    }

    /// The partitions it owns according to its latest assign, revoke or loss.
    pub fn owned(&self) -> Vec<i32> {
        self.log_entries()
            .iter()
            .rev()
            .find_map(|e| e["owned"].as_str().map(partition_list))
            .unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A list of partitions as the replica logs it: a JSON array (`[0,3,7]`).
pub fn partition_list(text: &str) -> Vec<i32> {
    serde_json::from_str(text).unwrap_or_default()
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
