//! Bad durations are refused at start with a message that names the flag, never a
//! panic (a zero `--reconcile-interval` used to panic the agent's timer).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn agent(extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twill-agent"))
        .args([
            "--controller",
            "https://127.0.0.1:1",
            "--tls-cert",
            "/nonexistent/node.crt",
            "--tls-key",
            "/nonexistent/node.key",
            "--tls-ca",
            "/nonexistent/ca.crt",
        ])
        .args(extra)
        .output()
        .expect("run twill-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_or_absurd_durations_are_refused_with_the_flag_named() {
    for (flag, value, says) in [
        ("--reconcile-interval", "0s", "zero"),
        ("--reconcile-interval", "0ms", "zero"),
        ("--reconcile-interval", "100000h", "too long"),
        ("--call-timeout", "0s", "zero"),
        ("--call-timeout", "2h", "too long"),
        ("--renew-margin", "soon", "invalid duration"),
    ] {
        let (code, stderr) = agent(&[flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {value}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
    }
}
