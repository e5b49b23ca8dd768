//! The lease writer against a real sled store (and one that fails on purpose).

use ipnet::Ipv4Net;
use twill_common::model::NodeName;
use twill_proto::AcquireRequest;

use twill_common::networks::Network;
use twill_common::NetConf;
use twill_proto::lease_event::Type as EventType;

use super::*;
use crate::networks::ServedNetwork;
use crate::store::{Layout, RecordKind, SledStore};

/// `conf` served as the only network, `default`.
fn served(conf: &NetConf) -> Served {
    let network = Network::default_from(conf.clone());
    [(
        network.name.clone(),
        ServedNetwork {
            network,
            retired: false,
        },
    )]
    .into()
}

fn default() -> NetworkName {
    NetworkName::default_network()
}

/// The key of `node`'s lease or reservation in the default network.
fn key(node: &str) -> LeaseKey {
    (default(), node.to_string())
}

struct Fixture {
    leases: Leases,
    hub: Arc<Hub>,
    _dir: tempfile::TempDir,
}

fn start(network: &str, ttl: Duration) -> Fixture {
    let conf = NetConf::parse(&format!(
        r#"{{"Network": "{network}", "Backend": {{"Type": "vxlan"}}}}"#
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let hub = Arc::new(Hub::new(vec![], vec![], 0));
    let leases = Leases::start(
        &served(&conf),
        store,
        hub.clone(),
        BTreeMap::new(),
        ttl,
        Arc::default(),
    )
    .unwrap();
    Fixture {
        leases,
        hub,
        _dir: dir,
    }
}

/// A unicast MAC of a node's own.
fn mac_of(node: &str) -> String {
    let h = node
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let b = h.to_be_bytes();
    format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn conf_of(network: &str, backend: &str) -> NetConf {
    NetConf::parse(&format!(
        r#"{{"Network": "{network}", "Backend": {{"Type": "{backend}"}}}}"#
    ))
    .unwrap()
}

fn fields(requested: &str, public_ip: &str, vtep_mac: &str) -> AcquireRequest {
    AcquireRequest {
        requested_subnet: requested.into(),
        public_ip: public_ip.into(),
        backend_type: "vxlan".into(),
        vtep_mac: vtep_mac.into(),
        ..Default::default()
    }
}

/// `AcquireParams::parse` for a node named by text, as the service does after taking
/// the name from the caller's certificate.
fn parse_params(
    conf: &NetConf,
    node: &str,
    f: AcquireRequest,
) -> Result<AcquireParams, LeaseOpError> {
    let node = NodeName::new(node).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
    AcquireParams::parse(default(), conf, node, &f)
}

fn params(node: &str, requested: &str) -> AcquireParams {
    let conf = conf_of("10.0.0.0/8", "vxlan");
    parse_params(&conf, node, fields(requested, "192.0.2.1", &mac_of(node))).unwrap()
}

#[tokio::test]
async fn a_node_asking_again_keeps_its_subnet() {
    let f = start("10.244.0.0/16", Duration::from_secs(3600));
    let a = f.leases.acquire(params("a", "")).await.unwrap();
    let b = f.leases.acquire(params("b", "")).await.unwrap();
    assert_ne!(a.subnet, b.subnet);
    let again = f
        .leases
        .acquire(params("a", "10.244.77.0/24"))
        .await
        .unwrap();
    assert_eq!(again.subnet, a.subnet, "sticky while the lease lives");
    assert_eq!(
        again.revision, a.revision,
        "an unchanged renewal is no new revision"
    );
    assert_eq!(f.hub.leases().0.len(), 2);
}

#[tokio::test]
async fn requested_subnet_is_granted_when_free_and_in_range() {
    let f = start("10.244.0.0/16", Duration::from_secs(3600));
    assert_eq!(
        f.leases
            .acquire(params("a", "10.244.77.0/24"))
            .await
            .unwrap()
            .subnet,
        "10.244.77.0/24"
    );
    let b = f
        .leases
        .acquire(params("b", "10.244.77.0/24"))
        .await
        .unwrap();
    assert_ne!(b.subnet, "10.244.77.0/24", "taken: a fresh one");
    let c = f
        .leases
        .acquire(params("c", "10.244.0.0/24"))
        .await
        .unwrap();
    assert_ne!(c.subnet, "10.244.0.0/24", "before SubnetMin: a fresh one");
    let e = f
        .leases
        .acquire(params("d", "10.9.0.0/24"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not a /24 subnet of Network 10.244.0.0/16"),
        "{e}"
    );
    let e = f
        .leases
        .acquire(params("d", "10.244.0.0/25"))
        .await
        .unwrap_err();
    assert!(matches!(e, LeaseOpError::Invalid(_)), "{e}");
}

#[tokio::test]
async fn exhaustion_release_and_reuse() {
    let f = start("10.1.0.0/26", Duration::from_secs(3600));
    for n in ["a", "b", "c"] {
        f.leases.acquire(params(n, "")).await.unwrap();
    }
    let e = f.leases.acquire(params("d", "")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Exhausted(_)), "{e}");
    assert!(e.to_string().contains("out of subnets"));
    assert!(f.leases.release(&default(), "b", &[]).await.unwrap());
    assert!(
        !f.leases.release(&default(), "b", &[]).await.unwrap(),
        "releasing twice is no error"
    );
    f.leases.acquire(params("d", "")).await.unwrap();
}

#[tokio::test]
async fn reservations_are_never_handed_to_others() {
    let f = start("10.1.0.0/26", Duration::from_secs(3600));
    let reserved: Ipv4Net = "10.1.0.32/28".parse().unwrap();
    f.leases
        .reserve(&default(), "x", reserved.into())
        .await
        .unwrap();
    let a = f.leases.acquire(params("a", "10.1.0.32/28")).await.unwrap();
    let b = f.leases.acquire(params("b", "")).await.unwrap();
    assert!(a.subnet != reserved.to_string() && b.subnet != reserved.to_string());
    assert!(matches!(
        f.leases.acquire(params("c", "")).await.unwrap_err(),
        LeaseOpError::Exhausted(_)
    ));
    assert_eq!(
        f.leases.acquire(params("x", "")).await.unwrap().subnet,
        reserved.to_string()
    );
    assert!(f.leases.release(&default(), "x", &[]).await.unwrap());
    assert!(
        matches!(
            f.leases.acquire(params("c", "")).await.unwrap_err(),
            LeaseOpError::Exhausted(_)
        ),
        "released but still reserved"
    );
    let e = f
        .leases
        .reserve(&default(), "y", a.subnet.parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, LeaseOpError::Conflict(_)) && e.to_string().contains("leased to node a"),
        "{e}"
    );
    let e = f
        .leases
        .reserve(&default(), "y", "10.2.0.0/28".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, LeaseOpError::Invalid(_)), "{e}");
    assert!(f.leases.unreserve(&default(), "x").await.unwrap());
    f.leases.acquire(params("c", "")).await.unwrap();
}

#[tokio::test]
async fn expired_leases_are_swept_and_announced() {
    let f = start("10.244.0.0/16", Duration::from_secs(1));
    let mut sub = f
        .hub
        .subscribe(0, "", &crate::events::Networks::default_only());
    f.leases.acquire(params("a", "")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let batch = tokio::time::timeout_at(deadline, sub.feed.recv())
            .await
            .expect("expiry")
            .unwrap();
        let parts = crate::events::decode(&batch.encoded).unwrap();
        if parts
            .iter()
            .flat_map(|p| &p.events)
            .any(|e| e.r#type == EventType::Delete as i32)
        {
            break;
        }
    }
    assert!(f.hub.leases().0.is_empty());
}

#[test]
fn bad_requests_name_the_field() {
    let e = |r: Result<AcquireParams, LeaseOpError>| r.unwrap_err().to_string();
    let c = conf_of("10.0.0.0/8", "vxlan");
    let mac = "0a:00:00:00:00:01";
    let parse = |node, f| parse_params(&c, node, f);
    assert!(e(parse("", fields("", "192.0.2.1", mac))).contains("empty"));
    assert!(e(parse("a", fields("10.244.1.5/24", "192.0.2.1", mac))).contains("requested_subnet"));
    assert!(e(parse("a", fields("", "nope", mac))).contains("public_ip"));
    let udp = AcquireRequest {
        backend_type: "udp".into(),
        ..fields("", "192.0.2.1", mac)
    };
    assert!(e(parse("a", udp)).contains("backend_type"));
    assert!(e(parse("a", fields("", "192.0.2.1", "zz"))).contains("vtep_mac"));
}

fn dual_conf() -> NetConf {
    NetConf::parse(
        r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60",
            "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap()
}

fn dual_params(conf: &NetConf, node: &str, requested6: &str) -> AcquireParams {
    let mac = mac_of(node);
    let mac6 = format!("0a:59{}", &mac[5..]);
    let f = AcquireRequest {
        requested_ipv6_subnet: requested6.into(),
        public_ipv6: "2001:db8::1".into(),
        vtep_mac_v6: mac6,
        ..fields("", "192.0.2.1", &mac)
    };
    parse_params(conf, node, f).unwrap()
}

#[tokio::test]
async fn ipv6_only_leases_and_reservations_hold_across_a_restart() {
    let conf = NetConf::parse(
        r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60",
            "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let (leases, hub) = start_on(&conf, store.clone()).await;
    let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
    assert_eq!(
        (a.subnet.as_str(), a.public_ip.as_str(), a.vtep_mac.as_str()),
        ("", "", ""),
        "no IPv4 side: the request's IPv4 fields are ignored"
    );
    assert_eq!(a.ipv6_subnet, "fd00:10:244:1::/64");
    let e = leases
        .reserve(&default(), "c", "10.244.1.0/24".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LeaseOpError::Invalid(m) if m.contains("no IPv4")),
        "{e}"
    );
    let e = leases
        .reserve(&default(), "c", "fd00:10:244:1::/64".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, LeaseOpError::Conflict(_)), "a's subnet: {e}");
    leases
        .reserve(&default(), "b", "fd00:10:244:7::/64".parse().unwrap())
        .await
        .unwrap();
    let c = leases
        .acquire(dual_params(&conf, "c", "fd00:10:244:7::/64"))
        .await
        .unwrap();
    assert_ne!(c.ipv6_subnet, "fd00:10:244:7::/64", "reserved for b");
    let b = leases.acquire(dual_params(&conf, "b", "")).await.unwrap();
    assert_eq!(b.ipv6_subnet, "fd00:10:244:7::/64");
    assert_no_shared_subnet(&hub);
    drop(leases);

    let (leases, hub) = start_on(&conf, store.clone()).await;
    assert_eq!(
        hub.reservations()[&key("b")].to_string(),
        "fd00:10:244:7::/64",
        "the IPv6 reservation was stored"
    );
    for (node, before) in [("a", &a), ("b", &b), ("c", &c)] {
        let again = leases.acquire(dual_params(&conf, node, "")).await.unwrap();
        assert_eq!(
            again.ipv6_subnet, before.ipv6_subnet,
            "{node} keeps its subnet"
        );
    }
    assert!(leases.unreserve(&default(), "b").await.unwrap());
    assert!(!hub.reservations().contains_key(&key("b")));
}

#[tokio::test]
async fn a_dual_stack_reservation_keeps_both_subnets() {
    let conf = dual_conf();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let (leases, hub) = start_on(&conf, store.clone()).await;
    let both: Reservation = "10.244.9.0/24,fd00:10:244:9::/64".parse().unwrap();
    leases.reserve(&default(), "r", both).await.unwrap();
    let other = leases
        .acquire(dual_params(&conf, "x", "fd00:10:244:9::/64"))
        .await
        .unwrap();
    assert_ne!(other.ipv6_subnet, "fd00:10:244:9::/64");
    let r = leases.acquire(dual_params(&conf, "r", "")).await.unwrap();
    assert_eq!(
        (r.subnet.as_str(), r.ipv6_subnet.as_str()),
        ("10.244.9.0/24", "fd00:10:244:9::/64")
    );
    drop(leases);
    let (_leases, hub2) = start_on(&conf, store).await;
    assert_eq!(hub2.reservations()[&key("r")], both, "stored as one record");
    assert_eq!(hub.reservations()[&key("r")], both);
}

#[tokio::test]
async fn dual_stack_leases_get_a_subnet_of_each_family_and_keep_both() {
    let conf = dual_conf();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let (leases, hub) = start_on(&conf, store.clone()).await;
    for bad in ["fd00:99::/64", "fd00:10:244:1::/80"] {
        let e = leases
            .acquire(dual_params(&conf, "bad", bad))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("requested_ipv6_subnet"), "{bad}: {e}");
    }
    let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
    let b = leases
        .acquire(dual_params(&conf, "b", "fd00:10:244:9::/64"))
        .await
        .unwrap();
    assert_eq!(a.ipv6_subnet, "fd00:10:244:1::/64");
    assert_eq!(
        b.ipv6_subnet, "fd00:10:244:9::/64",
        "the requested one, free"
    );
    assert_eq!(
        (a.public_ipv6.as_str(), a.vtep_mac_v6.is_empty()),
        ("2001:db8::1", false)
    );
    let again = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
    assert_eq!(
        (again.revision, again.ipv6_subnet),
        (a.revision, a.ipv6_subnet.clone())
    );

    // The v6 subnets come back after a restart of the writer, so c cannot get b's.
    drop(leases);
    let (leases, _hub) = start_on(&conf, store).await;
    let c = leases
        .acquire(dual_params(&conf, "c", "fd00:10:244:9::/64"))
        .await
        .unwrap();
    assert_ne!(c.ipv6_subnet, b.ipv6_subnet);
    assert!(leases.release(&default(), "b", &[]).await.unwrap());
    let d = leases
        .acquire(dual_params(&conf, "d", "fd00:10:244:9::/64"))
        .await
        .unwrap();
    assert_eq!(d.ipv6_subnet, b.ipv6_subnet, "released with its lease");
    drop(hub);
}

#[tokio::test]
async fn a_v6_vtep_mac_held_by_another_node_is_refused_and_nothing_is_written() {
    let conf = dual_conf();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let (leases, hub) = start_on(&conf, store).await;
    let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
    let mut spoof = dual_params(&conf, "mallory", "");
    spoof.parts.v6.as_mut().unwrap().vtep_mac = a.vtep_mac_v6.parse().ok();
    let e = leases.acquire(spoof).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::AlreadyExists(_)), "{e}");
    assert!(e.to_string().contains("node a"), "{e}");
    let mut cross = dual_params(&conf, "mallory", "");
    cross.parts.v6.as_mut().unwrap().vtep_mac = a.vtep_mac.parse().ok();
    assert!(
        leases.acquire(cross).await.is_err(),
        "a's IPv4 MAC as an IPv6 one"
    );
    let (table, revision) = hub.leases();
    assert_eq!((table.len(), revision), (1, a.revision), "nothing written");
}

