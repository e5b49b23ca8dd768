//! End to end, real binaries in network namespaces (issue 24, trust in node
//! identity): a bootstrap token cannot take over a live node.
//!
//! Three agents bootstrap with a token and converge; pods on node-b and node-c ping
//! node-a's pods continuously. A second `twill-agent` started on node-c's host as
//! `--node-name node-a`, with the same token and an empty certificate directory of its
//! own, is refused by the controller with `ALREADY_EXISTS` again and again (counted in
//! `twill_node_certificates_refused_total{reason="name_alive"}`) while:
//!
//! * it writes no certificate and touches nothing on node-c (the agent bootstraps
//!   before it opens netlink: node-c's links, addresses, routes, flannel.1 neighbours
//!   and FDB, subnet.env and lease stay as they were);
//! * node-a's lease (public IP, VTEP MAC, subnet) stays as it was;
//! * neither ping loses a single echo request.
//!
//! The way out for a machine that really is node-a and lost its key is
//! `twillctl certs revoke node-a`: node-a's own agent, restarted without its key and
//! certificate, is refused until the revocation and bootstraps right after it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use twill_tests::certs::cert_serial;
use twill_tests::overlay::CONTROLLER_PROC;
use twill_tests::{
    hold_for, require_lab, wait_until, Check, ContinuousPing, Overlay, OverlayConfig,
    CONTROLLER_HOST,
};

/// Deadline for the overlay to converge (generous: the machine may be busy).
const CONVERGE: Duration = Duration::from_secs(90);
/// Deadline for one change the test waits for.
const SETTLE: Duration = Duration::from_secs(60);
/// How long the impostor is watched after its first refusals (a few more of its
/// retries, with the pings running).
const WATCH: Duration = Duration::from_secs(5);
/// Fewest echo requests each ping must have sent (20 a second) to cover the attempt.
const MIN_PINGS: u64 = 100;
/// The impostor's lab process name; it runs on node-c's host.
const IMPOSTOR: &str = "impostor-node-a";
/// The impostor's `/healthz` port, beside node-c's agent's.
const IMPOSTOR_METRICS_PORT: u16 = 8576;
/// The agent's log line for a refused bootstrap attempt.
const REFUSED: &str = "the controller did not issue a node certificate";
/// The agent's log line for a certificate it got from the controller.
const ISSUED: &str = "node certificate issued";
/// The refusal metric, for the reason this test is about.
const NAME_ALIVE: &str = r#"twill_node_certificates_refused_total{reason="name_alive"}"#;

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn a_token_cannot_take_over_a_live_node_and_its_pings_never_stop() {
    let Some(ov) = require_lab(
        "takeover",
        Overlay::start(OverlayConfig::three_nodes().bootstrap(true)),
    ) else {
        return;
    };
    ov.run_scenario(scenario);
}

/// What `twillctl leases -o json` says of one node, as compared here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseFacts {
    subnet: String,
    public_ip: String,
    vtep_mac: String,
}

fn lease_of(ov: &Overlay, node: &str) -> Result<LeaseFacts> {
    let leases = ov.leases()?;
    let l = leases
        .iter()
        .find(|l| l.node_name == node)
        .with_context(|| format!("twillctl leases lists no lease for {node}: {leases:?}"))?;
    Ok(LeaseFacts {
        subnet: l.subnet.clone(),
        public_ip: l.public_ip.clone(),
        vtep_mac: l.vtep_mac.clone(),
    })
}

/// The impostor's files: a directory of its own under node-c's host directory.
struct Impostor {
    dir: PathBuf,
    pki: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    subnet_file: PathBuf,
    token_file: PathBuf,
    metrics: SocketAddr,
}

impl Impostor {
    fn new(ov: &Overlay, on: &str) -> Impostor {
        let dir = ov.node_host(on).dir.join("impostor");
        let pki = dir.join("pki");
        Impostor {
            cert: pki.join("node.crt"),
            key: pki.join("node.key"),
            subnet_file: dir.join("subnet.env"),
            token_file: dir.join("bootstrap-token"),
            metrics: SocketAddr::new(ov.node_host(on).addr(), IMPOSTOR_METRICS_PORT),
            pki,
            dir,
        }
    }

