//! `make demo`: a three-host Twill overlay in network namespaces, shown working.
//!
//! Builds the lab (a controller host and hosts node-a, node-b, node-c on one underlay
//! bridge), starts twill-controller and an agent per host, waits until every host has
//! a route to every other host's pod subnet, prints the lease table (`twillctl
//! leases`), each host's subnet.env and Twill routes, gives every host a pod bridge
//! holding its gateway address, pings each host's gateway from every other host, and
//! cleans up (also on Ctrl-C). Exits non-zero if any ping fails.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_tests::{cleanup_all_labs, LabError, Overlay, OverlayConfig, FLANNEL_DEV};

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
            println!("\ntwill-demo: every ping succeeded; cleaned up.");
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
    let ov = match Overlay::start(OverlayConfig::three_nodes()) {
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

    heading("each host gets a pod bridge pods0 holding its subnet's gateway address");
    for n in ov.nodes() {
        let env = &envs[n];
        lab.add_bridge(n, "pods0", env.subnet)?;
        println!("{n}: pods0 {}", env.subnet);
    }

    heading("ping from each host (rows) to each host's pod gateway (columns)");
    let nodes = ov.nodes();
    print!("{:<10}", "from \\ to");
    for to in nodes {
        print!(" {:>18}", format!("{to} {}", envs[to].gateway()));
    }
    println!();
    let mut all_ok = true;
    for from in nodes {
        print!("{from:<10}");
        for to in nodes {
            let cell = if from == to {
                "-".to_string()
            } else {
                match lab.ping(from, envs[to].gateway()) {
                    Ok(()) => "ok".into(),
                    Err(e) => {
                        all_ok = false;
                        eprintln!("  {e:#}");
                        "FAIL".into()
                    }
                }
            };
            print!(" {cell:>18}");
        }
        println!();
    }
    Ok(all_ok)
}
