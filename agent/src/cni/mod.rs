//! `twill-cni`: a CNI plugin that behaves like flannel's (docs/compatibility.md, CNI
//! plugin), so an
//! existing flannel conflist needs only its `type` changed.
//!
//! It owns the plugin's whole life: reading the CNI environment and the network
//! configuration (spec 1.1.0 with STATUS and GC; configs declaring 0.3.0 to 1.0.0 are
//! accepted),
//! building the delegate configuration from flannel's subnet.env (the `bridge` plugin
//! with `host-local` IPAM unless told otherwise), saving it under `<dataDir>/<containerID>`
//! so DEL does not depend on subnet.env, running the delegate from `CNI_PATH`, and
//! printing results and errors as the spec's JSON. It never panics on bad input.
//!
//! - `config`: the network configuration, subnet.env checks, the delegate config (pure).
//! - `exec`: finding and invoking the delegate plugin.
//! - `store`: the saved delegate configurations.
//! - `status`: STATUS (subnet.env and the agent's health).
//! - `report`: telling the agent of each attachment added or deleted.
//! - `error`: the CNI error type and codes.

pub mod config;
pub mod error;
pub mod exec;
pub mod report;
pub mod status;
pub mod store;

use std::io::{Read, Write};

use serde_json::{json, Value};

pub use config::{NetConf, SUPPORTED_VERSIONS};
pub use error::{code, CniError};

/// The version we answer in when the caller's cannot be determined.
pub const LATEST_VERSION: &str = "1.1.0";
/// The interface GC assumes for an attachment saved without one (by flannel, or an
/// older twill-cni): what Kubernetes runtimes name a pod's interface.
const DEFAULT_IFNAME: &str = "eth0";

/// A CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach the container; idempotent.
    Del,
    /// Verify the container's attachment.
    Check,
    /// Report the supported versions.
    Version,
    /// Whether pods can be attached now (CNI 1.1).
    Status,
    /// Release every attachment the runtime no longer holds (CNI 1.1).
    Gc,
}

impl Command {
    /// Each command with its `CNI_COMMAND` name.
    const NAMES: [(Command, &'static str); 6] = [
        (Command::Add, "ADD"),
        (Command::Del, "DEL"),
        (Command::Check, "CHECK"),
        (Command::Version, "VERSION"),
        (Command::Status, "STATUS"),
        (Command::Gc, "GC"),
    ];

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("", |(_, n)| n)
    }
}

/// The CNI environment of one invocation, validated as libcni's `skel` validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_PATH`.
    pub cni_path: String,
    /// `CNI_ARGS` (`K=V;K=V`, optional).
    pub cni_args: String,
}

impl Args {
    /// Reads and validates the environment. Missing variables are named (code 4); a
    /// container ID or interface name libcni would reject is rejected the same way.
    pub fn from_env(getenv: &dyn Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |k: &str| getenv(k).unwrap_or_default();
        let invalid = |msg: String| CniError::new(code::INVALID_ENV, msg);
        let command = match get("CNI_COMMAND").as_str() {
            "" => {
                return Err(invalid(
                    "required environment variable CNI_COMMAND missing".into(),
                ))
            }
            other => Command::NAMES
                .iter()
                .find(|(_, n)| *n == other)
                .map(|(c, _)| *c)
                .ok_or_else(|| {
                    invalid(format!(
                        "unknown CNI_COMMAND {other:?} (twill-cni supports ADD, DEL, CHECK, \
                         VERSION, STATUS, GC)"
                    ))
                })?,
        };
        let (container_id, netns, ifname, cni_path) = (
            get("CNI_CONTAINERID"),
            get("CNI_NETNS"),
            get("CNI_IFNAME"),
            get("CNI_PATH"),
        );
        let required: &[(&str, &str)] = match command {
            Command::Version | Command::Status => &[],
            Command::Gc => &[("CNI_PATH", &cni_path)],
            Command::Del => &[
                ("CNI_CONTAINERID", &container_id),
                ("CNI_IFNAME", &ifname),
                ("CNI_PATH", &cni_path),
            ],
            Command::Add | Command::Check => &[
                ("CNI_CONTAINERID", &container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", &ifname),
                ("CNI_PATH", &cni_path),
            ],
        };
        let missing: Vec<&str> = required
            .iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            let s = if missing.len() == 1 { "" } else { "s" };
            return Err(invalid(format!(
                "required environment variable{s} {} missing for {}",
                missing.join(", "),
                command.name()
            )));
        }
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            if !config::valid_cni_name(&container_id) {
                return Err(invalid(format!(
                    "invalid characters in CNI_CONTAINERID {container_id:?} (allowed: [a-zA-Z0-9][a-zA-Z0-9_.-]*)"
                )));
            }
            if ifname.len() > 15
                || ifname == "."
                || ifname == ".."
                || ifname
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(invalid(format!(
                    "invalid CNI_IFNAME {ifname:?}: at most 15 characters, not . or .., no /, : or whitespace"
                )));
            }
        }
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            cni_path,
            cni_args: get("CNI_ARGS"),
        })
    }
}

