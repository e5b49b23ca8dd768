//! Mutual TLS against the real `twill-controller` binary, with certificates made by
//! `twillctl certs` and by the `openssl` CLI (REFERENCE.md 2.3).
//!
//! Needs `cargo build --workspace --bins` first (the controller is another crate's binary).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use twill_ctl::certs::{self, Ca, Role, Validity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, ListLeasesRequest};

const READY_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The controller process

fn controller_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("TWILL_CONTROLLER_BIN") {
        candidates.push(PathBuf::from(p));
    }
    // This test runs as target/<profile>/deps/tls_controller-<hash>.
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

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// A running controller, killed on drop.
struct Controller {
    child: Child,
    grpc: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Controller {
    fn start(cert: &Path, key: &Path, client_ca: &Path) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let net_conf = dir.path().join("net-conf.json");
        std::fs::write(
            &net_conf,
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}"#,
        )
        .unwrap();
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
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
            .arg(&net_conf)
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
        c.wait_ready(metrics);
        c
    }

    fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/readyz` and the gRPC port until both answer, the process dies, or the deadline passes.
    fn wait_ready(&mut self, metrics: SocketAddr) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("twill-controller exited early ({status}):\n{}", self.logs());
            }
            if http_status(metrics, "/readyz") == Some(200)
                && TcpStream::connect_timeout(&self.grpc, Duration::from_millis(200)).is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "twill-controller not ready after {READY_DEADLINE:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Certificates

/// Paths of a certificate and its key.
#[derive(Clone)]
struct Pair {
    crt: PathBuf,
    key: PathBuf,
}

impl Pair {
    fn at(dir: &Path, stem: &str) -> Pair {
        Pair {
            crt: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// A CA and the certificates it signed.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    controller: Pair,
    admin: Pair,
    node: Pair,
    node_name: String,
}

/// Certificates made by `twillctl certs`.
fn twillctl_pki(dir: &Path) -> Pki {
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

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the openssl CLI ({e}); install openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates made with the `openssl` CLI in REFERENCE.md 2.3's layout: an RSA CA,
/// an EC controller certificate (IP SAN 127.0.0.1, serverAuth), an RSA admin
/// certificate (O=twill:admins, clientAuth) and an EC node certificate (O=twill:nodes).
fn openssl_pki(dir: &Path) -> Pki {
    std::fs::write(
        dir.join("ext.cnf"),
        "\
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid

[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
",
    )
    .unwrap();
    // The CA: `req -x509` takes its extensions from the config's x509_extensions section.
    std::fs::write(
        dir.join("req.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = ca\n[dn]\n[ca]\n\
         basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=openssl-twill-ca",
            "-config",
            "req.cnf",
        ],
    );
    let leaf = |stem: &str, keyspec: &[&str], subj: &str, section: &str| {
        let key = format!("{stem}.key");
        let csr = format!("{stem}.csr");
        let crt = format!("{stem}.crt");
        let mut args = vec!["req", "-new", "-newkey"];
        args.extend_from_slice(keyspec);
        args.extend_from_slice(&[
            "-nodes", "-keyout", &key, "-out", &csr, "-subj", subj, "-config", "req.cnf",
        ]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-sha256",
                "-extfile",
                "ext.cnf",
                "-extensions",
                section,
                "-out",
                &crt,
            ],
        );
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let ec = ["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    leaf("controller", &ec, "/CN=twill-controller", "server");
    leaf(
        "admin",
        &["rsa:2048"],
        "/O=twill:admins/CN=ossl-admin",
        "client",
    );
    leaf("node", &ec, "/O=twill:nodes/CN=ossl-node", "client");
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "ca.crt",
            "controller.crt",
            "admin.crt",
            "node.crt",
        ],
    );
    Pki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.crt"),
        controller: Pair::at(dir, "controller"),
        admin: Pair::at(dir, "admin"),
        node: Pair::at(dir, "node"),
        node_name: "ossl-node".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Clients

fn twillctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twillctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TWILL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().expect("run twillctl")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "twillctl failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `twillctl leases` against `ctl` with a client certificate.
fn leases(url: &str, ca: &Path, client: &Pair, extra: &[&str]) -> Output {
    let mut args = vec![
        "--controller",
        url,
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        client.crt.to_str().unwrap(),
        "--tls-key",
        client.key.to_str().unwrap(),
        "--timeout",
        "5s",
        "leases",
    ];
    args.extend_from_slice(extra);
    twillctl(&args)
}

/// Asserts that twillctl's error is a TLS/transport refusal, not a gRPC answer from a service.
fn assert_tls_refusal(err: &str) {
    println!("refused: {err}");
    assert!(
        !err.contains("PERMISSION_DENIED") && !err.contains("UNAUTHENTICATED"),
        "the TLS layer let the client through; the service refused it: {err}"
    );
    assert!(
        err.contains("cannot connect") || err.contains("transport error"),
        "not a TLS/transport failure: {err}"
    );
}

/// Asserts a failed twillctl run: exit 1 and a one-line `error: ...`; returns the line.
fn failed(out: &Output, ctl: &Controller) -> String {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn tls(ca: &Path, client: Option<&Pair>) -> ClientTlsConfig {
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

/// Acquires a lease for the node certificate's node through AgentService.
fn acquire(ctl: &Controller, pki: &Pki, public_ip: &str) -> twill_proto::Lease {
    runtime().block_on(async {
        let ch = Endpoint::from_shared(ctl.url())
            .unwrap()
            .tls_config(tls(&pki.ca, Some(&pki.node)))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("node connect: {e:?}\n{}", ctl.logs()));
        let resp = AgentServiceClient::new(ch)
            .acquire(AcquireRequest {
                node_name: pki.node_name.clone(),
                requested_subnet: String::new(),
                public_ip: public_ip.into(),
                backend_type: "vxlan".into(),
                vtep_mac: "0a:58:0a:f4:01:01".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("Acquire: {e:?}\n{}", ctl.logs()));
        resp.into_inner().lease.expect("lease in AcquireResponse")
    })
}

/// Checks that `twillctl leases` with the admin certificate lists `node` (table and json).
fn assert_admin_lists(ctl: &Controller, pki: &Pki, node: &str, subnet: &str) {
    let url = ctl.url();
    let table = ok(&leases(&url, &pki.ca, &pki.admin, &[]));
    println!("twillctl leases:\n{table}");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NODE", "SUBNET", "PUBLIC-IP", "VTEP-MAC", "EXPIRES-IN"],
        "{table}"
    );
    let row = lines
        .find(|l| l.starts_with(node))
        .unwrap_or_else(|| panic!("{node} missing:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], subnet, "{table}");
    assert_eq!(cells[3], "0a:58:0a:f4:01:01", "{table}");
    assert!(
        cells[4].starts_with("23h") || cells[4] == "24h",
        "EXPIRES-IN {:?}:\n{table}",
        cells[4]
    );

    let wide = ok(&leases(&url, &pki.ca, &pki.admin, &["-o", "wide"]));
    println!("twillctl leases -o wide:\n{wide}");
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header.last(), Some(&"REVISION"), "{wide}");

    let json = ok(&leases(&url, &pki.ca, &pki.admin, &["-o", "json"]));
    println!("twillctl leases -o json:\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["revision"].as_u64().unwrap() >= 1, "{json}");
    let l = v["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node_name"] == node)
        .unwrap_or_else(|| panic!("{node} missing:\n{json}"));
    assert_eq!(l["subnet"], subnet);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let exp = l["expires_at_unix"].as_i64().unwrap();
    assert!(
        (now + 86_400 - exp).abs() < 120,
        "expires_at_unix {exp}, now {now}"
    );

    let out = leases(&url, &pki.ca, &pki.admin, &["--prefix", "no-such-node-"]);
    assert_eq!(ok(&out), "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No leases found"));
}

// ---------------------------------------------------------------------------------------
// The cases

/// (1) Certificates made by `twillctl certs`: an admin lists leases, by IP and by DNS name.
#[test]
fn twillctl_certificates_work() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);

    let empty = leases(&ctl.url(), &pki.ca, &pki.admin, &[]);
    assert_eq!(ok(&empty), "", "fresh controller should have no leases");

    let lease = acquire(&ctl, &pki, "192.168.50.10");
    assert_eq!(lease.node_name, "node-a");
    assert_admin_lists(&ctl, &pki, "node-a", &lease.subnet);

    let by_name = format!("https://localhost:{}", ctl.grpc.port());
    let out = ok(&leases(&by_name, &pki.ca, &pki.admin, &[]));
    assert!(out.contains("node-a"), "{out}");
}

/// (2) Certificates made with the openssl CLI: the controller serves with the openssl
/// server certificate, and the openssl admin and node certificates are accepted.
#[test]
fn openssl_certificates_work() {
    let dir = tempfile::tempdir().unwrap();
    let pki = openssl_pki(dir.path());
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    let lease = acquire(&ctl, &pki, "192.168.50.11");
    assert_eq!(lease.node_name, "ossl-node");
    assert_admin_lists(&ctl, &pki, "ossl-node", &lease.subnet);
    // The openssl node certificate is a node, not an admin.
    let err = failed(&leases(&ctl.url(), &pki.ca, &pki.node, &[]), &ctl);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
}

/// (3) A client without a certificate is refused by the TLS layer.
#[test]
fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    let result: Result<(), String> = runtime().block_on(async {
        let ch = Endpoint::from_shared(ctl.url())
            .unwrap()
            .tls_config(tls(&pki.ca, None))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect failed: {e:?}"))?;
        match AdminServiceClient::new(ch)
            .list_leases(ListLeasesRequest::default())
            .await
        {
            Ok(_) => Ok(()),
            // A status with a transport error as its source was made on our side when the
            // connection broke; a status the service sent has no source.
            Err(s) if std::error::Error::source(&s).is_some() => Err(format!("transport: {s:?}")),
            Err(s) => panic!("the TLS layer let the client through; the service answered {s:?}"),
        }
    });
    let err = result.expect_err("a client without a certificate was served");
    println!("no client certificate: {err}");
    // twillctl cannot even be asked to go without a certificate: it names the flag.
    let out = twillctl(&[
        "--controller",
        &ctl.url(),
        "--tls-ca",
        pki.ca.to_str().unwrap(),
        "leases",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
    // The controller still serves good clients.
    ok(&leases(&ctl.url(), &pki.ca, &pki.admin, &[]));
}

/// (4) A client certificate from another CA is refused.
#[test]
fn client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(&dir.path().join("good"));
    let other = twillctl_pki(&dir.path().join("other"));
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    // The rogue admin trusts the real server CA, so only its own certificate is wrong.
    let out = leases(&ctl.url(), &pki.ca, &other.admin, &[]);
    assert_tls_refusal(&failed(&out, &ctl));
    // And a client that trusts the wrong CA refuses the controller.
    let out = leases(&ctl.url(), &other.ca, &pki.admin, &[]);
    let err = failed(&out, &ctl);
    assert!(
        err.contains("cannot connect") || err.contains("UNAVAILABLE"),
        "{err}"
    );
    ok(&leases(&ctl.url(), &pki.ca, &pki.admin, &[]));
}

/// (5) A node certificate may not use the admin API.
#[test]
fn node_certificate_gets_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    let out = leases(&ctl.url(), &pki.ca, &pki.node, &[]);
    let err = failed(&out, &ctl);
    assert!(err.starts_with("error: PERMISSION_DENIED: "), "{err}");
}

/// (6) An expired client certificate is refused.
#[test]
fn expired_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ca = Ca::load(&pki.dir.join("ca.crt"), &pki.dir.join("ca.key")).unwrap();
    let now = SystemTime::now();
    let expired = ca
        .issue(
            &Role::Admin("old-alice".into()),
            Validity {
                not_before: now - Duration::from_secs(10 * 86_400),
                not_after: now - Duration::from_secs(86_400),
            },
        )
        .unwrap();
    certs::write_pair(&pki.dir, "admin-expired", &expired, false).unwrap();
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    let out = leases(
        &ctl.url(),
        &pki.ca,
        &Pair::at(&pki.dir, "admin-expired"),
        &[],
    );
    let err = failed(&out, &ctl);
    assert_tls_refusal(&err);
    assert!(err.contains("admin-expired.crt expired at"), "{err}");
    ok(&leases(&ctl.url(), &pki.ca, &pki.admin, &[]));
}
