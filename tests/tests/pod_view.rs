//! The node's pod view (REFERENCE 2.11) through crashes: pods are added and deleted by
//! the real twill-cni (real `bridge` and `host-local`) while the node's real agent is
//! SIGKILLed in the middle of the burst and started again. Reports in flight when it
//! died, and those sent while it was down (queued on disk), reach it; its view then
//! equals host-local's files: as many attachments as addresses held, every address it
//! reports held (no conflict), nothing called leaked. The controller is then SIGKILLed
//! while pods come and go; started again, its `twillctl pods` equals host-local's
//! files (the agent re-reports when its watch reopens). Then a pod's namespace goes
//! without a DEL (a crashed runtime): `twillctl ipam check` names exactly its address
//! as leaked, `twillctl ipam release --leaked` has the agent release it from
//! host-local's files (and nothing else), and the check is clean.
//!
//! Needs root, network namespaces and Debian's containernetworking-plugins; without
//! them it is skipped loudly, or fails when `CI` is set.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use twill_tests::kit::skip;
use twill_tests::pods::{self, ipam_dir, Pod, CNI_PATH, NETWORK};
use twill_tests::{require_lab, wait_until, Check, Overlay, OverlayConfig};

const NODE: &str = "node-a";
const CONVERGE: Duration = Duration::from_secs(60);
/// Pods added in the burst, and how many are added before the agent is killed.
const BURST: usize = 12;
const KILL_AFTER: usize = 4;

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn the_pod_view_converges_to_host_locals_files_across_agent_crashes() {
    let test = "the_pod_view_converges_to_host_locals_files_across_agent_crashes";
    if !Path::new(CNI_PATH).join("bridge").is_file() {
        return skip(test, "needs containernetworking-plugins in /usr/lib/cni");
    }
    let config = OverlayConfig::new([NODE]).agent_args(NODE, ["--reconcile-interval", "1s"]);
    let Some(ov) = require_lab(test, Overlay::start(config)) else {
        return;
    };
    if let Err(e) = scenario(&ov) {
        panic!("{e:#}");
    }
}