#[test]
fn bad_ipv6_fields_name_the_field() {
    let conf = dual_conf();
    let mac = "0a:00:00:00:00:01";
    let e = |ip6: &str, mac6: &str, req6: &str| {
        let f = AcquireRequest {
            requested_ipv6_subnet: req6.into(),
            public_ipv6: ip6.into(),
            vtep_mac_v6: mac6.into(),
            ..fields("", "192.0.2.1", mac)
        };
        parse_params(&conf, "a", f).unwrap_err().to_string()
    };
    let m6 = "0a:00:00:00:06:01";
    assert!(e("", m6, "").contains("public_ipv6 is empty"));
    for bad in ["ff02::1", "fe80::1", "::", "::1", "fd00:10:244:1::5"] {
        assert!(e(bad, m6, "").contains("public_ipv6"), "{bad}");
    }
    assert!(e("2001:db8::1", "33:33:00:00:00:01", "").contains("vtep_mac_v6"));
    assert!(e("2001:db8::1", "", "").contains("vtep_mac_v6"));
    assert!(e("2001:db8::1", mac, "").contains("MAC of the IPv4 device"));
    // On an IPv4-only network the IPv6 fields are ignored (an agent of the
    // previous version sends none).
    let v4 = conf_of("10.244.0.0/16", "vxlan");
    let p = parse_params(&v4, "a", fields("", "192.0.2.1", mac)).unwrap();
    assert!(p.parts.v6.is_none());
}