    /// `on`'s agent's arguments with the identity, files and port swapped for the
    /// impostor's: same controller, same CA, same token, `--node-name node-a`.
    fn args(&self, ov: &Overlay, on: &str, victim: &str) -> Result<Vec<String>> {
        let mut args = ov.agent_command_args(on);
        let swap = [
            ("--node-name", victim.to_string()),
            ("--tls-cert", self.cert.display().to_string()),
            ("--tls-key", self.key.display().to_string()),
            ("--subnet-file", self.subnet_file.display().to_string()),
            (
                "--subnet-dir",
                self.subnet_file
                    .with_file_name("networks")
                    .display()
                    .to_string(),
            ),
            ("--metrics-addr", self.metrics.to_string()),
            (
                "--cni-socket",
                self.dir.join("run/agent.sock").display().to_string(),
            ),
            (
                "--attachments-file",
                self.dir.join("attachments.json").display().to_string(),
            ),
            (
                "--bootstrap-token-file",
                self.token_file.display().to_string(),
            ),
        ];
        for (flag, value) in swap {
            let i = args
                .iter()
                .position(|a| a == flag)
                .with_context(|| format!("{on}'s agent has no {flag}: {args:?}"))?;
            args[i + 1] = value;
        }
        Ok(args)
    }

    /// The files it left in its certificate directory.
    fn pki_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.pki)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn scenario(ov: &Overlay) -> Result<()> {
    let t0 = Instant::now();
    let (a, b, c) = ("node-a", "node-b", "node-c");
    let lab = ov.lab();

    // 1. Three agents that bootstrapped with the token, converged; a pod gateway on
    //    each host.
    let envs = ov.wait_converged(CONVERGE)?;
    for n in [a, b, c] {
        ov.wait_agent_healthy(n, SETTLE)?;
        ensure!(
            current_run_log(ov, &Overlay::agent_proc(n)).contains(ISSUED),
            "{n}'s agent did not bootstrap"
        );
        lab.add_bridge(n, "pods0", envs[n].subnet)?;
    }
    let gw = |n: &str| envs[n].gateway();
    for from in [b, c] {
        ov.ping_from(from, gw(from).into(), gw(a).into(), SETTLE)?;
    }
    println!(
        "takeover: three agents bootstrapped with a token and converged in {:.1?}",
        t0.elapsed()
    );

    // What must not change while the impostor tries.
    let lease_a = lease_of(ov, a)?;
    let lease_c = lease_of(ov, c)?;
    let serial_a = cert_serial(&ov.node_cert_file(a))?;
    let serial_c = cert_serial(&ov.node_cert_file(c))?;
    let subnet_env_c = std::fs::read_to_string(ov.subnet_file(c))?;
    let alive_before = counter(ov, NAME_ALIVE)?;
    println!("takeover: node-a's lease {lease_a:?}; node-c's {lease_c:?}; name_alive refusals so far {alive_before}");

    // 2. Pods on node-b and node-c ping node-a's pod gateway, 20 a second.
    let mut pings: Vec<(String, ContinuousPing)> = [b, c]
        .into_iter()
        .map(|from| {
            let what = format!("{from} {} -> {a} {}", gw(from), gw(a));
            ContinuousPing::start_from(lab, from, gw(from).into(), gw(a).into()).map(|p| (what, p))
        })
        .collect::<Result<_>>()?;
    let ping_started = Instant::now();
    hold_for(Duration::from_secs(2), "the pings to run", || {
        pings
            .iter_mut()
            .try_for_each(|(what, p)| p.still_running(&format!("{what}, warm-up")))
    })?;

    // node-c's kernel, looked at once the pings run (and IPv6 link-local addresses
    // have left DAD: the lab's links are new).
    let kernel_c = kernel_state(ov, c)?;

    // 3. The impostor: a second agent on node-c's host calling itself node-a, with the
    //    same token and a certificate directory of its own (empty).
    let imp = Impostor::new(ov, c);
    std::fs::create_dir(&imp.dir)?;
    let token = std::fs::read_to_string(ov.bootstrap_token_file(c))?;
    write_private(&imp.token_file, &token)?;
    let args = imp.args(ov, c, a)?;
    let impostor_started = Instant::now();
    lab.spawn(c, IMPOSTOR, &ov.bins().agent(), args)?;
    let pid = lab.pid(IMPOSTOR).context("the impostor has no pid")?;
    println!("takeover: impostor started on node-c's host as node-a (pid {pid})");

    // Everything that must hold while it runs, looked at on every poll.
    let mut unchanged = || -> Result<()> {
        for (what, p) in &mut pings {
            p.still_running(&format!("{what}, while the impostor runs"))?;
        }
        for f in [&imp.cert, &imp.key, &imp.subnet_file] {
            ensure!(!f.exists(), "the impostor wrote {}", f.display());
        }
        for n in [a, b, c] {
            ensure!(ov.agent_running(n), "{n}'s agent exited");
        }
        for n in [a, c] {
            let r = lab.http_get(n, ov.agent_metrics_addr(n), "/healthz")?;
            ensure!(
                r.status == 200,
                "{n}'s agent is not healthy: HTTP {} {}",
                r.status,
                r.body.trim()
            );
        }
        let now_a = lease_of(ov, a)?;
        ensure!(
            now_a == lease_a,
            "node-a's lease changed: {lease_a:?} -> {now_a:?}"
        );
        let now_c = lease_of(ov, c)?;
        ensure!(
            now_c == lease_c,
            "node-c's lease changed: {lease_c:?} -> {now_c:?}"
        );
        let now = kernel_state(ov, c)?;
        ensure!(
            now == kernel_c,
            "node-c's kernel state changed:\n--- before\n{kernel_c}\n--- now\n{now}"
        );
        ensure!(
            std::fs::read_to_string(ov.subnet_file(c))? == subnet_env_c,
            "node-c's subnet.env changed"
        );
        Ok(())
    };

    // 4. Refused at least twice (the agent's log) and counted (the controller's
    //    metric), with nothing changed meanwhile; then watched for a few more retries.
    let first = wait_until(
        SETTLE,
        "the impostor to be refused twice with ALREADY_EXISTS and name_alive to count it",
        || {
            if !lab.is_running(IMPOSTOR) {
                return Check::Fatal(format!(
                    "the impostor exited:\n{}",
                    lab.log_tail(IMPOSTOR, 30)
                ));
            }
            if let Err(e) = unchanged() {
                return Check::Fatal(format!("{e:#}"));
            }
            let refusals = refusals(ov, IMPOSTOR);
            let counted = match counter(ov, NAME_ALIVE) {
                Ok(n) => n - alive_before,
                Err(e) => return Check::NotYet(format!("{e:#}")),
            };
            if refusals.len() >= 2 && counted >= 1 {
                Check::Ready((refusals, counted, impostor_started.elapsed()))
            } else {
                Check::NotYet(format!(
                    "{} refusals logged, {counted} counted",
                    refusals.len()
                ))
            }
        },
    )?;
    println!(
        "takeover: impostor refused {} times (name_alive +{}) {:.1?} after its start",
        first.0.len(),
        first.1,
        first.2
    );
    hold_for(
        WATCH,
        "nothing to change while the impostor keeps retrying",
        &mut unchanged,
    )?;
    unchanged()?;

    let refused = refusals(ov, IMPOSTOR);
    let other: Vec<&String> = refused
        .iter()
        .filter(|l| !l.contains("code=ALREADY_EXISTS"))
        .collect();
    ensure!(
        other.is_empty(),
        "the impostor was refused otherwise than ALREADY_EXISTS:\n{other:#?}"
    );
    ensure!(
        refused
            .iter()
            .all(|l| l.contains("twillctl certs revoke node-a")),
        "the refusals do not name `twillctl certs revoke node-a`:\n{refused:#?}"
    );
    let log = lab.log(IMPOSTOR);
    ensure!(
        !log.contains(ISSUED),
        "the impostor got a certificate:\n{log}"
    );
    let ctl_log = lab.log(CONTROLLER_PROC);
    let ctl_refusals = ctl_log
        .lines()
        .filter(|l| l.contains("bootstrap refused") && l.contains("node node-a is alive"))
        .count();
    ensure!(
        ctl_refusals >= refused.len(),
        "the controller logged {ctl_refusals} refusals of node-a, the impostor {}",
        refused.len()
    );
    let health = lab.http_get(c, imp.metrics, "/healthz")?;
    ensure!(
        health.status != 200,
        "the impostor is healthy without a certificate: {}",
        health.body.trim()
    );

    // 5. SIGTERM to the impostor's own pid: it exits cleanly, leaving nothing behind.
    let t = Instant::now();
    let status = lab.stop(IMPOSTOR).context("SIGTERM to the impostor")?;
    let took = t.elapsed();
    ensure!(
        status.success(),
        "the impostor exited with {status} on SIGTERM"
    );
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the impostor's pid {pid} is still there"
    );
    let left = imp.pki_files();
    ensure!(
        left.is_empty(),
        "the impostor left files in {}: {left:?}",
        imp.pki.display()
    );
    let refused = refusals(ov, IMPOSTOR);
    let counted = counter(ov, NAME_ALIVE)? - alive_before;
    ensure!(
        counted >= refused.len() as u64 && counted <= refused.len() as u64 + 1,
        "name_alive counted {counted} refusals; the impostor logged {} (one more may have \
         been answered as it stopped)",
        refused.len()
    );
    println!(
        "takeover: impostor ran {:.1?}, refused {} times with ALREADY_EXISTS (agent's log), \
         name_alive +{counted} (controller's metric), {ctl_refusals} refusals in the \
         controller's log; exited {status} {took:.1?} after SIGTERM; its certificate \
         directory holds {left:?}",
        impostor_started.elapsed(),
        refused.len(),
    );
    unchanged()?;
    ensure!(
        cert_serial(&ov.node_cert_file(a))? == serial_a
            && cert_serial(&ov.node_cert_file(c))? == serial_c,
        "node-a's or node-c's certificate changed"
    );

    // The pings, stopped: not one echo request lost.
    let mut problems = Vec::new();
    for (what, mut p) in pings {
        let report = p.finish()?;
        println!(
            "takeover: continuous ping {what} (every 50 ms, {:.1?}) across the impostor's \
             attempt: {report}",
            ping_started.elapsed()
        );
        problems.extend(
            report
                .problems(MIN_PINGS, "the impostor's attempt")
                .into_iter()
                .map(|p| format!("{what}: {p}")),
        );
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));

    // 6. The way out: node-a, its key and certificate lost, is refused until an admin
    //    revokes it, and bootstraps right after.
    ensure!(
        ov.stop_agent(a)?.success(),
        "node-a's agent did not exit cleanly"
    );
    std::fs::remove_file(ov.node_cert_file(a))?;
    std::fs::remove_file(ov.node_key_file(a))?;
    ov.restart_agent(a)?;
    let before = wait_until(
        SETTLE,
        "node-a's agent, without its key, to be refused",
        || {
            let proc_a = Overlay::agent_proc(a);
            if !ov.agent_running(a) {
                return Check::Fatal(lab.log_tail(&proc_a, 30));
            }
            let r = refusals(ov, &proc_a);
            if r.is_empty() {
                Check::NotYet("no refusal yet".into())
            } else {
                Check::Ready(r)
            }
        },
    )?;
    ensure!(
        before.iter().all(|l| l.contains("code=ALREADY_EXISTS")),
        "node-a without its key was refused otherwise than ALREADY_EXISTS:\n{before:#?}"
    );
    ensure!(
        !ov.node_cert_file(a).exists(),
        "node-a got a certificate before the revocation"
    );
    ov.twillctl(&["certs", "revoke", a])?;
    let revoked = Instant::now();
    ov.wait_agent_healthy(a, SETTLE)?;
    let to_healthy = revoked.elapsed();
    let log = current_run_log(ov, &Overlay::agent_proc(a));
    ensure!(
        log.matches(ISSUED).count() == 1,
        "node-a's agent did not bootstrap once after the revocation:\n{log}"
    );
    let new_serial = cert_serial(&ov.node_cert_file(a))?;
    ensure!(
        new_serial != serial_a,
        "node-a's new certificate has the old serial"
    );
    ov.wait_converged(CONVERGE)?;
    let lease_after = lease_of(ov, a)?;
    for from in [b, c] {
        ov.ping_from(from, gw(from).into(), gw(a).into(), SETTLE)?;
    }
    println!(
        "takeover: node-a without its key: refused {} time(s) before `twillctl certs revoke \
         node-a`, healthy {to_healthy:.1?} after it; lease {lease_after:?} (was {lease_a:?})",
        before.len()
    );
    ensure!(
        lease_after == lease_a,
        "node-a came back with lease {lease_after:?}, not {lease_a:?}"
    );
    println!("takeover: the whole scenario took {:.1?}", t0.elapsed());
    Ok(())
}

