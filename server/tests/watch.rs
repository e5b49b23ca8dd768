//! The watch stream: a snapshot then live events, exact resume from a revision (also
//! across a controller restart), and a reset when the revision is unknown.

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
        .watch(WatchRequest { from_revision: 0 })
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
        .watch(WatchRequest { from_revision: 999 })
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
        .watch(WatchRequest { from_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    client.acquire(acquire_request("a", "")).await.unwrap();
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
        .watch(WatchRequest { from_revision: 0 })
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
