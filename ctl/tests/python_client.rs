//! An independent client — `tests/python/admin_client.py`, Python stubs generated from
//! our .proto files with grpcio-tools — against a real controller: the contract works
//! for a client that shares no code with Twill, over the same mutual TLS.
//!
//! Needs python3 with grpcio and grpcio-tools (`python3 -m pip install grpcio
//! grpcio-tools`); the interpreter is `$PYTHON` if set. Without them the test is
//! skipped with a loud message, unless `CI` is set, in which case it fails.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// True when python and grpc_tools are usable; otherwise skips loudly (or fails in CI).
fn python_ready() -> bool {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "{py} cannot import grpc / grpc_tools: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run {py}: {e}"),
    };
    twill_tests::kit::skip(
        "python_client",
        &format!("{why} (install with: {py} -m pip install grpcio grpcio-tools)"),
    );
    false
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/admin_client.py")
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

fn run_python(ctl: &Controller, pki: &Pki, client: &Pair, extra: &[&str]) -> Output {
    Command::new(python())
        .arg(script())
        .arg("--target")
        .arg(ctl.grpc.to_string())
        .arg("--ca")
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&client.crt)
        .arg("--key")
        .arg(&client.key)
        .arg("--proto-dir")
        .arg(proto_dir())
        .args(extra)
        .output()
        .expect("run the python client")
}

#[test]
fn python_client_lists_leases_config_and_status() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    for (i, n) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        acquire_as(&ctl, &pki, n, &format!("192.168.50.{}", 10 + i));
    }
    ok(&ctl_as(
        &ctl,
        &pki,
        &pki.admin,
        &["reserve", "node-x", "10.244.200.0/24"],
    ));

    // Pages of two: the client follows next_page_token.
    let out = run_python(&ctl, &pki, &pki.admin, &["--page-size", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed ({:?}):\nstdout: {stdout}\nstderr: {}\ncontroller log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        ctl.logs()
    );
    println!("python client:\n{stdout}");
    let py: Value = serde_json::from_str(&stdout).expect("python client prints JSON");
    assert_eq!(py["pages"], 2, "{py}");

    // The leases agree with twillctl's, field by field.
    let ours: Value = serde_json::from_str(&admin(&ctl, &pki, &["leases", "-o", "json"])).unwrap();
    let (theirs, ours) = (
        py["leases"].as_array().unwrap(),
        ours["leases"].as_array().unwrap(),
    );
    assert_eq!(theirs.len(), 3, "{py}");
    assert_eq!(theirs.len(), ours.len());
    for (t, o) in theirs.iter().zip(ours) {
        for k in [
            "node_name",
            "subnet",
            "public_ip",
            "backend_type",
            "vtep_mac",
            "expires_at_unix",
            "revision",
            "vni",
            "reserved",
        ] {
            assert_eq!(t[k], o[k], "{k}: python {t} vs twillctl {o}");
        }
    }
    assert_eq!(theirs[0]["public_ip"], "192.168.50.10");
    assert_eq!(theirs[1]["reserved"], false);
    assert!(py["revision"].as_u64().unwrap() >= 3, "{py}");

    let config = &py["config"];
    assert_eq!(config["network"], "10.244.0.0/16", "{config}");
    assert_eq!(config["subnet_len"], 24);
    assert_eq!(config["backend_type"], "vxlan");
    assert_eq!(config["vni"], 1);
    assert_eq!(config["lease_ttl_seconds"], 86_400);

    let status = &py["status"];
    assert_eq!(status["subnets_total"], 255, "{status}");
    assert_eq!(status["subnets_used"], 3);
    assert_eq!(status["subnets_reserved"], 1);
    assert_eq!(status["subnets_free"], 251);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["agents"].as_array().unwrap().is_empty());

    // A node certificate is refused with PERMISSION_DENIED, as for twillctl.
    let out = run_python(&ctl, &pki, &pki.node, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: PERMISSION_DENIED: "), "{err}");
}
