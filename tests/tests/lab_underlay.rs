//! The lab itself, without any Twill binary: namespaces, the underlay bridge, hosts
//! that reach each other and the gateway, processes, and a clean teardown.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::Ipv4Addr;
use std::time::Duration;

use twill_tests::{cmd, require_lab, wait_until, Lab, LabConfig};

fn netns_exists(name: &str) -> bool {
    cmd::run(&["ip", "netns", "list"])
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn hosts_reach_each_other_over_the_underlay_and_everything_is_cleaned_up() {
    let Some(lab) = require_lab("lab_underlay", Lab::new(LabConfig::new(["a", "b", "c"]))) else {
        return;
    };

    // names stay within the kernel's 15 characters and are unique to this lab
    let mut namespaces = vec![lab.underlay_netns().to_string()];
    for h in lab.hosts() {
        assert!(h.netns.len() <= 15, "{}", h.netns);
        assert!(h.netns.starts_with("tw-"), "{}", h.netns);
        namespaces.push(h.netns.clone());
    }
    for ns in &namespaces {
        assert!(netns_exists(ns), "namespace {ns} missing");
    }

    // every host: eth0 with its underlay address and MTU, lo up, default route via
    // the gateway on the bridge
    for h in lab.hosts() {
        let eth0 = lab.link(&h.name, "eth0").unwrap();
        assert_eq!(eth0.mtu, 1500);
        assert!(eth0.is_up(), "{eth0:?}");
        assert!(lab.link(&h.name, "lo").unwrap().is_up());
        let routes = lab.all_routes(&h.name).unwrap();
        let default = routes
            .iter()
            .find(|r| r.dst == "default")
            .unwrap_or_else(|| panic!("no default route on {}: {routes:?}", h.name));
        assert_eq!(
            default.gateway.as_deref(),
            Some(&*lab.gateway().to_string())
        );
        assert_eq!(default.dev.as_deref(), Some("eth0"));
        assert!(lab.underlay().contains(&h.ip));
        let addrs = lab
            .exec(&h.name, &["ip", "-br", "-4", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(addrs.contains(&h.ip.to_string()), "{addrs}");
    }

    // every host pings the gateway and every other host
    for from in lab.hosts() {
        lab.ping(&from.name, lab.gateway()).unwrap();
        for to in lab.hosts().iter().filter(|t| t.name != from.name) {
            lab.ping(&from.name, to.ip).unwrap();
        }
    }

    // nothing outside the lab is reachable: no route beyond the underlay gateway
    let out = lab
        .try_exec("a", &["ping", "-c", "1", "-W", "1", "198.19.0.1"])
        .unwrap();
    assert!(!out.success(), "traffic left the lab: {out}");

    // the lab's own bridge helper, and an HTTP server reachable only inside the lab
    lab.add_bridge("b", "pods0", "10.250.0.1/24".parse().unwrap())
        .unwrap();
    lab.exec(
        "a",
        &[
            "ip",
            "route",
            "add",
            "10.250.0.0/24",
            "via",
            &lab.host("b").ip.to_string(),
        ],
    )
    .unwrap();
    lab.ping("a", Ipv4Addr::new(10, 250, 0, 1)).unwrap();

    // processes: start, stop with SIGTERM, restart, kill
    let dir = lab.host("c").dir.clone();
    std::fs::write(dir.join("index.html"), "hello from c\n").unwrap();
    // (a plain TCPServer: http.server's HTTPServer would look up the host's name in
    // DNS, which has no answer inside the lab)
    let server = "import http.server, socketserver, sys, os\n\
                  os.chdir(sys.argv[2])\n\
                  socketserver.TCPServer.allow_reuse_address = True\n\
                  socketserver.TCPServer((sys.argv[1], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()\n";
    lab.spawn(
        "c",
        "http",
        std::path::Path::new("python3"),
        vec![
            "-c".into(),
            server.into(),
            lab.host("c").ip.to_string(),
            dir.display().to_string(),
        ],
    )
    .unwrap();
    let addr = (lab.host("c").ip, 8080).into();
    let body = wait_until(Duration::from_secs(20), "the HTTP server on c", || {
        lab.http_get("a", addr, "/index.html")
    })
    .unwrap();
    assert_eq!(body.status, 200);
    assert_eq!(body.body, "hello from c\n");

    let status = lab.stop("http").unwrap();
    assert!(!lab.is_running("http"), "{status}");
    lab.restart("http").unwrap();
    assert!(lab.is_running("http"));
    wait_until(Duration::from_secs(20), "the restarted HTTP server", || {
        lab.http_get("b", addr, "/index.html")
    })
    .unwrap();
    lab.kill("http").unwrap();
    assert!(!lab.is_running("http"));
    assert!(lab.log("http").contains("start #2"));

    // a process left running is killed by the guard
    lab.restart("http").unwrap();
    let pid = lab.pid("http").unwrap();
    drop(lab);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.contains("State:\tZ"))
                .unwrap_or(true),
        "process {pid} survived the lab"
    );
    for ns in &namespaces {
        assert!(!netns_exists(ns), "namespace {ns} left behind");
    }
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn two_labs_run_side_by_side() {
    let Some(one) = require_lab("lab_underlay (parallel)", Lab::new(LabConfig::new(["x"]))) else {
        return;
    };
    let Some(two) = require_lab("lab_underlay (parallel)", Lab::new(LabConfig::new(["x"]))) else {
        return;
    };
    assert_ne!(one.id(), two.id());
    assert_ne!(one.host("x").netns, two.host("x").netns);
    one.ping("x", one.gateway()).unwrap();
    two.ping("x", two.gateway()).unwrap();
}

#[test]
fn a_failing_wait_names_what_it_waited_for() {
    let err = wait_until(Duration::from_millis(300), "a route to nowhere", || {
        Err::<(), _>("routes: []")
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("a route to nowhere") && msg.contains("routes: []"),
        "{msg}"
    );
}
