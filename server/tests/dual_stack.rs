//! Dual-stack leases through the real controller: every node gets a subnet of each
//! family and keeps both across a controller restart; bad IPv6 lease fields are
//! refused with the right status code and nothing is written; an IPv4-only
//! controller ignores the IPv6 fields a newer agent sends.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use support::{acquire_request, mac, Controller, Pki, NET_CONF};
use tonic::Code;
use twill_proto::{AcquireRequest, Lease, ListLeasesRequest};

const DUAL: &str = r#"{"Network": "10.128.0.0/12", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "vxlan"}}"#;

/// What a dual-stack agent of node `node` sends: its own MAC per device.
fn dual_request(node: &str, public_ipv6: &str) -> AcquireRequest {
    let m = mac(node);
    AcquireRequest {
        public_ipv6: public_ipv6.into(),
        vtep_mac_v6: format!("0a:59{}", &m[5..]),
        ..acquire_request(node, "")
    }
}

async fn table(ctl: &Controller, pki: &Pki) -> (Vec<Lease>, u64) {
    let r = ctl
        .admin(pki)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    (r.leases, r.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_leases_keep_both_subnets_and_bad_ipv6_fields_write_nothing() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&pki, &dir.path().join("data"), DUAL, &[]);
    let (a, b) = (pki.node("a"), pki.node("b"));
    let granted = ctl.grant(&pki, &a, dual_request("a", "2001:db8::a")).await;
    assert_eq!(granted.ipv6_subnet, "fd00:10:244:1::/64");
    assert_eq!(granted.public_ipv6, "2001:db8::a");
    let (_, before) = table(&ctl, &pki).await;

    let mut agent_b = ctl.agent(&pki, &b).await;
    for (public_ipv6, why) in [
        ("ff02::1", "multicast"),
        ("fe80::1", "link-local"),
        ("::", "unspecified"),
        ("", "empty"),
    ] {
        let s = agent_b
            .acquire(dual_request("b", public_ipv6))
            .await
            .expect_err(why);
        assert_eq!(s.code(), Code::InvalidArgument, "{why}: {}", s.message());
        assert!(
            s.message().contains("public_ipv6"),
            "{why}: {}",
            s.message()
        );
    }
    let spoof = AcquireRequest {
        vtep_mac_v6: granted.vtep_mac_v6.clone(),
        ..dual_request("b", "2001:db8::b")
    };
    let s = agent_b.acquire(spoof).await.expect_err("a's IPv6 VTEP MAC");
    assert_eq!(s.code(), Code::AlreadyExists, "{}", s.message());
    assert!(s.message().contains("node a"), "{}", s.message());
    let (leases, after) = table(&ctl, &pki).await;
    assert_eq!(
        (leases.len(), after),
        (1, before),
        "nothing written by refused requests"
    );

    // Both subnets survive a crash of the controller: the node asks again and keeps
    // them (no revision, no broadcast for an unchanged renewal).
    ctl.kill9();
    ctl.restart();
    let again = ctl.grant(&pki, &a, dual_request("a", "2001:db8::a")).await;
    assert_eq!(
        (
            again.subnet.as_str(),
            again.ipv6_subnet.as_str(),
            again.revision
        ),
        (
            granted.subnet.as_str(),
            granted.ipv6_subnet.as_str(),
            granted.revision
        )
    );
    let b_lease = ctl.grant(&pki, &b, dual_request("b", "2001:db8::b")).await;
    assert_ne!(b_lease.ipv6_subnet, granted.ipv6_subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_only_controller_ignores_the_ipv6_fields() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let a = pki.node("a");
    let lease = ctl.grant(&pki, &a, dual_request("a", "2001:db8::a")).await;
    assert!(!lease.subnet.is_empty());
    assert_eq!(
        (
            lease.ipv6_subnet.as_str(),
            lease.public_ipv6.as_str(),
            lease.vtep_mac_v6.as_str()
        ),
        ("", "", "")
    );
}
