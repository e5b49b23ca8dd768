//! The two servers under test, each a real process on 127.0.0.1 with a temp data dir:
//! `twill-controller`, and etcd configured as flannel's etcd mode would use it
//! (client-certificate TLS from the same CA).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use twill_common::networks::{check_against, Network, NetworkName};
use twill_common::NetConf;

use twill_tests::kit::{free_ports, on_taken_port};

use crate::pki::Pki;
use crate::sim;

/// The controller's count of watch messages sent (one per watcher per publication).
pub const WATCH_MESSAGES: &str = "twill_watch_messages_sent_total";

/// The Twill network configuration of the benchmarks: a /8 of /24s, room for 65,535
/// nodes (flannel's 10.244.0.0/16 holds only 255).
pub const NET_CONF: &str =
    r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#;

/// The files of the extra networks of a run joining `networks` networks (the default
/// one, [`NET_CONF`], and `networks - 1` more, [`sim::network_conf`]): (file name,
/// contents) each. Refused, before any controller starts, when there are more than
/// the bench has pools for, when two would overlap or share a VNI (the controller's own
/// rules), or when a pool has fewer subnets than `nodes` (the nodes and joiners that
/// will each hold a lease in it).
pub fn extra_networks(networks: usize, nodes: usize) -> Result<Vec<(String, String)>> {
    if networks == 0 || networks > sim::MAX_NETWORKS {
        bail!(
            "--networks {networks}: the bench has pools for 1 to {} networks",
            sim::MAX_NETWORKS
        );
    }
    let default = NetConf::parse(NET_CONF).context("the bench's default network")?;
    let mut all = vec![Network::default_from(default)];
    let mut files = Vec::new();
    for k in 1..networks {
        let name = sim::network_name(k);
        let conf = sim::network_conf(k);
        let file = format!("{name}.json");
        let net = Network::parse(NetworkName::new(name.clone())?, &conf, Path::new(&file))
            .with_context(|| format!("the bench's network {name}"))?;
        check_against(&net, &all).with_context(|| format!("the bench's network {name}"))?;
        let subnets = net.conf.ipv4.as_ref().map_or(0, |p| p.count() as usize);
        if subnets < nodes {
            bail!("network {name} ({conf}) has {subnets} subnets, fewer than the {nodes} nodes");
        }
        all.push(net);
        files.push((file, conf));
    }
    Ok(files)
}

/// Finds `twill-controller`: `--controller-bin`/`TWILL_BENCH_CONTROLLER`, else next to
/// this binary (same profile), else target/release, else target/debug.
pub fn find_controller(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--controller-bin {} does not exist", p.display());
    }
    find_bin(
        "twill-controller",
        "build it with `cargo build --release -p twill-server` (or pass --controller-bin)",
    )
}

/// The workspace binary `name`: next to twill-bench (or its test), else in
/// target/{release,debug}; `how` says how to build it when it is in neither.
pub fn find_bin(name: &str, how: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut candidates = Vec::new();
    // target/<profile>/twill-bench, or target/<profile>/deps/<test> for tests.
    for dir in exe.ancestors().skip(1).take(3) {
        candidates.push(dir.join(name));
        candidates.push(dir.join("release").join(name));
        candidates.push(dir.join("debug").join(name));
    }
    candidates.push(PathBuf::from("target/release").join(name));
    candidates.push(PathBuf::from("target/debug").join(name));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found next to twill-bench nor in target/{{release,debug}}: {how}")
        })
}

/// Whether a binary was built with the release profile (for the report).
pub fn profile_of(bin: &Path) -> &'static str {
    if bin.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else if bin.components().any(|c| c.as_os_str() == "debug") {
        "debug"
    } else {
        "unknown"
    }
}

