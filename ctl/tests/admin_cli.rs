//! `twillctl` as a process against a real `twill-controller`: every admin command, its
//! output formats, its errors, and connection settings from the config file.
//!
//! Needs `cargo build --workspace --bins` first (the controller is another crate's binary).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;
use twill_proto::lease_event::Type as EventType;

const LINE_DEADLINE: Duration = Duration::from_secs(10);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// The rows of a table (header excluded), split on whitespace.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect()
}

/// A controller with three leases: node-a, node-b, node-c.
fn three_leases(pki: &Pki) -> Controller {
    let ctl = Controller::for_pki(pki, NET_CONF);
    for (i, n) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        acquire_as(&ctl, pki, n, &format!("192.168.50.{}", 10 + i));
    }
    ctl
}

/// `leases` (table, wide, json, yaml, filters, paging) and `lease get`.
#[test]
fn list_and_get_leases() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = three_leases(&pki);

    let table = admin(&ctl, &pki, &["leases"]);
    println!("twillctl leases:\n{table}");
    assert_eq!(
        header(&table),
        [
            "NODE",
            "SUBNET",
            "PUBLIC-IP",
            "VTEP-MAC",
            "EXPIRES-IN",
            "RESERVED"
        ]
    );
    let table_rows = rows(&table);
    let names: Vec<&str> = table_rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["node-a", "node-b", "node-c"], "{table}");

    // JSON parses and says what the table says.
    let doc = json(&admin(&ctl, &pki, &["leases", "-o", "json"]));
    let leases = doc["leases"].as_array().unwrap();
    assert_eq!(leases.len(), table_rows.len());
    for (l, row) in leases.iter().zip(&table_rows) {
        assert_eq!(l["node_name"], row[0]);
        assert_eq!(l["subnet"], row[1]);
        assert_eq!(l["public_ip"], row[2]);
        assert_eq!(l["vtep_mac"], row[3]);
        assert_eq!(l["reserved"], row[5] == "yes");
        assert_eq!(row[5], "no");
        assert!(row[4].starts_with("23h") || row[4] == "24h", "{table}");
        assert_eq!(l["backend_type"], "vxlan");
        assert_eq!(l["vni"], 1);
    }
    assert!(doc["revision"].as_u64().unwrap() >= 3);

    // Paging: one lease per call still lists them all, in order.
    let paged = json(&admin(
        &ctl,
        &pki,
        &["leases", "-o", "json", "--page-size", "1"],
    ));
    assert_eq!(paged["leases"], doc["leases"]);

    let wide = admin(&ctl, &pki, &["leases", "-o", "wide"]);
    assert_eq!(
        header(&wide),
        [
            "NODE",
            "SUBNET",
            "PUBLIC-IP",
            "VTEP-MAC",
            "EXPIRES-IN",
            "RESERVED",
            "VNI",
            "REVISION"
        ]
    );

    let yaml = admin(&ctl, &pki, &["leases", "-o", "yaml"]);
    assert!(yaml.contains("\n- node_name: \"node-b\"\n"), "{yaml}");
    assert!(yaml.contains("\n  reserved: false\n"), "{yaml}");

    // Filters.
    let b_subnet = leases[1]["subnet"].as_str().unwrap();
    let only_b = admin(&ctl, &pki, &["leases", "--subnet", b_subnet]);
    assert_eq!(rows(&only_b).len(), 1, "{only_b}");
    assert_eq!(rows(&only_b)[0][0], "node-b");
    let all = admin(&ctl, &pki, &["leases", "--subnet", "10.244.0.0/16"]);
    assert_eq!(rows(&all).len(), 3, "{all}");
    let prefixed = admin(&ctl, &pki, &["leases", "--prefix", "node-c"]);
    assert_eq!(rows(&prefixed).len(), 1, "{prefixed}");
    let out = ctl_as(
        &ctl,
        &pki,
        &pki.admin,
        &["leases", "--subnet", "10.99.0.0/16"],
    );
    assert_eq!(ok(&out), "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No leases found in 10.99.0.0/16"));
    let out = ctl_as(&ctl, &pki, &pki.admin, &["leases", "--subnet", "10.99.0.0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed CIDR is a usage error"
    );

    // lease get.
    let one = admin(&ctl, &pki, &["lease", "get", "node-b"]);
    assert_eq!(header(&one), header(&table));
    // EXPIRES-IN may tick over between the two calls (24h -> 23h59m): compare the rest.
    let one_row = &rows(&one)[0];
    assert_eq!(rows(&one).len(), 1, "{one}");
    assert_eq!(one_row[..4], table_rows[1][..4]);
    assert_eq!(one_row[5..], table_rows[1][5..]);
    assert!(
        one_row[4].starts_with("23h") || one_row[4] == "24h",
        "{one}"
    );
    let one = json(&admin(
        &ctl,
        &pki,
        &["lease", "get", "node-b", "-o", "json"],
    ));
    assert_eq!(one, leases[1]);
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["lease", "get", "node-x"]),
        &ctl,
    );
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
}

