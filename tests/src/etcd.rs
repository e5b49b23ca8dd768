//! A real etcd cluster for tests of the controller's etcd backend (issue 14): members
//! on 127.0.0.1 with ports of their own, client TLS with client certificates (peers
//! talk plain HTTP on loopback), member control by PID, and `etcdctl` to look at (and
//! tamper with) what the controllers stored.
//!
//! ```no_run
//! use twill_tests::etcd::{require_etcd, EtcdCluster};
//!
//! if !require_etcd("example") {
//!     return; // printed a loud SKIPPED (or panicked, with CI=true)
//! }
//! let etcd = EtcdCluster::start(3).unwrap(); // returns once it has a leader
//! // give a controller etcd.endpoints_csv(), etcd.ca(), etcd.client_cert(), etcd.client_key()
//! etcd.put("/twill/x", "1").unwrap();
//! println!("{:?}", etcd.get_prefix("/twill/").unwrap());
//! etcd.kill(0).unwrap(); // SIGKILL to etcd's own pid, reaped
//! etcd.restart(0).unwrap(); // same data dir, --initial-cluster-state existing
//! // dropping `etcd` kills every member and deletes the certificates and data dirs
//! ```
//!
//! Processes in a [`Lab`]'s hosts cannot reach the machine's loopback:
//! [`EtcdCluster::start_in_lab`] runs one member in each of the given lab hosts instead,
//! listening on the host's underlay address (clients on `:2379`, peers on `:2380`), and
//! runs `etcdctl` inside the first of them, so that no etcd traffic leaves the lab's
//! namespaces.

use parking_lot::{Mutex, MutexGuard};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::certs::openssl;
use crate::cmd::{self, cmdline, CmdOutput};
use crate::kit::{free_ports, skip};
use crate::lab::Lab;
use crate::process::log_tail;
use crate::wait::{wait_until, Check};

/// How long [`EtcdCluster::start`] waits for every member to be healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`EtcdCluster::restart`], `stop` and `cont` wait for the member.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(15);
/// etcdctl's limit per request: without quorum a request fails after this instead of
/// waiting for etcd's own request timeout (7 s with these election settings).
/// etcd's own `--election-timeout` (and a tenth of it, its `--heartbeat-interval`).
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
const COMMAND_TIMEOUT: &str = "--command-timeout=2s";
const DIAL_TIMEOUT: &str = "--dial-timeout=1s";
/// Ports are picked free but released before etcd binds them, so another process may
/// take one in between: a start that fails that way is tried again with new ports.
const START_ATTEMPTS: usize = 3;
/// Log lines of each member printed when a test fails.
const LOG_LINES: usize = 40;
/// etcd's own ports, used by members in lab hosts (each has an address of its own).
pub const LAB_CLIENT_PORT: u16 = 2379;
pub const LAB_PEER_PORT: u16 = 2380;

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether `etcd` and `etcdctl` are installed; if not, prints a loud
/// `SKIPPED: <test>: needs etcd` and returns `false`, or panics (fails the test) when
/// `CI` is set.
///
/// ```no_run
/// # use twill_tests::etcd::require_etcd;
/// if !require_etcd("my_test") {
///     return;
/// }
/// ```
pub fn require_etcd(test: &str) -> bool {
    let Err(why) = binaries() else {
        return true;
    };
    skip(
        test,
        &format!("needs etcd: {why:#} (run scripts/setup.sh as root)"),
    );
    false
}

/// `etcd` and `etcdctl`, from `PATH`.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    match (find("etcd"), find("etcdctl")) {
        (Some(etcd), Some(etcdctl)) => Ok((etcd, etcdctl)),
        (etcd, _) => bail!(
            "{} not found (Debian packages etcd-server and etcd-client)",
            if etcd.is_none() { "etcd" } else { "etcdctl" }
        ),
    }
}

/// One etcd process and what it needs to be started again.
#[derive(Debug)]
struct Member {
    name: String,
    /// The address it listens on: 127.0.0.1, or its lab host's underlay address.
    ip: Ipv4Addr,
    /// The network namespace it runs in (a lab host's), or `None` for the machine's.
    netns: Option<String>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped (and not continued yet).
    stopped: bool,
    starts: u32,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("https://{}:{}", self.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }

    /// Reaps the process if it has exited; whether it is still running.
    fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(st)) => {
                self.note(&format!("exited: {st}"));
                self.child = None;
                false
            }
            Err(_) => false,
        }
    }

    fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    fn running_pid(&mut self) -> Result<Pid> {
        let pid = self
            .pid()
            .with_context(|| format!("etcd member {} is not running", self.name))?;
        Ok(Pid::from_raw(pid as i32))
    }

    /// SIGKILL to etcd's own pid, and reap it: once this returns the process is gone.
    fn kill(&mut self) -> Result<()> {
        let pid = self.running_pid()?;
        self.note("sending SIGKILL");
        kill(pid, Signal::SIGKILL)
            .with_context(|| format!("cannot SIGKILL etcd member {} (pid {pid})", self.name))?;
        let st = self.child.take().expect("running").wait()?;
        self.stopped = false;
        self.note(&format!("exited: {st}"));
        Ok(())
    }

    /// Sends `sig` and waits until the kernel reports the process `stopped` or not.
    fn suspend(&mut self, sig: Signal, stopped: bool) -> Result<()> {
        let pid = self.running_pid()?;
        self.note(&format!("sending {sig}"));
        kill(pid, sig).with_context(|| {
            format!("cannot send {sig} to etcd member {} (pid {pid})", self.name)
        })?;
        let what = format!(
            "etcd member {} (pid {pid}) to be {}",
            self.name,
            if stopped { "stopped" } else { "running again" }
        );
        wait_until(MEMBER_TIMEOUT, &what, || match proc_state(pid) {
            Ok(s) if (s == 'T') == stopped => Check::Ready(()),
            Ok(s) => Check::NotYet(format!("state {s}")),
            Err(e) => Check::Fatal(format!("{e:#}")),
        })?;
        self.stopped = stopped;
        Ok(())
    }

    /// Appends a harness note to the member's log, so the log tells what happened.
    fn note(&self, msg: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "=== twill etcd harness: {}: {msg}", self.name);
        }
    }
}

/// The scheduler state of a process (`R`, `S`, `T` for stopped, ...), from
/// `/proc/<pid>/stat`.
fn proc_state(pid: Pid) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("pid {pid} is gone"))?;
    // The command name in parentheses may contain anything; the state follows it.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .with_context(|| format!("cannot parse /proc/{pid}/stat: {stat:?}"))
}

/// A running etcd cluster with its certificates. Dropping it kills every member (also
/// when a test panics, after printing the tail of every member's log) and deletes its
/// temp dir.
pub struct EtcdCluster {
    etcd: PathBuf,
    etcdctl: PathBuf,
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    token: String,
    /// Where the members run: `None` on loopback, else one lab host each (its
    /// namespace and underlay address).
    lab_hosts: Option<Vec<(String, Ipv4Addr)>>,
    /// `--election-timeout`.
    election: Duration,
    members: Mutex<Vec<Member>>,
    // last: deleted after the members are killed
    dir: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

impl EtcdCluster {
    /// Makes a CA, a server certificate (127.0.0.1, localhost) and a client certificate
    /// (`CN=twill-controller`), starts `members` etcd processes forming one cluster, and
    /// waits until every member is healthy (there is a leader and each serves a
    /// quorum read).
    pub fn start(members: usize) -> Result<EtcdCluster> {
        ensure!(members > 0, "an etcd cluster needs at least one member");
        Self::start_placed(members, None, DEFAULT_ELECTION_TIMEOUT)
    }