/// The VERSION answer.
pub fn version_info() -> Value {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Runs one command; returns what to print on stdout on success.
pub fn run(args: &Args, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    if args.command == Command::Version {
        return Ok(version_info().to_string().into_bytes());
    }
    let conf = NetConf::parse(stdin)?;
    match args.command {
        Command::Add => cmd_add(args, &conf),
        Command::Del => cmd_del(args, &conf),
        Command::Check => cmd_check(args, &conf),
        Command::Status => {
            since(&conf, args.command, "1.1.0")?;
            status::check(&conf).map(|()| Vec::new())
        }
        Command::Gc => cmd_gc(args, &conf),
        Command::Version => unreachable!("handled above"),
    }
}

/// Whether `conf`'s version has `command`, which exists from `min` on (CHECK from
/// 0.4.0, STATUS and GC from 1.1.0).
fn since(conf: &NetConf, command: Command, min: &str) -> Result<(), CniError> {
    if config::version_at_least(&conf.cni_version, min) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "config version {} does not allow {} (needs {min} or later)",
            conf.cni_version,
            command.name()
        ),
    ))
}

fn to_bytes(delegate: &serde_json::Map<String, Value>) -> Result<Vec<u8>, CniError> {
    serde_json::to_vec(delegate)
        .map_err(|e| CniError::new(code::INTERNAL, format!("serializing delegate config: {e}")))
}

fn delegate_type(conf: &serde_json::Map<String, Value>) -> Option<&str> {
    conf.get("type").and_then(Value::as_str)
}

fn cmd_add(args: &Args, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    let env = config::load_subnet_env(&conf.subnet_file)?;
    let delegate = config::build_delegate(conf, &env);
    let plugin = exec::find_plugin(delegate_type(&delegate).unwrap_or(""), &args.cni_path)?;
    let bytes = to_bytes(&delegate)?;
    // Saved before the delegate runs: after a failed ADD the runtime calls DEL, which
    // must find it to undo whatever the delegate did half-way (flannel does the same).
    store::save(&conf.data_dir, &args.container_id, &bytes)?;
    store::save_ifname(&conf.data_dir, &args.container_id, &args.ifname)?;
    let out = exec::invoke(&plugin, "ADD", &bytes)?;
    let parsed = serde_json::from_slice::<Value>(&out);
    if let Ok(result) = &parsed {
        report::added(args, conf, &delegate, result);
    }
    let Ok(mut result) = parsed else {
        return Err(CniError::new(
            code::DELEGATE_FAILED,
            format!(
                "delegate {} returned a result that is not JSON",
                plugin.display()
            ),
        )
        .with_details(String::from_utf8_lossy(&out).into_owned()));
    };
    if config::delegate_version(&conf.cni_version) == conf.cni_version {
        return Ok(out);
    }
    config::relabel(&mut result, &conf.cni_version);
    Ok(result.to_string().into_bytes())
}

fn cmd_del(args: &Args, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    // Unknown container or already deleted: nothing to do (spec: DEL is idempotent).
    if let Some(saved) = store::load(&conf.data_dir, &args.container_id)? {
        delete(conf, &args.container_id, &saved, &args.cni_path, &[])?;
    }
    report::deleted(conf, &args.container_id, &args.ifname);
    Ok(Vec::new())
}

