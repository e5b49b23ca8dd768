//! What a server process costs, read from /proc: peak and current RSS, CPU seconds.

use std::time::Duration;

/// Kernel clock ticks per second in /proc/<pid>/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// A `VmXxx:   1234 kB` field of /proc/<pid>/status, in MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident set size (VmHWM) in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// Current resident set size (VmRSS) in MB.
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

/// Resets the peak RSS to the current RSS (`echo 5 > /proc/<pid>/clear_refs`), so a
/// phase's peak can be read on its own. Needs to own the process (or root).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// User + system CPU time of the process so far.
pub fn cpu(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields after it start past ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / TICKS_PER_SECOND))
}

/// CPU time of this process (the load generator), user + system.
pub fn self_cpu() -> Duration {
    cpu(std::process::id()).unwrap_or_default()
}

/// Watches a server during a phase: CPU seconds used and peak RSS since `start`. A
/// server of several processes (replicas) counts their sum: the peak is the sum of
/// each process's own peak, an upper bound of the peak of the sum.
pub struct Meter {
    pids: Vec<u32>,
    cpu0: Duration,
    self_cpu0: Duration,
}

/// What a [`Meter`] saw.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Server CPU seconds (user + system) in the phase.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub cpu_s: f64,
    /// Server peak RSS in the phase, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub peak_rss_mb: f64,
    /// Server RSS at the end of the phase, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub rss_mb: f64,
    /// CPU seconds of the load generator (this process) in the phase.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub client_cpu_s: f64,
}

impl Meter {
    /// Starts measuring `pid` now (resets its peak RSS).
    pub fn start(pid: u32) -> Meter {
        Meter::start_all(&[pid])
    }

    /// Starts measuring the processes `pids` as one server now (resets their peaks).
    pub fn start_all(pids: &[u32]) -> Meter {
        pids.iter().copied().for_each(reset_peak);
        Meter {
            pids: pids.to_vec(),
            cpu0: total_cpu(pids),
            self_cpu0: self_cpu(),
        }
    }

    /// What the processes used since `start`.
    pub fn read(&self) -> Usage {
        let sum_mb = |read: fn(u32) -> Option<f64>| {
            self.pids
                .iter()
                .map(|&p| read(p).unwrap_or(f64::NAN))
                .sum::<f64>()
        };
        Usage {
            cpu_s: total_cpu(&self.pids)
                .saturating_sub(self.cpu0)
                .as_secs_f64(),
            peak_rss_mb: sum_mb(peak_rss_mb),
            rss_mb: sum_mb(rss_mb),
            client_cpu_s: self_cpu().saturating_sub(self.self_cpu0).as_secs_f64(),
        }
    }
}

/// CPU time of several processes together (a process that is gone counts nothing).
fn total_cpu(pids: &[u32]) -> Duration {
    pids.iter().map(|&p| cpu(p).unwrap_or_default()).sum()
}

/// Raises this process's open-file limit to the hard limit (thousands of sockets);
/// children (the servers) inherit it. Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}