fn scenario(ov: &Overlay) -> Result<()> {
    ov.wait_converged(CONVERGE)?;
    let cni_bin = ov.bins().path("twill-cni");
    ensure!(cni_bin.is_file(), "{} missing", cni_bin.display());

    // 1. A burst of ADDs; the agent is SIGKILLed in the middle of it.
    let added = Arc::new(AtomicUsize::new(0));
    let pods: Vec<Pod> = std::thread::scope(|s| -> Result<Vec<Pod>> {
        let burst = s.spawn(|| -> Result<Vec<Pod>> {
            let mut pods = Vec::new();
            for i in 0..BURST {
                let (pod, _) = pods::attach(ov, &cni_bin, NODE, &format!("v{i}"))?;
                pods.push(pod);
                added.fetch_add(1, Ordering::SeqCst);
            }
            Ok(pods)
        });
        wait_until(CONVERGE, "the first ADDs of the burst", || {
            added.load(Ordering::SeqCst) >= KILL_AFTER
        })?;
        let st = ov.kill_agent(NODE)?;
        ensure!(!st.success(), "the agent was killed, not exited: {st}");
        ensure!(!ov.agent_running(NODE), "the agent is gone");
        burst.join().expect("the burst thread")
    })?;

    // 2. DELs while the agent is down: their reports wait in the queue.
    for pod in &pods[..3] {
        pods::cni(ov, &cni_bin, NODE, "DEL", pod)?;
    }
    ov.restart_agent(NODE)?;
    // 3. And more with it back.
    for pod in &pods[3..5] {
        pods::cni(ov, &cni_bin, NODE, "DEL", pod)?;
    }
    let live = BURST - 5;

    let dir = ipam_dir(ov, NODE).join(NETWORK);
    let held = held_addresses(&dir)?.len();
    ensure!(
        held == live,
        "host-local holds {held} addresses, {live} pods live"
    );
    wait_until(CONVERGE, "the agent's view to equal host-local's", || {
        let series = [
            "twill_agent_pod_attachments",
            "twill_pod_ips_used{network=\"default\",family=\"ipv4\"}",
            "twill_agent_pod_ips_conflicts",
            "twill_agent_pod_ips_leaked",
        ];
        let seen = match ov.agent_metric_values(NODE, &series) {
            Ok(v) => v,
            Err(e) => return Check::NotYet(format!("{e:#}")),
        };
        let want = vec![Some(live as f64), Some(held as f64), Some(0.0), Some(0.0)];
        if seen == want {
            Check::Ready(())
        } else {
            Check::NotYet(format!(
                "(attachments, used, conflicts, leaked) {seen:?}, want {want:?}"
            ))
        }
    })?;

    // 3b. The controller is SIGKILLed; a pod goes and one comes while it is down.
    //     Started again, it knows no pods (they live in its memory): the agent's
    //     report when its watch reopens gives it the node's whole set, which then
    //     equals host-local's files.
    let st = ov.kill_controller()?;
    ensure!(!st.success(), "the controller was killed, not exited: {st}");
    ensure!(
        !ov.lab().is_running(twill_tests::overlay::CONTROLLER_PROC),
        "the controller is gone"
    );
    pods::cni(ov, &cni_bin, NODE, "DEL", &pods[11])?;
    let (late, _) = pods::attach(ov, &cni_bin, NODE, "late")?;
    ov.restart_controller()?;
    let want = {
        let mut w: Vec<(String, String)> = pods[5..11]
            .iter()
            .chain(std::iter::once(&late))
            .map(|p| (p.container_id.clone(), p.addr.to_string()))
            .collect();
        w.sort();
        w
    };
    wait_until(
        CONVERGE,
        "`twillctl pods` after the controller's restart to equal host-local's files",
        || {
            let listed = match listed_pods(ov) {
                Ok(l) => l,
                Err(e) => return Check::NotYet(format!("{e:#}")),
            };
            let files = match held_addresses(&dir) {
                Ok(f) => f,
                Err(e) => return Check::Fatal(format!("{e:#}")),
            };
            let mut addrs: Vec<String> = listed.iter().map(|(_, a)| a.clone()).collect();
            addrs.sort();
            if listed == want && addrs == files {
                Check::Ready(())
            } else {
                Check::NotYet(format!(
                    "listed {listed:?}, want {want:?}; host-local holds {files:?}"
                ))
            }
        },
    )?;

    // 4. A runtime crashes: a pod's namespace goes without a DEL. `ipam check` names
    //    exactly its address as leaked.
    let crashed = &pods[5];
    twill_tests::cmd::run(&["ip", "netns", "del", &crashed.netns])?;
    let findings = || -> Result<Vec<(String, String, String)>> {
        let out = ov.twillctl(&["ipam", "check", "-o", "json"])?;
        let doc: serde_json::Value = serde_json::from_str(&out)?;
        Ok(doc["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                (s("node"), s("ip"), s("kind"))
            })
            .collect())
    };
    let leaked = vec![(
        NODE.to_string(),
        crashed.addr.to_string(),
        "leaked".to_string(),
    )];
    wait_until(
        CONVERGE,
        "`twillctl ipam check` to name the leaked address",
        || match findings() {
            Ok(f) if f == leaked => Check::Ready(()),
            Ok(f) => Check::NotYet(format!("findings {f:?}, want {leaked:?}")),
            Err(e) => Check::NotYet(format!("{e:#}")),
        },
    )?;
    // 5. `twillctl ipam release --leaked`: the agent releases it from host-local's
    //    files (nothing else), and the check is clean.
    let asked = ov.twillctl(&["ipam", "release", "--leaked"])?;
    ensure!(
        asked.contains(&crashed.addr.to_string()),
        "release asked for: {asked}"
    );
    let file = dir.join(crashed.addr.to_string());
    wait_until(CONVERGE, "the leaked address released", || {
        match findings() {
            Ok(f) if f.is_empty() && !file.exists() => Check::Ready(()),
            Ok(f) => Check::NotYet(format!("findings {f:?}, file there: {}", file.exists())),
            Err(e) => Check::NotYet(format!("{e:#}")),
        }
    })?;
    let left = held_addresses(&dir)?.len();
    ensure!(
        left == live - 1,
        "host-local holds {left}, want {}",
        live - 1
    );
    Ok(())
}

/// The addresses host-local holds in `dir`, sorted.
fn held_addresses(dir: &Path) -> Result<Vec<String>> {
    let mut held: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("host-local's {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<IpAddr>().ok())
        .map(|a| a.to_string())
        .collect();
    held.sort();
    Ok(held)
}

/// `twillctl pods -o json` on [`NODE`]: (container, first address), sorted.
fn listed_pods(ov: &Overlay) -> Result<Vec<(String, String)>> {
    let out = ov.twillctl(&["pods", "--node", NODE, "-o", "json"])?;
    let doc: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let mut listed: Vec<(String, String)> = doc["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (s(&p["container_id"]), s(&p["ips"][0]))
        })
        .collect();
    listed.sort();
    Ok(listed)
}

