//! Several `twill-controller` replicas on one [`EtcdCluster`], on the host's loopback
//! (no network namespaces): for the high-availability tests of the etcd store.
//!
//! * [`Pki`]: a CA, a controller certificate (127.0.0.1, localhost) and an admin
//!   certificate made with `twillctl certs`, and node certificates issued in-process
//!   with the `twill-ctl` library (hundreds in a second, where the CLI takes minutes).
//! * [`Controller`]: one controller process, started directly (its pid is the
//!   controller's own), with its log; SIGKILL, SIGSTOP/SIGCONT, SIGTERM by that pid,
//!   each checked in `/proc`.
//! * [`ReplicaSet`]: N controllers with `--store etcd` on one prefix, each advertising
//!   its own `https://127.0.0.1:PORT`; `/readyz` and `/metrics` over plain HTTP; who
//!   leads; kill, restart, freeze and thaw a replica by index. Dropping it kills every
//!   controller (printing each log's tail when a test panicked).
//!
//! ```no_run
//! use std::time::Duration;
//! use twill_tests::replicas::{Pki, ReplicaSet, HA_NET_CONF};
//! use twill_tests::{Bins, EtcdCluster};
//!
//! let bins = Bins::locate().unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! let pki = Pki::create(&bins, &dir.path().join("certs")).unwrap();
//! let etcd = EtcdCluster::start(3).unwrap();
//! let set = ReplicaSet::start(&bins, &etcd, &pki, dir.path(), 3, "/twill/", HA_NET_CONF).unwrap();
//! let leader = set.wait_leader(Duration::from_secs(30), None).unwrap();
//! set.kill(leader).unwrap(); // SIGKILL to its own pid, reaped, gone from /proc
//! set.restart(leader).unwrap(); // same flags, same ports
//! ```

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use twill_ctl::certs::{Ca, Role, Validity};

use crate::cmd::{self, cmdline};
use crate::etcd::EtcdCluster;
use crate::kit::{free_ports, http_get, on_taken_port, skip};
use crate::process::log_tail;
use crate::wait::{wait_until, Check};
use crate::Bins;

/// A network with room for thousands of /24 leases (4,096), so that a test may hold
/// a thousand nodes; public IPs of test nodes are outside it (100.64.0.0/10 and the
/// documentation ranges).
pub const HA_NET_CONF: &str =
    r#"{"Network":"10.64.0.0/12","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
/// The admin user of [`Pki`].
pub const ADMIN: &str = "ha-admin";
/// How long a controller may take to exit after SIGTERM.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freeze or thaw may take to show in `/proc`.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines of each controller printed when a test fails.
const LOG_LINES: usize = 40;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

// ------------------------------------------------------------------ certificates

/// A certificate and key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The test PKI: files from `twillctl certs` in [`Pki::dir`] (`ca.crt`, `ca.key`,
/// `controller.crt/.key` with O=twill:controllers and clientAuth, from `--replica`,
/// `admin-ha-admin.crt/.key`), and node certificates issued in-process by the same CA.
pub struct Pki {
    dir: PathBuf,
    ca: Ca,
    ca_pem: String,
    admin: Pem,
    nodes: Mutex<HashMap<String, Arc<Pem>>>,
}