/// Undoes `container_id`'s attachment through the delegate configuration it was
/// added with (`saved`), and forgets it; `env` is set for the delegate (GC names the
/// container and interface).
fn delete(
    conf: &NetConf,
    container_id: &str,
    saved: &[u8],
    cni_path: &str,
    env: &[(&str, &str)],
) -> Result<(), CniError> {
    let parsed: Option<serde_json::Map<String, Value>> = serde_json::from_slice(saved).ok();
    let Some(plugin_type) = parsed.as_ref().and_then(delegate_type) else {
        // flannel: an unreadable saved config is logged and dropped; the interface goes
        // away with the network namespace.
        eprintln!(
            "twill-cni: ignoring unparseable saved delegate config {}",
            store::path_for(&conf.data_dir, container_id).display()
        );
        return store::remove(&conf.data_dir, container_id);
    };
    let plugin = exec::find_plugin(plugin_type, cni_path)?;
    // The saved bytes are passed as saved (flannel does): the delegate sees the config
    // it was added with, whatever subnet.env says now. The file stays on failure so a
    // retried DEL still has it.
    exec::invoke_with(&plugin, "DEL", saved, env)?;
    store::remove(&conf.data_dir, container_id)
}

/// GC: every saved attachment of this network whose container the runtime no longer
/// names in `cni.dev/valid-attachments` is deleted through its delegate (as DEL would,
/// the network namespace being gone), so host-local gives its addresses back. One that
/// fails is reported and the others go on. The list names this network's attachments
/// only, and networks may share a data directory (flannel's default is one for all):
/// a saved configuration of another network (its delegate's `name`), or one that does
/// not parse, is left alone.
fn cmd_gc(args: &Args, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    since(conf, args.command, "1.1.0")?;
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "GC needs cni.dev/valid-attachments (the attachments to keep); without it \
             nothing is released",
        ));
    };
    let mut failed = Vec::new();
    for id in store::containers(&conf.data_dir)? {
        if valid.iter().any(|a| a.container_id == id) {
            continue;
        }
        let Some(saved) = store::load(&conf.data_dir, &id)? else {
            continue;
        };
        let network = serde_json::from_slice::<Value>(&saved)
            .ok()
            .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string));
        if network.as_deref() != Some(conf.name.as_str()) {
            continue;
        }
        let ifname = store::load_ifname(&conf.data_dir, &id)?;
        let ifname = ifname.as_deref().unwrap_or(DEFAULT_IFNAME);
        let env = [
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_IFNAME", ifname),
            ("CNI_NETNS", ""),
        ];
        match delete(conf, &id, &saved, &args.cni_path, &env) {
            Ok(()) => report::deleted(conf, &id, ifname),
            Err(e) => failed.push(format!("{id}: {}", e.msg)),
        }
    }
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    Err(CniError::new(
        code::DELEGATE_FAILED,
        format!(
            "GC could not release {} attachment(s); they are tried again at the next GC",
            failed.len()
        ),
    )
    .with_details(failed.join("; ")))
}

fn cmd_check(args: &Args, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    since(conf, args.command, "0.4.0")?;
    let Some(saved) = store::load(&conf.data_dir, &args.container_id)? else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "container {} is unknown: no saved delegate config in {}",
                args.container_id,
                conf.data_dir.display()
            ),
        ));
    };
    let Ok(mut delegate) = serde_json::from_slice::<serde_json::Map<String, Value>>(&saved) else {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            format!(
                "saved delegate config {} is not a JSON object",
                store::path_for(&conf.data_dir, &args.container_id).display()
            ),
        ));
    };
    let plugin = exec::find_plugin(delegate_type(&delegate).unwrap_or(""), &args.cni_path)?;
    // The prevResult is in the caller's version, so the delegate must be asked in it
    // (1.1.0 as 1.0.0, the same result format).
    let version = config::delegate_version(&conf.cni_version);
    delegate.insert("cniVersion".into(), json!(version));
    if let Some(prev) = &conf.prev_result {
        let mut prev = prev.clone();
        config::relabel(&mut prev, version);
        delegate.insert("prevResult".into(), prev);
    }
    if let Some(rc) = &conf.runtime_config {
        delegate.insert("runtimeConfig".into(), rc.clone());
    }
    let bytes = to_bytes(&delegate)?;
    exec::invoke(&plugin, "CHECK", &bytes)?;
    Ok(Vec::new())
}

