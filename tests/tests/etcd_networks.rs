//! Several networks with the leases in etcd (REFERENCE 2.7 and 2.10): every replica
//! serves every network. Real etcd on 127.0.0.1 (`tests/src/etcd.rs`), two real
//! controllers, each with the same `blue.json` in its own `--networks-dir`.
//!
//! A lease in `blue` taken through either replica (the follower forwards it) is
//! stored under blue's keys, served by both replicas' admin API under `--network blue`
//! only, and reaches a watch of `default` and `blue` opened on the follower; after the
//! leader is killed the other replica leads and renews it in place.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tonic::transport::Channel;
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, Lease, ListLeasesRequest, WatchRequest};
use twill_tests::replicas::{channel, replica_bins, run_kept, Pem, Pki, ReplicaSet, HA_NET_CONF};
use twill_tests::{wait_until, Bins, Check, EtcdCluster};

const BLUE: &str = r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#;
const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn every_replica_serves_every_network() {
    let test = "every_replica_serves_every_network";
    let Some(bins) = replica_bins(test) else {
        return;
    };
    run_kept("twill-etcd-networks", |dir| scenario(&bins, dir));
}

fn blue_request(node: &str, mac: &str) -> AcquireRequest {
    AcquireRequest {
        node_name: node.into(),
        public_ip: "100.64.0.7".into(),
        backend_type: "vxlan".into(),
        vtep_mac: mac.into(),
        network: "blue".into(),
        ..Default::default()
    }
}

/// `blue`'s leases as replica `ch` serves them, by node.
async fn blue_leases(ch: &Channel) -> Result<Vec<(String, String)>> {
    let r = AdminServiceClient::new(ch.clone())
        .list_leases(ListLeasesRequest {
            network: "blue".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.leases
        .into_iter()
        .map(|l| (l.node_name, l.subnet))
        .collect())
}

fn scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let pki = Pki::create(bins, dir)?;
    for i in 0..2 {
        let networks = dir.join(format!("replica{i}.data")).join("networks");
        std::fs::create_dir_all(&networks)?;
        std::fs::write(networks.join("blue.json"), BLUE)?;
    }
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, 2, "/twill-networks/", HA_NET_CONF)?;
    let rt = tokio::runtime::Runtime::new()?;
    // Lazy channels are made inside the runtime.
    let _in_runtime = rt.enter();
    let leader = wait_until(PATIENCE, "a leader", || match set.leaders().as_slice() {
        [l] => Check::Ready(*l),
        other => Check::NotYet(format!("leaders {other:?}")),
    })?;
    let follower = 1 - leader;
    let node_a = pki.node("node-a")?;
    let node_b = pki.node("node-b")?;
    let agent = |i: usize, pem: &Pem| -> Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(channel(
            &set.url(i),
            pki.ca_pem(),
            pem,
        )?))
    };
    let admin = |i: usize| channel(&set.url(i), pki.ca_pem(), pki.admin());

    // node-a's blue lease through the leader, node-b's through the follower (forwarded).
    let grant = |i: usize, pem: &Pem, node: &str, mac: &str| -> Result<Lease> {
        let mut c = agent(i, pem)?;
        let l = rt
            .block_on(c.acquire(blue_request(node, mac)))
            .with_context(|| format!("{node}'s blue lease through replica {i}"))?
            .into_inner()
            .lease
            .context("no lease")?;
        ensure!(
            l.network == "blue" && l.subnet.starts_with("10.10."),
            "{l:?}"
        );
        Ok(l)
    };
    let a = grant(leader, &node_a, "node-a", "0a:58:0a:0a:00:01")?;
    let b = grant(follower, &node_b, "node-b", "0a:58:0a:0a:00:02")?;

    // Both replicas serve them under blue, and default holds neither.
    for i in [leader, follower] {
        let ch = admin(i)?;
        wait_until(
            PATIENCE,
            &format!("replica {i} to serve blue's two leases"),
            || match rt.block_on(blue_leases(&ch)) {
                Ok(l) if l.len() == 2 => Check::Ready(()),
                Ok(l) => Check::NotYet(format!("{l:?}")),
                Err(e) => Check::NotYet(format!("{e:#}")),
            },
        )?;
        let default = rt
            .block_on(AdminServiceClient::new(ch).list_leases(ListLeasesRequest::default()))?
            .into_inner();
        ensure!(
            default.leases.is_empty(),
            "default holds {:?}",
            default.leases
        );
    }

    // A watch of default and blue on the follower carries blue's leases.
    let mut w = agent(follower, &node_b)?;
    let first = rt.block_on(async {
        let mut s = w
            .watch(WatchRequest {
                networks: vec!["default".into(), "blue".into()],
                ..Default::default()
            })
            .await?
            .into_inner();
        tokio::time::timeout(PATIENCE, s.message())
            .await
            .context("no watch message")??
            .context("the stream ended")
    })?;
    let mut nodes: Vec<(String, String)> = first
        .events
        .iter()
        .filter_map(|e| e.lease.as_ref())
        .map(|l| (l.network.clone(), l.node_name.clone()))
        .collect();
    nodes.sort();
    ensure!(
        first.reset
            && nodes
                == [
                    ("blue".to_string(), "node-a".to_string()),
                    ("blue".into(), "node-b".into())
                ],
        "the follower's reset: {first:?}"
    );

    // The leader dies; the follower leads and renews node-a's blue lease in place.
    set.kill(leader)?;
    wait_until(PATIENCE, "the follower to lead", || {
        if set.leaders() == [follower] {
            Check::Ready(())
        } else {
            Check::NotYet(format!("leaders {:?}", set.leaders()))
        }
    })?;
    let again = wait_until(
        PATIENCE,
        "node-a's renewal on the new leader",
        || match grant(follower, &node_a, "node-a", "0a:58:0a:0a:00:01") {
            Ok(l) => Check::Ready(l),
            Err(e) => Check::NotYet(format!("{e:#}")),
        },
    )?;
    ensure!(
        (again.subnet.as_str(), again.revision) == (a.subnet.as_str(), a.revision),
        "node-a's blue lease moved: {a:?} then {again:?}"
    );
    ensure!(a.subnet != b.subnet);
    Ok(())
}