/// The controller as a reader can rebuild it: its `--version`, build profile and the
/// git revision of the checkout it was built in (`+changes` when that tree differs
/// from the commit), e.g. `twill-controller 0.1.0, release, git 07251e8`.
pub fn describe_controller(bin: &Path) -> String {
    let run = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let version =
        run(Command::new(bin).arg("--version")).unwrap_or_else(|| "twill-controller".into());
    // target/<profile>/twill-controller: the checkout is above `target`.
    let checkout = bin.canonicalize().ok().and_then(|b| {
        b.ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "target"))
            .and_then(Path::parent)
            .map(Path::to_path_buf)
    });
    let git = checkout.and_then(|dir| {
        let rev =
            run(Command::new("git")
                .arg("-C")
                .arg(&dir)
                .args(["rev-parse", "--short", "HEAD"]))?;
        let dirty = run(Command::new("git").arg("-C").arg(&dir).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_some_and(|s| !s.is_empty());
        Some(format!("git {rev}{}", if dirty { "+changes" } else { "" }))
    });
    format!(
        "{version}, {}, {}",
        profile_of(bin),
        git.unwrap_or_else(|| "git revision unknown".into())
    )
}

/// The log filter of the servers a run starts: `TWILL_BENCH_LOG` (a `RUST_LOG` filter,
/// e.g. `info` to see when each watcher connected), else warnings only.
fn log_filter() -> String {
    std::env::var("TWILL_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

fn spawn_logged(bin: &Path, args: &[String], env: &[(&str, &OsStr)], log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", log_filter())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("start {}", bin.display()))
}

/// A bare HTTP/1.1 GET; `None` when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// How long a stopped server may take to exit before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Sends `signal` and waits for the exit; after [`STOP_GRACE`] escalates to SIGKILL.
/// Returns true when it had to escalate.
fn stop_child(child: &mut Child, signal: Signal) -> bool {
    let mut escalated = false;
    if let Ok(None) = child.try_wait() {
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        escalated = true;
    }
    let _ = child.wait();
    escalated
}

/// The replicas' `--leader-ttl`: the least etcd grants with [`ETCD_ELECTION_TIMEOUT_MS`]
/// (1.5 election timeouts, rounded up to whole seconds). The controller's default, 2 s,
/// is what etcd's default election timeout (1 s) allows.
const LEADER_TTL: &str = "1s";
/// The bench's etcd members' `--election-timeout` (and a tenth of it, their
/// `--heartbeat-interval`): half etcd's default, so that it grants a 1 s lease.
const ETCD_ELECTION_TIMEOUT_MS: u32 = 500;

/// The controller's environment: its networks dir and, with `--store etcd`, its
/// leader TTL. Environment rather than flags, which a previous controller from before
/// them would refuse.
fn controller_env(dir: &Path) -> [(&'static str, &OsStr); 2] {
    [
        ("TWILL_NETWORKS_DIR", dir.as_os_str()),
        ("TWILL_LEADER_TTL", OsStr::new(LEADER_TTL)),
    ]
}

/// A running `twill-controller`; killed on drop.
pub struct Controller {
    child: Child,
    bin: PathBuf,
    args: Vec<String>,
    networks_dir: PathBuf,
    log: PathBuf,
    /// gRPC address.
    pub addr: SocketAddr,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Controller {
    /// Starts the controller with a fresh data dir and waits for /readyz.
    pub fn start(bin: &Path, pki: &Pki) -> Result<Controller> {
        Controller::launch(bin, pki, &[], |_| Vec::new())
    }

    /// As [`Controller::start`], serving also the extra networks `networks` (from
    /// [`extra_networks`]), written into its `--networks-dir` before it starts; fails
    /// when it refuses one of them.
    pub fn start_with_networks(
        bin: &Path,
        pki: &Pki,
        networks: &[(String, String)],
    ) -> Result<Controller> {
        let c = Controller::launch(bin, pki, networks, |_| Vec::new())?;
        if c.log_tail(1000).contains("network file refused") {
            bail!(
                "twill-controller refused a network of the bench:\n{}",
                c.log_tail(30)
            );
        }
        Ok(c)
    }

    /// A replica with `--store etcd` on `etcd` under `prefix`, advertising its own URL
    /// to the other replicas (for forwarded writes); waits for /readyz (leader or
    /// follower). The controller certificate is also its etcd client certificate.
    pub fn start_replica(
        bin: &Path,
        pki: &Pki,
        etcd: &EtcdCluster,
        prefix: &str,
    ) -> Result<Controller> {
        let p = |name: &str| pki.path(name).display().to_string();
        let endpoints = etcd.endpoints();
        Controller::launch(bin, pki, &[], |addr| {
            vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                endpoints.clone(),
                "--etcd-cert".into(),
                p("server.crt"),
                "--etcd-key".into(),
                p("server.key"),
                "--etcd-ca".into(),
                p("ca.crt"),
                "--etcd-prefix".into(),
                prefix.into(),
                "--advertise-url".into(),
                format!("https://{addr}"),
            ]
        })
    }

    /// As [`Controller::start`], and it signs node certificates for bootstrapping
    /// nodes with the CA that also verifies client certificates (a cluster's usual
    /// set-up), each valid for a day: within the benchmark CA's two.
    pub fn start_issuing(bin: &Path, pki: &Pki) -> Result<Controller> {
        let p = |name: &str| pki.path(name).display().to_string();
        Controller::launch(bin, pki, &[], |_| {
            vec![
                "--signing-cert".into(),
                p("ca.crt"),
                "--signing-key".into(),
                p("ca.key"),
                "--node-cert-ttl".into(),
                "24h".into(),
            ]
        })
    }

    /// Starts the controller with the common flags, the extra `networks` (file name,
    /// contents) in its networks dir, and `extra(its gRPC address)`. A port can be
    /// taken between being picked and bound (another process's outgoing connection
    /// may be given it), so a controller that could not bind is started again on new
    /// ones.
    fn launch(
        bin: &Path,
        pki: &Pki,
        networks: &[(String, String)],
        extra: impl Fn(SocketAddr) -> Vec<String>,
    ) -> Result<Controller> {
        on_taken_port("a controller", || {
            Controller::launch_once(bin, pki, networks, &extra)
        })
    }

    fn launch_once(
        bin: &Path,
        pki: &Pki,
        networks: &[(String, String)],
        extra: &impl Fn(SocketAddr) -> Vec<String>,
    ) -> Result<Controller> {
        let dir = tempfile::Builder::new()
            .prefix("twill-bench-controller")
            .tempdir()?;
        let net_conf = dir.path().join("net-conf.json");
        std::fs::write(&net_conf, NET_CONF)?;
        if !networks.is_empty() {
            let networks_dir = dir.path().join("networks");
            std::fs::create_dir_all(&networks_dir)?;
            for (file, conf) in networks {
                std::fs::write(networks_dir.join(file), conf)?;
            }
        }
        let ports = free_ports(2)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let metrics = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let p = |s: &Path| s.display().to_string();
        let mut args = vec![
            "--listen".into(),
            addr.to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--data-dir".into(),
            p(&dir.path().join("data")),
            "--net-conf".into(),
            p(&net_conf),
            "--tls-cert".into(),
            p(&pki.path("server.crt")),
            "--tls-key".into(),
            p(&pki.path("server.key")),
            "--tls-client-ca".into(),
            p(&pki.path("ca.crt")),
        ];
        args.extend(extra(addr));
        let log = dir.path().join("controller.log");
        // By its variable, not --networks-dir: a controller from before several
        // networks (`--previous-controller`) ignores it instead of refusing to start.
        let networks_dir = dir.path().join("networks");
        let child = spawn_logged(bin, &args, &controller_env(&networks_dir), &log)?;
        let mut c = Controller {
            child,
            bin: bin.to_path_buf(),
            args,
            networks_dir,
            log,
            addr,
            metrics,
            _dir: dir,
        };
        c.wait_ready(Duration::from_secs(60))?;
        Ok(c)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A counter or gauge from the controller's /metrics (`None` if it does not answer
    /// or has no such series).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.metrics, "/metrics")?;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The controller's log so far.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "twill-controller exited with {status} before it was ready:\n{}",
                    self.log_tail(30)
                );
            }
            if http_get(self.metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "twill-controller not ready after {limit:?}:\n{}",
            self.log_tail(30)
        )
    }

    /// Whether this replica leads (`twill_is_leader` is 1); false when it does not
    /// answer.
    pub fn is_leader(&self) -> bool {
        self.metric("twill_is_leader") == Some(1.0)
    }

    /// Stops the process with `signal` (SIGTERM: graceful; SIGKILL: a crash); true
    /// when it did not exit within [`STOP_GRACE`] and was SIGKILLed.
    pub fn stop(&mut self, signal: Signal) -> bool {
        stop_child(&mut self.child, signal)
    }

    /// Starts again on the same data dir and ports; returns once /readyz answers.
    pub fn start_again(&mut self) -> Result<()> {
        self.child = spawn_logged(
            &self.bin,
            &self.args,
            &controller_env(&self.networks_dir),
            &self.log,
        )?;
        self.wait_ready(Duration::from_secs(60))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::SIGKILL);
    }
}

