//! A continuous ping that watches the data plane while a test disturbs the control
//! plane: [`ContinuousPing`] runs `ping -n -i 0.05` in a lab host's namespace, stops
//! it with SIGINT and reads what it printed into a [`PingReport`]: how many echo
//! requests went out, how many were answered, and which ones were lost.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::Lab;

/// The interval between echo requests (`ping -i`): 20 a second.
const INTERVAL: &str = "0.05";

/// How long [`ContinuousPing::finish`] waits for ping to exit after SIGINT.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A `ping -n -i 0.05` running in the background in a lab host's namespace, its
/// output going to a file in the lab's directory. Dropping it kills ping.
pub struct ContinuousPing {
    child: Child,
    out: PathBuf,
}

impl ContinuousPing {
    /// Starts pinging `dst` from `host`.
    pub fn start(lab: &Lab, host: &str, dst: Ipv4Addr) -> Result<ContinuousPing> {
        Self::spawn(lab, host, None, dst)
    }

    /// Starts pinging `dst` from `host` with source address `src` (`ping -I src`).
    /// Either family: ping picks ICMPv6 for an IPv6 destination.
    pub fn start_from(lab: &Lab, host: &str, src: IpAddr, dst: IpAddr) -> Result<ContinuousPing> {
        Self::spawn(lab, host, Some(src), dst)
    }

    fn spawn(
        lab: &Lab,
        host: &str,
        src: Option<IpAddr>,
        dst: impl Into<IpAddr>,
    ) -> Result<ContinuousPing> {
        let dst = dst.into();
        let out = lab.dir().join(format!("ping-{host}-{dst}.out"));
        let f = File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.host(host).netns])
            .args(["ping", "-n", "-i", INTERVAL]);
        if let Some(src) = src {
            cmd.arg("-I").arg(src.to_string());
        }
        let child = cmd
            .arg(dst.to_string())
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("cannot start ping")?;
        Ok(ContinuousPing { child, out })
    }

    /// Whether ping is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `Err`, with what ping printed, when it has exited; `when` says at which point
    /// of the test it was looked at.
    pub fn still_running(&mut self, when: &str) -> Result<()> {
        ensure!(
            self.running(),
            "ping exited early ({when}): {}",
            self.output()
        );
        Ok(())
    }

    /// SIGINT (ping prints its summary), wait for the exit, read what it printed.
    pub fn finish(&mut self) -> Result<PingReport> {
        ensure!(self.running(), "ping exited early: {}", self.output());
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT)?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.running() {
            ensure!(Instant::now() < deadline, "ping did not exit after SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("cannot read ping's output {}", self.out.display()))?;
        PingReport::parse(&text)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a ping stopped with SIGINT printed.
#[derive(Debug)]
pub struct PingReport {
    pub transmitted: u64,
    pub received: u64,
    /// Sequence numbers sent but never answered, except the last one when it was
    /// still in flight at SIGINT.
    pub lost: Vec<u64>,
    /// Whether the last echo request was still unanswered at SIGINT (not a loss).
    pub last_in_flight: bool,
    /// ping's own summary line ("N packets transmitted, M received, ...").
    pub summary: String,
}

impl PingReport {
    /// Reads the output of `ping -n` (iputils): the replies' `icmp_seq`s and the
    /// summary line.
    pub fn parse(text: &str) -> Result<PingReport> {
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no summary in ping's output:\n{text}"))?
            .trim()
            .to_string();
        // "1200 packets transmitted, 1200 received, 0% packet loss, time 60000ms"
        let num = |key: &str| -> Result<u64> {
            summary
                .split(',')
                .find(|p| p.contains(key))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("cannot read `{key}` in {summary:?}"))
        };
        let transmitted = num("transmitted")?;
        let received = num("received")?;
        let answered: BTreeSet<u64> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect();
        let mut lost: Vec<u64> = (1..=transmitted)
            .filter(|s| !answered.contains(s))
            .collect();
        let last_in_flight = lost.last() == Some(&transmitted);
        if last_in_flight {
            lost.pop();
        }
        Ok(PingReport {
            transmitted,
            received,
            lost,
            last_in_flight,
            summary,
        })
    }

    /// What is wrong with a ping that had to cover `covering` (e.g. "the restarts")
    /// with at least `min_transmitted` echo requests and lose none of them; empty when
    /// nothing is.
    pub fn problems(&self, min_transmitted: u64, covering: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.transmitted < min_transmitted {
            problems.push(format!(
                "ping sent only {} requests; it did not cover {covering}",
                self.transmitted
            ));
        }
        if !self.lost.is_empty() {
            problems.push(format!(
                "{} echo requests got no reply (icmp_seq {:?}); {}",
                self.lost.len(),
                self.lost,
                self.summary
            ));
        }
        problems
    }
}

/// "N transmitted, M received, K lost; ping said: <its summary>", with a note when
/// the last request was in flight at SIGINT.
impl fmt::Display for PingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} transmitted, {} received, {} lost{}; ping said: {}",
            self.transmitted,
            self.received,
            self.lost.len(),
            if self.last_in_flight {
                " (the last request was in flight at SIGINT; not counted)"
            } else {
                ""
            },
            self.summary
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(answered: &[u64], transmitted: u64) -> String {
        let mut text = "PING 10.244.1.0 (10.244.1.0) 56(84) bytes of data.\n".to_string();
        for s in answered {
            text.push_str(&format!(
                "64 bytes from 10.244.1.0: icmp_seq={s} ttl=64 time=0.061 ms\n"
            ));
        }
        let received = answered.len();
        text.push_str(&format!(
            "\n--- 10.244.1.0 ping statistics ---\n\
             {transmitted} packets transmitted, {received} received, 0% packet loss, time 250ms\n\
             rtt min/avg/max/mdev = 0.040/0.061/0.090/0.010 ms\n"
        ));
        text
    }

    #[test]
    fn counts_losses_but_not_the_request_in_flight_at_sigint() {
        let r = PingReport::parse(&output(&[1, 2, 4], 5)).unwrap();
        assert_eq!((r.transmitted, r.received), (5, 3));
        assert_eq!(r.lost, [3]);
        assert!(r.last_in_flight);
        assert_eq!(r.problems(5, "x").len(), 1, "{:?}", r.problems(5, "x"));
        assert!(r.to_string().contains("in flight"), "{r}");
    }

    #[test]
    fn a_clean_run_has_no_problems_unless_too_short() {
        let r = PingReport::parse(&output(&[1, 2, 3], 3)).unwrap();
        assert!(r.lost.is_empty() && !r.last_in_flight);
        assert!(r.problems(3, "x").is_empty());
        let short = r.problems(100, "the restarts");
        assert_eq!(
            short,
            ["ping sent only 3 requests; it did not cover the restarts"]
        );
    }

    #[test]
    fn no_summary_is_an_error_quoting_the_output() {
        let err = PingReport::parse("ping: connect: Network is unreachable\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Network is unreachable"), "{err}");
    }
}
