//! A controller under test: certificates made with twillctl's library, the real
//! `twill-controller` binary on loopback, and mTLS clients for any role.

#![allow(missing_docs, clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_pki::{new_ca, Ca, Issued, Role, Validity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
pub use twill_tests::kit::mac;
use twill_tests::kit::{http_get, on_free_ports};
use twill_tests::wait::{poll_until, Check};

/// A CA and the controller's certificate, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = new_ca(Validity::days(1).unwrap()).unwrap();
        let ca = Ca::from_pem(&root.cert_pem, &root.key_pem).unwrap();
        let server = ca
            .issue(
                &Role::Controller {
                    dns: vec!["localhost".into()],
                    ips: vec!["127.0.0.1".parse().unwrap()],
                    replica: false,
                },
                Validity::days(1).unwrap(),
            )
            .unwrap();
        std::fs::write(dir.path().join("ca.crt"), &root.cert_pem).unwrap();
        std::fs::write(dir.path().join("ca.key"), &root.key_pem).unwrap();
        std::fs::write(dir.path().join("controller.crt"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("controller.key"), &server.key_pem).unwrap();
        Pki {
            ca_pem: root.cert_pem,
            dir,
            ca,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn issue(&self, role: Role) -> Issued {
        self.ca.issue(&role, Validity::days(1).unwrap()).unwrap()
    }

    pub fn node(&self, name: &str) -> Issued {
        self.issue(Role::Node(name.into()))
    }

    pub fn admin(&self, name: &str) -> Issued {
        self.issue(Role::Admin(name.into()))
    }
}

/// A running `twill-controller`; killed on drop.
pub struct Controller {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
    pub net_conf: PathBuf,
    /// Its `--networks-dir` (empty unless a test writes network files there).
    pub networks_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
}

impl Controller {
    /// Starts the controller on `data_dir` with `net_conf` (JSON text) and waits for /readyz.
    pub fn start(pki: &Pki, data_dir: &Path, net_conf: &str, extra: &[&str]) -> Self {
        let net_conf_path = data_dir.with_extension("net-conf.json");
        std::fs::write(&net_conf_path, net_conf).unwrap();
        // The test's own, never the host's /etc/twill/networks.
        let networks_dir = data_dir.with_extension("networks");
        std::fs::create_dir_all(&networks_dir).unwrap();
        on_free_ports(2, |ports| {
            let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
            let metrics: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
            let mut args: Vec<String> = vec![
                "--listen".into(),
                addr.to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--net-conf".into(),
                net_conf_path.display().to_string(),
                "--tls-cert".into(),
                pki.path("controller.crt").display().to_string(),
                "--tls-key".into(),
                pki.path("controller.key").display().to_string(),
                "--tls-client-ca".into(),
                pki.path("ca.crt").display().to_string(),
                "--networks-dir".into(),
                networks_dir.display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let log = data_dir.with_extension("log");
            let mut c = Controller {
                child: spawn(&args, &log),
                addr,
                metrics,
                data_dir: data_dir.to_path_buf(),
                net_conf: net_conf_path.clone(),
                networks_dir: networks_dir.clone(),
                log,
                args,
            };
            c.ready().map(|()| c)
        })
    }

    /// Waits for /readyz; why not, with the log, when the process exits first or the
    /// deadline passes.
    fn ready(&mut self) -> Result<(), String> {
        let (child, metrics) = (&mut self.child, self.metrics);
        poll_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "the controller to be ready",
            || match child.try_wait().unwrap() {
                Some(status) => Check::Fatal(format!("controller exited with {status}")),
                None => match http_get(metrics, "/readyz") {
                    Ok(r) if r.status == 200 => Check::Ready(()),
                    Ok(r) => Check::NotYet(format!("/readyz: {} {}", r.status, r.body)),
                    Err(e) => Check::NotYet(format!("{e:#}")),
                },
            },
        )
        .map_err(|e| format!("{e:#}:\n{}", self.log_text()))
    }

    fn wait_ready(&mut self) {
        if let Err(why) = self.ready() {
            panic!("{why}");
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again with the same arguments (same ports, same data dir).
    pub fn restart(&mut self) {
        self.kill9();
        self.child = spawn(&self.args, &self.log);
        self.wait_ready();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// What clients need to connect, detached from the process (for spawned tasks).
    pub fn channel_factory(&self) -> ChannelFactory {
        ChannelFactory {
            url: self.url(),
            ca_pem: String::new(),
        }
    }

    pub async fn channel(
        &self,
        pki: &Pki,
        id: Option<&Issued>,
    ) -> Result<Channel, tonic::transport::Error> {
        ChannelFactory {
            url: self.url(),
            ca_pem: pki.ca_pem.clone(),
        }
        .connect_as(id)
        .await
    }

    pub async fn agent(&self, pki: &Pki, id: &Issued) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel(pki, Some(id)).await.expect("connect"))
    }

    /// The lease `id` is granted for `req`; panics when it is refused.
    pub async fn grant(
        &self,
        pki: &Pki,
        id: &Issued,
        req: twill_proto::AcquireRequest,
    ) -> twill_proto::Lease {
        self.agent(pki, id)
            .await
            .acquire(req)
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("a lease")
    }

    pub async fn admin(&self, pki: &Pki) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(
            self.channel(pki, Some(&pki.admin("root")))
                .await
                .expect("connect"),
        )
    }
}

/// Connects mTLS clients to a controller.
pub struct ChannelFactory {
    url: String,
    ca_pem: String,
}

impl ChannelFactory {
    pub fn with_ca(mut self, pki: &Pki) -> Self {
        self.ca_pem = pki.ca_pem.clone();
        self
    }

    pub async fn connect(&self, id: &Issued) -> Result<Channel, tonic::transport::Error> {
        self.connect_as(Some(id)).await
    }

    pub async fn connect_as(
        &self,
        id: Option<&Issued>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(id) = id {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        Endpoint::from_shared(self.url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_twill-controller"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("start twill-controller")
}

pub fn acquire_request(node: &str, requested: &str) -> twill_proto::AcquireRequest {
    twill_proto::AcquireRequest {
        node_name: node.into(),
        requested_subnet: requested.into(),
        public_ip: "192.0.2.10".into(),
        backend_type: "vxlan".into(),
        vtep_mac: mac(node),
        ..Default::default()
    }
}

pub const NET_CONF: &str = r#"{"Network": "10.128.0.0/12", "Backend": {"Type": "vxlan"}}"#;
