//! The network-namespace lab: an underlay bridge and hosts, processes inside them,
//! kernel-state helpers, and a cleanup guard.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::cmd::{self, CmdOutput};
use crate::kernel::{self, FdbEntry, Link, Neighbour, Route, FLANNEL_DEV, TWILL_ROUTE_PROTO};
use crate::kit::{http_get, skip, HttpResponse};
use crate::process::{self, Proc};

/// Prefix of every namespace the lab creates (`make clean-lab` removes them).
pub const NETNS_PREFIX: &str = "tw-";

/// The host side of each host's underlay veth.
pub const HOST_IFACE: &str = "eth0";

/// The bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

/// How long [`Lab::stop`] waits for a process to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static LIVE: Mutex<Vec<Weak<Mutex<Resources>>>> = Mutex::new(Vec::new());

/// Why a lab could not be started.
#[derive(Debug)]
pub enum LabError {
    /// The machine cannot run a lab (not root, no network namespaces): tests skip,
    /// unless `CI` is set, where they fail.
    Unavailable(String),
    /// Something went wrong building or starting it: tests fail.
    Failed(anyhow::Error),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Unavailable(why) => write!(f, "lab unavailable: {why}"),
            LabError::Failed(e) => write!(f, "lab failed: {e:#}"),
        }
    }
}

impl std::error::Error for LabError {}

impl From<anyhow::Error> for LabError {
    fn from(e: anyhow::Error) -> Self {
        LabError::Failed(e)
    }
}

/// Turns the result of starting a lab into the lab, or a loud skip ([`skip`]): prints
/// `SKIPPED: <test>: needs root and network namespaces` and returns `None` when the
/// machine cannot run a lab. Panics (fails the test) when the lab failed, and also when
/// it is unavailable while `CI` is set.
///
/// ```no_run
/// # use twill_tests::*;
/// let Some(lab) = require_lab("my_test", Lab::new(LabConfig::new(["a", "b"]))) else { return };
/// ```
pub fn require_lab<T>(test: &str, started: Result<T, LabError>) -> Option<T> {
    match started {
        Ok(v) => Some(v),
        Err(LabError::Unavailable(why)) => {
            skip(
                test,
                &format!("needs root and network namespaces ({why}); run as root"),
            );
            None
        }
        Err(LabError::Failed(e)) => panic!("{test}: lab failed: {e:#}"),
    }
}

/// Kills the processes and deletes the namespaces of every lab still alive in this
/// process (for Ctrl-C handlers; `Drop` does the same for one lab).
pub fn cleanup_all_labs() {
    let live: Vec<_> = lock(&LIVE).drain(..).collect();
    for res in live.iter().filter_map(Weak::upgrade) {
        cleanup(&res, false);
    }
}

/// Deletes `tw-` namespaces left by lab processes that no longer exist (the pid is
/// encoded in the name), with any process still inside them.
pub fn cleanup_stale_namespaces() {
    let Ok(list) = cmd::run(&["ip", "netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.get(..5))
            .and_then(|p| u32::from_str_radix(p, 36).ok())
        else {
            continue;
        };
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(ns);
        }
    }
}

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Host names, in order; host `i` gets underlay address `.i+1`.
    pub hosts: Vec<String>,
    /// MTU of the underlay (veths and bridge).
    pub mtu: u32,
    /// Print progress to stderr.
    pub verbose: bool,
    /// An IPv6-only underlay: the hosts get no IPv4 address and no IPv4 route.
    pub ipv6_only: bool,
}

impl LabConfig {
    pub fn new<S: Into<String>>(hosts: impl IntoIterator<Item = S>) -> LabConfig {
        LabConfig {
            hosts: hosts.into_iter().map(Into::into).collect(),
            mtu: 1500,
            verbose: false,
            ipv6_only: false,
        }
    }

    pub fn ipv6_only(mut self, yes: bool) -> Self {
        self.ipv6_only = yes;
        self
    }

    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    pub fn verbose(mut self, verbose: bool) -> Self {
        self.verbose = verbose;
        self
    }
}

/// One simulated machine: a network namespace joined to the underlay bridge by a veth
/// whose host side is `eth0`, with a default route via the underlay gateway.
#[derive(Debug, Clone)]
pub struct Host {
    /// The name the lab knows it by.
    pub name: String,
    /// Its network namespace (`tw-<id>-<n>`).
    pub netns: String,
    /// Its underlay address (on `eth0`; not configured on an IPv6-only underlay).
    pub ip: Ipv4Addr,
    /// Its IPv6 underlay address (on `eth0` too: the underlay is dual-stack).
    pub ip6: Ipv6Addr,
    /// The underlay is IPv6-only: `ip` is not configured.
    pub ipv6_only: bool,
    /// A directory of its own in the lab's temp dir.
    pub dir: PathBuf,
}

