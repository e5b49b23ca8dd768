//! Allocation throughput: leases granted durably per second with 1 and with 100
//! concurrent clients, against the real controller. A measurement, not a pass/fail
//! test: run it with
//! `cargo test --release -p twill-server --test throughput -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::{acquire_request, Controller, Pki};

const LEASES: usize = 2000;

async fn run(clients: usize) -> f64 {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        &pki,
        &dir.path().join("data"),
        r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#,
        &[],
    );
    let factory = Arc::new(ctl.channel_factory().with_ca(&pki));
    // Every node needs its own certificate (the node name is its CN): make them first.
    let ids: Vec<_> = (0..LEASES).map(|i| pki.node(&format!("n{i}"))).collect();
    let per_client = LEASES / clients;
    let mut conns = Vec::new();
    for c in 0..clients {
        let mut mine = Vec::new();
        for (i, id) in ids.iter().enumerate().skip(c * per_client).take(per_client) {
            let channel = factory.connect(id).await.unwrap();
            mine.push((
                format!("n{i}"),
                twill_proto::agent_service_client::AgentServiceClient::new(channel),
            ));
        }
        conns.push(mine);
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mine| {
            tokio::spawn(async move {
                for (node, mut client) in mine {
                    client.acquire(acquire_request(&node, "")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per_client * clients) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn leases_per_second() {
    for clients in [1, 100] {
        let rates: Vec<f64> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(run(clients).await);
            }
            v.sort_by(f64::total_cmp);
            v
        };
        println!(
            "{clients:>3} concurrent client(s): median {:.0} leases/s durably granted (runs: {:?})",
            rates[1],
            rates.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
}
