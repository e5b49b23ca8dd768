//! Several networks (REFERENCE 2.10) against the real controller: who may join which
//! network, what one watch carries, the directory re-read while running, and bad
//! files refused without touching the networks in force.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{acquire_request, Controller, Pki, NET_CONF};
use tonic::Code;
use twill_proto::{
    AcquireRequest, GetNetworkConfigRequest, ListAdminNetworksRequest, ListLeasesRequest,
    ListNetworksRequest, NetworkInfo, ReleaseRequest, WatchRequest, WatchResponse,
};

const BLUE: &str = r#"{"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}, "Nodes": ["node-a", "node-b"]}"#;
const RED: &str = r#"{"Network": "10.20.0.0/16", "Backend": {"Type": "host-gw"}}"#;

fn write(dir: &Path, name: &str, text: &str) {
    // Written aside and renamed in, as a ConfigMap update is: never read half-written.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

fn in_network(node: &str, network: &str) -> AcquireRequest {
    AcquireRequest {
        network: network.into(),
        ..acquire_request(node, "")
    }
}

fn host_gw(node: &str, network: &str) -> AcquireRequest {
    AcquireRequest {
        backend_type: "host-gw".into(),
        vtep_mac: String::new(),
        ..in_network(node, network)
    }
}

async fn networks(ctl: &Controller, pki: &Pki) -> Vec<NetworkInfo> {
    ctl.admin(pki)
        .await
        .list_networks(ListAdminNetworksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .networks
}

/// Waits (at most 20 s) until the admin's network list satisfies `ok`.
async fn wait_networks(
    ctl: &Controller,
    pki: &Pki,
    what: &str,
    ok: impl Fn(&[NetworkInfo]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = networks(ctl, pki).await;
        if ok(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: networks are {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn started(dir: &Path, pki: &Pki) -> Controller {
    let data = dir.join("data");
    let networks = data.with_extension("networks");
    std::fs::create_dir_all(&networks).unwrap();
    write(&networks, "blue.json", BLUE);
    write(&networks, "red.json", RED);
    Controller::start(pki, &data, NET_CONF, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_network_admits_its_nodes_and_allocates_from_its_own_pool() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = started(dir.path(), &pki);
    let (a, c) = (pki.node("node-a"), pki.node("node-c"));

    let listed = networks(&ctl, &pki).await;
    let summary: Vec<(&str, &str, u32, &str)> = listed
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.ipv4_network.as_str(),
                n.vni,
                n.backend_type.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("blue", "10.10.0.0/16", 2, "vxlan"),
            ("default", "10.128.0.0/12", 1, "vxlan"),
            ("red", "10.20.0.0/16", 0, "host-gw"),
        ]
    );
    assert_eq!(listed[0].nodes, ["node-a", "node-b"]);

    // node-a joins all three; each lease comes from its network's pool.
    let default = ctl.grant(&pki, &a, in_network("node-a", "")).await;
    let blue = ctl.grant(&pki, &a, in_network("node-a", "blue")).await;
    let red = ctl.grant(&pki, &a, host_gw("node-a", "red")).await;
    assert!(
        default.subnet.starts_with("10.1") && default.network.is_empty(),
        "{default:?}"
    );
    assert!(
        blue.subnet.starts_with("10.10.") && blue.network == "blue",
        "{blue:?}"
    );
    assert_eq!((blue.vni, blue.backend_type.as_str()), (2, "vxlan"));
    assert!(
        red.subnet.starts_with("10.20.") && red.vtep_mac.is_empty(),
        "{red:?}"
    );

    // node-c is not among blue's nodes: refused, naming the network and its rule.
    let mut as_c = ctl.agent(&pki, &c).await;
    let refused = as_c
        .acquire(in_network("node-c", "blue"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("network blue does not admit node node-c")
            && refused.message().contains("node-a"),
        "{}",
        refused.message()
    );
    let refused = as_c
        .get_network_config(GetNetworkConfigRequest {
            network: "blue".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = as_c
        .watch(WatchRequest {
            networks: vec!["blue".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "no peeking at blue either"
    );
    let open: Vec<String> = as_c
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(open, ["default", "red"]);
    ctl.grant(&pki, &c, in_network("node-c", "")).await;

    // Unknown and malformed names.
    let unknown = as_c
        .acquire(in_network("node-c", "green"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());
    assert!(unknown.message().contains("green"), "{}", unknown.message());
    let bad = as_c
        .acquire(in_network("node-c", "Not_A_Name"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{}", bad.message());

    // The admin lists each network's leases; a release in one leaves the others.
    let mut admin = ctl.admin(&pki).await;
    let list = |network: &str| ListLeasesRequest {
        network: network.into(),
        ..Default::default()
    };
    let names = |r: twill_proto::ListLeasesResponse| -> Vec<String> {
        r.leases.into_iter().map(|l| l.node_name).collect()
    };
    assert_eq!(
        names(admin.list_leases(list("")).await.unwrap().into_inner()),
        ["node-a", "node-c"]
    );
    assert_eq!(
        names(admin.list_leases(list("blue")).await.unwrap().into_inner()),
        ["node-a"]
    );
    let mut as_a = ctl.agent(&pki, &a).await;
    let released = as_a
        .release(ReleaseRequest {
            node_name: "node-a".into(),
            network: "blue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    assert!(names(admin.list_leases(list("blue")).await.unwrap().into_inner()).is_empty());
    assert_eq!(
        names(admin.list_leases(list("")).await.unwrap().into_inner()),
        ["node-a", "node-c"]
    );
    let listed = networks(&ctl, &pki).await;
    assert_eq!(
        listed.iter().map(|n| n.leases).collect::<Vec<_>>(),
        [0, 2, 1],
        "blue, default, red"
    );
}

/// The messages of a watch until one whose revision reaches `revision`.
async fn read_until(
    stream: &mut tonic::Streaming<WatchResponse>,
    revision: u64,
) -> Vec<WatchResponse> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got
        .last()
        .is_none_or(|m: &WatchResponse| m.revision < revision)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .expect("watch message in time")
            .unwrap()
            .expect("stream open");
        got.push(msg);
    }
    got
}

fn nets_of(msgs: &[WatchResponse]) -> Vec<(String, String)> {
    msgs.iter()
        .flat_map(|m| &m.events)
        .filter_map(|e| e.lease.as_ref())
        .map(|l| (l.network.clone(), l.node_name.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_watch_carries_every_network_it_names_and_no_other() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = started(dir.path(), &pki);
    let (a, b) = (pki.node("node-a"), pki.node("node-b"));
    ctl.grant(&pki, &a, in_network("node-a", "")).await;
    ctl.grant(&pki, &a, in_network("node-a", "blue")).await;

    let mut as_b = ctl.agent(&pki, &b).await;
    let mut both = as_b
        .watch(WatchRequest {
            networks: vec!["default".into(), "blue".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut only_default = as_b
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = read_until(&mut both, 2).await;
    assert!(first[0].reset);
    assert_eq!(
        nets_of(&first),
        [
            ("blue".to_string(), "node-a".to_string()),
            ("".into(), "node-a".into())
        ],
        "one reset holds both networks, by network name then node"
    );
    let first = read_until(&mut only_default, 2).await;
    assert_eq!(nets_of(&first), [("".to_string(), "node-a".to_string())]);

    // A red lease (not watched by either) and a blue one: the default-only watcher
    // sees neither, the other sees blue's.
    ctl.grant(&pki, &b, host_gw("node-b", "red")).await;
    let blue_b = ctl.grant(&pki, &b, in_network("node-b", "blue")).await;
    let default_b = ctl.grant(&pki, &b, in_network("node-b", "")).await;
    let got = read_until(&mut both, default_b.revision).await;
    assert_eq!(
        nets_of(&got),
        [
            ("blue".to_string(), "node-b".to_string()),
            ("".into(), "node-b".into())
        ]
    );
    assert!(
        blue_b.revision < default_b.revision,
        "one revision sequence"
    );
    let got = read_until(&mut only_default, default_b.revision).await;
    assert_eq!(nets_of(&got), [("".to_string(), "node-b".to_string())]);

    // Resuming from a revision replays only the watched networks' events.
    let mut resumed = as_b
        .watch(WatchRequest {
            from_revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = read_until(&mut resumed, default_b.revision).await;
    assert!(!got[0].reset);
    assert_eq!(nets_of(&got), [("".to_string(), "node-b".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_followed_and_bad_files_leave_the_networks_in_force() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = started(dir.path(), &pki);
    let nets = ctl.networks_dir.clone();
    let a = pki.node("node-a");
    ctl.grant(&pki, &a, in_network("node-a", "blue")).await;

    // A new file: served within a few seconds.
    write(
        &nets,
        "green.json",
        r#"{"Network": "10.30.0.0/16", "Backend": {"Type": "vxlan", "VNI": 3}}"#,
    );
    wait_networks(&ctl, &pki, "green added", |n| {
        n.iter().any(|n| n.name == "green")
    })
    .await;
    let green = ctl.grant(&pki, &a, in_network("node-a", "green")).await;
    assert!(green.subnet.starts_with("10.30."), "{green:?}");

    // Bad files: an overlap, a shared VNI, one that does not parse, and blue moved
    // under its lease. Each is refused and logged; what is served stays.
    write(
        &nets,
        "overlap.json",
        r#"{"Network": "10.10.128.0/17", "Backend": {"Type": "vxlan", "VNI": 9}}"#,
    );
    write(
        &nets,
        "samevni.json",
        r#"{"Network": "10.40.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}}"#,
    );
    write(&nets, "broken.json", "{ not json");
    write(
        &nets,
        "blue.json",
        &BLUE.replace("10.10.0.0/16", "10.11.0.0/16"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let wanted = [
        "network overlap (10.10.128.0/17) overlaps network blue (10.10.0.0/16)",
        "network samevni uses VXLAN VNI 2, as network blue does",
        "broken.json",
        "its Network, SubnetLen, IPv6 keys, Backend.Type, VNI or Port changed while 1 node(s) hold leases",
    ];
    while !wanted.iter().all(|w| ctl.log_text().contains(w)) {
        assert!(
            Instant::now() < deadline,
            "refusals logged: {}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = networks(&ctl, &pki).await;
    let names: Vec<&str> = listed.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["blue", "default", "green", "red"]);
    let metrics = twill_tests::kit::http_get(ctl.metrics, "/metrics")
        .unwrap()
        .body;
    for line in [
        "twill_network_files_refused 4",
        "twill_network_leases{network=\"blue\"} 1",
        "twill_network_leases{network=\"green\"} 1",
        "twill_network_leases{network=\"default\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    assert_eq!(listed[0].ipv4_network, "10.10.0.0/16", "blue as it was");
    let again = ctl.grant(&pki, &a, in_network("node-a", "blue")).await;
    assert!(
        again.subnet.starts_with("10.10."),
        "renewed where it was: {again:?}"
    );
    write(&nets, "blue.json", BLUE);

    // green's file goes: it retires (no new leases, no renewals) while its lease runs.
    std::fs::remove_file(nets.join("green.json")).unwrap();
    wait_networks(&ctl, &pki, "green retired", |n| {
        n.iter()
            .any(|n| n.name == "green" && n.retired && n.leases == 1)
    })
    .await;
    let mut as_a = ctl.agent(&pki, &a).await;
    let refused = as_a
        .acquire(in_network("node-a", "green"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "{}",
        refused.message()
    );
    assert!(
        refused
            .message()
            .contains("network green is no longer configured"),
        "{}",
        refused.message()
    );
    // Its last lease released, it is forgotten.
    as_a.release(ReleaseRequest {
        node_name: "node-a".into(),
        network: "green".into(),
    })
    .await
    .unwrap();
    wait_networks(&ctl, &pki, "green forgotten", |n| {
        n.iter().all(|n| n.name != "green")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while twill_tests::kit::http_get(ctl.metrics, "/metrics")
        .unwrap()
        .body
        .contains("network=\"green\"")
    {
        assert!(Instant::now() < deadline, "green's gauges outlive it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_every_network_survive_a_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = started(dir.path(), &pki);
    let a = pki.node("node-a");
    let default = ctl.grant(&pki, &a, in_network("node-a", "")).await;
    let blue = ctl.grant(&pki, &a, in_network("node-a", "blue")).await;
    ctl.restart();
    let default_again = ctl.grant(&pki, &a, in_network("node-a", "")).await;
    let blue_again = ctl.grant(&pki, &a, in_network("node-a", "blue")).await;
    assert_eq!(
        (default_again.subnet, blue_again.subnet),
        (default.subnet, blue.subnet),
        "sticky in each network"
    );
    assert_eq!(blue_again.revision, blue.revision, "an unchanged renewal");
}

/// A store written by the release before several networks (commit db59b25's
/// controller, `--lease-ttl 87600h`, network 10.128.0.0/12): node-a holds
/// 10.128.1.0/24 (revision 1), node-b 10.128.2.0/24 (revision 2), node-r has
/// 10.128.9.0/24 reserved. Its two files are sled's, copied as that controller left
/// them after SIGTERM.
const STORE_BEFORE_NETWORKS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/store-before-networks"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_the_release_before_networks_serves_as_default() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["conf", "db"] {
        std::fs::copy(Path::new(STORE_BEFORE_NETWORKS).join(f), data.join(f)).unwrap();
    }
    let networks = data.with_extension("networks");
    std::fs::create_dir_all(&networks).unwrap();
    write(&networks, "blue.json", BLUE);
    let net_conf = r#"{"Network": "10.128.0.0/12", "Backend": {"Type": "vxlan"}}"#;
    let mut ctl = Controller::start(&pki, &data, net_conf, &[]);
    let mut admin = ctl.admin(&pki).await;
    let leases = admin
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let held: Vec<(&str, &str, u64)> = leases
        .leases
        .iter()
        .map(|l| (l.node_name.as_str(), l.subnet.as_str(), l.revision))
        .collect();
    assert_eq!(
        held,
        [
            ("node-a", "10.128.1.0/24", 1),
            ("node-b", "10.128.2.0/24", 2)
        ],
        "the leases, in the default network"
    );
    let reserved = admin
        .list_reservations(twill_proto::ListReservationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .reservations;
    assert_eq!(
        (reserved[0].node_name.as_str(), reserved[0].subnet.as_str()),
        ("node-r", "10.128.9.0/24")
    );
    // node-a renews unchanged (another certificate of the node may), then joins blue:
    // the revisions go on from the stored one.
    let a = pki.node("node-a");
    let again = ctl.grant(&pki, &a, in_network("node-a", "")).await;
    assert_eq!(
        (again.subnet.as_str(), again.revision),
        ("10.128.1.0/24", 1)
    );
    let blue = ctl.grant(&pki, &a, in_network("node-a", "blue")).await;
    assert_eq!((blue.network.as_str(), blue.revision), ("blue", 3));
    let r = ctl
        .grant(&pki, &pki.node("node-r"), in_network("node-r", ""))
        .await;
    assert_eq!(r.subnet, "10.128.9.0/24", "the stored reservation honoured");
    // Everything is written back and read again.
    ctl.restart();
    let count = |network: &str| ListLeasesRequest {
        network: network.into(),
        ..Default::default()
    };
    let mut admin = ctl.admin(&pki).await;
    let default_leases = admin
        .list_leases(count(""))
        .await
        .unwrap()
        .into_inner()
        .leases;
    let blue_leases = admin
        .list_leases(count("blue"))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!((default_leases.len(), blue_leases.len()), (3, 1));
}

/// Asserts that `r` is a refusal of the caller (`who` says which).
fn refused<T>(r: Result<T, tonic::Status>, who: &str) {
    let Err(s) = r else { panic!("{who}: answered") };
    assert!(
        matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{who}: {s:?}"
    );
}

/// Who may call the two ListNetworks: the agent's is a node's own view (no certificate,
/// an admin and a revoked node are refused), the admin's is an admin's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_networks_answers_only_its_callers() {
    use twill_proto::admin_service_client::AdminServiceClient;
    use twill_proto::agent_service_client::AgentServiceClient;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = started(dir.path(), &pki);

    // No certificate: the connection may only bootstrap.
    let anonymous = ctl.channel_factory().with_ca(&pki).connect_as(None).await;
    if let Ok(ch) = anonymous {
        refused(
            AgentServiceClient::new(ch.clone())
                .list_networks(ListNetworksRequest {})
                .await,
            "no certificate, agent ListNetworks",
        );
        refused(
            AdminServiceClient::new(ch)
                .list_networks(ListAdminNetworksRequest::default())
                .await,
            "no certificate, admin ListNetworks",
        );
    }

    // A node: its own view, never the admin's.
    let a = pki.node("node-a");
    let mine = ctl
        .agent(&pki, &a)
        .await
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.networks.len(), 3, "blue admits node-a");
    let as_node = ctl.channel(&pki, Some(&a)).await.unwrap();
    refused(
        AdminServiceClient::new(as_node)
            .list_networks(ListAdminNetworksRequest::default())
            .await,
        "a node, admin ListNetworks",
    );

    // An admin: the admin's list, not a node's.
    assert_eq!(networks(&ctl, &pki).await.len(), 3);
    let admin_cert = pki.admin("root");
    let as_admin = ctl.channel(&pki, Some(&admin_cert)).await.unwrap();
    refused(
        AgentServiceClient::new(as_admin)
            .list_networks(ListNetworksRequest {})
            .await,
        "an admin, agent ListNetworks",
    );

    // A revoked node: refused from then on.
    ctl.admin(&pki)
        .await
        .revoke_node_certificates(twill_proto::RevokeNodeCertificatesRequest {
            node_name: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = match ctl.channel(&pki, Some(&a)).await {
            Ok(ch) => AgentServiceClient::new(ch)
                .list_networks(ListNetworksRequest {})
                .await
                .map(|_| ()),
            Err(_) => Err(tonic::Status::unauthenticated("handshake refused")),
        };
        if r.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a revoked node still lists networks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
