//! `twillctl token create|list|delete` and `twillctl certs issued` as processes against a
//! real `twill-controller`: the bare token on stdout, lists that never show a secret,
//! NOT_FOUND on a second delete, usage errors for absurd TTLs.
//!
//! Needs `cargo build --workspace --bins` first (the controller is another crate's binary).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use serde_json::Value;
use support::*;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect()
}

/// True for kubelet's token format, `[a-z0-9]{6}\.[a-z0-9]{16}`.
fn is_token(s: &str) -> bool {
    let alnum = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    match s.split_once('.') {
        Some((id, secret)) => alnum(id, 6) && alnum(secret, 16),
        None => false,
    }
}

/// Runs `token create ARGS`, asserts stdout is exactly one token and a newline, and
/// returns (token, id, secret).
fn create(ctl: &Controller, pki: &Pki, args: &[&str]) -> (String, String, String) {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = admin(ctl, pki, &all);
    let token = out
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("no newline after the token: {out:?}"));
    assert!(
        is_token(token),
        "stdout is not ^[a-z0-9]{{6}}\\.[a-z0-9]{{16}}\\n$: {out:?}"
    );
    let (id, secret) = token.split_once('.').unwrap();
    (token.to_string(), id.to_string(), secret.to_string())
}

/// Every string anywhere in a JSON value.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out)
        }),
        _ => {}
    }
}

/// The token list as JSON; asserts that no key or value contains any of `secrets`.
fn list_json(ctl: &Controller, pki: &Pki, secrets: &[&str]) -> Vec<Value> {
    let text = admin(ctl, pki, &["token", "list", "-o", "json"]);
    let doc = json(&text);
    let mut all = Vec::new();
    strings(&doc, &mut all);
    for s in secrets {
        assert!(
            !all.iter().any(|x| x.contains(s)),
            "token list shows a secret:\n{text}"
        );
    }
    doc["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens array:\n{text}"))
        .clone()
}

/// Create, list (json, yaml, table), delete, and delete again.
#[test]
fn token_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);

    let (token, id, secret) = create(&ctl, &pki, &["--description", "rack 7 install"]);
    println!("made token id {id}");

    let tokens = list_json(&ctl, &pki, &[&secret, &token]);
    let t = tokens
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("token {id} not listed: {tokens:?}"));
    assert_eq!(t["description"], "rack 7 install");
    assert_eq!(t["uses"], 0);
    assert_eq!(t["last_used_unix"], 0);
    assert!(t["last_used"].is_null(), "{t}");
    // The default TTL is 24h.
    let life = t["expires_at_unix"].as_i64().unwrap() - t["created_at_unix"].as_i64().unwrap();
    assert!((86_390..=86_410).contains(&life), "lifetime {life}s: {t}");
    assert!(!t["expires_at"].as_str().unwrap().is_empty(), "{t}");

    let yaml = admin(&ctl, &pki, &["token", "list", "-o", "yaml"]);
    assert!(yaml.starts_with("tokens:\n- id: "), "{yaml}");
    assert!(yaml.contains(&format!("- id: \"{id}\"\n")), "{yaml}");
    assert!(!yaml.contains(&secret), "{yaml}");

    let table = admin(&ctl, &pki, &["token", "list"]);
    println!("twillctl token list:\n{table}");
    assert_eq!(
        header(&table),
        [
            "ID",
            "DESCRIPTION",
            "NODES",
            "EXPIRES-IN",
            "USES",
            "LAST-USED"
        ]
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
    assert!(row.contains("rack 7 install"), "{row}");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[cells.len() - 2..], ["0", "never"], "{row}");
    assert!(!table.contains(&secret), "{table}");
    let wide = admin(&ctl, &pki, &["token", "list", "-o", "wide"]);
    assert!(
        header(&wide).ends_with(&["LAST-USED", "USES-LEFT", "CREATED", "EXPIRES-AT"]),
        "{wide}"
    );

    // A shorter TTL is passed on; -o does not change create's output.
    let (_, short_id, short_secret) = create(&ctl, &pki, &["--ttl", "2h", "-o", "json"]);
    let tokens = list_json(&ctl, &pki, &[&secret, &short_secret]);
    let s = tokens
        .iter()
        .find(|t| t["id"] == short_id.as_str())
        .unwrap_or_else(|| panic!("token {short_id} not listed: {tokens:?}"));
    let life = s["expires_at_unix"].as_i64().unwrap() - s["created_at_unix"].as_i64().unwrap();
    assert!((7_190..=7_210).contains(&life), "lifetime {life}s: {s}");
    assert_eq!(s["description"], "");
    let ids: Vec<&str> = tokens.iter().map(|t| t["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "ordered by id");

    // Delete by id.
    assert_eq!(
        admin(&ctl, &pki, &["token", "delete", &id]),
        format!("token/{id} deleted\n")
    );
    let tokens = list_json(&ctl, &pki, &[&secret]);
    assert!(
        !tokens.iter().any(|t| t["id"] == id.as_str()),
        "{id} still listed: {tokens:?}"
    );
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["token", "delete", &id]),
        &ctl,
    );
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");

    // Delete by whole token: the secret is not repeated.
    let (whole, whole_id, whole_secret) = create(&ctl, &pki, &[]);
    let out = admin(&ctl, &pki, &["token", "delete", &whole]);
    assert_eq!(out, format!("token/{whole_id} deleted\n"));
    assert!(!out.contains(&whole_secret));
    let tokens = list_json(&ctl, &pki, &[&whole_secret]);
    assert!(!tokens.iter().any(|t| t["id"] == whole_id.as_str()));

    // The last one, then an empty list: nothing on stdout, a note on stderr.
    admin(&ctl, &pki, &["token", "delete", &short_id]);
    let out = ctl_as(&ctl, &pki, &pki.admin, &["token", "list"]);
    assert_eq!(ok(&out), "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No bootstrap tokens found."),
        "{out:?}"
    );
    assert_eq!(
        json(&admin(&ctl, &pki, &["token", "list", "-o", "json"])),
        serde_json::json!({"tokens": []})
    );
    let err = failed(
        &ctl_as(&ctl, &pki, &pki.admin, &["token", "delete", "zzzzzz"]),
        &ctl,
    );
    assert!(err.starts_with("error: NOT_FOUND: "), "{err}");
}