impl Pki {
    /// Makes the CA, the controller certificate for the replicas (`--replica`, IP
    /// 127.0.0.1, DNS localhost) and the admin certificate in `dir` with `twillctl certs`.
    pub fn create(bins: &Bins, dir: &Path) -> Result<Pki> {
        let ctl = bins.twillctl().display().to_string();
        let d = dir.display().to_string();
        cmd::run(&[&ctl, "certs", "init", "--dir", &d])?;
        cmd::run(&[
            &ctl,
            "certs",
            "issue",
            "controller",
            "--replica",
            "--dir",
            &d,
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
        ])?;
        cmd::run(&[&ctl, "certs", "issue", "admin", ADMIN, "--dir", &d])?;
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("twillctl certs did not write {}", dir.join(f).display()))
        };
        let ca = Ca::load(&dir.join("ca.crt"), &dir.join("ca.key"))
            .context("cannot load the CA twillctl made")?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_pem: read("ca.crt")?,
            admin: Pem {
                cert: read(&format!("admin-{ADMIN}.crt"))?,
                key: read(&format!("admin-{ADMIN}.key"))?,
            },
            ca,
            nodes: Mutex::new(HashMap::new()),
        })
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `ca.crt`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The admin's certificate (`CN=ha-admin, O=twill:admins`).
    pub fn admin(&self) -> &Pem {
        &self.admin
    }

    /// A node certificate (`CN=<node>, O=twill:nodes`), issued once per node.
    pub fn node(&self, node: &str) -> Result<Arc<Pem>> {
        if let Some(p) = lock(&self.nodes).get(node) {
            return Ok(p.clone());
        }
        let issued = self
            .ca
            .issue(&Role::Node(node.to_string()), Validity::days(1)?)
            .with_context(|| format!("cannot issue a node certificate for {node}"))?;
        let pem = Arc::new(Pem {
            cert: issued.cert_pem,
            key: issued.key_pem,
        });
        lock(&self.nodes).insert(node.to_string(), pem.clone());
        Ok(pem)
    }

    /// The controller flags that name the serving certificate and the client CA.
    fn tls_args(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--tls-cert".into(),
            p("controller.crt"),
            "--tls-key".into(),
            p("controller.key"),
            "--tls-client-ca".into(),
            p("ca.crt"),
        ]
    }
}

// ------------------------------------------------------------------ processes

/// The scheduler state of a process (`R`, `S`, `T` for stopped, `Z`...), from
/// `/proc/<pid>/stat`; `None` once the pid is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// One controller process (no shell, no wrapper: the child's pid is the controller's),
/// its flags, and its log (stdout and stderr, appended across restarts, with notes of
/// what the harness did to it).
#[derive(Debug)]
pub struct Controller {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped and not continued yet.
    frozen: bool,
    starts: u32,
}

impl Controller {
    /// A controller that is not started yet.
    pub fn new(name: &str, program: &Path, args: Vec<String>, log: PathBuf) -> Controller {
        Controller {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log,
            child: None,
            frozen: false,
            starts: 0,
        }
    }

    /// More flags, for its next start.
    pub fn push_args<S: Into<String>>(&mut self, args: impl IntoIterator<Item = S>) {
        self.args.extend(args.into_iter().map(Into::into));
    }

    /// Starts (or starts again) the process with its flags.
    pub fn start(&mut self) -> Result<()> {
        ensure!(!self.is_running(), "{} is already running", self.name);
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        // hermetic: everything is passed by flags
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TWILL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("TWILL_HA_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open log {}", self.log.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "=== twill ha harness: start #{} of {}: {}",
            self.starts,
            self.name,
            cmdline(&cmd)
        )?;
        let err = log.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}: {}", self.name, cmdline(&cmd)))?;
        self.child = Some(child);
        self.frozen = false;
        Ok(())
    }

    /// Reaps the process if it exited; whether it still runs.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(st)) => {
                self.note(&format!("exited: {st}"));
                self.child = None;
                self.frozen = false;
                false
            }
            Err(_) => false,
        }
    }

    /// Its pid, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// True while SIGSTOPped.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    fn running_pid(&mut self) -> Result<u32> {
        self.pid()
            .with_context(|| format!("{} is not running", self.name))
    }

    fn signal(&self, pid: u32, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("cannot send {sig} to {} (pid {pid})", self.name))
    }

    /// SIGKILL to its own pid; reaps it and checks the pid is gone from `/proc`.
    /// Returns the pid it had.
    pub fn kill(&mut self) -> Result<u32> {
        let pid = self.running_pid()?;
        self.note(&format!("sending SIGKILL to pid {pid}"));
        self.signal(pid, Signal::SIGKILL)?;
        let st = self.child.take().expect("running").wait()?;
        self.frozen = false;
        self.note(&format!("exited: {st}"));
        ensure!(
            proc_state(pid).is_none(),
            "{} (pid {pid}) is still in /proc after SIGKILL and wait",
            self.name
        );
        Ok(pid)
    }

    /// SIGSTOP to its own pid; waits until the kernel reports it stopped.
    pub fn freeze(&mut self) -> Result<u32> {
        let pid = self.running_pid()?;
        self.note(&format!("sending SIGSTOP to pid {pid}"));
        self.signal(pid, Signal::SIGSTOP)?;
        wait_until(
            SIGNAL_TIMEOUT,
            &format!("{} (pid {pid}) to be stopped", self.name),
            || match proc_state(pid) {
                Some('T') => Check::Ready(()),
                Some(s) => Check::NotYet(format!("state {s}")),
                None => Check::Fatal("the pid is gone".into()),
            },
        )?;
        self.frozen = true;
        Ok(pid)
    }

    /// SIGCONT to its own pid; waits until the kernel no longer reports it stopped.
    pub fn thaw(&mut self) -> Result<u32> {
        let pid = self.running_pid()?;
        self.note(&format!("sending SIGCONT to pid {pid}"));
        self.signal(pid, Signal::SIGCONT)?;
        wait_until(
            SIGNAL_TIMEOUT,
            &format!("{} (pid {pid}) to run again", self.name),
            || match proc_state(pid) {
                Some('T') => Check::NotYet("still stopped".into()),
                Some(_) => Check::Ready(()),
                None => Check::Fatal("the pid is gone".into()),
            },
        )?;
        self.frozen = false;
        Ok(pid)
    }

    /// SIGTERM and wait for the exit (SIGKILL and an error past [`TERM_TIMEOUT`]).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let pid = self.running_pid()?;
        if self.frozen {
            self.thaw()?;
        }
        self.note(&format!("sending SIGTERM to pid {pid}"));
        self.signal(pid, Signal::SIGTERM)?;
        let deadline = Instant::now() + TERM_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().expect("running").try_wait()? {
                self.child = None;
                self.note(&format!("exited: {st}"));
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!(
                    "{} did not exit within {TERM_TIMEOUT:?} of SIGTERM (killed)",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Appends a harness note to the log.
    pub fn note(&self, msg: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "=== twill ha harness: {}: {msg}", self.name);
        }
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.kill();
        }
    }
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

