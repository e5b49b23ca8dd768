//! Running commands and capturing their output.

use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

/// What a finished command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The output if the command succeeded, else an error naming the command, its exit
    /// status and what it printed on stderr.
    pub fn ok(self) -> Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            bail!("{self}")
        }
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.cmdline, self.status)?;
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, ": {err}")?;
        }
        let out = self.stdout.trim();
        if !out.is_empty() && !self.success() {
            write!(f, " (stdout: {out})")?;
        }
        Ok(())
    }
}

/// Quotes one argument for display (not for a shell).
fn show_arg(a: &OsStr) -> String {
    let s = a.to_string_lossy();
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        format!("{s:?}")
    } else {
        s.into_owned()
    }
}

/// The command line of `cmd`, for messages.
pub fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(show_arg)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin closed) and captures its output; fails only when it
/// cannot be started.
pub fn capture(cmd: &mut Command) -> Result<CmdOutput> {
    let line = cmdline(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    Ok(CmdOutput {
        cmdline: line,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a program with arguments and captures its output (any exit status).
pub fn try_run<S: AsRef<OsStr>>(args: &[S]) -> Result<CmdOutput> {
    let (prog, rest) = args.split_first().context("empty command")?;
    capture(Command::new(prog).args(rest))
}

/// Runs a program with arguments; its stdout if it exits 0, else an error with stderr.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    try_run(args)?.ok()
}