#[test]
fn host_gw_leases_carry_no_vtep_mac() {
    let c = conf_of("10.244.0.0/16", "host-gw");
    let f = AcquireRequest {
        backend_type: "host-gw".into(),
        ..fields("", "192.0.2.1", "")
    };
    let p = parse_params(&c, "a", f).unwrap();
    assert_eq!(p.parts.v4.unwrap().vtep_mac, None);
    let e = parse_params(&c, "a", fields("", "192.0.2.1", "0a:00:00:00:00:01"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("this controller runs \"host-gw\""), "{e}");
}

#[tokio::test]
async fn host_gw_grants_leases_without_backend_data() {
    let conf = conf_of("10.244.0.0/16", "host-gw");
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let (leases, hub) = start_on(&conf, store).await;
    let p = |node: &str| {
        let f = AcquireRequest {
            backend_type: String::new(),
            ..fields("", "192.0.2.1", "")
        };
        parse_params(&conf, node, f).unwrap()
    };
    let a = leases.acquire(p("a")).await.unwrap();
    let b = leases.acquire(p("b")).await.unwrap();
    assert_eq!(
        (a.backend_type.as_str(), a.vtep_mac.as_str()),
        ("host-gw", "")
    );
    assert_ne!(a.subnet, b.subnet);
    assert_eq!(
        leases.acquire(p("a")).await.unwrap().revision,
        a.revision,
        "a plain renewal"
    );
    assert_eq!(hub.leases().0.len(), 2);
}

/// Starts the writer over what `store` holds, as the controller does at start.
async fn start_on(conf: &NetConf, store: Arc<dyn Store>) -> (Leases, Arc<Hub>) {
    let snap = store.load().await.unwrap();
    let hub = Arc::new(Hub::new(snap.leases, snap.history, snap.revision).with_epoch(snap.epoch));
    let leases = Leases::start(
        &served(conf),
        store,
        hub.clone(),
        snap.reservations,
        Duration::from_secs(3600),
        Arc::default(),
    )
    .unwrap();
    (leases, hub)
}

fn assert_no_shared_subnet(hub: &Hub) {
    let (leases, _) = hub.leases();
    let mut seen = BTreeMap::new();
    for l in &leases {
        for s in [&l.subnet, &l.ipv6_subnet]
            .into_iter()
            .filter(|s| !s.is_empty())
        {
            if let Some(other) = seen.insert(s.clone(), l.node_name.clone()) {
                panic!("{} and {other} share {s}", l.node_name);
            }
        }
    }
}

#[tokio::test]
async fn a_vtep_mac_held_by_another_node_is_refused_and_nothing_is_written() {
    let f = start("10.244.0.0/16", Duration::from_secs(3600));
    let a = f.leases.acquire(params("a", "")).await.unwrap();
    let mut spoof = params("mallory", "");
    let v4 = spoof.parts.v4.as_mut().unwrap();
    v4.vtep_mac = a.vtep_mac.parse().ok();
    v4.public_ip = "198.51.100.66".parse().unwrap();
    let e = f.leases.acquire(spoof.clone()).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::AlreadyExists(_)), "{e}");
    assert!(
        e.to_string().contains("vtep_mac") && e.to_string().contains("node a"),
        "{e}"
    );
    let (leases, revision) = f.hub.leases();
    assert_eq!((leases.len(), revision), (1, a.revision), "nothing written");
    // A node may keep its own MAC, and once a's lease is gone the MAC is free.
    f.leases.acquire(params("a", "")).await.unwrap();
    assert!(f.leases.release(&default(), "a", &[]).await.unwrap());
    f.leases.acquire(spoof).await.unwrap();
}

