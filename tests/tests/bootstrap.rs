//! End to end, zero-touch node identity: agents that start with only the CA
//! certificate and a bootstrap token (`twillctl token create`) get their node
//! certificates from the controller (`IdentityService.Bootstrap`, signed with the
//! lab's CA) and form the overlay.
//!
//! * three agents bootstrap, converge and ping across hosts; the time from each
//!   agent's start to its first lease (`/healthz` = 200) is printed;
//! * each key is mode 0600 in a 0700 directory the agent made; each certificate is
//!   `CN=<node>, O=twill:nodes`, extended key usage clientAuth only, signed by the
//!   CA, valid for the controller's `--node-cert-ttl` (2h); neither the token's
//!   secret nor the key appears in the agent's log;
//! * an agent stopped with SIGTERM and started again keeps its certificate (same
//!   serial) and does not bootstrap again;
//! * twenty more starts of node-b with its key and certificate removed: the median
//!   time from start to first lease with bootstrap is printed;
//! * with a wrong token the agent is refused (UNAUTHENTICATED), keeps retrying with
//!   backoff, does not get healthy and exits cleanly on SIGTERM; a corrected token
//!   file is picked up without a restart.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use twill_tests::certs::{cert_serial, key_belongs, openssl};
use twill_tests::{require_lab, wait_until, Check, Overlay, OverlayConfig, SubnetEnv};

const CONVERGE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(60);
/// The controller's `--node-cert-ttl`.
const NODE_CERT_TTL: Duration = Duration::from_secs(2 * 3600);
const NODE_CERT_TTL_FLAG: &str = "2h";
/// How far an issued lifetime may differ from the TTL (issuers backdate notBefore).
const TTL_SLACK: Duration = Duration::from_secs(10 * 60);
/// The agent's log line for a certificate it got from the controller.
const ISSUED: &str = "node certificate issued";
/// How many times node-b bootstraps from nothing, for the start-to-lease figure.
const FRESH_BOOTSTRAPS: usize = 20;
/// A well-formed token the controller never made.
const WRONG_TOKEN: &str = "zzzzzz.0000000000000000";

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn agents_with_only_a_token_bootstrap_converge_and_keep_their_certificates() {
    let Some(ov) = require_lab(
        "bootstrap",
        Overlay::start(
            OverlayConfig::three_nodes()
                .bootstrap(true)
                .node_cert_ttl(NODE_CERT_TTL_FLAG)
                .start_agents(false),
        ),
    ) else {
        return;
    };
    ov.run_scenario(scenario);
}

