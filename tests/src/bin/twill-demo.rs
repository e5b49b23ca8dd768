//! `make demo`: a three-host Twill overlay in network namespaces, shown working.
//!
//! Builds the lab (a controller host and hosts node-a, node-b, node-c on one underlay
//! bridge), starts twill-controller with a signing CA and an agent per host with only
//! the CA certificate and a bootstrap token (`twillctl token create`): each agent makes
//! its own key and gets its node certificate from the controller. Waits until every
//! host has a route to every other host's pod subnet, prints the token id and the
//! issued certificates (`twillctl certs issued`), the lease table (`twillctl
//! leases`), each host's subnet.env and Twill routes, attaches two pods per host with
//! the real twill-cni (as a container runtime would), pings every pod from every other
//! pod, and cleans up (also on Ctrl-C). Exits non-zero if any ping fails.

use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_tests::{cleanup_all_labs, pods, LabError, Overlay, OverlayConfig, FLANNEL_DEV};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    if let Err(e) = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ntwill-demo: interrupted: stopping processes and deleting namespaces");
        cleanup_all_labs();
        std::process::exit(130);
    }) {
        eprintln!("twill-demo: warning: cannot handle Ctrl-C: {e}");
    }
    let result = run();
    if INTERRUPTED.load(Ordering::SeqCst) {
        // the handler is cleaning up (or has); it exits with 130
        std::thread::park();
    }
    match result {
        Ok(true) => {
            println!("\ntwill-demo: every pod reached every other pod, across hosts; cleaned up.");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!(
                "\ntwill-demo: FAILED: some pings failed (see the matrix above); cleaned up."
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\ntwill-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn heading(s: &str) {
    println!("\n== {s}");
}

fn run() -> Result<bool> {
    heading("Twill demo: a controller and three hosts in network namespaces");
    let started = Instant::now();
    // Zero-touch node identity: no node certificates are made; the agents bootstrap.
    let ov = match Overlay::start(OverlayConfig::three_nodes().bootstrap(true)) {
        Ok(ov) => ov,
        Err(LabError::Unavailable(why)) => {
            bail!("the demo needs root and network namespaces: {why}")
        }
        Err(LabError::Failed(e)) => return Err(e),
    };
    let lab = ov.lab();
    println!(
        "underlay {} on bridge br0 (namespace {}), gateway {}",
        lab.underlay(),
        lab.underlay_netns(),
        lab.gateway()
    );
    println!("{:<12} {:<14} {:<16} role", "host", "namespace", "address");
    for h in lab.hosts() {
        let role = if h.name == twill_tests::CONTROLLER_HOST {
            "twill-controller"
        } else {
            "twill-agent"
        };
        println!("{:<12} {:<14} {:<16} {role}", h.name, h.netns, h.ip);
    }
    println!(
        "lab files and logs: {} (deleted at exit unless TWILL_LAB_KEEP=1)",
        lab.dir().display()
    );
    let token_id = ov
        .nodes()
        .first()
        .and_then(|n| std::fs::read_to_string(ov.bootstrap_token_file(n)).ok())
        .and_then(|t| t.trim().split('.').next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    println!(
        "zero-touch node identity: the controller signs node certificates \
         (--signing-cert/--signing-key); each agent starts with only the CA certificate \
         {} and bootstrap token {token_id} (`twillctl token create --ttl 1h`; the secret \
         is not shown) in --bootstrap-token-file, and makes its own key",
        ov.certs_dir().join("ca.crt").display()
    );

    let result = show(&ov, started);
    match &result {
        Ok(true) => {}
        _ => lab.dump(),
    }
    result
}

fn show(ov: &Overlay, started: Instant) -> Result<bool> {
    let lab = ov.lab();
    heading("waiting for every host to route to every other host's subnet");
    let envs = ov
        .wait_converged(Duration::from_secs(60))
        .context("the overlay did not converge")?;
    println!("converged {:.1?} after start", started.elapsed());

    heading(&format!(
        "node certificates the controller issued with the token: twillctl --controller {} certs issued",
        ov.controller_url()
    ));
    print!(
        "{}",
        ov.twillctl(&["certs", "issued"])
            .context("twillctl certs issued")?
    );
    for n in ov.nodes() {
        let (cert, key) = (ov.node_cert_file(n), ov.node_key_file(n));
        let mode = std::fs::metadata(&key)
            .with_context(|| format!("{n}: the agent wrote no key {}", key.display()))?
            .permissions()
            .mode()
            & 0o777;
        let subject = twill_tests::cmd::run(&[
            "openssl",
            "x509",
            "-noout",
            "-subject",
            "-enddate",
            "-in",
            &cert.display().to_string(),
        ])
        .map(|out| out.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("(openssl: {e:#})"));
        println!(
            "{n}: {} (key {}, mode {mode:04o}, made on the node): {subject}",
            cert.display(),
            key.display()
        );
    }

    heading(&format!(
        "lease table: twillctl --controller {} leases",
        ov.controller_url()
    ));
    print!("{}", ov.leases_table().context("twillctl leases")?);

    for n in ov.nodes() {
        heading(&format!("{n}: {}", ov.subnet_file(n).display()));
        print!(
            "{}",
            std::fs::read_to_string(ov.subnet_file(n)).context("reading subnet.env")?
        );
        heading(&format!(
            "{n}: ip route show proto 74 (Twill's routes); {FLANNEL_DEV} MAC {}",
            ov.vtep_mac(n)?
        ));
        print!("{}", lab.exec(n, &["ip", "route", "show", "proto", "74"])?);
    }

    heading("two pods per host, attached by twill-cni (delegating to bridge + host-local), as a container runtime would");
    let cni_bin = ov.bins().path("twill-cni");
    let mut pods = Vec::new();
    for (h, n) in ov.nodes().iter().enumerate() {
        for i in 0..2 {
            let (pod, _) =
                pods::attach(ov, &cni_bin, n, &format!("{h}{i}")).with_context(|| {
                    format!(
                        "attaching a pod on {n} (are containernetworking-plugins installed in {}?)",
                        pods::CNI_PATH
                    )
                })?;
            println!(
                "{n}: pod {:<14} eth0 {:<15} (subnet {})",
                pod.netns,
                pod.addr,
                envs[n].subnet_net()
            );
            pods.push(pod);
        }
    }

    heading("ping from each pod (rows) to each pod (columns)");
    print!("{:<16}", "from \\ to");
    for to in &pods {
        print!(" {:>12}", to.addr.to_string());
    }
    println!();
    let mut all_ok = true;
    for from in &pods {
        print!("{:<16}", format!("{} {}", from.node, from.addr));
        for to in &pods {
            let cell = if from.netns == to.netns {
                "-".to_string()
            } else {
                let addr = to.addr.to_string();
                match pods::exec_in(
                    &from.netns,
                    &["ping", "-n", "-q", "-c", "1", "-W", "2", &addr],
                ) {
                    Ok(out) if out.success => "ok".into(),
                    Ok(out) => {
                        all_ok = false;
                        eprintln!(
                            "  {} -> {addr}: {}{}",
                            from.addr,
                            out.stdout.trim(),
                            out.stderr.trim()
                        );
                        "FAIL".into()
                    }
                    Err(e) => {
                        all_ok = false;
                        eprintln!("  {e:#}");
                        "FAIL".into()
                    }
                }
            };
            print!(" {cell:>12}");
        }
        println!();
    }
    Ok(all_ok)
}