impl Host {
    /// The address its services listen on and are reached at: the IPv4 underlay
    /// address, or the IPv6 one on an IPv6-only underlay.
    pub fn addr(&self) -> IpAddr {
        if self.ipv6_only {
            self.ip6.into()
        } else {
            self.ip.into()
        }
    }
}

#[derive(Debug, Default)]
struct Resources {
    netns: Vec<String>,
    procs: BTreeMap<String, Proc>,
    tempdir: Option<tempfile::TempDir>,
    done: bool,
}

/// A running lab. Dropping it kills every process it started and deletes every
/// namespace (and with them every link) it made — also when a test panics, in which
/// case it first prints the kernel state of every host and the tail of every log.
pub struct Lab {
    id: String,
    underlay_netns: String,
    underlay: Ipv4Net,
    gateway: Ipv4Addr,
    underlay6: Ipv6Net,
    gateway6: Ipv6Addr,
    mtu: u32,
    hosts: Vec<Host>,
    dir: PathBuf,
    verbose: bool,
    res: Arc<Mutex<Resources>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

fn base36(mut n: u32, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    while out.len() < width {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

fn delete_netns(ns: &str) {
    if let Ok(pids) = cmd::run(&["ip", "netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = cmd::run(&["ip", "netns", "del", ns]);
}

fn log_lines() -> usize {
    std::env::var("TWILL_LAB_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

fn cleanup(res: &Mutex<Resources>, dump: bool) {
    let mut r = lock(res);
    if r.done {
        return;
    }
    r.done = true;
    // SIGTERM everything at once, give them a moment, then SIGKILL the rest.
    for p in r.procs.values_mut() {
        let _ = p.signal(Signal::SIGTERM);
    }
    for p in r.procs.values_mut() {
        if p.wait_exit(Duration::from_secs(3)).is_none() {
            let _ = p.kill();
        }
    }
    if dump {
        let n = log_lines();
        for p in r.procs.values() {
            let state = match p.status {
                Some(st) => format!("{st}"),
                None => "killed by lab cleanup".into(),
            };
            eprintln!(
                "\n----- twill lab log: {} (netns {}, last run: {state}; {}) -----\n{}",
                p.name,
                p.netns,
                p.log.display(),
                p.log_tail(n)
            );
        }
    }
    let namespaces: Vec<String> = r.netns.drain(..).rev().collect();
    for ns in &namespaces {
        delete_netns(ns);
    }
    if let Some(dir) = r.tempdir.take() {
        if dump || std::env::var_os("TWILL_LAB_KEEP").is_some() {
            let kept = dir.keep();
            eprintln!("twill lab: kept its files in {}", kept.display());
        }
    }
}

impl Lab {
    /// Builds the underlay and the hosts. [`LabError::Unavailable`] when not root or
    /// when `ip netns add` fails.
    pub fn new(cfg: LabConfig) -> Result<Lab, LabError> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            return Err(LabError::Unavailable(format!(
                "not running as root (euid {uid})"
            )));
        }
        if cfg.hosts.is_empty() || cfg.hosts.len() > 250 {
            return Err(anyhow!("a lab has 1 to 250 hosts, not {}", cfg.hosts.len()).into());
        }
        for (i, h) in cfg.hosts.iter().enumerate() {
            if h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(anyhow!("bad host name {h:?}").into());
            }
            if cfg.hosts[..i].contains(h) {
                return Err(anyhow!("host name {h:?} given twice").into());
            }
        }
        cleanup_stale_namespaces();

        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", base36(pid, 5), base36(n, 1));
        // lab k uses 198.18.k.0/24 (separate namespaces could share it; unique anyway
        // so that captures and logs are unambiguous)
        let k = (pid.wrapping_mul(7919).wrapping_add(n.wrapping_mul(131))) % 254 + 1;
        let underlay = Ipv4Net::new(Ipv4Addr::new(198, 18, k as u8, 0), 24).expect("valid");
        let gateway = Ipv4Addr::new(198, 18, k as u8, 254);
        // The IPv6 underlay: a unique local prefix per lab, fd18:k::/64.
        let underlay6 =
            Ipv6Net::new(Ipv6Addr::new(0xfd18, k as u16, 0, 0, 0, 0, 0, 0), 64).expect("valid");
        let gateway6 = Ipv6Addr::new(0xfd18, k as u16, 0, 0, 0, 0, 0, 0xfe);

        let tempdir = tempfile::Builder::new()
            .prefix(&format!("twill-lab-{id}-"))
            .tempdir()
            .map_err(|e| LabError::Failed(anyhow!("cannot create the lab's temp dir: {e}")))?;
        let dir = tempdir.path().to_path_buf();
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| anyhow!(e))?;
        let res = Arc::new(Mutex::new(Resources {
            tempdir: Some(tempdir),
            ..Resources::default()
        }));
        lock(&LIVE).push(Arc::downgrade(&res));

        let hosts = cfg
            .hosts
            .iter()
            .enumerate()
            .map(|(i, name)| Host {
                name: name.clone(),
                netns: format!("{NETNS_PREFIX}{id}-{i}"),
                ip: Ipv4Addr::from(u32::from(underlay.network()) + i as u32 + 1),
                ip6: Ipv6Addr::from(u128::from(underlay6.network()) + i as u128 + 1),
                ipv6_only: cfg.ipv6_only,
                dir: dir.join(name),
            })
            .collect::<Vec<_>>();
        let lab = Lab {
            underlay_netns: format!("{NETNS_PREFIX}{id}-u"),
            id,
            underlay,
            gateway,
            underlay6,
            gateway6,
            mtu: cfg.mtu,
            hosts,
            dir,
            verbose: cfg.verbose,
            res,
        };
        for h in &lab.hosts {
            debug_assert!(h.netns.len() <= 15, "{}", h.netns);
        }

        // The first namespace tells whether this machine can do it at all.
        let out = cmd::try_run(&["ip", "netns", "add", &lab.underlay_netns])
            .map_err(|e| LabError::Unavailable(format!("cannot run `ip netns add`: {e:#}")))?;
        if !out.success() {
            return Err(LabError::Unavailable(format!("{out}")));
        }
        lock(&lab.res).netns.push(lab.underlay_netns.clone());
        lab.build().map_err(LabError::Failed)?;
        Ok(lab)
    }

    fn say(&self, msg: &str) {
        if self.verbose {
            eprintln!("lab {}: {msg}", self.id);
        }
    }

    fn ip(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "-n", netns];
        all.extend_from_slice(args);
        cmd::run(&all)
    }

    fn build(&self) -> Result<()> {
        let u = &self.underlay_netns;
        let mtu = self.mtu.to_string();
        let gw = format!("{}/{}", self.gateway, self.underlay.prefix_len());
        self.ip(u, &["link", "set", "lo", "up"])?;
        self.ip(
            u,
            &[
                "link",
                "add",
                UNDERLAY_BRIDGE,
                "mtu",
                &mtu,
                "type",
                "bridge",
            ],
        )?;
        if !self.ipv6_only() {
            self.ip(u, &["addr", "add", &gw, "dev", UNDERLAY_BRIDGE])?;
        }
        // nodad: usable at once, no duplicate address detection to wait for.
        let gw6 = format!("{}/{}", self.gateway6, self.underlay6.prefix_len());
        self.ip(u, &["addr", "add", &gw6, "dev", UNDERLAY_BRIDGE, "nodad"])?;
        self.ip(u, &["link", "set", UNDERLAY_BRIDGE, "up"])?;
        for (i, h) in self.hosts.iter().enumerate() {
            std::fs::create_dir_all(&h.dir)
                .with_context(|| format!("cannot create {}", h.dir.display()))?;
            cmd::run(&["ip", "netns", "add", &h.netns])?;
            lock(&self.res).netns.push(h.netns.clone());
            let veth = format!("v{i}");
            let addr = format!("{}/{}", h.ip, self.underlay.prefix_len());
            self.ip(&h.netns, &["link", "set", "lo", "up"])?;
            self.ip(
                u,
                &[
                    "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", HOST_IFACE,
                    "mtu", &mtu, "netns", &h.netns,
                ],
            )?;
            self.ip(u, &["link", "set", &veth, "master", UNDERLAY_BRIDGE, "up"])?;
            if !h.ipv6_only {
                self.ip(&h.netns, &["addr", "add", &addr, "dev", HOST_IFACE])?;
            }
            let addr6 = format!("{}/{}", h.ip6, self.underlay6.prefix_len());
            self.ip(
                &h.netns,
                &["addr", "add", &addr6, "dev", HOST_IFACE, "nodad"],
            )?;
            self.ip(&h.netns, &["link", "set", HOST_IFACE, "up"])?;
            if !h.ipv6_only {
                self.ip(
                    &h.netns,
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        &self.gateway.to_string(),
                        "dev",
                        HOST_IFACE,
                    ],
                )?;
            }
            self.ip(
                &h.netns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &self.gateway6.to_string(),
                    "dev",
                    HOST_IFACE,
                ],
            )?;
            self.say(&format!(
                "host {} = netns {} at {} and {}",
                h.name, h.netns, h.ip, h.ip6
            ));
        }
        Ok(())
    }

