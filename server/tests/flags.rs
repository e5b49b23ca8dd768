//! Bad lease TTLs are refused at start with a message that names the flag, never a
//! panic or an overflowed expiry.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn controller(ttl: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twill-controller"))
        .args([
            "--tls-cert",
            "/nonexistent/c.crt",
            "--tls-key",
            "/nonexistent/c.key",
            "--tls-client-ca",
            "/nonexistent/ca.crt",
            "--data-dir",
            "/nonexistent/data",
            "--lease-ttl",
            ttl,
        ])
        .output()
        .expect("run twill-controller");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_short_or_absurd_lease_ttls_are_refused() {
    for (ttl, says) in [
        ("0s", "too short"),
        ("5s", "too short"),
        ("100000000h", "too long"),
        ("99999999999999999999999s", "--lease-ttl"),
    ] {
        let (code, stderr) = controller(ttl);
        assert!(matches!(code, Some(1 | 2)), "{ttl}: {code:?} {stderr}");
        assert!(
            stderr.contains("--lease-ttl") && stderr.contains(says),
            "{ttl}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{ttl}: {stderr}");
    }
}