/// `lease revoke`: the lease goes, and an agent watching the table sees the DELETE.
#[test]
fn revoke_reaches_watching_agent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = three_leases(&pki);
    let b = json(&admin(
        &ctl,
        &pki,
        &["lease", "get", "node-b", "-o", "json"],
    ));
    runtime().block_on(async {
        let (mut stream, snapshot) = open_watch(&ctl, &pki, "node-a").await;
        assert!(snapshot.reset);
        assert_eq!(snapshot.events.len(), 3);

        let out = {
            let (ctl, pki) = (&ctl, &pki);
            // twillctl runs on a thread while this runtime keeps the stream flowing.
            std::thread::scope(|s| {
                s.spawn(|| admin(ctl, pki, &["lease", "revoke", "node-b"]))
                    .join()
                    .unwrap()
            })
        };
        assert_eq!(
            out,
            format!(
                "lease/node-b revoked (subnet {})\n",
                b["subnet"].as_str().unwrap()
            )
        );
        let deadline = Instant::now() + LINE_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, stream.message())
                .await
                .expect("a DELETE event within the deadline")
                .expect("watch stream error")
                .expect("watch stream ended");
            let delete = msg.events.iter().find(|e| {
                e.r#type == EventType::Delete as i32
                    && e.lease.as_ref().is_some_and(|l| l.node_name == "node-b")
            });
            if let Some(e) = delete {
                assert_eq!(e.lease.as_ref().unwrap().subnet, b["subnet"]);
                break;
            }
        }
    });
    let names: Vec<String> = rows(&admin(&ctl, &pki, &["leases"]))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(names, ["node-a", "node-c"]);
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["lease", "revoke", "node-b"]),
        &ctl,
    );
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    // -o json prints the revoked lease.
    let c = json(&admin(
        &ctl,
        &pki,
        &["lease", "revoke", "node-c", "-o", "json"],
    ));
    assert_eq!(c["node_name"], "node-c");
    assert!(c["subnet"].as_str().unwrap().starts_with("10.244."));
}