#[test]
fn lease_fields_must_be_unicast_and_outside_the_pod_network() {
    let parse = |ip: &str, mac: &str| {
        parse_params(&conf_of("10.244.0.0/16", "vxlan"), "a", fields("", ip, mac))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(parse("192.0.2.1", "0a:58:00:00:00:01").is_ok());
    for (ip, mac, field) in [
        ("192.0.2.1", "00:00:00:00:00:00", "vtep_mac"),
        ("192.0.2.1", "ff:ff:ff:ff:ff:ff", "vtep_mac"),
        ("192.0.2.1", "01:00:5e:00:00:01", "vtep_mac"),
        ("0.0.0.0", "0a:58:00:00:00:01", "public_ip"),
        ("127.0.0.1", "0a:58:00:00:00:01", "public_ip"),
        ("224.0.0.5", "0a:58:00:00:00:01", "public_ip"),
        ("255.255.255.255", "0a:58:00:00:00:01", "public_ip"),
        ("10.244.9.1", "0a:58:00:00:00:01", "public_ip"),
    ] {
        let e = parse(ip, mac).unwrap_err();
        assert!(e.contains(field), "{ip} {mac}: {e}");
    }
}

#[tokio::test]
async fn reservations_that_disagree_with_stored_leases_never_yield_a_shared_subnet() {
    // 10.1.0.0/24 in /28s: SubnetMin is 10.1.0.16/28, so 15 subnets.
    let conf = NetConf::parse(
        r#"{"Network": "10.1.0.0/24", "SubnetLen": 28, "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let lease = |node: &str, subnet: &str, rev: u64| Lease {
        node_name: node.into(),
        subnet: subnet.into(),
        public_ip: "192.0.2.1".into(),
        vtep_mac: mac_of(node),
        backend_type: "vxlan".into(),
        expires_at_unix: now_unix() + 3600,
        revision: rev,
        ..Default::default()
    };
    let put = |l: Lease| LeaseEvent {
        r#type: EventType::Put as i32,
        revision: l.revision,
        lease: Some(l),
    };
    // Written straight into the store: what no sequence of API calls makes, but a
    // narrowed range, a restored backup or another version can leave behind.
    let reservations: BTreeMap<LeaseKey, Reservation> = [
        ("x", "10.1.0.32/28"),  // leased to a
        ("y", "10.1.0.0/28"),   // before SubnetMin
        ("z", "10.1.0.64/28"),  // fine
        ("zz", "10.1.0.64/28"), // the same subnet again
    ]
    .into_iter()
    .map(|(n, s)| (key(n), s.parse().unwrap()))
    .collect();
    store
        .write(&Batch {
            events: &[put(lease("a", "10.1.0.32/28", 1))],
            reservations: Some(&reservations),
            ..Batch::default()
        })
        .await
        .unwrap();
    store.flush().await.unwrap();

    let (leases, hub) = start_on(&conf, store.clone()).await;
    let stale = hub.stale_reservations();
    assert_eq!(
        stale.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        vec!["x", "y", "zz"],
        "{stale:?}"
    );
    assert!(stale[&key("x")].contains("leased to node a"), "{stale:?}");
    assert!(stale[&key("y")].contains("outside"), "{stale:?}");
    let y = leases.acquire(params("y", "")).await.unwrap();
    assert_ne!(
        y.subnet, "10.1.0.0/28",
        "a reservation outside the range is not granted"
    );
    let x = leases.acquire(params("x", "")).await.unwrap();
    assert_ne!(x.subnet, "10.1.0.32/28", "held by a");
    assert!(leases.release(&default(), "x", &[]).await.unwrap());
    assert!(
        leases.unreserve(&default(), "x").await.unwrap(),
        "dropping a stale reservation"
    );
    assert!(leases.release(&default(), "a", &[]).await.unwrap());
    // .32 is free now: exactly one node may get it.
    let mut n = 0;
    loop {
        match leases
            .acquire(params(&format!("n{n}"), "10.1.0.32/28"))
            .await
        {
            Ok(_) => assert_no_shared_subnet(&hub),
            Err(LeaseOpError::Exhausted(_)) => break,
            Err(e) => panic!("{e}"),
        }
        n += 1;
    }
    assert_no_shared_subnet(&hub);
    assert!(
        hub.leases().0.iter().all(|l| l.subnet != "10.1.0.64/28"),
        "z's reserved subnet went to nobody else"
    );
    leases
        .acquire(params("z", ""))
        .await
        .map(|l| assert_eq!(l.subnet, "10.1.0.64/28"))
        .unwrap();
    // What was stored starts again without complaint, and still shares nothing.
    let (again, hub) = start_on(&conf, store.clone()).await;
    assert_no_shared_subnet(&hub);
    assert!(matches!(
        again.acquire(params("late", "")).await.unwrap_err(),
        LeaseOpError::Exhausted(_)
    ));
}

/// A sled store whose writes or flushes fail on demand (sled has applied a batch
/// in memory before its flush can fail, as after a disk error).
struct FailingStore {
    inner: SledStore,
    fail_write: std::sync::atomic::AtomicBool,
    fail_flush: std::sync::atomic::AtomicBool,
    fail_load: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Store for FailingStore {
    async fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
        if self.fail_load.load(Ordering::Relaxed) {
            return Err(StoreError::Backend("injected read failure".into()));
        }
        self.inner.load().await
    }
    async fn write(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
        if self.fail_write.load(Ordering::Relaxed) {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        self.inner.write(batch).await
    }
    async fn put_record(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.put_record(kind, id, value).await
    }
    async fn delete_record(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_record(kind, id).await
    }
    async fn records(&self, kind: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.records(kind).await
    }
    async fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.record(kind, id).await
    }
    async fn set_layout(&self, layout: &Layout) -> Result<(), StoreError> {
        self.inner.set_layout(layout).await
    }
    fn size_on_disk(&self) -> u64 {
        self.inner.size_on_disk()
    }
    async fn flush(&self) -> Result<(), StoreError> {
        if self.fail_flush.load(Ordering::Relaxed) {
            return Err(StoreError::Backend("injected flush failure".into()));
        }
        self.inner.flush().await
    }
}

/// A failing store (nothing failing yet) in a temp dir, and a network for it.
fn failing_store() -> (Arc<FailingStore>, NetConf, tempfile::TempDir) {
    let conf =
        NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore {
        inner: SledStore::open(dir.path(), 100).unwrap(),
        fail_write: false.into(),
        fail_flush: false.into(),
        fail_load: false.into(),
    });
    (store, conf, dir)
}

