//! The controller re-reads its serving certificate when the files change (as
//! cert-manager and the kubelet rewrite a mounted Secret): new handshakes present the
//! new certificate, open connections carry on, nothing restarts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{acquire_request, Controller, Pki, NET_CONF};
use twill_pki::Role;

/// `serial=<hex>` with the hex's leading zeros left out: openssl prints the serial
/// without DER's sign byte, the raw serial keeps it. rcgen's serial is a hash with its
/// top bit cleared, so a sign byte appears when the hash's first byte clears to 0 and
/// the next has its top bit set: about one certificate in 256, which then failed here.
fn serial_text(hex: &str) -> String {
    format!("serial={}", hex.trim_start_matches('0'))
}

/// The serial of the certificate the controller presents, as openssl reads it.
fn presented_serial(ctl: &Controller) -> String {
    let s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &ctl.addr.to_string(),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl s_client (scripts/setup.sh installs openssl)");
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(x509.stdin.as_mut().unwrap(), &s_client.stdout).unwrap();
    let out = x509.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.strip_prefix("serial=") {
        Some(hex) => serial_text(hex),
        None => text,
    }
}

fn serial_of(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    serial_text(
        &p.parse_x509()
            .unwrap()
            .raw_serial_as_string()
            .replace(':', "")
            .to_uppercase(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_serving_certificate_is_used_without_a_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let before = presented_serial(&ctl);
    assert!(before.starts_with("serial="), "{before:?}");
    let node = pki.node("a");
    let mut open = ctl.agent(&pki, &node).await;
    open.acquire(acquire_request("a", "")).await.unwrap();

    // Replaced the way a Secret volume is: new files, renamed into place.
    let fresh = pki.issue(Role::Controller {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        replica: false,
    });
    for (name, text) in [
        ("controller.key", &fresh.key_pem),
        ("controller.crt", &fresh.cert_pem),
    ] {
        let tmp = pki.path(&format!("{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, pki.path(name)).unwrap();
    }
    let want = serial_of(&fresh.cert_pem);
    assert_ne!(want, before);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = presented_serial(&ctl);
        if now == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still presenting {now} 20s after the files changed (want {want})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ctl.child.try_wait().unwrap().is_none(), "no restart");
    let mut moved = acquire_request("a", "");
    moved.public_ip = "192.0.2.99".into();
    open.acquire(moved)
        .await
        .expect("the open connection carries on");
    ctl.agent(&pki, &pki.node("b"))
        .await
        .acquire(acquire_request("b", ""))
        .await
        .expect("a new connection verifies the new certificate");
    assert!(
        ctl.log_text().contains("TLS files changed"),
        "{}",
        ctl.log_text()
    );
}
