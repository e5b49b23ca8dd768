//! Authorization matrix: who may call what, proven against the real controller.
//! Every refused call must leave the lease table untouched.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::{Duration, SystemTime};

use support::{acquire_request, Controller, Pki, NET_CONF};
use tonic::Code;
use twill_pki::{Role, Validity};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{ListLeasesRequest, ReleaseRequest};

async fn lease_count(ctl: &Controller, pki: &Pki) -> usize {
    ctl.admin(pki)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
        .len()
}

/// A call over a connection the controller must refuse at the TLS layer: either the
/// handshake fails or the first call does; nothing may succeed.
async fn assert_refused(ctl: &Controller, pki: &Pki, id: Option<&twill_pki::Issued>, what: &str) {
    let factory = ctl.channel_factory().with_ca(pki);
    match factory.connect_as(id).await {
        Err(_) => {}
        Ok(channel) => {
            let r = AgentServiceClient::new(channel)
                .acquire(acquire_request("node-a", ""))
                .await;
            let status = r.expect_err(&format!("{what}: the call must fail"));
            assert!(
                matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::Unknown
                        | Code::Unauthenticated
                        | Code::Internal
                        | Code::Cancelled
                ),
                "{what}: unexpected {status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_certificates_get_through() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);

    // Node B holds a lease that others will try to touch.
    let b = pki.node("node-b");
    let mut as_b = ctl.agent(&pki, &b).await;
    let b_lease = as_b
        .acquire(acquire_request("node-b", ""))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease_count(&ctl, &pki).await, 1);

    assert_refused(&ctl, &pki, None, "no client certificate").await;

    let other = Pki::new();
    let foreign = other.node("node-a");
    assert_refused(&ctl, &pki, Some(&foreign), "certificate from another CA").await;

    let now = SystemTime::now();
    let expired = pki
        .ca
        .issue(
            &Role::Node("node-a".into()),
            Validity {
                not_before: now - Duration::from_secs(2 * 86_400),
                not_after: now - Duration::from_secs(86_400),
            },
        )
        .unwrap();
    assert_refused(&ctl, &pki, Some(&expired), "expired certificate").await;

    let mut as_a = ctl.agent(&pki, &pki.node("node-a")).await;
    let s = as_a
        .acquire(acquire_request("node-b", ""))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "A renewing B's lease: {s:?}"
    );
    assert!(
        s.message().contains("cannot act for node \"node-b\""),
        "{}",
        s.message()
    );
    let s = as_a
        .release(ReleaseRequest {
            node_name: "node-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "A releasing B's lease: {s:?}"
    );

    let mut node_as_admin = twill_proto::admin_service_client::AdminServiceClient::new(
        ctl.channel(&pki, Some(&b)).await.unwrap(),
    );
    let s = node_as_admin
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "agent cert on the admin API: {s:?}"
    );

    let mut admin_as_agent = ctl.agent(&pki, &pki.admin("alice")).await;
    let s = admin_as_agent
        .acquire(acquire_request("alice", ""))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "admin cert acquiring a lease: {s:?}"
    );

    let leases = ctl
        .admin(&pki)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(leases, vec![b_lease], "nothing written by refused calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let mut a = ctl.agent(&pki, &pki.node("node-a")).await;

    let cases = [
        (
            "malformed subnet",
            {
                let mut r = acquire_request("node-a", "10.130.1.0/33");
                r.requested_subnet = "banana".into();
                r
            },
            "requested_subnet",
        ),
        (
            "host bits set",
            acquire_request("node-a", "10.130.1.7/24"),
            "host bits",
        ),
        (
            "subnet outside the network",
            acquire_request("node-a", "10.9.0.0/24"),
            "Network 10.128.0.0/12",
        ),
        (
            "empty node name",
            acquire_request("", ""),
            "node name is empty",
        ),
        (
            "oversized node name",
            acquire_request(&"n".repeat(300), ""),
            "limit is 253",
        ),
        (
            "unknown backend",
            {
                let mut r = acquire_request("node-a", "");
                r.backend_type = "udp".into();
                r
            },
            "backend_type",
        ),
        (
            "bad public ip",
            {
                let mut r = acquire_request("node-a", "");
                r.public_ip = "300.1.1.1".into();
                r
            },
            "public_ip",
        ),
        (
            "bad vtep mac",
            {
                let mut r = acquire_request("node-a", "");
                r.vtep_mac = "xx".into();
                r
            },
            "vtep_mac",
        ),
    ];
    for (what, req, needle) in cases {
        let s = a.acquire(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(
            s.message().contains(needle),
            "{what}: message {:?} should mention {needle:?}",
            s.message()
        );
    }
    assert_eq!(lease_count(&ctl, &pki).await, 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_subnets_is_resource_exhausted() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        &pki,
        &dir.path().join("data"),
        r#"{"Network": "10.1.0.0/26", "Backend": {"Type": "vxlan"}}"#,
        &[],
    );
    for n in ["n1", "n2", "n3"] {
        ctl.agent(&pki, &pki.node(n))
            .await
            .acquire(acquire_request(n, ""))
            .await
            .unwrap();
    }
    let s = ctl
        .agent(&pki, &pki.node("n4"))
        .await
        .acquire(acquire_request("n4", ""))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("out of subnets"), "{}", s.message());
}

