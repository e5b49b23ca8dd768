//! Mutual TLS against the real `twill-controller` binary, with certificates made by
//! `twillctl certs` and by the `openssl` CLI (docs/compatibility.md, Certificates and
//! roles).
//!
//! Needs `cargo build --workspace --bins` first (the controller is another crate's binary).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use support::{failed, ok, runtime, tls, twillctl, twillctl_pki, Controller, Pair, Pki};
use tonic::transport::Endpoint;
use twill_ctl::certs::{self, Ca, Role, Validity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, ListLeasesRequest};

// ---------------------------------------------------------------------------------------
// Certificates made with openssl

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

/// Certificates made with the `openssl` CLI in the layout of docs/compatibility.md
/// (Certificates and roles): an RSA CA,
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
                ..Default::default()
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
        [
            "NODE",
            "SUBNET",
            "PUBLIC-IP",
            "VTEP-MAC",
            "EXPIRES-IN",
            "RESERVED"
        ],
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
    assert_eq!(cells[5], "no", "{table}");

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

/// (3) A client without a certificate gets UNAUTHENTICATED from every service but
/// IdentityService.
#[test]
fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::start(&pki.controller.crt, &pki.controller.key, &pki.ca);
    // The handshake lets a client without a certificate in (a new node may only call
    // IdentityService.Bootstrap); every other service refuses it.
    let status = runtime().block_on(async {
        let ch = Endpoint::from_shared(ctl.url())
            .unwrap()
            .tls_config(tls(&pki.ca, None))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("the handshake completes without a client certificate");
        AdminServiceClient::new(ch)
            .list_leases(ListLeasesRequest::default())
            .await
            .expect_err("a client without a certificate was served")
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate is required"),
        "{status:?}"
    );
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
