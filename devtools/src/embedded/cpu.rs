//! CPU time spent by local processes, read from `/proc` (Linux; `None` elsewhere). The
//! benchmark reports it per event: on a shared machine it varies far less than wall-clock rates.

use std::path::Path;

/// Kernel clock ticks per second, the unit of `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which is in parentheses and may
/// hold spaces), so that index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    // The state is a letter: kept as 0 so that indexes match the fields.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

// Indexes into `stat_fields`: fields 4 (ppid), 14 (utime), 15 (stime), 16 (cutime), 17 (cstime).
const PPID: usize = 1;
const UTIME: usize = 11;
const STIME: usize = 12;
const CUTIME: usize = 13;
const CSTIME: usize = 14;

/// User and system CPU seconds of one process (all its threads) so far.
pub fn process_seconds(pid: i32) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some((f.get(UTIME)? + f.get(STIME)?) as f64 / ticks_per_second())
}

/// CPU seconds of a process and all its children so far: its own, those of children it has
/// reaped, and those of children still running. For a PostgreSQL server, whose backends are
/// all children of the postmaster, that is the whole server.
pub fn tree_seconds(root: i32) -> Option<f64> {
    let f = stat_fields(root)?;
    let mut ticks = f.get(UTIME)? + f.get(STIME)? + f.get(CUTIME)? + f.get(CSTIME)?;
    for entry in std::fs::read_dir(Path::new("/proc")).ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(child) = stat_fields(pid).filter(|c| c.get(PPID) == Some(&(root as u64))) {
            ticks += child.get(UTIME).unwrap_or(&0) + child.get(STIME).unwrap_or(&0);
        }
    }
    Some(ticks as f64 / ticks_per_second())
}

#[cfg(test)]
mod tests {
    use nix::sys::resource::{UsageWho, getrusage};

    use super::*;

    /// The kernel's own account of this process's CPU time, by another interface than /proc.
    fn rusage_seconds() -> f64 {
        let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    }

    /// What /proc says this process used agrees with getrusage, after work that getrusage
    /// measures (however long a busy machine takes to give it the CPU: no wall-clock bound).
    #[test]
    fn a_busy_process_accumulates_the_cpu_time_the_kernel_reports() {
        let me = std::process::id() as i32;
        let start = rusage_seconds();
        let mut x = 0u64;
        while rusage_seconds() - start < 0.2 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let ours = process_seconds(me).expect("own /proc entry");
        let kernel = rusage_seconds();
        // /proc counts in clock ticks (10 ms); read just before getrusage.
        assert!(
            ours <= kernel + 0.02 && ours >= kernel - 0.05,
            "/proc says {ours} s, getrusage {kernel} s"
        );
        assert!(ours >= start + 0.15, "{start} -> {ours}");
        assert!(tree_seconds(me).expect("tree") >= ours);
    }
}