/// The whole plugin: validates the environment, reads stdin, runs the command and
/// prints the result or the error JSON. Returns the process exit code.
pub fn main_with(
    getenv: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    let mut input = Vec::new();
    let result = Args::from_env(getenv).and_then(|args| {
        // VERSION is often run by hand; do not wait for a stdin nobody sends.
        if args.command != Command::Version {
            stdin.read_to_end(&mut input).map_err(|e| {
                CniError::new(code::IO_FAILURE, format!("error reading stdin: {e}"))
            })?;
        }
        run(&args, &input)
    });
    match result {
        Ok(out) => {
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
            0
        }
        Err(e) => {
            if getenv("CNI_COMMAND").unwrap_or_default().is_empty() {
                let _ = writeln!(
                    stderr,
                    "twill-cni {}: flannel-compatible CNI plugin; CNI protocol versions supported: {}",
                    env!("CARGO_PKG_VERSION"),
                    SUPPORTED_VERSIONS.join(", ")
                );
            }
            let version = config::declared_version(&input);
            let json = e.to_json(version.as_deref().unwrap_or(LATEST_VERSION));
            let _ = writeln!(stdout, "{json}");
            let _ = stdout.flush();
            1
        }
    }
}

/// `twill-cni`'s `main`, on the process's real environment and stdio.
pub fn main() -> i32 {
    let getenv = |k: &str| std::env::var(k).ok();
    main_with(
        &getenv,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn call(env: &[(&str, &str)], stdin: &str) -> (i32, Value) {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let getenv = |k: &str| map.get(k).cloned();
        let mut out = Vec::new();
        let mut err = Vec::new();
        // Never the host's agent socket (or its queue under /run/twill).
        let stdin = match serde_json::from_str::<Value>(stdin) {
            Ok(Value::Object(mut conf)) => {
                conf.entry("agentSocket").or_insert(json!(""));
                Value::Object(conf).to_string()
            }
            _ => stdin.to_string(),
        };
        let rc = main_with(&getenv, &mut stdin.as_bytes(), &mut out, &mut err);
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (rc, v)
    }

    const CONF: &str = r#"{"cniVersion":"0.4.0","name":"cbr0","type":"twill-cni"}"#;

    #[test]
    fn version_lists_supported_versions() {
        let (rc, v) = call(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(rc, 0);
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(v["cniVersion"], json!("1.1.0"));
    }

    #[test]
    fn missing_and_bad_env_are_named() {
        let (rc, v) = call(&[], CONF);
        assert_eq!((rc, v["code"].clone()), (1, json!(4)));
        assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));

        let (rc, v) = call(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")], CONF);
        assert_eq!((rc, v["code"].clone()), (1, json!(4)));
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains("CNI_NETNS, CNI_IFNAME, CNI_PATH") && !msg.contains("CNI_CONTAINERID"),
            "{msg}"
        );

        let base = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let mut env = base.to_vec();
        env.push(("CNI_CONTAINERID", "../etc"));
        let (_, v) = call(&env, CONF);
        assert_eq!(v["code"], json!(4));
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));

        let (_, v) = call(&[("CNI_COMMAND", "GC")], CONF);
        assert_eq!(v["code"], json!(4));
    }

    #[test]
    fn errors_answer_in_the_callers_version() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"0.3.1","name":"n","subnetFile":"{}/none","dataDir":"{}/d"}}"#,
            dir.path().display(),
            dir.path().display()
        );
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let (rc, v) = call(&env, &conf);
        assert_eq!(rc, 1);
        assert_eq!(v["cniVersion"], json!("0.3.1"));
        assert_eq!(v["code"], json!(11));
        assert!(v["msg"].as_str().unwrap().contains("twill-agent"));

        let (_, v) = call(&env, "not json");
        assert_eq!(
            (v["code"].clone(), v["cniVersion"].clone()),
            (json!(6), json!("1.1.0"))
        );
        let (_, v) = call(&env, r#"{"cniVersion":"2.0.0","name":"n"}"#);
        assert_eq!(v["code"], json!(1));
    }

    #[test]
    fn del_of_unknown_container_succeeds_and_check_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","dataDir":"{}/d"}}"#,
            dir.path().display()
        );
        let mut env = vec![
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        assert_eq!(call(&env, &conf), (0, Value::Null));
        env[0] = ("CNI_COMMAND", "CHECK");
        env.push(("CNI_NETNS", "/var/run/netns/x"));
        let (rc, v) = call(&env, &conf);
        assert_eq!((rc, v["code"].clone()), (1, json!(3)));
        let (_, v) = call(&env, &conf.replace("1.0.0", "0.3.1"));
        assert_eq!(v["code"], json!(1));
    }

    #[test]
    fn unparseable_saved_config_is_dropped_on_del() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        store::save(&data, "c1", b"garbage").unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","dataDir":"{}"}}"#,
            data.display()
        );
        let env = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        assert_eq!(call(&env, &conf).0, 0);
        assert!(!store::path_for(&data, "c1").exists());
    }

    const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    /// An agent's `/healthz` on 127.0.0.1 that answers each connection with the next of
    /// `answers` (status, body).
    fn agent(answers: Vec<(u16, &'static str)>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for (status, body) in answers {
                let (mut c, _) = l.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut c, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    #[test]
    fn status_needs_subnet_env_and_a_healthy_agent() {
        let d = tempfile::tempdir().unwrap();
        let env = d.path().join("subnet.env");
        let conf = |url: &str, version: &str| {
            json!({"cniVersion": version, "name": "n", "subnetFile": env, "agentURL": url})
                .to_string()
        };
        let status = [("CNI_COMMAND", "STATUS")];
        let url = agent(vec![(503, "no lease held"), (200, "ok")]);

        let (rc, v) = call(&status, &conf(&url, "1.1.0"));
        assert_eq!((rc, v["code"].clone()), (1, json!(50)), "{v}");
        assert!(v["msg"].as_str().unwrap().contains("subnet.env"), "{v}");

        std::fs::write(&env, SUBNET_ENV).unwrap();
        let (rc, v) = call(&status, &conf(&url, "1.1.0"));
        assert_eq!((rc, v["code"].clone()), (1, json!(50)), "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains("not healthy") && msg.contains("no lease held"),
            "{msg}"
        );

        let (rc, v) = call(&status, &conf(&url, "1.1.0"));
        assert_eq!((rc, v), (0, Value::Null), "available");

        let closed = format!("http://{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let (rc, v) = call(&status, &conf(&closed, "1.1.0"));
        assert_eq!((rc, v["code"].clone()), (1, json!(50)), "{v}");
        assert!(
            v["msg"].as_str().unwrap().contains("does not answer"),
            "{v}"
        );

        assert_eq!(call(&status, &conf("", "1.1.0")).0, 0, "subnet.env alone");
        let (_, v) = call(&status, &conf("", "1.0.0"));
        assert_eq!(v["code"], json!(1), "STATUS is CNI 1.1");
        let (_, v) = call(&status, &conf("https://x", "1.1.0"));
        assert_eq!(v["code"], json!(7), "agentURL is plain http");
    }

    #[test]
    fn gc_deletes_through_the_delegate_what_the_runtime_no_longer_holds() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (bin, data, log) = (
            d.path().join("bin"),
            d.path().join("data"),
            d.path().join("log"),
        );
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(d.path().join("subnet.env"), SUBNET_ENV).unwrap();
        // A delegate that records each call and succeeds.
        let bridge = bin.join("bridge");
        std::fs::write(
            &bridge,
            format!(
                "#!/bin/sh\necho \"$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME\" >> {}\necho '{{}}'\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bridge, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cni_path = bin.display().to_string();
        let conf = |extra: Value| {
            let mut c = json!({"cniVersion": "1.1.0", "name": "n", "type": "twill-cni",
                "subnetFile": d.path().join("subnet.env"), "dataDir": data});
            if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            c.to_string()
        };
        for (id, ifname) in [("c1", "eth0"), ("c2", "net1"), ("c3", "net2")] {
            let env = [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", cni_path.as_str()),
            ];
            assert_eq!(call(&env, &conf(json!({}))).0, 0);
        }
        // Saved by flannel: no interface name kept.
        std::fs::write(data.join("old"), r#"{"type":"bridge","name":"n"}"#).unwrap();
        // Another network's, in the same data directory, and one that does not parse.
        std::fs::write(data.join("blue"), r#"{"type":"bridge","name":"blue"}"#).unwrap();
        std::fs::write(data.join("torn"), "{").unwrap();
        std::fs::write(&log, "").unwrap();

        let gc = [("CNI_COMMAND", "GC"), ("CNI_PATH", cni_path.as_str())];
        let (_, v) = call(&gc, &conf(json!({})));
        assert_eq!(v["code"], json!(7), "no list, nothing released: {v}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "");

        let keep = json!({"cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "net1"}]});
        let (rc, v) = call(&gc, &conf(keep));
        assert_eq!((rc, v), (0, Value::Null));
        let mut calls: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        calls.sort();
        assert_eq!(calls, ["DEL c1 eth0", "DEL c3 net2", "DEL old eth0"]);
        assert_eq!(store::containers(&data).unwrap(), ["blue", "c2", "torn"]);
    }
}