/// `reserve` / `unreserve` / `reservations` on a network of two subnets: the reserved
/// one is neither handed out on request nor by allocation, and goes to its node.
#[test]
fn reservations_keep_a_subnet_for_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let tiny = r#"{"Network": "10.10.0.0/24", "SubnetLen": 26, "SubnetMin": "10.10.0.128",
                   "SubnetMax": "10.10.0.192", "Backend": {"Type": "vxlan"}}"#;
    let ctl = Controller::for_pki(&pki, tiny);
    let (free, kept) = ("10.10.0.128/26", "10.10.0.192/26");

    assert_eq!(
        admin(&ctl, &pki, &["reserve", "node-r", kept]),
        format!("reservation/node-r created (subnet {kept})\n")
    );
    let out = ctl_as(&ctl, &pki, &pki.admin, &["reservations"]);
    assert_eq!(ok(&out), format!("NODE     SUBNET\nnode-r   {kept}\n"));
    // Someone else may not reserve it too.
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["reserve", "node-x", kept]),
        &ctl,
    );
    assert!(err.starts_with("error: FAILED_PRECONDITION: "), "{err}");
    let err = failed(
        &ctl_as(
            &ctl,
            &pki,
            &pki.admin,
            &["reserve", "node-x", "10.99.0.0/26"],
        ),
        &ctl,
    );
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");

    let rt = runtime();
    // Asked for by another node: it gets the other subnet.
    let a = rt
        .block_on(try_acquire_as(&ctl, &pki, "node-a", "192.168.50.10", kept))
        .unwrap();
    assert_eq!(a.subnet, free);
    // Allocation with only the reserved subnet left: out of subnets, not the reserved one.
    match rt.block_on(try_acquire_as(&ctl, &pki, "node-b", "192.168.50.11", "")) {
        Err(s) => println!("node-b refused as expected: {s:?}"),
        Ok(l) => panic!("node-b was given {} on a full network", l.subnet),
    }
    let st = json(&admin(&ctl, &pki, &["status", "-o", "json"]));
    assert_eq!(st["subnets_total"], 2, "{st}");
    assert_eq!(st["subnets_used"], 1, "{st}");
    assert_eq!(st["subnets_free"], 0, "{st}");
    assert_eq!(st["subnets_reserved"], 1, "{st}");
    // The node with the reservation gets it.
    let r = rt
        .block_on(try_acquire_as(&ctl, &pki, "node-r", "192.168.50.12", ""))
        .unwrap();
    assert_eq!(r.subnet, kept);

    let table = admin(&ctl, &pki, &["leases"]);
    println!("{table}");
    let reserved: Vec<(String, String)> = rows(&table)
        .into_iter()
        .map(|r| (r[0].clone(), r[5].clone()))
        .collect();
    assert_eq!(
        reserved,
        [
            ("node-a".to_string(), "no".to_string()),
            ("node-r".to_string(), "yes".to_string())
        ]
    );
    let wide = admin(&ctl, &pki, &["reservations", "-o", "wide"]);
    assert_eq!(
        wide,
        format!("NODE     SUBNET           IN-USE\nnode-r   {kept}   yes\n")
    );
    let doc = json(&admin(&ctl, &pki, &["reservations", "-o", "json"]));
    assert_eq!(
        doc,
        serde_json::json!({"reservations": [{"node_name": "node-r", "network": "default", "subnet": kept, "in_use": true}]})
    );

    // Unreserve: the lease stays; once it is revoked the subnet is free for anyone.
    let un = json(&admin(&ctl, &pki, &["unreserve", "node-r", "-o", "json"]));
    assert_eq!(
        un,
        serde_json::json!({"node_name": "node-r", "network": "default", "subnet": kept})
    );
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["unreserve", "node-r"]),
        &ctl,
    );
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
    let out = ctl_as(&ctl, &pki, &pki.admin, &["reservations"]);
    assert_eq!(ok(&out), "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No reservations found."));
    let leases = json(&admin(&ctl, &pki, &["leases", "-o", "json"]));
    assert_eq!(leases["leases"][1]["reserved"], false);
    admin(&ctl, &pki, &["lease", "revoke", "node-r"]);
    let b = rt
        .block_on(try_acquire_as(&ctl, &pki, "node-b", "192.168.50.11", ""))
        .unwrap();
    assert_eq!(b.subnet, kept);
}

