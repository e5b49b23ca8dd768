//! The watch stream: a snapshot then live events, exact resume from a revision (also
//! across a controller restart), a reset when the revision is unknown or belongs to
//! another store, and a table too large for one message delivered in parts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::Duration;

use support::{acquire_request, Controller, Pki, NET_CONF};
use twill_proto::lease_event::Type as EventType;
use twill_proto::{ReleaseRequest, WatchRequest, WatchResponse};

async fn next(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch message within 10s")
        .unwrap()
        .expect("stream open")
}

fn summary(r: &WatchResponse) -> Vec<(String, i32, u64)> {
    r.events
        .iter()
        .map(|e| {
            (
                e.lease.as_ref().unwrap().node_name.clone(),
                e.r#type,
                e.revision,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_live_events_then_exact_resume() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let (a, b, c) = (pki.node("a"), pki.node("b"), pki.node("c"));
    ctl.agent(&pki, &a)
        .await
        .acquire(acquire_request("a", ""))
        .await
        .unwrap();
    ctl.agent(&pki, &b)
        .await
        .acquire(acquire_request("b", ""))
        .await
        .unwrap();

    let mut watcher = ctl.agent(&pki, &c).await;
    let mut stream = watcher
        .watch(WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert!(first.reset, "from scratch: a reset snapshot");
    assert_eq!(first.events.len(), 2);
    assert_eq!(first.revision, 2);

    ctl.agent(&pki, &c)
        .await
        .acquire(acquire_request("c", ""))
        .await
        .unwrap();
    let live = next(&mut stream).await;
    assert!(!live.reset);
    assert_eq!(summary(&live), vec![("c".into(), EventType::Put as i32, 3)]);
    let seen = live.revision;
    drop(stream);

    // Missed while disconnected: a release and a new node.
    ctl.agent(&pki, &a)
        .await
        .release(ReleaseRequest {
            node_name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let d = pki.node("d");
    ctl.agent(&pki, &d)
        .await
        .acquire(acquire_request("d", ""))
        .await
        .unwrap();
    let mut stream = watcher
        .watch(WatchRequest {
            from_revision: seen,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resumed = next(&mut stream).await;
    assert!(!resumed.reset, "the history has them: no reset");
    assert_eq!(
        summary(&resumed),
        vec![
            ("a".into(), EventType::Delete as i32, 4),
            ("d".into(), EventType::Put as i32, 5)
        ]
    );
    drop(stream);

    // The history is stored: resuming works across a controller restart too.
    ctl.restart();
    let mut watcher = ctl.agent(&pki, &c).await;
    let mut stream = watcher
        .watch(WatchRequest {
            from_revision: seen,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resumed = next(&mut stream).await;
    assert!(!resumed.reset);
    assert_eq!(
        resumed
            .events
            .iter()
            .map(|e| e.revision)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
    drop(stream);

    // A revision this controller never issued (its store was replaced): reset.
    let mut stream = watcher
        .watch(WatchRequest {
            from_revision: 999,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let reset = next(&mut stream).await;
    assert!(reset.reset);
    let mut nodes: Vec<_> = reset
        .events
        .iter()
        .map(|e| e.lease.as_ref().unwrap().node_name.clone())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        vec!["b", "c", "d"],
        "the reset lists exactly the live leases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_watcher_gets_only_live_events() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let a = pki.node("a");
    let mut client = ctl.agent(&pki, &a).await;
    client.acquire(acquire_request("a", "")).await.unwrap();
    // Revision 0 is "from scratch"; revision 1 is up to date: nothing to replay, then live.
    let mut stream = client
        .watch(WatchRequest {
            from_revision: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A renewal that changes nothing is no event; a new public address is.
    client.acquire(acquire_request("a", "")).await.unwrap();
    let mut moved = acquire_request("a", "");
    moved.public_ip = "192.0.2.11".into();
    client.acquire(moved).await.unwrap();
    let live = next(&mut stream).await;
    assert!(!live.reset);
    assert_eq!(live.revision, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_watches_and_the_controller_exits() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let a = pki.node("a");
    let mut client = ctl.agent(&pki, &a).await;
    let mut stream = client
        .watch(WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &ctl.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = ctl.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "controller still running 20s after SIGTERM with a watcher open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "clean exit after SIGTERM: {exit}");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no more messages after shutdown: {end:?}"
    );
}

/// Writes `n` leases with long node names straight into a new store in `dir`.
async fn store_with_leases(dir: &std::path::Path, n: u32) {
    use twill_proto::{Lease, LeaseEvent};
    use twill_server::store::{Batch, SledStore, Store};
    let store = SledStore::open(dir, 100).unwrap();
    let events: Vec<LeaseEvent> = (0..n)
        .map(|i| {
            let rev = u64::from(i) + 1;
            let subnet = std::net::Ipv4Addr::from(0x0a00_0000 + ((i + 1) << 8));
            LeaseEvent {
                r#type: EventType::Put as i32,
                revision: rev,
                lease: Some(Lease {
                    // Names as long as cloud providers make them, and longer.
                    node_name: format!("ip-{i:06}.{}", "eu-west-1.compute.internal.".repeat(4)),
                    subnet: format!("{subnet}/24"),
                    public_ip: "192.0.2.10".into(),
                    backend_type: "vxlan".into(),
                    vtep_mac: format!(
                        "0a:58:00:{:02x}:{:02x}:{:02x}",
                        i >> 16,
                        (i >> 8) & 0xff,
                        i & 0xff
                    ),
                    expires_at_unix: 4_000_000_000,
                    revision: rev,
                    vni: 1,
                    reserved: false,
                    ..Default::default()
                }),
            }
        })
        .collect();
    for chunk in events.chunks(5_000) {
        store
            .write(&Batch {
                events: chunk,
                ..Batch::default()
            })
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60000_lease_table_reaches_an_agent_in_bounded_parts() {
    const N: u32 = 60_000;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    store_with_leases(&data, N).await;
    let net_conf = r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#;
    let ctl = Controller::start(&pki, &data, net_conf, &[]);
    let me = pki.node("watcher");

    // The agent's own client and reassembly: one reset with every lease.
    let channel = ctl.channel(&pki, Some(&me)).await.unwrap();
    let mut agent = twill_agent::client::agent_client(channel);
    let mut stream = agent
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut assembler = twill_agent::client::Assembler::default();
    let mut parts = 0;
    let whole = loop {
        parts += 1;
        if let Some(whole) = assembler.push(next(&mut stream).await) {
            break whole;
        }
    };
    assert!(whole.reset && !whole.more);
    assert_eq!(whole.events.len(), N as usize, "every lease, once");
    assert_eq!(whole.revision, u64::from(N));
    assert!(parts > 4, "a table of this size comes in parts ({parts})");
    println!("{N} leases delivered in {parts} parts");

    // A client with gRPC's default 4 MiB limit (an older agent, any other tool) gets
    // every part too: none is larger than the controller's bound (64 KiB of events).
    let channel = ctl.channel(&pki, Some(&me)).await.unwrap();
    let mut plain = twill_proto::agent_service_client::AgentServiceClient::new(channel);
    let mut stream = plain
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    loop {
        let part = next(&mut stream).await;
        assert!(prost::Message::encoded_len(&part) <= (64 << 10) + 4096);
        seen += part.events.len();
        if !part.more {
            break;
        }
    }
    assert_eq!(seen, N as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_a_replaced_store_gets_a_reset_even_when_its_revision_caught_up() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut old = Controller::start(&pki, &dir.path().join("old"), NET_CONF, &[]);
    let w = pki.node("w");
    for n in ["a", "b"] {
        ctl_acquire(&old, &pki, n).await;
    }
    let mut stream = old
        .agent(&pki, &w)
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    let (seen, epoch) = (first.revision, first.epoch.clone());
    assert_eq!(epoch.len(), 16, "every message names the store: {epoch:?}");
    drop(stream);
    old.kill9();

    // Same address, a new data directory: other events under the same revisions.
    let new = Controller::start(&pki, &dir.path().join("new"), NET_CONF, &[]);
    for n in ["x", "y", "z"] {
        ctl_acquire(&new, &pki, n).await;
    }
    let mut watcher = new.agent(&pki, &w).await;
    let mut stream = watcher
        .watch(WatchRequest {
            from_revision: seen,
            epoch: epoch.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resumed = next(&mut stream).await;
    assert!(
        resumed.reset,
        "revision {seen} of store {epoch} means nothing to the new store"
    );
    assert_ne!(resumed.epoch, epoch);
    assert_eq!(summary(&resumed).len(), 3);
}

async fn ctl_acquire(ctl: &Controller, pki: &Pki, node: &str) {
    ctl.agent(pki, &pki.node(node))
        .await
        .acquire(acquire_request(node, ""))
        .await
        .unwrap();
}