fn scenario(ov: &Overlay) -> Result<()> {
    let nodes: Vec<&str> = ov.nodes().iter().map(String::as_str).collect();
    let token = std::fs::read_to_string(ov.bootstrap_token_file(nodes[0]))?
        .trim()
        .to_string();
    for n in &nodes {
        ensure!(
            !ov.node_pki_dir(n).exists(),
            "{n}: {} exists before the agent started",
            ov.node_pki_dir(n).display()
        );
        ensure!(
            !ov.certs_dir().join(format!("node-{n}.crt")).exists(),
            "a node certificate was issued for {n} by hand"
        );
        check_mode(&ov.bootstrap_token_file(n), 0o600)?;
    }

    // 1. Three agents with only the CA certificate and the token get a lease.
    let started: BTreeMap<&str, Instant> = nodes
        .iter()
        .map(|n| {
            let t = Instant::now();
            ov.start_agent(n).map(|()| (*n, t))
        })
        .collect::<Result<_>>()?;
    let to_lease = wait_all_healthy(ov, &started, SETTLE)?;
    println!(
        "bootstrap: agent start to first lease (GET /healthz = 200): {}",
        show_times(&to_lease)
    );

    // 2. They converge and reach each other across the overlay.
    let envs = ov.wait_converged(CONVERGE)?;
    every_pair_pings(ov, &envs, &nodes)?;
    let leased: Vec<String> = ov.leases()?.into_iter().map(|l| l.node_name).collect();
    ensure!(leased == nodes, "twillctl leases lists {leased:?}");

    // 3. What each agent wrote, and what it logged.
    let mut serials = BTreeMap::new();
    for n in &nodes {
        let cert = certificate_is_right(ov, n)?;
        serials.insert(*n, cert.serial);
        let log = current_run_log(ov, n);
        ensure!(
            log.matches(ISSUED).count() == 1,
            "{n}: want one {ISSUED:?} in the log:\n{log}"
        );
        secrets_not_logged(ov, n, &token)?;
    }

    // 4. A restart (SIGTERM, start again) keeps the certificate and does not bootstrap.
    let b = "node-b";
    let status = ov.stop_agent(b).context("SIGTERM to node-b's agent")?;
    ensure!(status.success(), "node-b's agent exited with {status}");
    let t = Instant::now();
    ov.restart_agent(b)?;
    let again = wait_all_healthy(ov, &BTreeMap::from([(b, t)]), SETTLE)?;
    println!(
        "bootstrap: restart of node-b with its certificate to first lease: {}",
        show_times(&again)
    );
    let serial = cert_serial(&ov.node_cert_file(b))?;
    ensure!(
        serial == serials[b],
        "node-b's certificate changed across a restart: serial {} -> {serial}",
        serials[b]
    );
    let log = current_run_log(ov, b);
    ensure!(
        !log.contains(ISSUED) && log.contains("not bootstrapping"),
        "node-b bootstrapped again after a restart:\n{log}"
    );
    ov.wait_converged(SETTLE)?;

    // 5. Start to first lease with nothing but the token, again and again (node-b's
    //    key and certificate removed, and the node revoked, before each start).
    let mut fresh = Vec::new();
    for _ in 0..FRESH_BOOTSTRAPS {
        ensure!(
            ov.stop_agent(b)?.success(),
            "node-b's agent did not exit cleanly"
        );
        std::fs::remove_file(ov.node_cert_file(b))?;
        std::fs::remove_file(ov.node_key_file(b))?;
        // A node that lost its key is alive to the controller (its lease and
        // certificate): a token cannot take its name until an admin revokes it.
        ov.twillctl(&["certs", "revoke", b])?;
        let t = Instant::now();
        ov.restart_agent(b)?;
        fresh.extend(wait_all_healthy(ov, &BTreeMap::from([(b, t)]), SETTLE)?.into_values());
    }
    fresh.sort();
    println!(
        "bootstrap: agent start to first lease with a new key and certificate, {} runs: \
         median {} ms, min {} ms, max {} ms",
        fresh.len(),
        fresh[fresh.len() / 2].as_millis(),
        fresh[0].as_millis(),
        fresh[fresh.len() - 1].as_millis()
    );
    certificate_is_right(ov, b)?;
    ov.wait_converged(SETTLE)?;

    // 6. A wrong token: refused, retried with backoff, never healthy, SIGTERM exits
    //    cleanly; the corrected token file is read again without a restart.
    let c = "node-c";
    ensure!(
        ov.stop_agent(c)?.success(),
        "node-c's agent did not exit cleanly"
    );
    std::fs::remove_file(ov.node_cert_file(c))?;
    ov.twillctl(&["certs", "revoke", c])?;
    ov.write_bootstrap_token(c, WRONG_TOKEN)?;
    ov.restart_agent(c)?;
    let refusals = wait_refusals(ov, c, 2)?;
    ensure!(
        refusals.contains("UNAUTHENTICATED"),
        "node-c's refusals do not say UNAUTHENTICATED:\n{refusals}"
    );
    ensure!(ov.agent_running(c), "node-c's agent exited while refused");
    ensure!(
        !ov.node_cert_file(c).exists(),
        "node-c has a certificate with a wrong token"
    );
    let health = ov.lab().http_get(c, ov.agent_metrics_addr(c), "/healthz")?;
    ensure!(
        health.status != 200,
        "node-c is healthy without a certificate"
    );
    let t = Instant::now();
    let status = ov
        .stop_agent(c)
        .context("SIGTERM to node-c while refused")?;
    ensure!(
        status.success(),
        "node-c's agent exited with {status} on SIGTERM while refused"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "node-c took {:?} to exit on SIGTERM while refused",
        t.elapsed()
    );
    println!(
        "bootstrap: node-c, refused, exited {:?} after SIGTERM",
        t.elapsed()
    );

    ov.restart_agent(c)?;
    wait_refusals(ov, c, 1)?;
    let t = Instant::now();
    ov.write_bootstrap_token(c, &token)?;
    let fixed = wait_all_healthy(ov, &BTreeMap::from([(c, t)]), Duration::from_secs(90))?;
    println!(
        "bootstrap: node-c, token corrected while retrying, to first lease: {}",
        show_times(&fixed)
    );
    let cert = certificate_is_right(ov, c)?;
    ensure!(
        cert.serial != serials[c],
        "node-c's new certificate has the old serial"
    );
    secrets_not_logged(ov, c, &token)?;
    let envs = ov.wait_converged(CONVERGE)?;
    every_pair_pings(ov, &envs, &nodes)?;
    Ok(())
}