#[tokio::test]
async fn a_failed_store_write_never_reuses_a_revision_and_memory_matches_the_store() {
    let (failing, conf, _dir) = failing_store();
    let store: Arc<dyn Store> = failing.clone();
    let (leases, hub) = start_on(&conf, store.clone()).await;
    let mut seen: BTreeMap<u64, LeaseEvent> = BTreeMap::new();
    let mut feed = hub
        .subscribe(0, "", &crate::events::Networks::default_only())
        .feed;
    let mut record = |feed: &mut tokio::sync::broadcast::Receiver<_>| {
        while let Ok(m) = feed.try_recv() {
            let m: crate::events::WatchMessage = m;
            for part in crate::events::decode(&m.encoded).unwrap() {
                for e in part.events {
                    if let Some(before) = seen.insert(e.revision, e.clone()) {
                        assert_eq!(before, e, "revision {} announced as two events", e.revision);
                    }
                }
            }
        }
    };
    leases.acquire(params("a", "")).await.unwrap();

    // The flush fails after sled applied the batch; the write fails before it.
    failing.fail_flush.store(true, Ordering::Relaxed);
    let e = leases.acquire(params("b", "")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
    assert!(e.to_string().contains("may or may not"), "{e}");
    failing.fail_flush.store(false, Ordering::Relaxed);
    failing.fail_write.store(true, Ordering::Relaxed);
    let e = leases.acquire(params("c", "")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
    failing.fail_write.store(false, Ordering::Relaxed);

    let stored = store.load().await.unwrap();
    let names = |ls: &[Lease]| {
        let mut v: Vec<(String, String, u64)> = ls
            .iter()
            .map(|l| (l.node_name.clone(), l.subnet.clone(), l.revision))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&hub.leases().0),
        names(&stored.leases),
        "memory is what the store holds"
    );
    let d = leases.acquire(params("d", "")).await.unwrap();
    assert!(
        d.revision > stored.revision,
        "revision {} reused",
        d.revision
    );
    record(&mut feed);
    assert_no_shared_subnet(&hub);

    // A restart serves exactly what watchers were told, with the same revisions.
    let (_again, restarted) = start_on(&conf, store.clone()).await;
    assert_eq!(names(&restarted.leases().0), names(&hub.leases().0));
    for e in store.load().await.unwrap().history {
        if let Some(told) = seen.get(&e.revision) {
            assert_eq!(told, &e, "stored history differs from what was announced");
        }
    }
    assert!(leases.is_running());
}

#[tokio::test]
async fn an_unchanged_renewal_costs_no_revision_and_a_changed_one_does() {
    let f = start("10.244.0.0/16", Duration::from_secs(3600));
    let a = f.leases.acquire(params("a", "")).await.unwrap();
    let mut feed = f
        .hub
        .subscribe(a.revision, "", &crate::events::Networks::default_only())
        .feed;
    let again = f.leases.acquire(params("a", "")).await.unwrap();
    assert_eq!(
        (again.subnet.as_str(), again.revision),
        (a.subnet.as_str(), a.revision)
    );
    assert!(feed.try_recv().is_err(), "no watcher woken");
    assert_eq!(f.hub.leases().1, a.revision);
    let mut moved = params("a", "");
    moved.parts.v4.as_mut().unwrap().public_ip = "192.0.2.77".parse().unwrap();
    let moved = f.leases.acquire(moved).await.unwrap();
    assert_eq!(moved.subnet, a.subnet);
    assert!(
        moved.revision > a.revision,
        "a new address is news to every peer"
    );
    assert!(feed.recv().await.is_ok());
}

#[tokio::test]
async fn a_store_that_cannot_be_read_back_stops_the_writer_visibly() {
    let (failing, conf, _dir) = failing_store();
    failing.fail_flush.store(true, Ordering::Relaxed);
    let (leases, _hub) = start_on(&conf, failing.clone()).await;
    failing.fail_load.store(true, Ordering::Relaxed);
    assert!(leases.is_running());
    let e = leases.acquire(params("a", "")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases.is_running() {
        assert!(Instant::now() < deadline, "the writer should have stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = leases.acquire(params("b", "")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Stopped), "{e}");
}

/// A second network, `blue`, beside `conf` as `default`.
fn served_with_blue(conf: &NetConf) -> Served {
    let mut all = served(conf);
    let blue = Network::parse(
        NetworkName::new("blue").unwrap(),
        r#"{"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}}"#,
        std::path::Path::new("blue.json"),
    )
    .unwrap();
    all.insert(
        blue.name.clone(),
        ServedNetwork {
            network: blue,
            retired: false,
        },
    );
    all
}

#[tokio::test]
async fn a_store_written_before_several_networks_loads_as_the_default_network() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let conf = conf_of("10.244.0.0/16", "vxlan");
    let mac = mac_of("node-a");
    let stored = Lease {
        node_name: "node-a".into(),
        subnet: "10.244.7.0/24".into(),
        public_ip: "192.0.2.1".into(),
        backend_type: "vxlan".into(),
        vtep_mac: mac.clone(),
        expires_at_unix: now_unix() + 3600,
        revision: 41,
        vni: 1,
        ..Default::default()
    };
    {
        // The keys and values exactly as the release before several networks wrote
        // them (its Lease had no field 15, so an empty network encodes the same).
        let db = sled::open(dir.path()).unwrap();
        db.insert("meta/epoch", "00000000000000aa").unwrap();
        db.insert("meta/revision", &41u64.to_be_bytes()).unwrap();
        db.insert("meta/layout", "Network=10.244.0.0/16 SubnetLen=24")
            .unwrap();
        db.insert("lease/node-a", stored.encode_to_vec()).unwrap();
        let event = LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(stored.clone()),
            revision: 41,
        };
        db.insert(
            [&b"event/"[..], &41u64.to_be_bytes()].concat(),
            event.encode_to_vec(),
        )
        .unwrap();
        db.insert("reservation/node-r", "10.244.9.0/24").unwrap();
        db.flush().unwrap();
    }
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let snap = store.load().await.unwrap();
    let hub = Arc::new(Hub::new(snap.leases, snap.history, snap.revision).with_epoch(snap.epoch));
    let leases = Leases::start(
        &served_with_blue(&conf),
        store.clone(),
        hub.clone(),
        snap.reservations,
        Duration::from_secs(3600),
        Arc::default(),
    )
    .unwrap();
    assert_eq!(
        hub.lease(&default(), "node-a").unwrap().subnet,
        "10.244.7.0/24"
    );
    assert!(hub.reservations().contains_key(&key("node-r")));
    let renewed = leases
        .acquire(parse_params(&conf, "node-a", fields("", "192.0.2.1", &mac)).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (
            renewed.subnet.as_str(),
            renewed.revision,
            renewed.network.as_str()
        ),
        ("10.244.7.0/24", 41, ""),
        "the same lease, renewed unchanged"
    );
    let r = leases
        .acquire(parse_params(&conf, "node-r", fields("", "192.0.2.9", &mac_of("node-r"))).unwrap())
        .await
        .unwrap();
    assert_eq!(r.subnet, "10.244.9.0/24", "the stored reservation honoured");
    assert_eq!(r.revision, 42, "revisions go on from the stored one");
    let blue_conf = served_with_blue(&conf)[&NetworkName::new("blue").unwrap()]
        .network
        .conf
        .clone();
    let mut p = parse_params(&blue_conf, "node-a", fields("", "192.0.2.1", &mac)).unwrap();
    p.network = NetworkName::new("blue").unwrap();
    let blue = leases.acquire(p).await.unwrap();
    assert_eq!(
        (
            blue.subnet.as_str(),
            blue.vni,
            blue.network.as_str(),
            blue.revision
        ),
        ("10.10.1.0/24", 2, "blue", 43)
    );
    // Written back: the default lease keeps its old key, blue's has its own.
    drop(leases);
    let again = store.load().await.unwrap();
    let mut nets: Vec<(String, String)> = again
        .leases
        .iter()
        .map(|l| (l.network.clone(), l.node_name.clone()))
        .collect();
    nets.sort();
    assert_eq!(
        nets,
        [
            ("".into(), "node-a".into()),
            ("".into(), "node-r".into()),
            ("blue".into(), "node-a".into())
        ]
    );
}

#[tokio::test]
async fn networks_are_separate_tables_with_one_revision_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
    let conf = conf_of("10.244.0.0/16", "vxlan");
    let hub = Arc::new(Hub::new(vec![], vec![], 0));
    let all = served_with_blue(&conf);
    let leases = Leases::start(
        &all,
        store,
        hub.clone(),
        BTreeMap::new(),
        Duration::from_secs(3600),
        Arc::default(),
    )
    .unwrap();
    let blue = NetworkName::new("blue").unwrap();
    let blue_conf = all[&blue].network.conf.clone();
    let in_blue = |node: &str| {
        let mut p = parse_params(&blue_conf, node, fields("", "192.0.2.1", &mac_of(node))).unwrap();
        p.network = blue.clone();
        p
    };
    let a = leases.acquire(params("a", "")).await.unwrap();
    // The same node, the same MAC, in another network: each network has its devices.
    let a_blue = leases.acquire(in_blue("a")).await.unwrap();
    assert_eq!((a.revision, a_blue.revision), (1, 2));
    assert!(a_blue.subnet.starts_with("10.10."));
    // Reservations and revocations are per network.
    leases
        .reserve(&blue, "r", "10.10.5.0/24".parse().unwrap())
        .await
        .unwrap();
    assert!(!hub.reservations().contains_key(&key("r")));
    let r = leases.acquire(in_blue("r")).await.unwrap();
    assert_eq!(r.subnet, "10.10.5.0/24");
    assert!(leases.revoke(&blue, "a", "ops").await.unwrap());
    assert!(
        hub.lease(&default(), "a").is_some(),
        "default's lease stays"
    );
    assert!(hub.lease(&blue, "a").is_none());
    let unknown = leases
        .revoke(&NetworkName::new("green").unwrap(), "a", "ops")
        .await
        .unwrap();
    assert!(!unknown);
    let mut p = params("x", "");
    p.network = NetworkName::new("green").unwrap();
    let e = leases.acquire(p).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::UnknownNetwork(_)), "{e}");

    // blue retires: no grant, no renewal; its leases stay until they run out.
    let mut retired = all.clone();
    retired.get_mut(&blue).unwrap().retired = true;
    leases.configure(Arc::new(retired)).await;
    let e = leases.acquire(in_blue("r")).await.unwrap_err();
    assert!(matches!(e, LeaseOpError::Retired(_)), "{e}");
    assert!(hub.lease(&blue, "r").is_some());
    // Back again, as it was.
    leases.configure(Arc::new(all.clone())).await;
    assert_eq!(
        leases.acquire(in_blue("r")).await.unwrap().subnet,
        "10.10.5.0/24"
    );
}
