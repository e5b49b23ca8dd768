//! A controller restarted with a net-conf.json that no longer fits its stored leases
//! refuses to start and says what to do; the store is left as it was.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::process::Command;

use support::{acquire_request, Controller, Pki, NET_CONF};
use twill_proto::ListLeasesRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_network_subnet_len_or_backend_is_refused_at_start() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut ctl = Controller::start(&pki, &data, NET_CONF, &[]);
    let a = pki.node("a");
    let lease = ctl.grant(&pki, &a, acquire_request("a", "")).await;
    ctl.kill9();

    for (conf, why) in [
        (
            r#"{"Network": "10.128.0.0/12", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}"#,
            "SubnetLen changed",
        ),
        (
            r#"{"Network": "10.64.0.0/16", "Backend": {"Type": "vxlan"}}"#,
            "Network changed",
        ),
        (
            r#"{"Network": "10.128.0.0/12", "Backend": {"Type": "host-gw"}}"#,
            "Backend changed from vxlan to host-gw",
        ),
    ] {
        std::fs::write(&ctl.net_conf, conf).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_twill-controller"))
            .args(&ctl.args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{why}: the controller must refuse to start"
        );
        assert!(
            stderr.contains("restore the previous net-conf.json") && stderr.contains("1 lease(s)"),
            "{why}: the error says what is wrong and what to do: {stderr}"
        );
    }

    std::fs::write(&ctl.net_conf, NET_CONF).unwrap();
    ctl.restart();
    let leases = ctl
        .admin(&pki)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(
        leases,
        vec![lease],
        "the store is untouched by the refused starts"
    );
}