/// A TTL of zero, under a second or over a year is a usage error (exit 2), from the
/// flag or the environment, before any connection is tried.
#[test]
fn bad_ttl_is_a_usage_error() {
    for ttl in ["0s", "500ms", "2y", "soon"] {
        let out = twillctl(&[
            "--controller",
            "https://127.0.0.1:1",
            "token",
            "create",
            "--ttl",
            ttl,
        ]);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {out:?}");
        assert!(out.stdout.is_empty(), "--ttl {ttl}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--ttl"), "--ttl {ttl}: {err}");
    }
    let out = twillctl_cmd()
        .env("TWILL_TOKEN_TTL", "0s")
        .args(["token", "create"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is zero"), "{err}");
}

/// A token bound to nothing, or used zero times, is a usage error (exit 2), from the
/// flag or the environment, before any connection is tried.
#[test]
fn bad_binding_is_a_usage_error() {
    let cases: [(&[&str], &str); 5] = [
        (&["--uses", "0"], "never be used"),
        (&["--uses=-3"], "not a number of uses"),
        (&["--node", "a/b"], "contains '/'"),
        (&["--node", "ok", "--node", ""], "node name is empty"),
        (&["--node-prefix", ""], "leave --node-prefix out"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["--controller", "https://127.0.0.1:1", "token", "create"];
        args.extend_from_slice(flags);
        let out = twillctl(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{flags:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    for (var, value, says) in [
        ("TWILL_TOKEN_USES", "0", "never be used"),
        ("TWILL_TOKEN_NODE", "db-1,a b", "contains ' '"),
        (
            "TWILL_TOKEN_NODE_PREFIX",
            "rack/",
            "prefix \"rack/\" contains '/'",
        ),
    ] {
        let out = twillctl_cmd()
            .env(var, value)
            .args(["--controller", "https://127.0.0.1:1", "token", "create"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{var}={value}: {err}");
    }
}

/// A token bound to names and a number of uses says so in `token list`.
#[test]
fn a_bound_token_shows_its_binding() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    let (_, id, secret) = create(
        &ctl,
        &pki,
        &[
            "--node",
            "db-1",
            "--node",
            "db-2",
            "--node-prefix",
            "worker-",
            "--uses",
            "5",
        ],
    );
    let tokens = list_json(&ctl, &pki, &[&secret]);
    let t = tokens.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(t["nodes"], serde_json::json!(["db-1", "db-2"]), "{t}");
    assert_eq!(t["node_prefix"], "worker-", "{t}");
    assert_eq!(t["max_uses"], 5, "{t}");
    assert_eq!(t["uses_left"], 5, "{t}");
    let table = admin(&ctl, &pki, &["token", "list"]);
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert!(cells.contains(&"db-1,db-2,worker-*"), "{table}");
    assert_eq!(cells[cells.len() - 2..], ["0/5", "never"], "{row}");
    // Unbound: any name, no limit.
    let (_, any, _) = create(&ctl, &pki, &[]);
    let t = list_json(&ctl, &pki, &[])
        .into_iter()
        .find(|t| t["id"] == any.as_str())
        .unwrap();
    assert_eq!(t["max_uses"], 0, "{t}");
    assert!(t["uses_left"].is_null(), "{t}");
    let table = admin(&ctl, &pki, &["token", "list"]);
    let row = table.lines().find(|l| l.starts_with(&any)).unwrap();
    assert!(row.split_whitespace().any(|c| c == "*"), "{row}");
}

/// `certs issued` on a controller that has issued nothing.
#[test]
fn certs_issued_on_a_fresh_controller() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    let out = ctl_as(&ctl, &pki, &pki.admin, &["certs", "issued"]);
    assert_eq!(ok(&out), "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No issued certificates found."),
        "{out:?}"
    );
    assert_eq!(admin(&ctl, &pki, &["certs", "issued", "-o", "wide"]), "");
    assert_eq!(
        json(&admin(&ctl, &pki, &["certs", "issued", "-o", "json"])),
        serde_json::json!({"certificates": []})
    );
    assert_eq!(
        admin(&ctl, &pki, &["certs", "issued", "-o", "yaml"]),
        "certificates: []\n"
    );
    // Like every admin command, it needs a controller.
    let out = twillctl(&["certs", "issued"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`certs issued` needs --controller"), "{err}");
}

/// Node certificates may not touch tokens or the issued list.
#[test]
fn certs_revoke_names_the_node_and_refuses_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    assert_eq!(
        admin(&ctl, &pki, &["certs", "revoke", "worker-7"]),
        "certificates/worker-7 revoked\n"
    );
    assert_eq!(
        admin(&ctl, &pki, &["certs", "revoke", "bob", "--role", "admin"]),
        "certificates/bob (admin) revoked\n"
    );
    let out = ctl_as(
        &ctl,
        &pki,
        &pki.admin,
        &["certs", "revoke", "x", "--role", "root"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = ctl_as(&ctl, &pki, &pki.admin, &["certs", "revoke", "a/b"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
        "{out:?}"
    );
}

#[test]
fn non_admin_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = twillctl_pki(dir.path());
    let ctl = Controller::for_pki(&pki, NET_CONF);
    let commands: [&[&str]; 4] = [
        &["token", "create"],
        &["token", "list"],
        &["token", "delete", "abcdef"],
        &["certs", "issued"],
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
    assert_eq!(
        json(&admin(&ctl, &pki, &["token", "list", "-o", "json"])),
        serde_json::json!({"tokens": []})
    );
}

/// The new commands explain themselves.
#[test]
fn token_commands_have_help() {
    let commands: [&[&str]; 6] = [
        &["token"],
        &["token", "create"],
        &["token", "list"],
        &["token", "delete"],
        &["certs", "issued"],
        &["certs", "revoke"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let out = ok(&twillctl(&args));
        assert!(out.contains("Usage: twillctl"), "{c:?}:\n{out}");
        assert!(out.contains("Examples:"), "{c:?}:\n{out}");
    }
    let create = ok(&twillctl(&["token", "create", "--help"]));
    for s in [
        "--ttl",
        "TWILL_TOKEN_TTL",
        "--description",
        "TWILL_TOKEN_DESCRIPTION",
        "--node <NAME>",
        "TWILL_TOKEN_NODE",
        "--node-prefix <PREFIX>",
        "TWILL_TOKEN_NODE_PREFIX",
        "--uses <N>",
        "TWILL_TOKEN_USES",
        "--node-prefix worker- --uses 50",
    ] {
        assert!(create.contains(s), "{s} missing:\n{create}");
    }
    let revoke = ok(&twillctl(&["certs", "revoke", "--help"]));
    assert!(revoke.contains("--role <ROLE>"), "{revoke}");
    assert!(revoke.contains("[default: node]"), "{revoke}");
    let list = ok(&twillctl(&["token", "list", "--help"]));
    assert!(
        list.contains("NODES") && list.contains("USES-LEFT"),
        "{list}"
    );
    let top = ok(&twillctl(&["--help"]));
    assert!(top.contains("\n  token "), "{top}");
    let certs = ok(&twillctl(&["certs", "--help"]));
    assert!(certs.contains("\n  issued "), "{certs}");
    let out = twillctl(&["token", "delete"]);
    assert_eq!(out.status.code(), Some(2), "an id is required");
}