// ------------------------------------------------------------------ helpers

/// Waits until every agent in `started` answers `/healthz` with 200; for each, the
/// time from its start to the first 200.
fn wait_all_healthy<'a>(
    ov: &Overlay,
    started: &BTreeMap<&'a str, Instant>,
    timeout: Duration,
) -> Result<BTreeMap<&'a str, Duration>> {
    let mut healthy: BTreeMap<&str, Duration> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for (n, t) in started {
            if healthy.contains_key(n) {
                continue;
            }
            if !ov.agent_running(n) {
                bail!(
                    "the agent of {n} exited; its log ends:\n{}",
                    ov.lab().log_tail(&Overlay::agent_proc(n), 30)
                );
            }
            match ov.lab().http_get(n, ov.agent_metrics_addr(n), "/healthz") {
                Ok(r) if r.status == 200 => {
                    healthy.insert(n, t.elapsed());
                }
                Ok(r) => waiting.push(format!("{n}: HTTP {} {}", r.status, r.body.trim())),
                Err(e) => waiting.push(format!("{n}: {e:#}")),
            }
        }
        if waiting.is_empty() {
            return Ok(healthy);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for the agents to be healthy: {}",
                waiting.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn show_times(times: &BTreeMap<&str, Duration>) -> String {
    times
        .iter()
        .map(|(n, d)| format!("{n} {} ms", d.as_millis()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The log of the agent's current run (after the lab's last start marker).
fn current_run_log(ov: &Overlay, node: &str) -> String {
    let log = ov.lab().log(&Overlay::agent_proc(node));
    match log.rfind("=== twill lab: start #") {
        Some(i) => log[i..].to_string(),
        None => log,
    }
}

/// Waits until the current run of `node`'s agent has logged `n` refused bootstrap
/// attempts; those lines.
fn wait_refusals(ov: &Overlay, node: &str, n: usize) -> Result<String> {
    wait_until(
        SETTLE,
        &format!("{node}'s agent to be refused {n} times"),
        || {
            if !ov.agent_running(node) {
                return Check::Fatal(format!(
                    "the agent of {node} exited:\n{}",
                    ov.lab().log_tail(&Overlay::agent_proc(node), 30)
                ));
            }
            let lines: Vec<String> = current_run_log(ov, node)
                .lines()
                .filter(|l| l.contains("did not issue a node certificate"))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                Check::Ready(lines.join("\n"))
            } else {
                Check::NotYet(format!("{} refusals so far", lines.len()))
            }
        },
    )
}

fn secrets_not_logged(ov: &Overlay, node: &str, token: &str) -> Result<()> {
    let log = ov.lab().log(&Overlay::agent_proc(node));
    let secret = token.split_once('.').map(|(_, s)| s).unwrap_or(token);
    ensure!(
        !log.contains(secret),
        "{node}'s log contains the token's secret"
    );
    ensure!(!log.contains("PRIVATE KEY"), "{node}'s log contains a key");
    let key = std::fs::read_to_string(ov.node_key_file(node))?;
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    ensure!(
        !log.contains(&body[..body.len().min(40)]),
        "{node}'s log contains its key"
    );
    Ok(())
}

/// What `openssl x509` says of a certificate.
struct CertFacts {
    serial: String,
}

/// The node's key and certificate files are as the agent must write them and the
/// controller must issue them.
fn certificate_is_right(ov: &Overlay, node: &str) -> Result<CertFacts> {
    let (cert, key) = (ov.node_cert_file(node), ov.node_key_file(node));
    check_mode(&key, 0o600)?;
    check_mode(&ov.node_pki_dir(node), 0o700)?;
    check_mode(&cert, 0o644)?;
    let out = openssl(&[
        "x509",
        "-noout",
        "-subject",
        "-ext",
        "extendedKeyUsage",
        "-dates",
        "-in",
        &cert.display().to_string(),
    ])?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("{node}: no {name} in openssl's output:\n{out}"))
    };
    let mut subject: Vec<String> = field("subject=")?
        .split(',')
        .map(|part| part.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect();
    subject.sort();
    ensure!(
        subject == [format!("CN={node}"), "O=twill:nodes".into()],
        "{node}: certificate subject {subject:?}, want CN={node}, O=twill:nodes"
    );
    let eku = out
        .lines()
        .skip_while(|l| !l.contains("X509v3 Extended Key Usage"))
        .nth(1)
        .map(str::trim)
        .with_context(|| format!("{node}: no extended key usage:\n{out}"))?;
    ensure!(
        eku == "TLS Web Client Authentication",
        "{node}: extended key usage {eku:?}, want TLS Web Client Authentication only"
    );
    let not_before = openssl_time(field("notBefore=")?)?;
    let not_after = openssl_time(field("notAfter=")?)?;
    let lifetime = not_after
        .duration_since(not_before)
        .with_context(|| format!("{node}: notAfter before notBefore"))?;
    ensure!(
        lifetime + Duration::from_secs(60) >= NODE_CERT_TTL && lifetime <= NODE_CERT_TTL + TTL_SLACK,
        "{node}: certificate lifetime {lifetime:?}, want --node-cert-ttl {NODE_CERT_TTL:?} (within {TTL_SLACK:?})"
    );
    let left = not_after
        .duration_since(SystemTime::now())
        .with_context(|| format!("{node}: certificate already expired"))?;
    ensure!(
        left <= NODE_CERT_TTL + Duration::from_secs(60) && left + TTL_SLACK >= NODE_CERT_TTL,
        "{node}: certificate expires in {left:?}, want about {NODE_CERT_TTL:?}"
    );
    let ca = ov.certs_dir().join("ca.crt").display().to_string();
    let verified = openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-purpose",
        "sslclient",
        &cert.display().to_string(),
    ])?;
    ensure!(
        verified.trim().ends_with(": OK"),
        "{node}: the certificate does not verify with the CA: {verified}"
    );
    ensure!(
        key_belongs(&cert, &key)?,
        "{node}: the key file does not belong to the certificate"
    );
    Ok(CertFacts {
        serial: cert_serial(&cert)?,
    })
}

