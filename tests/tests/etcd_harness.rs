//! The etcd harness itself (tests/src/etcd.rs), which the controller's etcd backend
//! tests stand on: three real members over client-certificate TLS lose quorum when two
//! are killed and regain it when they are restarted; a SIGSTOPped member is stopped
//! for real; dropping the cluster leaves no process and no file behind.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use twill_tests::{require_etcd, wait_until, EtcdCluster};

const P: &str = "/twill-harness/";

fn key(k: &str) -> String {
    format!("{P}{k}")
}

#[test]
fn three_members_lose_and_regain_quorum() {
    if !require_etcd("etcd_harness") {
        return;
    }
    let t0 = Instant::now();
    let etcd = EtcdCluster::start(3).unwrap();
    let started = t0.elapsed();
    assert_eq!(etcd.endpoints().len(), 3);
    assert!(etcd.endpoints_csv().starts_with("https://127.0.0.1:"));
    let pids: Vec<u32> = (0..3).map(|i| etcd.pid(i).unwrap()).collect();
    for pid in &pids {
        // the pid is etcd's own, not a wrapper's: signals reach etcd
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "etcd");
    }

    // Values round-trip as bytes (through etcdctl's stdin and base64 JSON).
    etcd.put(&key("a"), "1").unwrap();
    let odd = b"-starts like a flag\n\0and holds a NUL".to_vec();
    etcd.put(&key("odd"), &odd).unwrap();
    etcd.put(&key("empty"), "").unwrap();
    assert_eq!(
        etcd.get_prefix(P).unwrap(),
        vec![
            (key("a"), b"1".to_vec()),
            (key("empty"), Vec::new()),
            (key("odd"), odd),
        ]
    );

    // Two of three are a quorum (after a new election if the leader was killed).
    etcd.kill(0).unwrap();
    assert_eq!(etcd.pid(0), None);
    assert!(!Path::new(&format!("/proc/{}", pids[0])).exists());
    wait_until(
        Duration::from_secs(10),
        "a put with two of three members",
        || etcd.put(&key("b"), "2"),
    )
    .unwrap();

    // One of three is not.
    etcd.kill(1).unwrap();
    let t = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "a put to fail without quorum",
        || etcd.put(&key("lost"), "x").is_err(),
    )
    .unwrap();
    let refused = t.elapsed();

    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    assert!(etcd.pid(0).is_some() && etcd.pid(1).is_some());
    wait_until(Duration::from_secs(15), "a put after the restarts", || {
        etcd.put(&key("c"), "3")
    })
    .unwrap();
    // The refused put may still be committed: its entry can sit in the lone member's
    // log and be committed once quorum is back. Only the acknowledged ones count.
    let keys: Vec<String> = etcd
        .get_prefix(P)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| *k != key("lost"))
        .collect();
    assert_eq!(keys, ["a", "b", "c", "empty", "odd"].map(key));

    // A SIGSTOPped member hangs (the other two still serve); SIGCONT brings it back.
    etcd.stop(2).unwrap();
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pids[2])).unwrap();
    assert!(state
        .rsplit_once(')')
        .unwrap()
        .1
        .trim_start()
        .starts_with('T'));
    wait_until(
        Duration::from_secs(10),
        "a put with member 2 stopped",
        || etcd.put(&key("d"), "4"),
    )
    .unwrap();
    etcd.cont(2).unwrap();

    assert!(etcd.del_prefix(P).unwrap() >= 6);
    assert_eq!(etcd.get_prefix(P).unwrap(), Vec::new());

    let dir = etcd.ca().parent().unwrap().to_path_buf();
    let pids: Vec<u32> = (0..3).map(|i| etcd.pid(i).unwrap()).collect();
    drop(etcd);
    assert!(!dir.exists(), "{} was not deleted", dir.display());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is still there"
        );
    }
    eprintln!(
        "etcd harness: started in {started:.1?}, a put without quorum failed after {refused:.1?}, \
         all in {:.1?}",
        t0.elapsed()
    );
}
