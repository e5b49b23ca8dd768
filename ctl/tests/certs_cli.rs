//! `twillctl certs`: the library API and the real binary.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use twill_common::tls::Identity;
use twill_ctl::certs::{self, Ca, Role, Validity};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

fn twillctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twillctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TWILL_") {
            cmd.env_remove(k);
        }
    }
    // Never read the user's ~/.config/twill/config.toml: point at a directory without one.
    cmd.env(
        "XDG_CONFIG_HOME",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("twillctl-no-config-home"),
    );
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

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn der_of(pem: &[u8]) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).expect("PEM");
    p.contents
}

struct Ekus {
    server: bool,
    client: bool,
}

fn ekus(der: &[u8]) -> Ekus {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("extended key usage present")
        .value;
    Ekus {
        server: eku.server_auth,
        client: eku.client_auth,
    }
}

fn test_ca() -> Ca {
    let ca = certs::new_ca(Validity::days(1).unwrap()).unwrap();
    Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap()
}

#[test]
fn node_certificate_has_node_role() {
    let ca = test_ca();
    let node = ca
        .issue(&Role::Node("worker-1".into()), Validity::days(30).unwrap())
        .unwrap();
    let id = Identity::from_der(&node.cert_der).unwrap();
    assert_eq!(id.name, "worker-1");
    assert!(id.is_node());
    assert!(!id.is_admin());
    let not_after = node
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(id.not_after_unix, not_after);
    assert!(!id.expired(not_after), "valid through its last second");
    assert!(id.expired(not_after + 1));
    let e = ekus(&node.cert_der);
    assert!(e.client && !e.server);
    assert_eq!(der_of(node.cert_pem.as_bytes()), node.cert_der);
}

#[test]
fn admin_certificate_has_admin_role() {
    let ca = test_ca();
    let admin = ca
        .issue(&Role::Admin("alice".into()), Validity::days(30).unwrap())
        .unwrap();
    let id = Identity::from_der(&admin.cert_der).unwrap();
    assert_eq!(id.name, "alice");
    assert!(id.is_admin());
    assert!(!id.is_node());
    let e = ekus(&admin.cert_der);
    assert!(e.client && !e.server);
}

#[test]
fn controller_certificate_serves_and_only_a_replicas_is_a_client_certificate() {
    let ca = test_ca();
    let issue = |replica| {
        ca.issue(
            &Role::Controller {
                dns: vec!["twill.example.com".into()],
                ips: vec!["10.0.0.1".parse().unwrap()],
                replica,
            },
            Validity::days(30).unwrap(),
        )
        .unwrap()
    };
    // A single controller's certificate serves only.
    let e = ekus(&issue(false).cert_der);
    assert!(e.server && !e.client);
    // A replica's is a client certificate too: replicas on etcd present it to each
    // other when they forward writes.
    let ctl = issue(true);
    let e = ekus(&ctl.cert_der);
    assert!(e.server && e.client);
    let (_, cert) = X509Certificate::from_der(&ctl.cert_der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "twill-controller");
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(san
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName("twill.example.com"))));
    assert!(san
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [10, 0, 0, 1])));
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
}

#[test]
fn cli_writes_ca_and_certificates_with_modes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("pki");
    let ds = d.to_str().unwrap();
    let out = ok(&twillctl(&["certs", "init", "--dir", ds]));
    assert!(out.contains("ca.crt") && out.contains("ca.key"), "{out}");
    ok(&twillctl(&[
        "certs", "issue", "node", "worker-1", "--dir", ds,
    ]));
    ok(&twillctl(&[
        "certs", "issue", "admin", "alice", "--dir", ds,
    ]));
    ok(&twillctl(&[
        "certs",
        "issue",
        "controller",
        "--dir",
        ds,
        "--ip",
        "127.0.0.1",
        "--dns",
        "twill.local",
    ]));
    for stem in ["ca", "node-worker-1", "admin-alice", "controller"] {
        let key = d.join(format!("{stem}.key"));
        let crt = d.join(format!("{stem}.crt"));
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        let m = mode(&crt);
        assert_eq!(m & !0o644, 0, "{} has mode {m:o}", crt.display());
        assert_eq!(m & 0o600, 0o600, "{} has mode {m:o}", crt.display());
        let key_pem = std::fs::read_to_string(&key).unwrap();
        assert!(
            key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{key_pem}"
        );
    }

    let ca_der = der_of(&std::fs::read(d.join("ca.crt")).unwrap());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let cn = ca
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "twill-ca");
    let years =
        (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp()) / 86_400 / 365;
    assert_eq!(years, 10);

    let node = der_of(&std::fs::read(d.join("node-worker-1.crt")).unwrap());
    let id = Identity::from_der(&node).unwrap();
    assert_eq!(id.name, "worker-1");
    assert!(id.is_node());
    let (_, node_cert) = X509Certificate::from_der(&node).unwrap();
    assert_eq!(node_cert.issuer(), ca.subject());
    assert!(node_cert.verify_signature(Some(ca.public_key())).is_ok());

    let admin = der_of(&std::fs::read(d.join("admin-alice.crt")).unwrap());
    let id = Identity::from_der(&admin).unwrap();
    assert_eq!(id.name, "alice");
    assert!(id.is_admin());
    let e = ekus(&admin);
    assert!(e.client && !e.server);
}