/// Node certificates are refused by every admin command with PERMISSION_DENIED.
#[test]
fn non_admin_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    acquire_as(&ctl, &pki, "node-a", "192.168.50.10");
    let commands: [&[&str]; 9] = [
        &["status"],
        &["leases"],
        &["lease", "get", "node-a"],
        &["lease", "revoke", "node-a"],
        &["reserve", "node-a", "10.244.9.0/24"],
        &["unreserve", "node-a"],
        &["reservations"],
        &["config", "-o", "json"],
        &["watch"],
    ];
    for args in commands {
        let out = ctl_as(&ctl, &pki, &pki.node, args);
        let err = failed(&out, &ctl);
        assert!(
            err.starts_with("error: PERMISSION_DENIED: "),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // Nothing changed.
    let l = json(&admin(
        &ctl,
        &pki,
        &["lease", "get", "node-a", "-o", "json"],
    ));
    assert_eq!(l["node_name"], "node-a");
}

/// `status` shows capacity and a connected watcher.
#[test]
fn status_shows_connected_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = three_leases(&pki);
    runtime().block_on(async {
        let (_stream, _) = open_watch(&ctl, &pki, "node-b").await;
        let (table, doc) = {
            let (ctl, pki) = (&ctl, &pki);
            std::thread::scope(|s| {
                s.spawn(|| {
                    (
                        admin(ctl, pki, &["status"]),
                        json(&admin(ctl, pki, &["status", "-o", "json"])),
                    )
                })
                .join()
                .unwrap()
            })
        };
        println!("twillctl status:\n{table}");
        assert!(table.starts_with("Version:"), "{table}");
        assert!(
            table.contains("\nSubnets:      255 total, 3 used, 252 free, 0 reserved\n"),
            "{table}"
        );
        assert!(table.contains("\nAgents:       1 connected\n"), "{table}");
        let agents = table.split("\n\n").nth(1).expect("agent table");
        assert_eq!(
            header(agents),
            [
                "NAME",
                "CONNECTED",
                "LAST-SEEN",
                "REVISION",
                "LAG",
                "CERT-EXPIRES"
            ]
        );
        let r = &rows(agents)[0];
        assert_eq!(r[0], "node-b", "{table}");
        assert!(r[1].ends_with('s'), "{table}");
        assert_eq!(r[4], "0", "{table}");
        // The test PKI's node certificates last two days, less the seconds gone by.
        assert!(r[5] == "2d" || r[5].starts_with("47h"), "{table}");
        assert_eq!(doc["subnets_total"], 255);
        assert_eq!(doc["subnets_used"], 3);
        assert_eq!(doc["revision"], r[3].parse::<u64>().unwrap());
        assert_eq!(doc["agents"][0]["name"], "node-b");
        assert_eq!(doc["agents"][0]["revision_lag"], 0);
        let not_after = doc["agents"][0]["cert_not_after_unix"].as_i64().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now + 47 * 3600..=now + 48 * 3600).contains(&not_after),
            "two days from when the certificate was made: {doc}"
        );
        assert!(doc["agents"][0]["cert_not_after"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert!(!doc["version"].as_str().unwrap().is_empty());
        assert!(doc["store_size_bytes"].as_u64().is_some());
    });
    // The stream is closed: nobody is connected any more.
    let deadline = Instant::now() + LINE_DEADLINE;
    loop {
        let doc = json(&admin(&ctl, &pki, &["status", "-o", "json"]));
        if doc["agents"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "watcher still listed: {doc}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `config` prints the effective network configuration.
#[test]
fn config_prints_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    let table = admin(&ctl, &pki, &["config"]);
    println!("twillctl config:\n{table}");
    assert_eq!(header(&table), ["FIELD", "VALUE"]);
    assert!(
        table.contains("\nNetwork                 10.244.0.0/16\n"),
        "{table}"
    );
    assert!(
        table.contains("\nBackend.Type            vxlan\n"),
        "{table}"
    );
    assert!(table.contains("\nLeaseTTL                24h\n"), "{table}");
    let doc = json(&admin(&ctl, &pki, &["config", "-o", "json"]));
    assert_eq!(doc["network"], "10.244.0.0/16");
    assert_eq!(doc["subnet_len"], 24);
    assert_eq!(doc["vni"], 1);
    assert_eq!(doc["lease_ttl_seconds"], 86_400);
    assert_eq!(json(doc["net_conf_json"].as_str().unwrap()), json(NET_CONF));
    let yaml = admin(&ctl, &pki, &["config", "-o", "yaml"]);
    assert!(
        yaml.starts_with("network: \"10.244.0.0/16\"\nsubnet_len: 24\n"),
        "{yaml}"
    );
}

/// `watch -o json` prints an event when a lease is acquired, and exits 0 on SIGTERM;
/// the table form has a header, a RESET line and one line per event.
#[test]
fn watch_prints_events() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    acquire_as(&ctl, &pki, "node-a", "192.168.50.10");

    let spawn = |format: &str| {
        let mut args = conn_args(&ctl.url(), &pki.ca, &pki.admin);
        // A short call timeout must not cut the stream.
        if let Some(t) = args.last_mut() {
            *t = "1s".into();
        }
        twillctl_cmd()
            .args(&args)
            .args(["watch", "-o", format])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twillctl watch")
    };

    let mut child = spawn("json");
    let lines = Lines::new(child.stdout.take().unwrap());
    let reset = json(&lines.until(LINE_DEADLINE, "RESET", |l| l.contains("RESET")));
    assert_eq!(reset["type"], "RESET");
    let first = json(&lines.next(LINE_DEADLINE).expect("the snapshot's PUT"));
    assert_eq!(first["type"], "PUT");
    assert_eq!(first["lease"]["node_name"], "node-a");
    std::thread::sleep(Duration::from_millis(1500));
    let b = acquire_as(&ctl, &pki, "node-b", "192.168.50.11");
    let line = lines.until(LINE_DEADLINE, "node-b's PUT", |l| l.contains("node-b"));
    let ev = json(&line);
    assert_eq!(ev["type"], "PUT");
    assert_eq!(ev["lease"]["subnet"], b.subnet.as_str());
    assert_eq!(ev["lease"]["public_ip"], "192.168.50.11");
    assert_eq!(ev["revision"], b.revision);
    admin(&ctl, &pki, &["lease", "revoke", "node-b"]);
    let ev = json(&lines.until(LINE_DEADLINE, "node-b's DELETE", |l| l.contains("DELETE")));
    assert_eq!(ev["lease"]["node_name"], "node-b");
    terminate(&child);
    let st = wait_exit(&mut child, LINE_DEADLINE);
    assert_eq!(st.code(), Some(0), "watch should exit 0 on SIGTERM");

    let mut child = spawn("table");
    let lines = Lines::new(child.stdout.take().unwrap());
    let head = lines.next(LINE_DEADLINE).expect("header");
    assert_eq!(
        head.split_whitespace().collect::<Vec<_>>(),
        [
            "REVISION",
            "TYPE",
            "NODE",
            "SUBNET",
            "PUBLIC-IP",
            "VTEP-MAC"
        ]
    );
    let reset = lines.next(LINE_DEADLINE).expect("RESET line");
    assert_eq!(reset.split_whitespace().nth(1), Some("RESET"), "{reset}");
    let put = lines.next(LINE_DEADLINE).expect("PUT line");
    let cells: Vec<&str> = put.split_whitespace().collect();
    assert_eq!(cells[1..3], ["PUT", "node-a"], "{put}");
    assert_eq!(cells[4..], ["192.168.50.10", &mac("node-a")], "{put}");
    let c = acquire_as(&ctl, &pki, "node-c", "192.168.50.12");
    let line = lines.until(LINE_DEADLINE, "node-c", |l| l.contains("node-c"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            c.revision.to_string().as_str(),
            "PUT",
            "node-c",
            c.subnet.as_str(),
            "192.168.50.12",
            &mac("node-c")
        ]
    );
    terminate(&child);
    assert_eq!(wait_exit(&mut child, LINE_DEADLINE).code(), Some(0));

    // --from-revision: only what happened after it.
    let out = {
        let mut args = conn_args(&ctl.url(), &pki.ca, &pki.admin);
        args.extend(["watch", "-o", "json", "--from-revision"].map(String::from));
        args.push((c.revision - 1).to_string());
        let mut child = twillctl_cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Lines::new(child.stdout.take().unwrap());
        let l = lines
            .next(LINE_DEADLINE)
            .expect("an event after the revision");
        terminate(&child);
        assert_eq!(wait_exit(&mut child, LINE_DEADLINE).code(), Some(0));
        l
    };
    let ev = json(&out);
    assert_eq!(ev["type"], "PUT", "{out}");
    assert_eq!(ev["lease"]["node_name"], "node-c", "{out}");
}

/// Connection settings from the config file, with flags and environment taking
/// precedence, and errors naming the file and line.
#[test]
fn config_file_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(&dir.path().join("pki"));
    let ctl = Controller::for_pki(&pki, NET_CONF);
    acquire_as(&ctl, &pki, "node-a", "192.168.50.10");

    // $XDG_CONFIG_HOME/twill/config.toml with paths relative to it.
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("twill")).unwrap();
    let file = xdg.join("twill/config.toml");
    std::fs::write(
        &file,
        format!(
            "# twillctl connection\ncontroller = \"{}\"\ntls_cert = \"../../pki/admin-alice.crt\"\n\
             tls_key = \"../../pki/admin-alice.key\"\ntls_ca = \"{}\"\n",
            ctl.url(),
            pki.ca.display()
        ),
    )
    .unwrap();
    let run = |envs: &[(&str, &std::path::Path)], args: &[&str]| {
        let mut cmd = twillctl_cmd();
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.args(args).output().unwrap()
    };
    let out = run(&[("XDG_CONFIG_HOME", &xdg)], &["leases"]);
    assert!(ok(&out).contains("node-a"));

    // HOME/.config/twill/config.toml when XDG_CONFIG_HOME is unset.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".config/twill")).unwrap();
    std::fs::write(
        home.join(".config/twill/config.toml"),
        format!(
            "controller = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
            ctl.url(),
            pki.admin.crt.display(),
            pki.admin.key.display(),
            pki.ca.display()
        ),
    )
    .unwrap();
    let mut cmd = twillctl_cmd();
    cmd.env_remove("XDG_CONFIG_HOME").env("HOME", &home);
    assert!(ok(&cmd.arg("status").output().unwrap()).contains("Subnets:"));

    // --config and TWILL_CONFIG name another file.
    let other = dir.path().join("elsewhere.toml");
    std::fs::copy(&file, &other).unwrap();
    std::fs::write(
        &other,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("../../pki/", "pki/"),
    )
    .unwrap();
    let out = twillctl(&["--config", other.to_str().unwrap(), "config", "-o", "json"]);
    assert_eq!(json(&ok(&out))["network"], "10.244.0.0/16");
    let out = run(&[("TWILL_CONFIG", &other)], &["lease", "get", "node-a"]);
    assert!(ok(&out).contains("node-a"));

    // Precedence: a flag beats the environment, which beats the file.
    let bad = dir.path().join("bad-url.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&other)
            .unwrap()
            .replace(&ctl.url(), "https://127.0.0.1:1"),
    )
    .unwrap();
    let bad_cfg = bad.to_str().unwrap();
    let out = twillctl(&["--config", bad_cfg, "leases"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"),
        "{out:?}"
    );
    let url = ctl.url();
    let out = twillctl(&["--config", bad_cfg, "--controller", &url, "leases"]);
    assert!(ok(&out).contains("node-a"));
    let mut cmd = twillctl_cmd();
    cmd.env("TWILL_CONTROLLER", &url);
    assert!(ok(&cmd.args(["--config", bad_cfg, "leases"]).output().unwrap()).contains("node-a"));
    let mut cmd = twillctl_cmd();
    cmd.env("TWILL_CONTROLLER", "https://127.0.0.1:1");
    let out = cmd
        .args(["--config", bad_cfg, "--controller", &url, "leases"])
        .output()
        .unwrap();
    assert!(ok(&out).contains("node-a"));

    // A malformed file is an error naming the file and the line.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "controller = \"https://x:1\"\ntls_cert = admin.crt\n",
    )
    .unwrap();
    let out = twillctl(&["--config", broken.to_str().unwrap(), "leases"]);
    let err = failed(&out, &ctl);
    assert!(
        err.starts_with(&format!(
            "error: config file {}, line 2: ",
            broken.display()
        )),
        "{err}"
    );
    std::fs::write(
        &broken,
        "controller = \"https://x:1\"\n\ntls-ca = \"ca.crt\"\n",
    )
    .unwrap();
    let err = failed(
        &twillctl(&["--config", broken.to_str().unwrap(), "status"]),
        &ctl,
    );
    assert!(err.contains("line 3") && err.contains("tls-ca"), "{err}");
    // A named file that does not exist is an error; a missing default file is not, and
    // the usage error then names the flag, the variable and the file key.
    let err = failed(
        &twillctl(&["--config", "/nonexistent/twill.toml", "leases"]),
        &ctl,
    );
    assert!(err.contains("/nonexistent/twill.toml"), "{err}");
    let out = twillctl(&["leases"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--controller")
            && err.contains("TWILL_CONTROLLER")
            && err.contains("config.toml"),
        "{err}"
    );
}