/// Pod reports (REFERENCE 2.11): a node reports its own pods only, only in networks it
/// holds a lease in, only with addresses inside its subnet; anything else is refused
/// whole (PERMISSION_DENIED / INVALID_ARGUMENT) and nothing of it is listed. Admins
/// list the pods; nodes may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_only_its_own_pods_inside_its_own_subnet() {
    use twill_proto::{ListPodsRequest, PodAttachment, ReportAttachmentsRequest};

    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let (a, b) = (pki.node("node-a"), pki.node("node-b"));
    let lease_a = ctl.grant(&pki, &a, acquire_request("node-a", "")).await;
    let lease_b = ctl.grant(&pki, &b, acquire_request("node-b", "")).await;
    let host = |lease: &twill_proto::Lease, n: u8| {
        let net: ipnet::Ipv4Net = lease.subnet.parse().unwrap();
        let o = net.network().octets();
        format!("{}.{}.{}.{n}", o[0], o[1], o[2])
    };
    let pod = |id: &str, ip: String| PodAttachment {
        container_id: id.into(),
        ifname: "eth0".into(),
        namespace: "web".into(),
        pod: format!("pod-{id}"),
        ips: vec![ip],
        ..Default::default()
    };
    let report = |node: &str, pods: Vec<PodAttachment>| ReportAttachmentsRequest {
        node_name: node.into(),
        attachments: pods,
        usage: Vec::new(),
        findings: Vec::new(),
    };
    let list = || async {
        ctl.admin(&pki)
            .await
            .list_pods(ListPodsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .pods
    };
    let mut as_a = ctl.agent(&pki, &a).await;

    as_a.report_attachments(report("node-a", vec![pod("c1", host(&lease_a, 5))]))
        .await
        .unwrap();
    let pods = list().await;
    assert_eq!(pods.len(), 1);
    assert_eq!(
        (
            pods[0].node_name.as_str(),
            pods[0].network.as_str(),
            pods[0].pod.as_str()
        ),
        ("node-a", "default", "pod-c1")
    );

    // For another node: refused by who it is.
    let e = as_a
        .report_attachments(report("node-b", vec![pod("x", host(&lease_b, 5))]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Its own name, node-b's addresses: refused by where they are.
    let e = as_a
        .report_attachments(report(
            "node-a",
            vec![pod("c1", host(&lease_a, 5)), pod("x", host(&lease_b, 6))],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(&lease_a.subnet), "{}", e.message());
    // A network it holds no lease in.
    let mut elsewhere = pod("y", host(&lease_a, 7));
    elsewhere.network = "blue".into();
    let e = as_a
        .report_attachments(report("node-a", vec![elsewhere]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // More pods than its /24 has addresses.
    let many = (0..300)
        .map(|i| pod(&format!("m{i}"), host(&lease_a, 9)))
        .collect();
    let e = as_a
        .report_attachments(report("node-a", many))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let pods = list().await;
    assert_eq!(pods.len(), 1, "nothing of a refused report kept: {pods:?}");
    assert_eq!(pods[0].container_id, "c1");

    // Nodes do not read the pods.
    let e = twill_proto::admin_service_client::AdminServiceClient::new(
        ctl.channel(&pki, Some(&a)).await.unwrap(),
    )
    .list_pods(ListPodsRequest::default())
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Its pods leave with its lease.
    as_a.release(ReleaseRequest {
        node_name: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(list().await.is_empty());
}
