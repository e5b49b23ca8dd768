//! Shared harness of ctl's integration tests: a real `twill-controller` process, PKIs
//! made by `twillctl certs` (or in-process with the same library), `twillctl` run as a
//! process, and tonic clients that act as agents.
//!
//! Needs `cargo build --workspace --bins` first (the controller is another crate's binary).

#![allow(missing_docs, clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_ctl::certs::{self, Ca, Role, Validity};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, WatchRequest, WatchResponse};
pub use twill_tests::kit::mac;
use twill_tests::kit::{http_get, on_free_ports};
use twill_tests::wait::{poll_until, Check};

pub const READY_DEADLINE: Duration = Duration::from_secs(30);

/// The net-conf.json most tests use: 255 allocatable /24s.
pub const NET_CONF: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}"#;

// ---------------------------------------------------------------------------------------
// The controller process

pub fn controller_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("TWILL_CONTROLLER_BIN") {
        candidates.push(PathBuf::from(p));
    }
    // Tests run as target/<profile>/deps/<name>-<hash>.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join("twill-controller"));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join("twill-controller"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/twill-controller"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "the twill-controller binary is missing (looked at {candidates:?}): \
         run `cargo build --workspace --bins` first"
    );
}

/// A running controller, killed on drop.
pub struct Controller {
    child: Child,
    pub grpc: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Controller {
    /// A controller serving `NET_CONF`.
    pub fn start(cert: &Path, key: &Path, client_ca: &Path) -> Controller {
        Controller::start_with(cert, key, client_ca, NET_CONF)
    }

    /// A controller for `pki` serving `net_conf`.
    pub fn for_pki(pki: &Pki, net_conf: &str) -> Controller {
        Controller::start_with(&pki.controller.crt, &pki.controller.key, &pki.ca, net_conf)
    }

    pub fn start_with(cert: &Path, key: &Path, client_ca: &Path, net_conf: &str) -> Controller {
        Controller::start_with_networks(cert, key, client_ca, net_conf, &[])
    }

    /// A controller for `pki` serving `net_conf` as `default` and, from its
    /// `--networks-dir`, each `(name, json)` of `networks`.
    pub fn with_networks(pki: &Pki, net_conf: &str, networks: &[(&str, &str)]) -> Controller {
        Controller::start_with_networks(
            &pki.controller.crt,
            &pki.controller.key,
            &pki.ca,
            net_conf,
            networks,
        )
    }

    fn start_with_networks(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        net_conf: &str,
        networks: &[(&str, &str)],
    ) -> Controller {
        on_free_ports(2, |ports| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("networks")).unwrap();
            for (name, json) in networks {
                std::fs::write(
                    dir.path().join("networks").join(format!("{name}.json")),
                    json,
                )
                .unwrap();
            }
            let net_conf_path = dir.path().join("net-conf.json");
            std::fs::write(&net_conf_path, net_conf).unwrap();
            let grpc: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
            let metrics: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
            let log = dir.path().join("controller.log");
            let log_file = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(controller_bin());
            for (k, _) in std::env::vars() {
                if k.starts_with("TWILL_") {
                    cmd.env_remove(k);
                }
            }
            let child = cmd
                .arg("--listen")
                .arg(grpc.to_string())
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--net-conf")
                .arg(&net_conf_path)
                .arg("--networks-dir")
                .arg(dir.path().join("networks"))
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key)
                .arg("--tls-client-ca")
                .arg(client_ca)
                .arg("--metrics-addr")
                .arg(metrics.to_string())
                .arg("--lease-ttl")
                .arg("24h")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .expect("spawn twill-controller");
            let mut c = Controller {
                child,
                grpc,
                log,
                _dir: dir,
            };
            c.ready(metrics).map(|()| c)
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/readyz` and the gRPC port until both answer; why not, with the log, when
    /// the process dies or the deadline passes.
    fn ready(&mut self, metrics: SocketAddr) -> Result<(), String> {
        let (child, grpc) = (&mut self.child, self.grpc);
        poll_until(
            READY_DEADLINE,
            Duration::from_millis(50),
            "twill-controller to be ready",
            || {
                if let Some(status) = child.try_wait().unwrap() {
                    return Check::Fatal(format!("twill-controller exited early ({status})"));
                }
                match http_get(metrics, "/readyz") {
                    Ok(r) if r.status != 200 => {
                        Check::NotYet(format!("/readyz: {} {}", r.status, r.body))
                    }
                    Err(e) => Check::NotYet(format!("{e:#}")),
                    Ok(_) => match TcpStream::connect_timeout(&grpc, Duration::from_millis(200)) {
                        Ok(_) => Check::Ready(()),
                        Err(e) => Check::NotYet(format!("gRPC port {grpc}: {e}")),
                    },
                }
            },
        )
        .map_err(|e| format!("{e:#}:\n{}", self.logs()))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Certificates

/// Paths of a certificate and its key.
#[derive(Clone, Debug)]
pub struct Pair {
    pub crt: PathBuf,
    pub key: PathBuf,
}

impl Pair {
    pub fn at(dir: &Path, stem: &str) -> Pair {
        Pair {
            crt: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// A CA and the certificates it signed.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub controller: Pair,
    pub admin: Pair,
    pub node: Pair,
    pub node_name: String,
}

impl Pki {
    /// A node certificate for `name` (CN=name, O=twill:nodes), issued on first use with
    /// this PKI's CA (needs DIR/ca.key).
    pub fn node_cert(&self, name: &str) -> Pair {
        self.issue(Role::Node(name.to_string()))
    }

    /// An admin certificate for `name` (CN=name, O=twill:admins).
    pub fn admin_cert(&self, name: &str) -> Pair {
        self.issue(Role::Admin(name.to_string()))
    }

    fn issue(&self, role: Role) -> Pair {
        let pair = Pair::at(&self.dir, &role.file_stem());
        if !pair.crt.exists() {
            let ca = Ca::load(&self.dir.join("ca.crt"), &self.dir.join("ca.key")).unwrap();
            let issued = ca.issue(&role, Validity::days(2).unwrap()).unwrap();
            certs::write_pair(&self.dir, &role.file_stem(), &issued, false).unwrap();
        }
        pair
    }
}

/// Certificates made by `twillctl certs`.
pub fn twillctl_pki(dir: &Path) -> Pki {
    let d = dir.to_str().unwrap();
    ok(&twillctl(&["certs", "init", "--dir", d]));
    ok(&twillctl(&[
        "certs",
        "issue",
        "controller",
        "--dir",
        d,
        "--ip",
        "127.0.0.1",
        "--dns",
        "localhost",
    ]));
    ok(&twillctl(&["certs", "issue", "admin", "alice", "--dir", d]));
    ok(&twillctl(&["certs", "issue", "node", "node-a", "--dir", d]));
    Pki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.crt"),
        controller: Pair::at(dir, "controller"),
        admin: Pair::at(dir, "admin-alice"),
        node: Pair::at(dir, "node-node-a"),
        node_name: "node-a".into(),
    }
}

// ---------------------------------------------------------------------------------------
// twillctl as a process

/// An empty directory used as XDG_CONFIG_HOME, so no test reads the user's config file.
fn empty_config_home() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// `twillctl` with no TWILL_* variables and an empty config directory.
pub fn twillctl_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twillctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TWILL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("XDG_CONFIG_HOME", empty_config_home());
    cmd
}

pub fn twillctl(args: &[&str]) -> Output {
    twillctl_cmd().args(args).output().expect("run twillctl")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "twillctl failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The connection flags for `client` against `url`.
pub fn conn_args(url: &str, ca: &Path, client: &Pair) -> Vec<String> {
    vec![
        "--controller".into(),
        url.into(),
        "--tls-ca".into(),
        ca.display().to_string(),
        "--tls-cert".into(),
        client.crt.display().to_string(),
        "--tls-key".into(),
        client.key.display().to_string(),
        "--timeout".into(),
        "5s".into(),
    ]
}

/// `twillctl <connection flags> ARGS` as `client`.
pub fn ctl_as(ctl: &Controller, pki: &Pki, client: &Pair, args: &[&str]) -> Output {
    let mut all = conn_args(&ctl.url(), &pki.ca, client);
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    twillctl(&all)
}

/// `twillctl ARGS` as the PKI's admin; asserts success and returns stdout.
pub fn admin(ctl: &Controller, pki: &Pki, args: &[&str]) -> String {
    let out = ctl_as(ctl, pki, &pki.admin, args);
    assert!(
        out.status.success(),
        "twillctl {args:?} failed: {:?}\nstdout: {}\nstderr: {}\ncontroller log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ctl.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a failed twillctl run: exit 1 and a one-line `error: ...`; returns the line.
pub fn failed(out: &Output, ctl: &Controller) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1\nstdout: {}\nstderr: {err}\ncontroller log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        ctl.logs()
    );
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// A child process's stdout, read line by line on a thread so that reads can time out.
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    pub fn new(stdout: ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// The next line, or None when the deadline passes or the stream ends.
    pub fn next(&self, within: Duration) -> Option<String> {
        self.rx.recv_timeout(within).ok()
    }

    /// Reads lines until one satisfies `pred`; panics with everything read otherwise.
    pub fn until(&self, within: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!(
                    "no line with {what} within {within:?}; got:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }
}

/// Sends SIGTERM to a child (through the `kill` command: no libc in this crate).
pub fn terminate(child: &Child) {
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(st.success());
}

/// Waits for a child to exit, killing it after `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    poll_until(
        within,
        Duration::from_millis(20),
        "the child to exit",
        || child.try_wait().unwrap(),
    )
    .unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("{e:#}");
    })
}

