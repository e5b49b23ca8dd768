//! One node looping Acquire must not degrade the others: its writes are rate limited
//! per node, so it costs the table a handful of revisions, and another node's changes
//! still reach a watcher as fast as on a quiet controller.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{acquire_request, Controller, Pki, NET_CONF};
use twill_proto::{ReleaseRequest, WatchRequest, WatchResponse};

/// Milliseconds from a probe node's Acquire request to a watcher seeing its lease, for
/// `n` probes 300 ms apart.
async fn probe_latencies(
    ctl: &Controller,
    pki: &Pki,
    stream: &mut tonic::Streaming<WatchResponse>,
    tag: &str,
    n: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        let node = format!("probe-{tag}-{i}");
        let mut client = ctl.agent(pki, &pki.node(&node)).await;
        let sent = Instant::now();
        client.acquire(acquire_request(&node, "")).await.unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("a watch message within 30s")
                .unwrap()
                .expect("watch open");
            assert!(!msg.reset, "the watcher was never reset");
            if msg
                .events
                .iter()
                .any(|e| e.lease.as_ref().is_some_and(|l| l.node_name == node))
            {
                break;
            }
        }
        out.push(sent.elapsed().as_secs_f64() * 1000.0);
        client
            .release(ReleaseRequest {
                node_name: node,
                ..Default::default()
            })
            .await
            .unwrap();
        // Spread over a few seconds, so the flood runs long past its burst.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_looping_acquire_is_rate_limited_and_others_keep_their_latency() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let mut watcher = ctl.agent(&pki, &pki.node("watcher")).await;
    let mut stream = watcher
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("initial snapshot");
    let quiet = probe_latencies(&ctl, &pki, &mut stream, "quiet", 15).await;

    // The flood: four connections of one certificate, each request a real change (a
    // new public address every time), as fast as the controller answers.
    let stop = Arc::new(AtomicBool::new(false));
    let (granted, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flood = pki.node("flood");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let mut client = ctl.agent(&pki, &flood).await;
        let (stop, granted, limited) = (stop.clone(), granted.clone(), limited.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut req = acquire_request("flood", "");
                req.public_ip = format!("198.51.100.{}", 1 + (t * 50 + i) % 200);
                match client.acquire(req).await {
                    Ok(_) => granted.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        assert!(s.message().contains("retry in"), "{}", s.message());
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => panic!("flood: unexpected {s:?}"),
                };
            }
        }));
    }
    let flooded = probe_latencies(&ctl, &pki, &mut stream, "flood", 15).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (granted, limited) = (
        granted.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    );
    let (q, f) = (median(quiet), median(flooded.clone()));
    println!(
        "flood: {granted} granted, {limited} refused in {elapsed:.1}s; probe delivery p50 \
         quiet {q:.2} ms, under flood {f:.2} ms (max {:.2} ms)",
        flooded.iter().copied().fold(0.0, f64::max)
    );
    // Burst 10, then 2 a second: what the node got is bounded whatever it sent.
    assert!(
        (granted as f64) <= 10.0 + 2.0 * elapsed + 2.0,
        "{granted} writes in {elapsed:.1}s got past the limit"
    );
    assert!(
        limited > granted * 10,
        "the flood was mostly refused ({limited} vs {granted})"
    );
    // Generous: the point is that the flood does not queue others behind it (without
    // the limit, every flood write was a revision, an fsync and a broadcast).
    assert!(
        f < q * 20.0 + 500.0,
        "delivery under flood {f:.1} ms vs quiet {q:.1} ms"
    );
}