/// Finds the `etcd` binary (Debian's etcd-server package).
pub fn find_etcd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// `etcd --version`, first line.
pub fn etcd_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A single-member etcd on loopback with client-certificate TLS; killed on drop.
pub struct Etcd {
    child: Child,
    log: PathBuf,
    /// Client URL.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a single-member etcd with a fresh data dir. Readiness is for the caller
    /// to check (it needs a TLS client).
    pub fn start(bin: &Path, pki: &Pki) -> Result<Etcd> {
        let ports = free_ports(2)?;
        let (client, peer) = (ports[0], ports[1]);
        let cluster = format!("bench=http://127.0.0.1:{peer}");
        Etcd::start_member(bin, pki, "bench", client, peer, &cluster)
    }

    /// Starts one member of the cluster `initial_cluster` (`name=peer-url,...`).
    fn start_member(
        bin: &Path,
        pki: &Pki,
        name: &str,
        client: u16,
        peer: u16,
        initial_cluster: &str,
    ) -> Result<Etcd> {
        let dir = tempfile::Builder::new()
            .prefix("twill-bench-etcd")
            .tempdir()?;
        let p = |s: &Path| s.display().to_string();
        let args: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            p(&dir.path().join("data")),
            "--listen-client-urls".into(),
            format!("https://127.0.0.1:{client}"),
            "--advertise-client-urls".into(),
            format!("https://127.0.0.1:{client}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-cluster".into(),
            initial_cluster.into(),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            p(&pki.path("ca.crt")),
            "--cert-file".into(),
            p(&pki.path("server.crt")),
            "--key-file".into(),
            p(&pki.path("server.key")),
            "--election-timeout".into(),
            ETCD_ELECTION_TIMEOUT_MS.to_string(),
            "--heartbeat-interval".into(),
            (ETCD_ELECTION_TIMEOUT_MS / 10).to_string(),
            "--log-level".into(),
            "warn".into(),
            "--logger".into(),
            "zap".into(),
        ];
        let log = dir.path().join("etcd.log");
        let child = spawn_logged(bin, &args, &[], &log)?;
        Ok(Etcd {
            child,
            log,
            addr: format!("127.0.0.1:{client}").parse()?,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::SIGKILL);
    }
}

/// An etcd cluster of several members on loopback (peers over plain HTTP, clients
/// over mutual TLS), as the controllers of a high-availability set-up use it; killed
/// on drop.
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `size` members with fresh data dirs. Readiness is for the caller to check.
    pub fn start(bin: &Path, pki: &Pki, size: usize) -> Result<EtcdCluster> {
        let ports: Vec<(u16, u16)> = free_ports(2 * size)?
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| {
                Etcd::start_member(bin, pki, &format!("m{i}"), client, peer, &cluster)
            })
            .collect::<Result<_>>()?;
        Ok(EtcdCluster { members })
    }

    /// The client URLs, comma-separated (`--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Etcd::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Etcd::pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extra_networks_are_apart_from_the_default_one_and_big_enough() {
        // Every network the bench can make, checked by the controller's own rules
        // (overlap, VNI) inside `extra_networks`, each with room for 5,000 nodes and
        // the fan-out's joiners.
        let files = extra_networks(sim::MAX_NETWORKS, 5050).expect("networks accepted");
        assert_eq!(files.len(), sim::MAX_NETWORKS - 1);
        assert_eq!(files[0].0, "net2.json");
        for (k, (_, conf)) in files.iter().enumerate() {
            assert!(conf.contains(&format!(r#""VNI": {}"#, k + 2)), "{conf}");
        }
        assert!(extra_networks(1, 1_000_000).expect("one").is_empty());
        assert!(
            extra_networks(2, 20_000).is_err(),
            "16,383 subnets a network"
        );
        assert!(extra_networks(sim::MAX_NETWORKS + 1, 10).is_err());
    }
}