    /// [`EtcdCluster::start`] with one member in each of `hosts` of `lab` (etcd's own
    /// pid, started as `ip netns exec <host netns> etcd ...`, which execs in place),
    /// listening on the host's underlay address, clients on [`LAB_CLIENT_PORT`] and
    /// peers (plain HTTP) on [`LAB_PEER_PORT`]. The server certificate names every
    /// host's address; `etcdctl` runs in the first host's namespace. The lab kills the
    /// members too when it is dropped first (with its namespaces).
    /// Its members elect within `election` (etcd's `--election-timeout`, the
    /// heartbeat a tenth of it).
    pub fn start_in_lab(lab: &Lab, hosts: &[&str], election: Duration) -> Result<EtcdCluster> {
        ensure!(
            !hosts.is_empty(),
            "an etcd cluster needs at least one member"
        );
        let placed = hosts
            .iter()
            .map(|h| {
                let h = lab.host(h);
                (h.netns.clone(), h.ip)
            })
            .collect();
        Self::start_placed(hosts.len(), Some(placed), election)
    }

    fn start_placed(
        members: usize,
        lab_hosts: Option<Vec<(String, Ipv4Addr)>>,
        election: Duration,
    ) -> Result<EtcdCluster> {
        let (etcd, etcdctl) = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("twill-test-etcd")
            .tempdir()?;
        let d = dir.path();
        let cluster = EtcdCluster {
            etcd,
            etcdctl,
            ca: d.join("ca.crt"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            token: format!(
                "twill-test-{}-{}",
                std::process::id(),
                CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            lab_hosts,
            election,
            members: Mutex::new(Vec::new()),
            dir,
        };
        let ips: Vec<Ipv4Addr> = cluster
            .lab_hosts
            .iter()
            .flatten()
            .map(|(_, ip)| *ip)
            .collect();
        make_certs(cluster.dir.path(), &ips).context("cannot make the etcd test certificates")?;
        let mut attempt = 1;
        loop {
            match cluster.launch(members) {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < START_ATTEMPTS && cluster.lost_a_port() => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "etcd harness: a port was taken before etcd bound it, trying again: {e:#}"
                    );
                    cluster.discard()?;
                    attempt += 1;
                }
                Err(e) => bail!("{e:#}{}", cluster.log_tails()),
            }
        }
    }

