//! Crash test: 240 simulated agents acquire leases concurrently while the controller
//! is killed with SIGKILL at random moments, 20 times over the same data directory.
//! Every acknowledged lease must survive with the same subnet, no two leases may
//! overlap, and every lease must lie inside the configured range.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use rand::Rng;
use support::{acquire_request, Controller, Pki, NET_CONF};
use twill_common::NetConf;
use twill_proto::ListLeasesRequest;

const NODES: usize = 240;
const CYCLES: usize = 20;
/// Acknowledgements each cycle waits for before it picks its moment to kill.
const MIN_ACKS_PER_CYCLE: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_kill_9() {
    let pki = Pki::new();
    let ids: Arc<Vec<_>> = Arc::new(
        (0..NODES)
            .map(|i| pki.node(&format!("node-{i:03}")))
            .collect(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let pki = Arc::new(pki);
    // node → subnet, for every acquisition the controller acknowledged.
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut acks_total = 0usize;

    for cycle in 0..CYCLES {
        if cycle > 0 {
            ctl.restart();
        }
        let url_ctl = Arc::new(ctl.channel_factory().with_ca(&pki));
        let cycle_acks = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..NODES {
            let (ids, acked, factory, cycle_acks) = (
                ids.clone(),
                acked.clone(),
                url_ctl.clone(),
                cycle_acks.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let node = format!("node-{i:03}");
                let Ok(channel) = factory.connect(&ids[i]).await else {
                    return 0usize;
                };
                let mut client =
                    twill_proto::agent_service_client::AgentServiceClient::new(channel);
                let mut acks = 0;
                // A few renewals each, so kills land between and during writes.
                for _ in 0..3 {
                    let Ok(resp) = client.acquire(acquire_request(&node, "")).await else {
                        return acks;
                    };
                    let subnet = resp.into_inner().lease.unwrap().subnet;
                    let mut map = acked.lock().unwrap();
                    if let Some(before) = map.insert(node.clone(), subnet.clone()) {
                        assert_eq!(
                            before, subnet,
                            "{node} was acknowledged {before} earlier, now {subnet}"
                        );
                    }
                    acks += 1;
                    cycle_acks.fetch_add(1, Ordering::Relaxed);
                }
                acks
            }));
        }
        // Kill mid-storm: once this cycle has some acknowledgements (however slow the
        // machine), after a random extra moment while the rest are in flight.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while cycle_acks.load(Ordering::Relaxed) < MIN_ACKS_PER_CYCLE
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let kill_after = Duration::from_millis(rand::rng().random_range(0..150));
        tokio::time::sleep(kill_after).await;
        ctl.kill9();
        for t in tasks {
            acks_total += tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("client task ends once the controller is gone")
                .unwrap();
        }
    }

    ctl.restart();
    let resp = ctl
        .admin(&pki)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let stored: BTreeMap<String, String> = resp
        .leases
        .iter()
        .map(|l| (l.node_name.clone(), l.subnet.clone()))
        .collect();
    let acked = acked.lock().unwrap();
    for (node, subnet) in acked.iter() {
        assert_eq!(
            stored.get(node),
            Some(subnet),
            "acknowledged lease of {node} lost or changed"
        );
    }
    let conf = NetConf::parse(NET_CONF).unwrap();
    let mut subnets: Vec<Ipv4Net> = stored.values().map(|s| s.parse().unwrap()).collect();
    for s in &subnets {
        assert!(
            conf.ipv4.as_ref().unwrap().index_of(*s).is_some(),
            "{s} outside SubnetMin..SubnetMax"
        );
    }
    subnets.sort();
    for pair in subnets.windows(2) {
        assert!(
            !pair[0].contains(&pair[1].network()),
            "{} overlaps {}",
            pair[0],
            pair[1]
        );
    }
    println!(
        "crash test: {CYCLES} kill -9 cycles, {acks_total} acquisitions acknowledged, {} distinct nodes acknowledged, {} leases stored and verified",
        acked.len(),
        stored.len()
    );
    assert!(
        acked.len() >= NODES / 2,
        "too few acknowledgements to prove anything: {}",
        acked.len()
    );
}