// ------------------------------------------------------------------ replica sets

/// What one `/readyz` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    Leader,
    Follower,
    /// Any other answer (status and body), or no answer.
    Not(String),
}

/// One replica's addresses.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// Controllers with `--store etcd` on one etcd prefix. See the module documentation.
pub struct ReplicaSet {
    addrs: Vec<Addrs>,
    controllers: Mutex<Vec<Controller>>,
    prefix: String,
}

/// The flags every controller of these tests gets: addresses, net-conf, TLS, and a data
/// dir of its own (unused with etcd, but never the default /var/lib/twill).
pub fn base_args(pki: &Pki, addrs: Addrs, net_conf: &Path, data_dir: &Path) -> Vec<String> {
    let mut args = vec![
        "--listen".to_string(),
        addrs.grpc.to_string(),
        "--metrics-addr".into(),
        addrs.http.to_string(),
        "--net-conf".into(),
        net_conf.display().to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        // No file: only `default`, and never the host's /etc/twill/networks.
        "--networks-dir".into(),
        data_dir.join("networks").display().to_string(),
    ];
    args.extend(pki.tls_args());
    args
}

/// The `--store etcd` flags for `etcd` and `prefix`.
pub fn etcd_args(etcd: &EtcdCluster, prefix: &str) -> Vec<String> {
    vec![
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints_csv(),
        "--etcd-cert".into(),
        etcd.client_cert().display().to_string(),
        "--etcd-key".into(),
        etcd.client_key().display().to_string(),
        "--etcd-ca".into(),
        etcd.ca().display().to_string(),
        "--etcd-prefix".into(),
        prefix.into(),
    ]
}