// ---------------------------------------------------------------------------------------
// Agents (tonic clients with node certificates)

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn tls(ca: &Path, client: Option<&Pair>) -> ClientTlsConfig {
    let mut t =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(c) = client {
        t = t.identity(Identity::from_pem(
            std::fs::read(&c.crt).unwrap(),
            std::fs::read(&c.key).unwrap(),
        ));
    }
    t
}

/// An AgentService client with `client`'s certificate.
pub async fn agent(ctl: &Controller, ca: &Path, client: &Pair) -> AgentServiceClient<Channel> {
    let ch = Endpoint::from_shared(ctl.url())
        .unwrap()
        .tls_config(tls(ca, Some(client)))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("node connect: {e:?}\n{}", ctl.logs()));
    AgentServiceClient::new(ch)
}

/// Acquire for node `name` (its certificate issued on demand), asking for `requested`.
pub async fn try_acquire_as(
    ctl: &Controller,
    pki: &Pki,
    name: &str,
    public_ip: &str,
    requested: &str,
) -> Result<twill_proto::Lease, tonic::Status> {
    try_acquire_in(ctl, pki, name, public_ip, requested, "").await
}

/// [`try_acquire_as`] in network `network` (empty: `default`).
pub async fn try_acquire_in(
    ctl: &Controller,
    pki: &Pki,
    name: &str,
    public_ip: &str,
    requested: &str,
    network: &str,
) -> Result<twill_proto::Lease, tonic::Status> {
    let cert = pki.node_cert(name);
    let mut c = agent(ctl, &pki.ca, &cert).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        c.acquire(AcquireRequest {
            node_name: name.to_string(),
            requested_subnet: requested.to_string(),
            public_ip: public_ip.into(),
            backend_type: "vxlan".into(),
            vtep_mac: mac(name),
            network: network.into(),
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("Acquire took over 5s"))??;
    Ok(resp.into_inner().lease.expect("lease in AcquireResponse"))
}

/// Acquires a lease for node `name`; panics on failure.
pub fn acquire_as(ctl: &Controller, pki: &Pki, name: &str, public_ip: &str) -> twill_proto::Lease {
    runtime()
        .block_on(try_acquire_as(ctl, pki, name, public_ip, ""))
        .unwrap_or_else(|e| panic!("Acquire for {name}: {e:?}\n{}", ctl.logs()))
}

/// Opens AgentService.Watch as node `name` from revision 0 and reads the snapshot.
pub async fn open_watch(
    ctl: &Controller,
    pki: &Pki,
    name: &str,
) -> (tonic::Streaming<WatchResponse>, WatchResponse) {
    let cert = pki.node_cert(name);
    let mut c = agent(ctl, &pki.ca, &cert).await;
    let mut stream = c
        .watch(WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Watch: {e:?}\n{}", ctl.logs()))
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("snapshot within 5s")
        .expect("watch stream error")
        .expect("watch stream ended");
    (stream, first)
}