// ------------------------------------------------------------------ helpers

/// The log of a lab process's current run (after the lab's last start marker).
fn current_run_log(ov: &Overlay, proc_name: &str) -> String {
    let log = ov.lab().log(proc_name);
    match log.rfind("=== twill lab: start #") {
        Some(i) => log[i..].to_string(),
        None => log,
    }
}

/// The refused bootstrap attempts an agent logged in its current run.
fn refusals(ov: &Overlay, proc_name: &str) -> Vec<String> {
    current_run_log(ov, proc_name)
        .lines()
        .filter(|l| l.contains(REFUSED))
        .map(str::to_string)
        .collect()
}

/// A counter on the controller's `/metrics` (the whole series, labels included).
fn counter(ov: &Overlay, series: &str) -> Result<u64> {
    let r = ov
        .lab()
        .http_get(CONTROLLER_HOST, ov.controller_metrics_addr(), "/metrics")?;
    ensure!(r.status == 200, "controller /metrics: HTTP {}", r.status);
    let value = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no {series} on the controller's /metrics"))?;
    let v: f64 = value
        .trim()
        .parse()
        .with_context(|| format!("{series} {value:?}"))?;
    Ok(v as u64)
}

/// A host's network state, as text to compare: links, addresses, IPv4 routes of every
/// table, IPv6 routes of the main table (the local table gains link-local addresses
/// as their DAD ends), flannel.1's neighbours and FDB.
fn kernel_state(ov: &Overlay, host: &str) -> Result<String> {
    let lab = ov.lab();
    let mut out = String::new();
    for args in [
        &["ip", "-br", "link"][..],
        &["ip", "-br", "addr"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show"],
    ] {
        out.push_str(&format!("$ {}\n{}", args.join(" "), lab.exec(host, args)?));
    }
    out.push_str(&format!("neighbours {:?}\n", lab.neighbours(host)?));
    out.push_str(&format!("fdb {:?}\n", lab.fdb(host)?));
    Ok(out)
}

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
