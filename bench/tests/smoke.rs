//! Keeps the benchmark harness from rotting: `twill-bench smoke` (N=50 join storm,
//! fan-out, churn, reconnect, cold start; 3 replicas on etcd and a leader crash when
//! etcd is installed; data plane with 100 peers when root; the
//! charts of its one row) against
//! the real controller binary, in a few seconds. Checks that everything ran and converged, never
//! how fast: the machine may be slow or busy.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use serde_json::Value;
// In CI a part that could not run is a failure, not a skip.
use twill_tests::kit::in_ci;

#[test]
fn smoke_runs_every_scenario() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("smoke.json");
    let charts = dir.path().join("charts");
    let run = Command::new(env!("CARGO_BIN_EXE_twill-bench"))
        .args(["smoke", "--signal", "kill", "--out"])
        .arg(&out)
        .arg("--charts")
        .arg(&charts)
        .output()
        .expect("run twill-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() && stderr.contains("twill-controller not found") {
        // `cargo test -p twill-bench` alone does not build the controller;
        // `cargo test --workspace` (and `make test`, which CI runs) do.
        assert!(!in_ci(), "the controller binary is missing in CI: {stderr}");
        eprintln!("SKIPPED smoke: {stderr}");
        return;
    }
    assert!(
        run.status.success(),
        "twill-bench smoke failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("| 50 | join storm"),
        "markdown table printed:\n{stdout}"
    );

    let res: Value = serde_json::from_str(&std::fs::read_to_string(&out).expect("JSON written"))
        .expect("valid JSON");
    let twill = &res["rows"][0]["twill"]["runs"][0];
    assert_eq!(twill["storm"]["converged"], true, "{twill}");
    assert_eq!(twill["storm"]["nodes_granted"], 50);
    assert_eq!(
        twill["fanout"]["from_send_ms"]["count"],
        twill["fanout"]["expected"]
    );
    // Fan-out starts at the joiner's request send: no delivery can come before it.
    let first = twill["fanout"]["from_send_ms"]["p50"]
        .as_f64()
        .expect("p50");
    assert!(first >= 0.0, "{}", twill["fanout"]);
    assert!(
        stdout.contains("fan-out from request send"),
        "fan-out row printed:\n{stdout}"
    );
    for chart in ["join-storm.svg", "fanout-p99.svg", "memory.svg"] {
        let svg = std::fs::read_to_string(charts.join(chart)).expect("chart written");
        assert!(
            svg.contains("<text") && svg.contains("Twill"),
            "{chart}: {svg}"
        );
    }
    assert!(
        stdout.contains("| 50 | time zero → all N hold a lease"),
        "cold-start table printed:\n{stdout}"
    );
    let cold = &res["cold_start"][0]["runs"][0];
    assert_eq!(cold["converged"], true, "{cold}");
    assert_eq!(cold["nodes_bootstrapped"], 50, "{cold}");
    assert_eq!(res["reconnect"]["resumed"], 50);
    assert_eq!(res["churn"]["failed_cycles"], 0);
    let dataplane_ran = res["dataplane"].as_array().is_some_and(|d| {
        d.len() == 2
            && d.iter().all(|r| r["peers"] == 100)
            && d[0]["dual_stack"] == false
            && d[1]["dual_stack"] == true
    });
    let dataplane_skipped = res["notes"].as_array().is_some_and(|n| {
        n.iter()
            .any(|n| n.as_str().is_some_and(|s| s.contains("dataplane")))
    });
    // CI runs as root: there the data plane must have run, both stacks.
    assert!(
        dataplane_ran || (dataplane_skipped && !in_ci()),
        "{}",
        res["notes"]
    );

    // Replicas on etcd: scripts/setup.sh installs etcd, so in CI it must have run.
    let ha = &res["ha"][0];
    if ha.is_null() {
        assert!(!in_ci(), "the ha smoke did not run in CI: {}", res["notes"]);
        eprintln!("SKIPPED ha smoke: {}", res["notes"]);
        return;
    }
    assert_eq!(ha["etcd"]["runs"][0]["storm"]["converged"], true, "{ha}");
    let f = &ha["failovers"][0];
    assert_eq!(f["resumed"], f["moved"], "{f}");
    assert!(
        stdout.contains("#### Leader crash under 50 connected nodes"),
        "failover table printed:\n{stdout}"
    );
}