/// Every command explains itself.
#[test]
fn every_command_has_help() {
    let commands: [&[&str]; 11] = [
        &[],
        &["status"],
        &["leases"],
        &["lease"],
        &["lease", "get"],
        &["lease", "revoke"],
        &["reserve"],
        &["unreserve"],
        &["reservations"],
        &["config"],
        &["watch"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let out = ok(&twillctl(&args));
        assert!(out.contains("Usage: twillctl"), "{c:?}:\n{out}");
        assert!(out.len() > 300, "{c:?} help is thin:\n{out}");
        if !c.is_empty() {
            assert!(out.contains("Examples:"), "{c:?}:\n{out}");
        }
    }
    let top = ok(&twillctl(&["--help"]));
    for c in [
        "status",
        "leases",
        "lease",
        "reserve",
        "unreserve",
        "reservations",
        "config",
        "watch",
        "certs",
    ] {
        assert!(top.contains(&format!("\n  {c} ")), "{c} missing:\n{top}");
    }
    let out = twillctl(&["reserve", "node-a"]);
    assert_eq!(out.status.code(), Some(2));
    let out = twillctl(&["leases", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `reserve` with one subnet per family on a dual-stack network; an IPv6 subnet on an
/// IPv4-only network and two subnets of one family are refused.
#[test]
fn reservations_of_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let dual = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true,
                   "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "vxlan"}}"#;
    let ctl = Controller::for_pki(&pki, dual);
    let (v4, v6) = ("10.244.7.0/24", "fd00:10:244:7::/64");
    assert_eq!(
        admin(&ctl, &pki, &["reserve", "node-r", v6, v4]),
        format!("reservation/node-r created (subnet {v4},{v6})\n")
    );
    let out = ctl_as(&ctl, &pki, &pki.admin, &["reservations"]);
    assert_eq!(
        ok(&out),
        format!("NODE     SUBNET          IPV6-SUBNET\nnode-r   {v4}   {v6}\n")
    );
    let doc = json(&admin(&ctl, &pki, &["reservations", "-o", "json"]));
    assert_eq!(
        doc,
        serde_json::json!({"reservations": [{"node_name": "node-r", "network": "default", "subnet": v4, "ipv6_subnet": v6, "in_use": false}]})
    );
    let err = failed(
        &ctl_as(
            &ctl,
            &pki,
            &pki.admin,
            &[
                "reserve",
                "node-x",
                "fd00:10:244:8::/64",
                "fd00:10:244:9::/64",
            ],
        ),
        &ctl,
    );
    assert!(err.contains("at most one subnet per family"), "{err}");
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["reserve", "node-x", v6]),
        &ctl,
    );
    assert!(err.starts_with("error: FAILED_PRECONDITION: "), "{err}");

    let v4_only = Controller::for_pki(&pki, NET_CONF);
    let err = failed(
        &ctl_as(&v4_only, &pki, &pki.admin, &["reserve", "node-x", v6]),
        &v4_only,
    );
    assert!(
        err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("no IPv6"),
        "{err}"
    );
}

/// `networks`, and `--network` on the lease commands, against a controller serving
/// `default` and `blue`.
#[test]
fn networks_and_the_network_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let blue = r#"{"Network": "10.20.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}, "Nodes": ["node-a", "gpu-*"]}"#;
    let ctl = Controller::with_networks(&pki, NET_CONF, &[("blue", blue)]);
    acquire_as(&ctl, &pki, "node-a", "192.168.50.10");
    acquire_as(&ctl, &pki, "node-c", "192.168.50.12");
    let in_blue = runtime()
        .block_on(try_acquire_in(
            &ctl,
            &pki,
            "node-a",
            "192.168.50.10",
            "",
            "blue",
        ))
        .unwrap();
    assert!(in_blue.subnet.starts_with("10.20."), "{in_blue:?}");

    let table = admin(&ctl, &pki, &["networks"]);
    println!("twillctl networks:\n{table}");
    assert_eq!(
        header(&table),
        ["NAME", "IPV4", "IPV6", "VNI", "BACKEND", "NODES", "LEASES", "FREE", "STATUS"]
    );
    let r = rows(&table);
    assert_eq!(
        r[0],
        [
            "blue",
            "10.20.0.0/16",
            "<none>",
            "2",
            "vxlan",
            "node-a,gpu-*",
            "1",
            "254",
            "active"
        ]
    );
    assert_eq!(r[1][0], "default");
    let doc = json(&admin(&ctl, &pki, &["networks", "-o", "json"]));
    assert_eq!(
        doc["networks"][0]["nodes"],
        serde_json::json!(["node-a", "gpu-*"])
    );

    let blue_leases = rows(&admin(&ctl, &pki, &["leases", "--network", "blue"]));
    assert_eq!(blue_leases.len(), 1, "{blue_leases:?}");
    assert_eq!(
        blue_leases[0][..2],
        ["node-a".to_string(), in_blue.subnet.clone()]
    );
    let status = json(&admin(
        &ctl,
        &pki,
        &["status", "--network", "blue", "-o", "json"],
    ));
    assert_eq!(
        status["subnets_used"], 1,
        "blue's, not default's two: {status}"
    );

    // Reservations and revocations act on the network named, and only there.
    admin(
        &ctl,
        &pki,
        &["reserve", "node-b", "10.20.9.0/24", "--network", "blue"],
    );
    assert_eq!(admin(&ctl, &pki, &["reservations"]), "", "none in default");
    admin(
        &ctl,
        &pki,
        &["lease", "revoke", "node-a", "--network", "blue"],
    );
    assert_eq!(
        rows(&admin(&ctl, &pki, &["leases"])).len(),
        2,
        "default's leases stay"
    );

    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["leases", "--network", "green"]),
        &ctl,
    );
    assert!(err.contains("green"), "{err}");
    let bad = ctl_as(
        &ctl,
        &pki,
        &pki.admin,
        &["leases", "--network", "Not_A_Name"],
    );
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("network name \"Not_A_Name\" is not valid"),
        "{stderr}"
    );
}