/// A node's subnet filled to exhaustion (REFERENCE 2.11): with /28 subnets (13
/// addresses for pods), once 12 are held `twillctl ipam` says 92 %, `twillctl status`
/// names the subnet as nearly full, the agent's metrics say 12 of 13 and its log
/// warns, all before the ADD that fails (the 14th). Then a pod's namespace goes
/// without a DEL; released with `twillctl ipam release --leaked`, its address is the
/// one the next ADD gets.
#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn a_subnet_nearly_full_shows_before_the_add_that_fails() {
    let test = "a_subnet_nearly_full_shows_before_the_add_that_fails";
    if !Path::new(CNI_PATH).join("bridge").is_file() {
        return skip(test, "needs containernetworking-plugins in /usr/lib/cni");
    }
    let config = OverlayConfig::new([NODE])
        .net_conf(r#"{"Network":"10.244.0.0/16","SubnetLen":28,"Backend":{"Type":"vxlan"}}"#)
        .agent_args(NODE, ["--reconcile-interval", "1s"]);
    let Some(ov) = require_lab(test, Overlay::start(config)) else {
        return;
    };
    if let Err(e) = fill(&ov) {
        panic!("{e:#}");
    }
}

fn fill(ov: &Overlay) -> Result<()> {
    ov.wait_converged(CONVERGE)?;
    let cni_bin = ov.bins().path("twill-cni");
    let mut filled = Vec::new();
    for i in 0..12 {
        filled.push(pods::attach(ov, &cni_bin, NODE, &format!("f{i}"))?.0);
    }
    wait_until(CONVERGE, "the agent to count 12 of 13 addresses", || {
        let series = [
            "twill_pod_ips_used{network=\"default\",family=\"ipv4\"}",
            "twill_pod_ips_total{network=\"default\",family=\"ipv4\"}",
        ];
        let seen = match ov.agent_metric_values(NODE, &series) {
            Ok(v) => v,
            Err(e) => return Check::NotYet(format!("{e:#}")),
        };
        if seen == [Some(12.0), Some(13.0)] {
            Check::Ready(())
        } else {
            Check::NotYet(format!("(used, total) {seen:?}"))
        }
    })?;
    wait_until(CONVERGE, "`twillctl ipam` to say 92 %", || {
        match ov.twillctl(&["ipam"]) {
            Ok(out)
                if out.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&NODE) && f.ends_with(&["12", "13", "92%"])
                }) =>
            {
                Check::Ready(())
            }
            Ok(out) => Check::NotYet(out),
            Err(e) => Check::NotYet(format!("{e:#}")),
        }
    })?;
    let status = ov.twillctl(&["status"])?;
    ensure!(
        status.contains("Nearly full") && status.contains(NODE),
        "twillctl status does not name the subnet:\n{status}"
    );
    let log = ov.lab().log(&Overlay::agent_proc(NODE));
    ensure!(
        log.contains("nearly full"),
        "the agent's log has no warning:\n{log}"
    );
    pods::attach(ov, &cni_bin, NODE, "f12")?;
    let last = pods::attach(ov, &cni_bin, NODE, "f13");
    let e = match last {
        Ok(_) => anyhow::bail!("a 14th pod got an address from a /28"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        e.contains("no IP addresses available"),
        "the 14th ADD failed for another reason: {e}"
    );

    // A runtime crashes: a pod's namespace goes without a DEL. Once `twillctl ipam
    // release --leaked` has the agent release it, its address is the one host-local
    // hands the next pod (the only one free).
    let crashed = &filled[3];
    twill_tests::cmd::run(&["ip", "netns", "del", &crashed.netns])?;
    let addr = crashed.addr.to_string();
    wait_until(
        CONVERGE,
        "`twillctl ipam check` to name the leak",
        || match ov.twillctl(&["ipam", "check"]) {
            Ok(out)
                if out
                    .lines()
                    .any(|l| l.contains(&addr) && l.contains("LEAKED")) =>
            {
                Check::Ready(())
            }
            Ok(out) => Check::NotYet(out),
            Err(e) => Check::NotYet(format!("{e:#}")),
        },
    )?;
    ov.twillctl(&["ipam", "release", "--leaked"])?;
    let file = ipam_dir(ov, NODE).join(NETWORK).join(&addr);
    wait_until(CONVERGE, "the leaked address released", || {
        if file.exists() {
            Check::NotYet(format!("{} is there", file.display()))
        } else {
            Check::Ready(())
        }
    })?;
    let (again, _) = pods::attach(ov, &cni_bin, NODE, "f14")?;
    ensure!(
        again.addr == crashed.addr,
        "the next pod got {}, not the released {addr}",
        again.addr
    );
    Ok(())
}
