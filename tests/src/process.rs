//! Processes the lab runs inside network namespaces.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::cmdline;

/// A process started as `ip netns exec <netns> <program> <args>` (iproute2 execs the
/// program in place, so the child's pid is the program's), with stdout and stderr
/// appended to one log file.
#[derive(Debug)]
pub(crate) struct Proc {
    pub name: String,
    pub netns: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// How the last run ended, once reaped.
    pub status: Option<ExitStatus>,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    pub fn new(
        name: &str,
        netns: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Proc {
        Proc {
            name: name.into(),
            netns: netns.into(),
            program: program.into(),
            args,
            env,
            log,
            child: None,
            status: None,
            starts: 0,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.program)
            .args(&self.args);
        // hermetic: the lab passes everything by flags
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TWILL_") {
                cmd.env_remove(k);
            }
        }
        let log_level = std::env::var("TWILL_LAB_RUST_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("RUST_LOG", log_level);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts (or starts again) the process.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        let mut cmd = self.command();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open log {}", self.log.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "=== twill lab: start #{} of {}: {}",
            self.starts,
            self.name,
            cmdline(&cmd)
        )?;
        let err: File = log.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}: {}", self.name, cmdline(&cmd)))?;
        self.child = Some(child);
        self.status = None;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the child if it has exited; whether it is still running.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                self.child = None;
                self.note(&format!("exited: {st}"));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Sends `sig` if running.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let pid = self.pid().expect("running has a pid");
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("cannot send {sig} to {} (pid {pid})", self.name))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return self.status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit; past it, SIGKILL and an error.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if !self.is_running() {
            return self.status.context(format!("{} is not running", self.name));
        }
        self.note("sending SIGTERM");
        self.signal(Signal::SIGTERM)?;
        if let Some(st) = self.wait_exit(timeout) {
            return Ok(st);
        }
        self.note(&format!(
            "did not exit within {timeout:?} of SIGTERM: SIGKILL"
        ));
        let st = self.kill()?;
        bail!(
            "{} did not exit within {timeout:?} of SIGTERM (killed: {st})",
            self.name
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if !self.is_running() {
            return self.status.context(format!("{} is not running", self.name));
        }
        self.note("sending SIGKILL");
        self.signal(Signal::SIGKILL)?;
        let child = self.child.as_mut().expect("running");
        let st = child.wait()?;
        self.status = Some(st);
        self.child = None;
        self.note(&format!("exited: {st}"));
        Ok(st)
    }

    /// Appends a lab note to the log, so the log tells what happened to the process.
    pub fn note(&self, msg: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "=== twill lab: {}: {msg}", self.name);
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            let mut out = String::new();
            if from > 0 {
                out.push_str(&format!("[... {from} earlier lines]\n"));
            }
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("[cannot read {}: {e}]\n", path.display()),
    }
}