/// Parses openssl's `Dec  2 05:37:00 2025 GMT`.
fn openssl_time(s: &str) -> Result<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [mon, day, hms, year, "GMT"] = parts[..] else {
        bail!("cannot parse openssl time {s:?}");
    };
    let month = MONTHS
        .iter()
        .position(|m| *m == mon)
        .with_context(|| format!("month in {s:?}"))? as i64
        + 1;
    let day: i64 = day.parse()?;
    let year: i64 = year.parse()?;
    let hms: Vec<i64> = hms
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("time in {s:?}"))?;
    ensure!(hms.len() == 3, "time in {s:?}");
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs)?))
}

fn check_mode(path: &Path, want: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777;
    ensure!(
        mode == want,
        "{} has mode {mode:o}, want {want:o}",
        path.display()
    );
    Ok(())
}

fn every_pair_pings(
    ov: &Overlay,
    envs: &BTreeMap<String, SubnetEnv>,
    nodes: &[&str],
) -> Result<()> {
    for from in nodes {
        for to in nodes.iter().filter(|t| *t != from) {
            let env = &envs[*to];
            ov.lab().ping(from, env.flannel_addr()).with_context(|| {
                format!("{from} -> {to} ({}) over the overlay", env.flannel_addr())
            })?;
        }
    }
    Ok(())
}

#[test]
fn openssl_times_parse() {
    assert_eq!(
        openssl_time("Jan  1 00:00:00 1970 GMT").unwrap(),
        UNIX_EPOCH
    );
    assert_eq!(
        openssl_time("Dec  2 05:37:09 2025 GMT").unwrap(),
        UNIX_EPOCH + Duration::from_secs(1_764_653_829)
    );
    assert!(openssl_time("Dec 2 2025").is_err());
}