    /// Starts every member of a new cluster with fresh ports and data dirs, and waits
    /// until all are healthy.
    fn launch(&self, members: usize) -> Result<()> {
        let placed: Vec<(Option<String>, Ipv4Addr, u16, u16)> = match &self.lab_hosts {
            Some(hosts) => hosts
                .iter()
                .map(|(ns, ip)| (Some(ns.clone()), *ip, LAB_CLIENT_PORT, LAB_PEER_PORT))
                .collect(),
            None => {
                let ports = free_ports(2 * members)?;
                (0..members)
                    .map(|i| (None, Ipv4Addr::LOCALHOST, ports[2 * i], ports[2 * i + 1]))
                    .collect()
            }
        };
        let d = self.dir.path();
        let fresh: Vec<Member> = placed
            .into_iter()
            .enumerate()
            .map(|(i, (netns, ip, client_port, peer_port))| Member {
                name: format!("etcd{i}"),
                ip,
                netns,
                client_port,
                peer_port,
                data_dir: d.join(format!("etcd{i}.data")),
                log: d.join(format!("etcd{i}.log")),
                child: None,
                stopped: false,
                starts: 0,
            })
            .collect();
        let initial = initial_cluster(&fresh);
        // Each member is ours (killed on drop) from the moment it starts.
        let mut ms = lock(&self.members);
        *ms = fresh;
        for m in ms.iter_mut() {
            self.spawn(m, &initial, "new")?;
        }
        drop(ms);
        let what = format!("the {members}-member etcd cluster to be healthy");
        wait_until(START_TIMEOUT, &what, || {
            if let Some(dead) = self.first_dead_member() {
                return Check::Fatal(dead);
            }
            match self.etcdctl(&["endpoint", "health"], None) {
                Ok(out) if out.success() => Check::Ready(()),
                Ok(out) => Check::NotYet(format!("{out}")),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        })
    }

    /// Kills every member and deletes their data dirs and logs, for a fresh start.
    fn discard(&self) -> Result<()> {
        self.kill_all();
        for m in lock(&self.members).drain(..) {
            if m.data_dir.exists() {
                std::fs::remove_dir_all(&m.data_dir)?;
            }
            std::fs::remove_file(&m.log)?;
        }
        Ok(())
    }

    /// Whether a member exited because its port was taken.
    fn lost_a_port(&self) -> bool {
        lock(&self.members).iter().any(|m| {
            std::fs::read_to_string(&m.log).is_ok_and(|l| l.contains("address already in use"))
        })
    }

    /// A description of the first member that should run but exited, with its log.
    fn first_dead_member(&self) -> Option<String> {
        lock(&self.members).iter_mut().find_map(|m| {
            (!m.is_running()).then(|| {
                format!(
                    "etcd member {} exited; its log:\n{}",
                    m.name,
                    log_tail(&m.log, LOG_LINES)
                )
            })
        })
    }

    /// Starts `m`'s etcd process.
    fn spawn(&self, m: &mut Member, initial_cluster: &str, state: &str) -> Result<()> {
        let p = |f: &Path| f.display().to_string();
        let mut cmd = self.command(m.netns.as_deref(), &self.etcd);
        cmd.args(["--name", &m.name])
            .args(["--data-dir", &p(&m.data_dir)])
            .args(["--listen-client-urls", &m.endpoint()])
            .args(["--advertise-client-urls", &m.endpoint()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .arg("--client-cert-auth")
            .args(["--trusted-ca-file", &p(&self.ca)])
            .args(["--cert-file", &p(&self.server_cert)])
            .args(["--key-file", &p(&self.server_key)])
            // etcd's defaults unless a test asks (DEFAULT_ELECTION_TIMEOUT): a lost
            // leader is replaced within about a second (a test waiting on failover
            // waits for that), and two busy cores running debug builds in parallel do
            // not cause spurious elections.
            .args([
                "--heartbeat-interval",
                &(self.election.as_millis() / 10).to_string(),
            ])
            .args(["--election-timeout", &self.election.as_millis().to_string()])
            .args(["--logger", "zap", "--log-level", "info"]);
        // hermetic: etcd reads ETCD_* variables as flags
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("cannot open log {}", m.log.display()))?;
        m.starts += 1;
        writeln!(
            log,
            "=== twill etcd harness: start #{} of {}: {}",
            m.starts,
            m.name,
            cmdline(&cmd)
        )?;
        let err = log.try_clone()?;
        // etcd itself is the child (no shell, no wrapper; `ip netns exec` execs in
        // place): its pid is etcd's.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", cmdline(&cmd)))?;
        m.child = Some(child);
        m.stopped = false;
        Ok(())
    }

    fn member<T>(&self, i: usize, f: impl FnOnce(&mut Member) -> Result<T>) -> Result<T> {
        let mut ms = lock(&self.members);
        let n = ms.len();
        let m = ms
            .get_mut(i)
            .with_context(|| format!("no etcd member {i} (the cluster has {n})"))?;
        f(m)
    }

    /// SIGKILLs member `i` (etcd's own pid) and reaps it.
    pub fn kill(&self, i: usize) -> Result<()> {
        self.member(i, Member::kill)
    }

    /// Starts killed member `i` again with its data dir, ports and
    /// `--initial-cluster-state existing`, and waits until it answers (a local status
    /// request: whether the cluster has quorum again is for the caller to wait for).
    pub fn restart(&self, i: usize) -> Result<()> {
        let initial = initial_cluster(&lock(&self.members));
        let endpoint = self.member(i, |m| {
            ensure!(
                !m.is_running(),
                "etcd member {} is running: kill it first",
                m.name
            );
            self.spawn(m, &initial, "existing")?;
            Ok(m.endpoint())
        })?;
        let what = format!("restarted etcd member {i} to answer");
        wait_until(MEMBER_TIMEOUT, &what, || {
            let exited = self.member(i, |m| {
                Ok((!m.is_running()).then(|| log_tail(&m.log, LOG_LINES)))
            });
            if let Ok(Some(log)) = exited {
                return Check::Fatal(format!("it exited; its log:\n{log}"));
            }
            match self.etcdctl_at(&endpoint, &["endpoint", "status"], None) {
                Ok(out) if out.success() => Check::Ready(()),
                Ok(out) => Check::NotYet(format!("{out}")),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        })
    }

    /// SIGSTOPs member `i` and waits until it is stopped: it holds its connections
    /// but answers nothing (a hung member, unlike a dead one).
    pub fn stop(&self, i: usize) -> Result<()> {
        self.member(i, |m| m.suspend(Signal::SIGSTOP, true))
    }

    /// SIGCONTs member `i` stopped by [`EtcdCluster::stop`] and waits until it runs.
    pub fn cont(&self, i: usize) -> Result<()> {
        self.member(i, |m| m.suspend(Signal::SIGCONT, false))
    }

    /// The pid of member `i`'s etcd process, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.member(i, |m| Ok(m.pid())).ok().flatten()
    }

    /// Every member's client URL (`https://127.0.0.1:PORT`, or `https://<host
    /// address>:2379` in a lab), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        lock(&self.members).iter().map(Member::endpoint).collect()
    }

    /// [`EtcdCluster::endpoints`], comma-separated (for a flag).
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// The CA certificate (it signed the server and client certificates).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// A client certificate (`CN=twill-controller`) etcd accepts.
    pub fn client_cert(&self) -> &Path {
        &self.client_cert
    }

    /// The key of [`EtcdCluster::client_cert`].
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// Every key under `prefix` with its value, in key order (a quorum read).
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        #[derive(Deserialize)]
        struct Range {
            #[serde(default)]
            kvs: Vec<Kv>,
        }
        #[derive(Deserialize)]
        struct Kv {
            key: String,
            // absent when the value is empty
            #[serde(default)]
            value: String,
        }
        let out = self
            .etcdctl(&["get", "--prefix", "-w", "json", "--", prefix], None)?
            .ok()?;
        let range: Range = serde_json::from_str(&out)
            .with_context(|| format!("cannot parse etcdctl get -w json: {out}"))?;
        range
            .kvs
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8(base64_decode(&kv.key)?)
                    .with_context(|| format!("key {:?} is not UTF-8", kv.key))?;
                Ok((key, base64_decode(&kv.value)?))
            })
            .collect()
    }

    /// Writes `key` = `value`.
    pub fn put(&self, key: &str, value: impl AsRef<[u8]>) -> Result<()> {
        // The value goes through stdin: as an argument it could not hold a NUL. But
        // etcdctl takes empty stdin for a missing value, so an empty one is an argument.
        let value = value.as_ref();
        let out = if value.is_empty() {
            self.etcdctl(&["put", "--", key, ""], None)?
        } else {
            self.etcdctl(&["put", "--", key], Some(value))?
        };
        out.ok().map(drop)
    }

    /// The IDs of the leases etcd holds (`etcdctl lease list`).
    pub fn leases(&self) -> Result<Vec<String>> {
        let out = self.etcdctl(&["lease", "list"], None)?.ok()?;
        // "found N leases" and then one hex ID a line.
        Ok(out
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Deletes every key under `prefix`; how many there were.
    pub fn del_prefix(&self, prefix: &str) -> Result<u64> {
        let out = self
            .etcdctl(&["del", "--prefix", "--", prefix], None)?
            .ok()?;
        out.trim()
            .parse()
            .with_context(|| format!("etcdctl del printed {out:?}"))
    }

    /// Runs etcdctl against the members that can answer: killed and SIGSTOPped ones
    /// are left out, so that a request fails for want of quorum, not because etcdctl
    /// picked a member that never answers.
    fn etcdctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<CmdOutput> {
        let endpoints = lock(&self.members)
            .iter_mut()
            .filter_map(|m| (m.is_running() && !m.stopped).then(|| m.endpoint()))
            .collect::<Vec<_>>();
        ensure!(!endpoints.is_empty(), "no etcd member is running");
        self.etcdctl_at(&endpoints.join(","), args, stdin)
    }

    /// Runs `etcdctl --endpoints=<endpoints> ARGS` over TLS with the client certificate.
    fn etcdctl_at(
        &self,
        endpoints: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CmdOutput> {
        let p = |f: &Path| f.display().to_string();
        let netns = self.lab_hosts.as_ref().map(|h| h[0].0.as_str());
        let mut cmd = self.command(netns, &self.etcdctl);
        // hermetic: etcdctl reads ETCDCTL_* variables as flags
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg(format!("--cacert={}", p(&self.ca)))
            .arg(format!("--cert={}", p(&self.client_cert)))
            .arg(format!("--key={}", p(&self.client_key)))
            .args([DIAL_TIMEOUT, COMMAND_TIMEOUT])
            .args(args);
        let Some(input) = stdin else {
            return cmd::capture(&mut cmd);
        };
        let line = cmdline(&cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run `{line}`"))?;
        // etcdctl reads all of stdin before it prints anything: no deadlock
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input)
            .with_context(|| format!("cannot write to `{line}`"))?;
        let out = child.wait_with_output()?;
        Ok(CmdOutput {
            cmdline: line,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `program`, run in network namespace `netns` (`ip netns exec`, which execs it in
    /// place) or in the machine's.
    fn command(&self, netns: Option<&str>, program: &Path) -> Command {
        match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Each member's state and the tail of its log, for a failure's message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for m in lock(&self.members).iter_mut() {
            let state = match m.pid() {
                Some(pid) if m.stopped => format!("pid {pid}, SIGSTOPped"),
                Some(pid) => format!("pid {pid}"),
                None => "not running".into(),
            };
            out.push_str(&format!(
                "\n----- twill etcd harness log: {} ({}, {state}) -----\n{}",
                m.name,
                m.endpoint(),
                log_tail(&m.log, LOG_LINES)
            ));
        }
        out
    }

    fn kill_all(&self) {
        for m in lock(&self.members).iter_mut() {
            if m.is_running() {
                let _ = m.kill();
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        self.kill_all();
    }
}

/// `--initial-cluster`: every member's name and peer URL.
fn initial_cluster(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes `ca.crt`/`ca.key`, `server.crt`/`server.key` (serverAuth for 127.0.0.1,
/// localhost and `ips`; also clientAuth, since etcd's gRPC gateway dials its own gRPC
/// server with it) and `client.crt`/`client.key` (`CN=twill-controller`, clientAuth)
/// into `dir`, with `openssl`: P-256 keys, valid for two days.
fn make_certs(dir: &Path, ips: &[Ipv4Addr]) -> Result<()> {
    let p = |f: &str| dir.join(f).display().to_string();
    let cnf = p("openssl.cnf");
    let sans: String = ips.iter().map(|ip| format!(", IP:{ip}")).collect();
    std::fs::write(
        &cnf,
        format!(
            "[req]\n\
         distinguished_name = dn\n\
         prompt = no\n\
         [dn]\n\
         CN = replaced-by-subj\n\
         [ca]\n\
         basicConstraints = critical, CA:TRUE\n\
         keyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth, clientAuth\n\
         subjectAltName = IP:127.0.0.1, DNS:localhost{sans}\n\
         [client]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\n"
        ),
    )?;
    let key_opts = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-config", &cnf, "-extensions", "ca"];
    ca.extend(key_opts);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=twill-test-etcd-ca",
    ]);
    openssl(&ca)?;
    for (name, cn) in [("server", "localhost"), ("client", "twill-controller")] {
        let (key, csr, crt) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.crt")),
        );
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-new", "-config", &cnf];
        req.extend(key_opts);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&req)?;
        let serial = p("ca.srl");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAserial",
            &serial,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &cnf,
            "-extensions",
            name,
            "-out",
            &crt,
        ])?;
    }
    Ok(())
}

/// Decodes standard base64 (with or without padding), as etcdctl's JSON output
/// encodes keys and values.
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("invalid base64 {s:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_base64() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode("L3R3aWxsL2E=").unwrap(), b"/twill/a");
        assert_eq!(base64_decode("AP8+/w==").unwrap(), [0, 255, 62, 255]);
        assert!(base64_decode("Zm9v!").is_err());
    }
}