    /// The lab's short unique id (in every namespace name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lab's temp dir (host dirs, logs; deleted on drop unless a test failed or
    /// `TWILL_LAB_KEEP` is set).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `name`; panics on an unknown name (a bug in the test).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("lab has no host {name:?}"))
    }

    /// The underlay network (`198.18.k.0/24`).
    pub fn underlay(&self) -> Ipv4Net {
        self.underlay
    }

    /// The gateway address on the underlay bridge (every host's default route).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// True when the underlay has no IPv4 ([`LabConfig::ipv6_only`]).
    pub fn ipv6_only(&self) -> bool {
        self.hosts.first().is_some_and(|h| h.ipv6_only)
    }

    /// The IPv6 underlay network (`fd18:k::/64`).
    pub fn underlay6(&self) -> Ipv6Net {
        self.underlay6
    }

    /// The namespace holding the underlay bridge.
    pub fn underlay_netns(&self) -> &str {
        &self.underlay_netns
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    // ---------------------------------------------------------------- commands

    /// Runs a command in `host`'s namespace and captures its output (any exit status).
    pub fn try_exec<S: AsRef<str>>(&self, host: &str, args: &[S]) -> Result<CmdOutput> {
        let h = self.host(host);
        let mut all = vec!["ip", "netns", "exec", h.netns.as_str()];
        all.extend(args.iter().map(AsRef::as_ref));
        cmd::try_run(&all)
    }

    /// Runs a command in `host`'s namespace; its stdout, or an error with its stderr.
    pub fn exec<S: AsRef<str>>(&self, host: &str, args: &[S]) -> Result<String> {
        self.try_exec(host, args)?
            .ok()
            .with_context(|| format!("on host {host}"))
    }

    /// Runs `f` on a thread that has entered `host`'s network namespace (sockets it
    /// opens live there).
    pub fn in_netns<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.host(host).netns, f)
    }

    /// `GET http://addr/path` from inside `host`'s namespace.
    pub fn http_get(&self, host: &str, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
        self.in_netns(host, || http_get(addr, path))?
            .with_context(|| format!("GET http://{addr}{path} from host {host}"))
    }

    /// Pings `addr` from `host`: up to 3 echo requests, one at a time, each waiting up
    /// to 1 s for its reply; the first reply is success.
    pub fn ping(&self, host: &str, addr: Ipv4Addr) -> Result<()> {
        let a = addr.to_string();
        let mut last = None;
        for _ in 0..3 {
            let out = self.try_exec(host, &["ping", "-n", "-q", "-c", "1", "-W", "1", &a])?;
            if out.success() {
                return Ok(());
            }
            // ping exits 1 when no reply came; anything else (2, or 255 from `ip netns
            // exec` when there is no ping at all) is not worth retrying.
            if out.status.code() != Some(1) {
                bail!("ping {addr} from host {host} could not run: {out}");
            }
            last = Some(out);
        }
        let out = last.expect("tried");
        bail!(
            "ping {addr} from host {host}: no reply to 3 echo requests: {}",
            out.stdout.trim().lines().last().unwrap_or("").trim()
        )
    }

    /// Creates network namespace `tw-<lab id>-<suffix>` (e.g. a pod) with `lo` up, owned
    /// by the lab: deleted with it, processes inside included, also on Ctrl-C.
    pub fn add_netns(&self, suffix: &str) -> Result<String> {
        let name = format!("{NETNS_PREFIX}{}-{suffix}", self.id());
        anyhow::ensure!(
            name.len() <= 15,
            "namespace name {name} is longer than 15 characters"
        );
        cmd::run(&["ip", "netns", "add", &name])?;
        lock(&self.res).netns.push(name.clone());
        self.ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Creates a bridge `name` on `host` holding `addr` (e.g. a pod gateway
    /// `10.244.7.1/24`), and brings it up.
    pub fn add_bridge(&self, host: &str, name: &str, addr: Ipv4Net) -> Result<()> {
        let ns = &self.host(host).netns;
        self.ip(ns, &["link", "add", name, "type", "bridge"])?;
        self.ip(ns, &["addr", "add", &addr.to_string(), "dev", name])?;
        self.ip(ns, &["link", "set", name, "up"])?;
        Ok(())
    }

    // ------------------------------------------------------------ kernel state

    /// Twill's routes on `host` (`ip -j route show proto 74`).
    pub fn routes(&self, host: &str) -> Result<Vec<Route>> {
        let proto = TWILL_ROUTE_PROTO.to_string();
        let out = self.ip(
            &self.host(host).netns,
            &["-j", "route", "show", "proto", &proto],
        )?;
        kernel::parse_json_list("routes", &out)
    }

    /// Every IPv4 route in `host`'s main table.
    pub fn all_routes(&self, host: &str) -> Result<Vec<Route>> {
        let out = self.ip(&self.host(host).netns, &["-j", "route", "show"])?;
        kernel::parse_json_list("routes", &out)
    }

    /// Neighbour entries on `flannel.1` of `host`.
    pub fn neighbours(&self, host: &str) -> Result<Vec<Neighbour>> {
        self.neighbours_on(host, FLANNEL_DEV)
    }

    /// Neighbour entries on `dev` of `host`.
    pub fn neighbours_on(&self, host: &str, dev: &str) -> Result<Vec<Neighbour>> {
        let out = self.ip(&self.host(host).netns, &["-j", "neigh", "show", "dev", dev])?;
        kernel::parse_json_list("neighbours", &out)
    }

    /// FDB entries of `flannel.1` on `host` (`bridge -j fdb show dev flannel.1`).
    pub fn fdb(&self, host: &str) -> Result<Vec<FdbEntry>> {
        self.fdb_on(host, FLANNEL_DEV)
    }

    /// FDB entries of `dev` on `host`.
    pub fn fdb_on(&self, host: &str, dev: &str) -> Result<Vec<FdbEntry>> {
        let ns = &self.host(host).netns;
        let out = cmd::run(&["bridge", "-n", ns, "-j", "fdb", "show", "dev", dev])?;
        kernel::parse_json_list("fdb", &out)
    }

    /// Link `dev` on `host`, with details (`ip -j -d link show dev`).
    pub fn link(&self, host: &str, dev: &str) -> Result<Link> {
        let out = self.ip(
            &self.host(host).netns,
            &["-j", "-d", "link", "show", "dev", dev],
        )?;
        kernel::parse_json_list::<Link>("link", &out)?
            .into_iter()
            .next()
            .with_context(|| format!("no link {dev} on host {host}"))
    }

    /// The MAC address of `dev` on `host`, lower case.
    pub fn mac(&self, host: &str, dev: &str) -> Result<String> {
        self.link(host, dev)?
            .mac()
            .with_context(|| format!("link {dev} on host {host} has no MAC"))
    }

    /// A short human-readable dump of `host`'s network state (links, addresses, routes,
    /// neighbours and FDB of flannel.1).
    pub fn describe(&self, host: &str) -> String {
        let ns = self.host(host).netns.clone();
        let mut out = String::new();
        let cmds: [&[&str]; 5] = [
            &["ip", "-n", &ns, "-br", "addr"],
            &["ip", "-n", &ns, "route"],
            &["ip", "-n", &ns, "neigh", "show", "dev", FLANNEL_DEV],
            &["bridge", "-n", &ns, "fdb", "show", "dev", FLANNEL_DEV],
            &["ip", "-n", &ns, "-d", "link", "show", "dev", FLANNEL_DEV],
        ];
        for c in cmds {
            out.push_str(&format!("$ {}\n", c.join(" ")));
            match cmd::try_run(c) {
                Ok(o) => {
                    out.push_str(&o.stdout);
                    out.push_str(&o.stderr);
                }
                Err(e) => out.push_str(&format!("{e:#}\n")),
            }
        }
        out
    }

    // --------------------------------------------------------------- processes

    /// Starts `program args` in `host`'s namespace as process `name` (unique in the
    /// lab), `RUST_LOG=info`, output to `<lab dir>/logs/<name>.log`.
    pub fn spawn(&self, host: &str, name: &str, program: &Path, args: Vec<String>) -> Result<()> {
        self.spawn_with_env(host, name, program, args, Vec::new())
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        &self,
        host: &str,
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<()> {
        let h = self.host(host);
        let mut r = lock(&self.res);
        if r.done {
            bail!("lab is shut down");
        }
        if r.procs.contains_key(name) {
            bail!("a process named {name} exists already");
        }
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let mut p = Proc::new(name, &h.netns, program, args, env, log);
        p.start()?;
        self.say(&format!("started {name} on {host} (pid {:?})", p.pid()));
        r.procs.insert(name.to_string(), p);
        Ok(())
    }

    fn with_proc<T>(&self, name: &str, f: impl FnOnce(&mut Proc) -> Result<T>) -> Result<T> {
        let mut r = lock(&self.res);
        let p = r
            .procs
            .get_mut(name)
            .with_context(|| format!("the lab has no process {name}"))?;
        f(p)
    }

    /// SIGTERM, and wait up to [`STOP_TIMEOUT`] for the exit (then SIGKILL and fail).
    pub fn stop(&self, name: &str) -> Result<ExitStatus> {
        self.stop_within(name, STOP_TIMEOUT)
    }

    /// SIGTERM, and wait up to `timeout` for the exit (then SIGKILL and fail).
    pub fn stop_within(&self, name: &str, timeout: Duration) -> Result<ExitStatus> {
        self.say(&format!("stopping {name} (SIGTERM)"));
        self.with_proc(name, |p| p.stop(timeout))
    }

    /// SIGKILL.
    pub fn kill(&self, name: &str) -> Result<ExitStatus> {
        self.say(&format!("killing {name} (SIGKILL)"));
        self.with_proc(name, |p| p.kill())
    }

    /// Sends `sig` to a running process.
    pub fn signal(&self, name: &str, sig: Signal) -> Result<()> {
        self.with_proc(name, |p| p.signal(sig))
    }

    /// Starts a stopped process again with the same arguments (stops it first if it
    /// is running).
    pub fn restart(&self, name: &str) -> Result<()> {
        self.say(&format!("restarting {name}"));
        self.with_proc(name, |p| {
            if p.is_running() {
                p.stop(STOP_TIMEOUT)?;
            }
            p.start()
        })
    }

    /// Whether process `name` is running (reaps it if it exited).
    pub fn is_running(&self, name: &str) -> bool {
        self.with_proc(name, |p| Ok(p.is_running()))
            .unwrap_or(false)
    }

    /// How the last run of `name` ended, if it did.
    pub fn exit_status(&self, name: &str) -> Option<ExitStatus> {
        self.with_proc(name, |p| {
            p.is_running();
            Ok(p.status)
        })
        .ok()
        .flatten()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.with_proc(name, |p| Ok(p.pid())).ok().flatten()
    }

    /// Names of every process the lab started.
    pub fn process_names(&self) -> Vec<String> {
        lock(&self.res).procs.keys().cloned().collect()
    }

    /// The log file of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// The last `lines` lines of process `name`'s log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        process::log_tail(&self.log_path(name), lines)
    }

    /// The whole log of process `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Prints every host's network state and the tail of every log to stderr.
    pub fn dump(&self) {
        for h in &self.hosts {
            eprintln!(
                "\n----- twill lab host {} (netns {}, {}) -----\n{}",
                h.name,
                h.netns,
                h.ip,
                self.describe(&h.name)
            );
        }
        let n = log_lines();
        for name in self.process_names() {
            eprintln!(
                "\n----- twill lab log: {name} ({}) -----\n{}",
                self.log_path(&name).display(),
                self.log_tail(&name, n)
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            eprintln!(
                "\ntwill lab {}: the test failed; state before cleanup:",
                self.id
            );
            for h in &self.hosts {
                eprintln!(
                    "\n----- twill lab host {} (netns {}, {}) -----\n{}",
                    h.name,
                    h.netns,
                    h.ip,
                    self.describe(&h.name)
                );
            }
        }
        cleanup(&self.res, failing);
        lock(&LIVE).retain(|w| w.upgrade().is_some_and(|r| !Arc::ptr_eq(&r, &self.res)));
    }
}

/// Runs `f` on a thread that has entered network namespace `netns` (by name).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let fd = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {netns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in namespace {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_width_base36() {
        assert_eq!(base36(0, 5), "00000");
        assert_eq!(base36(4_194_304, 5), "2hwcg");
        assert_eq!(u32::from_str_radix("2hwcg", 36).unwrap(), 4_194_304);
        assert_eq!(base36(35, 1), "z");
        assert_eq!(base36(36, 1), "10");
    }
}