#[test]
fn cli_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    ok(&twillctl(&["certs", "init", "--dir", ds]));
    let key = dir.path().join("ca.key");
    let before = std::fs::read(&key).unwrap();

    let out = twillctl(&["certs", "init", "--dir", ds]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("ca.key exists; pass --force to overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key was changed");

    ok(&twillctl(&["certs", "issue", "node", "n1", "--dir", ds]));
    let out = twillctl(&["certs", "issue", "node", "n1", "--dir", ds]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node-n1.key exists; pass --force"));

    // --force replaces the files; a key that had loose permissions comes back 0600.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(&twillctl(&["certs", "init", "--dir", ds, "--force"]));
    assert_ne!(
        std::fs::read(&key).unwrap(),
        before,
        "--force did not replace the key"
    );
    assert_eq!(mode(&key), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn cli_controller_defaults_to_localhost() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    ok(&twillctl(&["certs", "init", "--dir", ds]));
    let out = twillctl(&["certs", "issue", "controller", "--dir", ds]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("localhost") && err.contains("127.0.0.1"),
        "{err}"
    );
    let der = der_of(&std::fs::read(dir.path().join("controller.crt")).unwrap());
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(san
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName("localhost"))));
    assert!(san
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1])));
    let e = ekus(&der);
    assert!(e.server && !e.client, "serverAuth only without --replica");
}

#[test]
fn cli_replica_controller_certificate_is_also_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    ok(&twillctl(&["certs", "init", "--dir", ds]));
    let out = ok(&twillctl(&[
        "certs",
        "issue",
        "controller",
        "--dir",
        ds,
        "--replica",
        "--ip",
        "10.0.0.1",
        "--ip",
        "10.0.0.2",
    ]));
    assert!(out.contains("serverAuth + clientAuth"), "{out}");
    let der = der_of(&std::fs::read(dir.path().join("controller.crt")).unwrap());
    let e = ekus(&der);
    assert!(e.server && e.client);
    let help = ok(&twillctl(&["certs", "issue", "controller", "--help"]));
    assert!(
        help.contains("--replica") && help.contains("clientAuth"),
        "{help}"
    );
}

#[test]
fn cli_uses_env_and_ca_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let out_dir = dir.path().join("out");
    ok(&twillctl(&[
        "certs",
        "init",
        "--dir",
        ca_dir.to_str().unwrap(),
    ]));
    let out = Command::new(env!("CARGO_BIN_EXE_twillctl"))
        .args(["certs", "issue", "admin", "bob"])
        .env("TWILL_CERT_DIR", &out_dir)
        .env("TWILL_CA_CERT", ca_dir.join("ca.crt"))
        .arg("--ca-key")
        .arg(ca_dir.join("ca.key"))
        .output()
        .unwrap();
    ok(&out);
    assert!(out_dir.join("admin-bob.crt").exists());
    assert_eq!(mode(&out_dir.join("admin-bob.key")), 0o600);
}

#[test]
fn cli_errors_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    // No CA yet.
    let out = twillctl(&["certs", "issue", "node", "n1", "--dir", ds]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("certs init"),
        "{err}"
    );
    // Bad node name.
    ok(&twillctl(&["certs", "init", "--dir", ds]));
    let out = twillctl(&["certs", "issue", "node", "bad/name", "--dir", ds]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: node name"), "{err}");
    // Usage errors exit 2.
    assert_eq!(twillctl(&["certs", "frobnicate"]).status.code(), Some(2));
    assert_eq!(twillctl(&["leases", "-o", "xml"]).status.code(), Some(2));
    let out = twillctl(&["leases"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TWILL_CONTROLLER"));
    // Missing TLS flags are named.
    let out = twillctl(&["--controller", "https://127.0.0.1:1", "leases"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert (or TWILL_TLS_CERT"));
    // Plain http is refused.
    let crt = dir.path().join("ca.crt");
    let key = dir.path().join("ca.key");
    let out = twillctl(&[
        "--controller",
        "http://127.0.0.1:1",
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        crt.to_str().unwrap(),
        "leases",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("https://"));
}