/// A lazily connecting mutual-TLS channel to `url` with `pem`'s certificate (made
/// inside a tokio runtime; it connects at its first call).
pub fn channel(url: &str, ca: &str, pem: &Pem) -> Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(&pem.cert, &pem.key));
    Ok(Endpoint::from_shared(url.to_string())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// A controller on `etcd` under `prefix`, not started: the addresses `addrs`, advertised
/// at its gRPC address, the net-conf `dir/net-conf.json`, its data dir
/// `dir/<name>.data` and its log `dir/<name>.log`.
pub fn replica(
    bins: &Bins,
    etcd: &EtcdCluster,
    pki: &Pki,
    dir: &Path,
    prefix: &str,
    name: &str,
    addrs: Addrs,
) -> Controller {
    let conf = dir.join("net-conf.json");
    let mut args = base_args(pki, addrs, &conf, &dir.join(format!("{name}.data")));
    args.extend(etcd_args(etcd, prefix));
    args.extend(["--advertise-url".into(), format!("https://{}", addrs.grpc)]);
    Controller::new(
        name,
        &bins.controller(),
        args,
        dir.join(format!("{name}.log")),
    )
}

/// Picks free ports for `n` controllers (gRPC and HTTP each).
pub fn pick_addrs(n: usize) -> Result<Vec<Addrs>> {
    let ports = free_ports(2 * n)?;
    Ok((0..n)
        .map(|i| Addrs {
            grpc: SocketAddr::from(([127, 0, 0, 1], ports[2 * i])),
            http: SocketAddr::from(([127, 0, 0, 1], ports[2 * i + 1])),
        })
        .collect())
}

impl ReplicaSet {
    /// Writes `net_conf` to `dir/net-conf.json` and starts `n` replicas on `etcd` under
    /// `prefix` (logs `dir/replica<i>.log`); returns once each answers `/readyz` with
    /// 200 (as leader or follower). A set one of whose ports was taken between being
    /// picked and bound is started again on new ones.
    pub fn start(
        bins: &Bins,
        etcd: &EtcdCluster,
        pki: &Pki,
        dir: &Path,
        n: usize,
        prefix: &str,
        net_conf: &str,
    ) -> Result<ReplicaSet> {
        std::fs::write(dir.join("net-conf.json"), net_conf)?;
        on_taken_port("a replica set", || {
            ReplicaSet::start_once(bins, etcd, pki, dir, n, prefix)
        })
    }

    fn start_once(
        bins: &Bins,
        etcd: &EtcdCluster,
        pki: &Pki,
        dir: &Path,
        n: usize,
        prefix: &str,
    ) -> Result<ReplicaSet> {
        let addrs = pick_addrs(n)?;
        let controllers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| replica(bins, etcd, pki, dir, prefix, &format!("replica{i}"), *a))
            .collect();
        let set = ReplicaSet {
            addrs,
            controllers: Mutex::new(controllers),
            prefix: prefix.to_string(),
        };
        for i in 0..n {
            set.with(i, Controller::start)?;
        }
        for i in 0..n {
            set.wait_ready(i, Duration::from_secs(30))?;
        }
        Ok(set)
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Never: a set has at least one replica.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The etcd prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Replica `i`'s gRPC URL (its `--advertise-url`).
    pub fn url(&self, i: usize) -> String {
        format!("https://{}", self.addrs[i].grpc)
    }

    /// Replica `i`'s addresses.
    pub fn addrs(&self, i: usize) -> Addrs {
        self.addrs[i]
    }

    /// Runs `f` on replica `i`'s process.
    pub fn with<T>(&self, i: usize, f: impl FnOnce(&mut Controller) -> Result<T>) -> Result<T> {
        let mut cs = lock(&self.controllers);
        let n = cs.len();
        let c = cs
            .get_mut(i)
            .with_context(|| format!("no replica {i} (the set has {n})"))?;
        f(c)
    }

    /// Replica `i`'s pid, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.with(i, |c| Ok(c.pid())).ok().flatten()
    }

    /// SIGKILLs replica `i` (its own pid; reaped; gone from `/proc`); the pid it had.
    pub fn kill(&self, i: usize) -> Result<u32> {
        self.with(i, Controller::kill)
    }

    /// Starts replica `i` again with the same flags (and ports, so the same URL).
    pub fn restart(&self, i: usize) -> Result<()> {
        self.with(i, Controller::start)
    }

    /// SIGSTOPs replica `i`.
    pub fn freeze(&self, i: usize) -> Result<u32> {
        self.with(i, Controller::freeze)
    }

    /// SIGCONTs replica `i`.
    pub fn thaw(&self, i: usize) -> Result<u32> {
        self.with(i, Controller::thaw)
    }

    /// SIGTERMs replica `i` and waits for its exit.
    pub fn terminate(&self, i: usize) -> Result<ExitStatus> {
        self.with(i, Controller::terminate)
    }

    /// Replica `i`'s whole log.
    pub fn log(&self, i: usize) -> String {
        self.with(i, |c| Ok(c.log_text())).unwrap_or_default()
    }

    /// Appends a note to replica `i`'s log.
    pub fn note(&self, i: usize, msg: &str) {
        let _ = self.with(i, |c| {
            c.note(msg);
            Ok(())
        });
    }

    /// Every replica's state and log tail, for a failure's message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for c in lock(&self.controllers).iter_mut() {
            let state = match c.pid() {
                Some(pid) if c.is_frozen() => format!("pid {pid}, SIGSTOPped"),
                Some(pid) => format!("pid {pid}"),
                None => "not running".into(),
            };
            out.push_str(&format!(
                "\n----- twill ha harness log: {} ({state}) -----\n{}",
                c.name,
                c.log_tail(LOG_LINES)
            ));
        }
        out
    }

    /// Whether replica `i` runs and is not frozen (so that it can answer).
    pub fn answers(&self, i: usize) -> bool {
        self.with(i, |c| Ok(c.is_running() && !c.is_frozen()))
            .unwrap_or(false)
    }

    /// What replica `i`'s `/readyz` says now.
    pub fn readyz(&self, i: usize) -> Ready {
        if !self.answers(i) {
            return Ready::Not("not running, or SIGSTOPped".into());
        }
        match http_get(self.addrs[i].http, "/readyz") {
            Ok(r) if r.status == 200 && r.body.trim() == "ready (leader)" => Ready::Leader,
            Ok(r) if r.status == 200 && r.body.trim() == "ready (follower)" => Ready::Follower,
            Ok(r) => Ready::Not(format!("{} {}", r.status, r.body.trim())),
            Err(e) => Ready::Not(format!("{e:#}")),
        }
    }

    /// Replica `i`'s `/metrics` text.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let r = http_get(self.addrs[i].http, "/metrics")?;
        ensure!(
            r.status == 200,
            "/metrics of replica {i} answered {}",
            r.status
        );
        Ok(r.body)
    }

    /// Waits until replica `i` answers `/readyz` with 200; what it said.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Result<Ready> {
        wait_until(timeout, &format!("replica {i} to be ready"), || {
            if !self.with(i, |c| Ok(c.is_running())).unwrap_or(false) {
                return Check::Fatal(format!(
                    "it is not running; its log:\n{}",
                    self.with(i, |c| Ok(c.log_tail(LOG_LINES)))
                        .unwrap_or_default()
                ));
            }
            match self.readyz(i) {
                Ready::Not(why) => Check::NotYet(why),
                r => Check::Ready(r),
            }
        })
    }

    /// The replicas whose `/readyz` says leader (frozen and dead ones are not asked).
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.readyz(i) == Ready::Leader)
            .collect()
    }

    /// Waits until exactly one replica (other than `not`) says it leads; its index.
    pub fn wait_leader(&self, timeout: Duration, not: Option<usize>) -> Result<usize> {
        let what = match not {
            Some(n) => format!("a replica other than {n} to lead"),
            None => "a replica to lead".into(),
        };
        wait_until(timeout, &what, || {
            let said: Vec<(usize, Ready)> = (0..self.len()).map(|i| (i, self.readyz(i))).collect();
            let leaders: Vec<usize> = said
                .iter()
                .filter(|(_, r)| *r == Ready::Leader)
                .map(|(i, _)| *i)
                .collect();
            match leaders.as_slice() {
                [l] if Some(*l) != not => Check::Ready(*l),
                _ => Check::NotYet(format!("/readyz: {said:?}")),
            }
        })
        .map_err(|e| anyhow::anyhow!("{e:#}{}", self.log_tails()))
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        for c in lock(&self.controllers).iter_mut() {
            if c.is_running() {
                let _ = c.kill();
            }
        }
    }
}

/// The binaries for a replicated-controller test, or a loud skip (a failure with CI
/// set) when etcd or they are missing.
pub fn replica_bins(test: &str) -> Option<Bins> {
    if !crate::require_etcd(test) {
        return None;
    }
    match Bins::locate() {
        Ok(b) => Some(b),
        Err(e) => {
            skip(test, &format!("needs the Twill binaries: {e:#}"));
            None
        }
    }
}

/// Runs a scenario in a temp dir of its own (certificates, net-conf, every
/// controller's log). On failure the dir is kept, and its path printed, so that the
/// logs can be read; with `TWILL_HA_KEEP` set it is always kept.
pub fn run_kept(prefix: &str, scenario: impl FnOnce(&Path) -> Result<()>) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temp dir");
    let result = scenario(dir.path());
    if result.is_err() || std::env::var_os("TWILL_HA_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("{prefix}: logs kept in {}", kept.display());
    }
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// A two-thread runtime for a scenario's client side.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
