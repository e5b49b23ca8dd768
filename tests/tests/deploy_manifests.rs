//! Checks of deploy/: the Kubernetes manifests, the Dockerfiles and the systemd units
//! must agree with the binaries, so they cannot drift from the code silently.
//!
//! - every flag (`--foo`) and `TWILL_*` variable the Deployment, the DaemonSet, the
//!   units and the example env files set exists in the binary's `--help`;
//! - the issue's requirements on the objects (Recreate, probes, hostNetwork, ...);
//! - deploy/check/validate_manifests.py: schema validation with kubernetes-validate;
//! - deploy/check/verify_units.sh: `systemd-analyze verify` and `security`;
//! - deploy/check/test_install_cni.sh: the init container's install script;
//! - the HA variant (issue 14: deploy/kubernetes-ha, deploy/kubernetes-ha/cert-manager,
//!   deploy/systemd/ha), rendered like kustomize does: 3 replicas, a rolling update,
//!   a PodDisruptionBudget and anti-affinity for the controller pods, the etcd flags
//!   and their files, the advertise URL from the pod IP, the certificate for serverAuth
//!   and clientAuth, and nothing taken away from the default but the sled store.
//!
//! The external checks print a loud SKIPPED when their tool is missing, and fail
//! instead when the environment variable CI is set.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use twill_tests::kit::{in_ci, loud, skip};
use twill_tests::Bins;

/// Exit status of a check script that skipped because a tool is missing.
const SKIPPED: i32 = 77;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The directory of the built binaries (target/<profile>).
fn bin_dir() -> PathBuf {
    Bins::locate().unwrap_or_else(|e| panic!("{e:#}")).dir
}

/// `BIN --help`, whitespace collapsed (clap may wrap long lines).
fn help(bin: &str) -> String {
    let path = bin_dir().join(bin);
    let out = Command::new(&path)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run {} --help: {e}", path.display()));
    assert!(
        out.status.success(),
        "{bin} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn has_flag(help: &str, flag: &str) -> bool {
    help.split(' ').any(|tok| {
        tok == flag
            || tok
                .strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with([',', '=']))
    })
}

fn has_env(help: &str, var: &str) -> bool {
    help.contains(&format!("[env: {var}="))
}

/// Variables the manifests may set that are not flags.
const NON_FLAG_ENV: &[&str] = &["RUST_LOG"];

fn check_env_name(bin: &str, help: &str, var: &str, origin: &str, errors: &mut Vec<String>) {
    if var.starts_with("TWILL_") {
        if !has_env(help, var) {
            errors.push(format!(
                "{origin}: {var} is not a variable of {bin} (no `[env: {var}=]` in `{bin} --help`)"
            ));
        }
    } else if !NON_FLAG_ENV.contains(&var) {
        errors.push(format!(
            "{origin}: {var} is neither a TWILL_* flag variable nor one of {NON_FLAG_ENV:?}"
        ));
    }
}

/// Duration-valued variables must parse the way the binaries parse them.
fn check_env_value(var: &str, value: &str, origin: &str, errors: &mut Vec<String>) {
    let parsed = match var {
        "TWILL_LEASE_TTL" | "TWILL_RECONCILE_INTERVAL" => {
            twill_common::parse_duration(value).map(drop)
        }
        "TWILL_NODE_CERT_TTL" => twill_common::parse_nonzero_duration(value).map(drop),
        _ => Ok(()),
    };
    if let Err(e) = parsed {
        errors.push(format!("{origin}: {var}={value}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes objects

fn docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn object(rel: &str, kind: &str, name: &str) -> Value {
    docs(rel)
        .into_iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{rel}: no {kind} {name}"))
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(&pod["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Checks a container's args and env against `bin --help`; returns the env it sets.
fn check_container_flags(
    bin: &str,
    c: &Value,
    origin: &str,
    errors: &mut Vec<String>,
) -> Vec<(String, String)> {
    check_container_flags_in(bin, &help(bin), c, origin, errors)
}

/// Like [`check_container_flags`], against the given help text (see
/// [`help_with_contract`]). A variable that is neither TWILL_* nor in [`NON_FLAG_ENV`]
/// is allowed only as a helper: set from the downward API and used as `$(NAME)` by a
/// later variable (POD_IP for TWILL_ADVERTISE_URL).
fn check_container_flags_in(
    bin: &str,
    help: &str,
    c: &Value,
    origin: &str,
    errors: &mut Vec<String>,
) -> Vec<(String, String)> {
    if !c["command"].is_null() {
        errors.push(format!(
            "{origin}: sets `command`; the image's entrypoint is {bin}, pass flags in `args`"
        ));
    }
    for arg in seq(&c["args"]) {
        let arg = s(arg, "args");
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = format!("--{}", flag.split('=').next().unwrap());
            if !has_flag(help, &flag) {
                errors.push(format!(
                    "{origin}: arg {arg}: {flag} is not a flag of {bin}"
                ));
            }
        }
    }
    let mut defined: Vec<(String, String)> = Vec::new();
    let env = seq(&c["env"]);
    for (i, e) in env.iter().enumerate() {
        let name = s(&e["name"], "env name").to_string();
        let helper = !name.starts_with("TWILL_")
            && !NON_FLAG_ENV.contains(&name.as_str())
            && !e["valueFrom"]["fieldRef"]["fieldPath"].is_null()
            && env[i + 1..].iter().any(|later| {
                later["value"]
                    .as_str()
                    .is_some_and(|v| v.contains(&format!("$({name})")))
            });
        if !helper {
            check_env_name(bin, help, &name, origin, errors);
        }
        let value = e["value"].as_str().unwrap_or("").to_string();
        check_env_value(&name, &value, origin, errors);
        // $(VAR) is expanded only from variables defined earlier in the list.
        let mut rest = value.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..]
                .find(')')
                .map(|i| start + i)
                .unwrap_or(rest.len());
            let var = &rest[start + 2..end];
            if !defined.iter().any(|(n, _)| n == var) {
                errors.push(format!(
                    "{origin}: {name} refers to $({var}), which is not defined before it"
                ));
            }
            rest = &rest[end.min(rest.len())..];
        }
        if defined.iter().any(|(n, _)| *n == name) {
            errors.push(format!("{origin}: {name} is set twice"));
        }
        defined.push((name, value));
    }
    defined
}

fn env_of<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The pod volume named `name`.
fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The container's mount that holds `file`: (volume name, read-only, path of the file
/// inside the volume).
fn mount_of(c: &Value, file: &str) -> (String, bool, String) {
    seq(&c["volumeMounts"])
        .iter()
        .find_map(|m| {
            let dir = m["mountPath"].as_str()?;
            let rel = file.strip_prefix(dir)?.strip_prefix('/')?;
            Some((
                s(&m["name"], "volumeMount name").to_string(),
                m["readOnly"].as_bool() == Some(true),
                rel.to_string(),
            ))
        })
        .unwrap_or_else(|| panic!("no volume mount holds {file}"))
}

/// Asserts that `file` is the key `key` of the ConfigMap or Secret (`kind`:
/// "configMap" or "secret") named `object_name`, mounted read-only in `c`; returns
/// the volume.
fn assert_file_from<'a>(
    pod: &'a Value,
    c: &Value,
    file: &str,
    kind: &str,
    object_name: &str,
    key: &str,
) -> &'a Value {
    let (vol, read_only, rel) = mount_of(c, file);
    assert!(read_only, "{file}: volume {vol} is mounted read-only");
    let v = volume(pod, &vol);
    let source = &v[kind];
    let name_field = if kind == "secret" {
        "secretName"
    } else {
        "name"
    };
    assert_eq!(
        source[name_field].as_str(),
        Some(object_name),
        "{file}: volume {vol} is the {kind} {object_name}"
    );
    let items = seq(&source["items"]);
    let found = if items.is_empty() {
        rel == key
    } else {
        items
            .iter()
            .any(|i| i["key"].as_str() == Some(key) && i["path"].as_str() == Some(rel.as_str()))
    };
    assert!(
        found,
        "{file}: volume {vol} puts the key {key} of {kind} {object_name} at {rel}"
    );
    v
}

fn finish(what: &str, errors: Vec<String>) {
    assert!(errors.is_empty(), "{what}:\n  {}", errors.join("\n  "));
}

#[test]
fn deployment_and_daemonset_flags_exist_in_the_binaries() {
    let mut errors = Vec::new();
    let deployment = object(
        "kubernetes/controller.yaml",
        "Deployment",
        "twill-controller",
    );
    let pod = &deployment["spec"]["template"]["spec"];
    check_container_flags(
        "twill-controller",
        container(pod, "controller"),
        "Deployment twill-controller",
        &mut errors,
    );

    let ds = object("kubernetes/agent.yaml", "DaemonSet", "twill-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let env = check_container_flags(
        "twill-agent",
        container(pod, "agent"),
        "DaemonSet twill-agent",
        &mut errors,
    );
    finish("manifests drifted from the binaries' flags", errors);

    // The node name comes from the downward API (the CN the agent asks for); the
    // agent keeps the key and certificate it makes on the node, and bootstraps with
    // the token.
    let node = seq(&container(pod, "agent")["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("TWILL_NODE_NAME"))
        .expect("TWILL_NODE_NAME is set");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    assert_eq!(
        env_of(&env, "TWILL_TLS_CERT"),
        Some("/var/lib/twill/pki/node.crt")
    );
    assert_eq!(
        env_of(&env, "TWILL_TLS_KEY"),
        Some("/var/lib/twill/pki/node.key")
    );
    assert!(
        env_of(&env, "TWILL_BOOTSTRAP_TOKEN_FILE").is_some_and(|v| !v.is_empty()),
        "the agent bootstraps with a token (TWILL_BOOTSTRAP_TOKEN_FILE)"
    );

    // The controller signs the certificates of bootstrapping agents.
    let controller_env: Vec<String> =
        seq(&container(&deployment["spec"]["template"]["spec"], "controller")["env"])
            .iter()
            .map(|e| s(&e["name"], "env name").to_string())
            .collect();
    for var in ["TWILL_SIGNING_CERT", "TWILL_SIGNING_KEY"] {
        assert!(
            controller_env.iter().any(|n| n == var),
            "the controller Deployment sets {var}"
        );
    }
}

#[test]
fn systemd_units_and_env_files_use_existing_variables() {
    let mut errors = Vec::new();
    for (bin, unit, env_file) in [
        (
            "twill-controller",
            "systemd/twill-controller.service",
            "systemd/controller.env",
        ),
        (
            "twill-agent",
            "systemd/twill-agent.service",
            "systemd/agent.env",
        ),
    ] {
        let help = help(bin);
        let unit_text = read(unit);
        for line in unit_text.lines() {
            if let Some(assign) = line.strip_prefix("Environment=") {
                let (var, value) = assign.split_once('=').unwrap_or((assign, ""));
                check_env_name(bin, &help, var, unit, &mut errors);
                check_env_value(var, value, unit, &mut errors);
            }
            if let Some(exec) = line.strip_prefix("ExecStart=") {
                for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
                    let flag = flag.split('=').next().unwrap();
                    if !has_flag(&help, flag) {
                        errors.push(format!("{unit}: {flag} is not a flag of {bin}"));
                    }
                }
            }
        }
        assert!(unit_text.contains(&format!(
            "EnvironmentFile=/etc/twill/{}",
            env_file.trim_start_matches("systemd/")
        )));
        // Commented-out examples count too: operators uncomment them.
        for line in read(env_file).lines() {
            let line = line.trim().trim_start_matches('#').trim();
            let Some((var, value)) = line.split_once('=') else {
                continue;
            };
            if var.is_empty()
                || !var
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                continue;
            }
            check_env_name(bin, &help, var, env_file, &mut errors);
            check_env_value(var, value, env_file, &mut errors);
        }
    }
    finish("systemd files drifted from the binaries' flags", errors);

    // Zero-touch node identity: the agent bootstraps with a token file and keeps its
    // key and certificate in its state directory; the controller signs.
    let vars = |rel: &str| -> Vec<(String, String)> {
        read(rel)
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let l = l.strip_prefix("Environment=").unwrap_or(l);
                let (k, v) = l.split_once('=')?;
                (!k.starts_with('#') && k.starts_with("TWILL_")).then(|| (k.into(), v.into()))
            })
            .collect()
    };
    let unit = read("systemd/twill-agent.service");
    assert!(
        unit.lines().any(|l| l == "StateDirectory=twill/pki"),
        "twill-agent.service: StateDirectory=twill/pki (writable under ProtectSystem=strict)"
    );
    let agent_unit = vars("systemd/twill-agent.service");
    assert_eq!(
        env_of(&agent_unit, "TWILL_TLS_CERT"),
        Some("/var/lib/twill/pki/node.crt")
    );
    assert_eq!(
        env_of(&agent_unit, "TWILL_TLS_KEY"),
        Some("/var/lib/twill/pki/node.key")
    );
    let agent_env = vars("systemd/agent.env");
    assert_eq!(
        env_of(&agent_env, "TWILL_BOOTSTRAP_TOKEN_FILE"),
        Some("/etc/twill/bootstrap-token"),
        "agent.env sets TWILL_BOOTSTRAP_TOKEN_FILE"
    );
    let controller_env = vars("systemd/controller.env");
    assert!(
        matches!(env_of(&controller_env, "TWILL_STORE"), None | Some("sled")),
        "controller.env keeps the sled store (the HA one is systemd/ha/controller.env)"
    );
    for var in ["TWILL_SIGNING_CERT", "TWILL_SIGNING_KEY"] {
        assert!(
            env_of(&controller_env, var).is_some(),
            "controller.env sets {var}"
        );
    }
}

#[test]
fn controller_deployment_meets_the_contract() {
    let d = object(
        "kubernetes/controller.yaml",
        "Deployment",
        "twill-controller",
    );
    assert_eq!(d["metadata"]["namespace"].as_str(), Some("twill-system"));
    assert_eq!(
        d["spec"]["replicas"].as_u64(),
        Some(1),
        "one controller per store"
    );
    assert_eq!(
        d["spec"]["strategy"]["type"].as_str(),
        Some("Recreate"),
        "two controllers must never share the store"
    );
    let pod = &d["spec"]["template"]["spec"];
    let c = container(pod, "controller");
    let port = |name: &str| {
        seq(&c["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port("grpc"), 8474);
    assert_eq!(port("metrics"), 8475);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("metrics"),
            "{probe}"
        );
    }
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(!c["resources"][r][k].is_null(), "resources.{r}.{k}");
        }
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );

    // The data dir is the PVC; net-conf.json and the TLS files come from the ConfigMap
    // and the Secret, at the paths the env points to.
    let env: Vec<(String, String)> = seq(&c["env"])
        .iter()
        .map(|e| {
            (
                s(&e["name"], "env").to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mount = |vol: &str| {
        seq(&c["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some(vol))
            .map(|m| s(&m["mountPath"], "mountPath").to_string())
            .unwrap_or_else(|| panic!("no mount of volume {vol}"))
    };
    let volume = |vol: &str| volume(pod, vol).clone();
    assert_eq!(env_of(&env, "TWILL_DATA_DIR"), Some(mount("data").as_str()));
    // The default stays the single controller on sled (the HA variant is
    // deploy/kubernetes-ha).
    assert!(
        matches!(env_of(&env, "TWILL_STORE"), None | Some("sled")),
        "the base Deployment keeps the sled store"
    );
    let pvc = volume("data")["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("data is a PVC")
        .to_string();
    object("kubernetes/controller.yaml", "PersistentVolumeClaim", &pvc);
    assert_eq!(
        env_of(&env, "TWILL_NET_CONF"),
        Some(format!("{}/net-conf.json", mount("config")).as_str())
    );
    assert_eq!(
        volume("config")["configMap"]["name"].as_str(),
        Some("twill-cfg")
    );
    let tls = mount("tls");
    assert_eq!(
        volume("tls")["secret"]["secretName"].as_str(),
        Some("twill-controller-tls")
    );
    assert_eq!(
        env_of(&env, "TWILL_TLS_CERT"),
        Some(format!("{tls}/tls.crt").as_str())
    );
    assert_eq!(
        env_of(&env, "TWILL_TLS_KEY"),
        Some(format!("{tls}/tls.key").as_str())
    );
    assert_eq!(
        env_of(&env, "TWILL_TLS_CLIENT_CA"),
        Some(format!("{tls}/ca.crt").as_str())
    );

    // The signing CA for bootstrapping agents: tls.crt/tls.key of the Secret twill-ca
    // (the layout of `kubectl create secret tls` and of cert-manager's CA Secret).
    for (var, key) in [
        ("TWILL_SIGNING_CERT", "tls.crt"),
        ("TWILL_SIGNING_KEY", "tls.key"),
    ] {
        let file = env_of(&env, var).unwrap_or_else(|| panic!("the controller sets {var}"));
        let v = assert_file_from(pod, c, file, "secret", "twill-ca", key);
        assert_ne!(
            v["secret"]["optional"].as_bool(),
            Some(true),
            "the signing CA is not optional"
        );
    }
    let (signing_vol, _, _) = mount_of(c, env_of(&env, "TWILL_SIGNING_KEY").unwrap());
    assert_ne!(
        signing_vol, "tls",
        "the signing CA has a volume of its own (not the serving certificate's Secret)"
    );

    // Services: gRPC under the name the agents dial, and metrics.
    let grpc = object(
        "kubernetes/controller-services.yaml",
        "Service",
        "twill-controller",
    );
    assert_eq!(grpc["spec"]["ports"][0]["port"].as_u64(), Some(8474));
    let metrics = object(
        "kubernetes/controller-services.yaml",
        "Service",
        "twill-controller-metrics",
    );
    assert_eq!(metrics["spec"]["ports"][0]["port"].as_u64(), Some(8475));
}

#[test]
fn agent_daemonset_meets_the_contract() {
    let ds = object("kubernetes/agent.yaml", "DaemonSet", "twill-agent");
    assert_eq!(ds["metadata"]["namespace"].as_str(), Some("twill-system"));
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
    assert!(
        !strategy["rollingUpdate"]["maxUnavailable"].is_null(),
        "maxUnavailable is set"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    assert!(
        seq(&pod["tolerations"])
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists")
                && t["key"].is_null()
                && t["effect"].is_null()),
        "a toleration of every taint (operator: Exists, no key, no effect)"
    );
    let c = container(pod, "agent");
    let sc = &c["securityContext"];
    assert_ne!(
        sc["privileged"].as_bool(),
        Some(true),
        "NET_ADMIN and NET_RAW instead of privileged"
    );
    let added: BTreeSet<&str> = seq(&sc["capabilities"]["add"])
        .iter()
        .map(|v| s(v, "capability"))
        .collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(
        seq(&sc["capabilities"]["drop"])
            .first()
            .and_then(Value::as_str),
        Some("ALL")
    );

    // The controller URL names the Service, in its namespace, on the gRPC port.
    let url = seq(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("TWILL_CONTROLLER"))
        .and_then(|e| e["value"].as_str())
        .expect("TWILL_CONTROLLER");
    assert_eq!(url, "https://twill-controller.twill-system.svc:8474");
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/livez")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let metrics = seq(&c["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .expect("metrics port");
    assert_eq!(metrics["containerPort"].as_u64(), Some(8476));

    // Host paths: subnet.env, the CNI dirs, the node's own key and certificate. No
    // per-node PKI prepared by hand.
    let host_paths: BTreeSet<&str> = seq(&pod["volumes"])
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for p in [
        "/run/flannel",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/twill",
    ] {
        assert!(host_paths.contains(p), "hostPath {p} is mounted");
    }
    assert!(
        !host_paths.contains("/etc/twill/pki"),
        "the agent no longer needs a hand-made /etc/twill/pki on the node"
    );
    let mounts: BTreeSet<&str> = seq(&c["volumeMounts"])
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains("/run/flannel"));

    let env_value = |name: &str| {
        seq(&c["env"])
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the agent sets {name}"))
    };
    // The key and certificate: written by the agent to a hostPath that is created when
    // missing and outlives the pod, so a restart does not bootstrap again.
    for var in ["TWILL_TLS_CERT", "TWILL_TLS_KEY"] {
        let file = env_value(var);
        let (vol, read_only, _) = mount_of(c, file);
        assert!(
            !read_only,
            "{var}={file}: the agent writes it (volume {vol})"
        );
        let host = &volume(pod, &vol)["hostPath"];
        // The parent of the key directory: the agent makes pki/ itself, 0700, and
        // refuses one others can read (kubelet would make it 0755).
        assert_eq!(
            host["path"].as_str(),
            Some("/var/lib/twill"),
            "{var}={file}: on the node"
        );
        assert_eq!(
            host["type"].as_str(),
            Some("DirectoryOrCreate"),
            "{var}: nothing to prepare on the node"
        );
    }
    // The bootstrap token from the Secret twill-bootstrap-token, key `token`.
    let token = assert_file_from(
        pod,
        c,
        env_value("TWILL_BOOTSTRAP_TOKEN_FILE"),
        "secret",
        "twill-bootstrap-token",
        "token",
    );
    // Kubernetes reads YAML 1.1, where 0400 is octal; serde_yaml (YAML 1.2) leaves
    // it a string.
    let mode = &token["secret"]["defaultMode"];
    let bits = match mode {
        Value::String(m) if m.starts_with('0') => u32::from_str_radix(m, 8).ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    assert!(
        bits.is_some_and(|m| m & 0o077 == 0),
        "the token is readable by its owner only (defaultMode {mode:?})"
    );
    // The CA that signed the controller's certificate, from the ConfigMap twill-ca.
    assert_file_from(
        pod,
        c,
        env_value("TWILL_TLS_CA"),
        "configMap",
        "twill-ca",
        "ca.crt",
    );

    // The init container installs twill-cni and the conflist with the image's script.
    let init = seq(&pod["initContainers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("install-cni"))
        .expect("init container install-cni");
    assert_eq!(
        seq(&init["command"]).first().and_then(Value::as_str),
        Some("/usr/local/bin/twill-install-cni")
    );
    let init_mounts: BTreeSet<&str> = seq(&init["volumeMounts"])
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for p in [
        "/host/opt/cni/bin",
        "/host/etc/cni/net.d",
        "/etc/twill/config",
    ] {
        assert!(
            init_mounts.contains(p),
            "the init container mounts {p} (paths of twill-install-cni)"
        );
    }
}

#[test]
fn configmap_has_flannels_keys_and_conflist() {
    let cm = object("kubernetes/configmap.yaml", "ConfigMap", "twill-cfg");
    let conflist: serde_json::Value =
        serde_json::from_str(s(&cm["data"]["cni-conf.json"], "cni-conf.json"))
            .expect("cni-conf.json is JSON");
    let expected: serde_json::Value = serde_json::from_str(
        r#"{"name":"cbr0","cniVersion":"0.3.1","cniVersions":["0.3.1","1.0.0","1.1.0"],"plugins":[{"type":"twill-cni","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    assert_eq!(conflist, expected);
    let net_conf = s(&cm["data"]["net-conf.json"], "net-conf.json");
    twill_common::NetConf::parse(net_conf)
        .unwrap_or_else(|e| panic!("net-conf.json in the ConfigMap: {e}"));
    let example: serde_json::Value = serde_json::from_str(&read("examples/net-conf.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(net_conf).unwrap(),
        example,
        "the ConfigMap's net-conf.json is deploy/examples/net-conf.json"
    );
}

#[test]
fn networks_configmap_is_the_controllers_networks_dir() {
    use twill_common::networks::{check_against, Network, NetworkName};
    // Several networks (issue 26): the ConfigMap twill-networks is the controller's
    // --networks-dir, mounted whole and read-only. No items and no subPath: only then
    // does the kubelet update the files in place, which the controller re-reads to add
    // and retire networks.
    let d = object(
        "kubernetes/controller.yaml",
        "Deployment",
        "twill-controller",
    );
    let pod = &d["spec"]["template"]["spec"];
    let c = container(pod, "controller");
    let env = env_pairs(c);
    let dir = env_of(&env, "TWILL_NETWORKS_DIR").expect("the controller sets TWILL_NETWORKS_DIR");
    let mount = seq(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("no volume is mounted at TWILL_NETWORKS_DIR {dir}"));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{dir} is read-only"
    );
    assert!(
        mount["subPath"].is_null(),
        "{dir} is mounted without subPath"
    );
    let v = volume(pod, s(&mount["name"], "volumeMount name"));
    assert_eq!(v["configMap"]["name"].as_str(), Some("twill-networks"));
    assert!(
        v["configMap"]["items"].is_null(),
        "every key of twill-networks is a file"
    );

    // Every key is a network file that fits beside `default` and the others: what the
    // controller would refuse is refused here first. The example is such a file too.
    let default = twill_common::NetConf::parse(&read("examples/net-conf.json")).unwrap();
    let mut networks = vec![Network::default_from(default)];
    let cm = object("kubernetes/configmap.yaml", "ConfigMap", "twill-networks");
    let keys = cm["data"].as_mapping().cloned().unwrap_or_default();
    let example = read("examples/blue.json");
    let files = keys
        .iter()
        .map(|(k, v)| (s(k, "key").to_string(), s(v, "value").to_string()))
        .chain([("blue.json".to_string(), example)]);
    for (key, text) in files {
        let stem = key
            .strip_suffix(".json")
            .unwrap_or_else(|| panic!("twill-networks key {key} is <name>.json"));
        let name = NetworkName::new(stem).unwrap_or_else(|e| panic!("{key}: {e}"));
        let n = Network::parse(name, &text, Path::new(&key)).unwrap_or_else(|e| panic!("{e}"));
        check_against(&n, &networks).unwrap_or_else(|e| panic!("{key}: {e}"));
        networks.push(n);
    }

    // The systemd settings name both ends (commented: the defaults).
    assert!(env_file("systemd/controller.env")
        .1
        .iter()
        .any(|v| v == "TWILL_NETWORKS_DIR"));
    assert!(env_file("systemd/agent.env")
        .1
        .iter()
        .any(|v| v == "TWILL_NETWORKS"));
}

#[test]
fn controller_certificate_names_the_service() {
    // The agents dial twill-controller.twill-system.svc: both ways of making the
    // controller's certificate must put that name in it.
    let dns = "twill-controller.twill-system.svc";
    let cert = object(
        "kubernetes/cert-manager/certificates.yaml",
        "Certificate",
        "twill-controller",
    );
    assert_eq!(
        cert["spec"]["secretName"].as_str(),
        Some("twill-controller-tls")
    );
    assert!(seq(&cert["spec"]["dnsNames"])
        .iter()
        .any(|n| n.as_str() == Some(dns)));
    let readme = read("README.md");
    assert!(
        readme
            .lines()
            .any(|l| l.contains("twillctl certs issue controller")
                && l.contains(&format!("--dns {dns}"))),
        "deploy/README.md issues the controller certificate with --dns {dns}"
    );
    for name in [
        "twill-controller-tls",
        "tls.crt",
        "tls.key",
        "ca.crt",
        "twill-bootstrap-token",
        "configmap twill-ca",
        "secret tls twill-ca",
        "twillctl token create",
        "twillctl certs revoke",
        "/var/lib/twill/pki",
        "/etc/twill/bootstrap-token",
    ] {
        assert!(readme.contains(name), "deploy/README.md documents {name}");
    }
}

#[test]
fn dockerfiles_build_existing_binaries() {
    let known_bins = ["twill-controller", "twillctl", "twill-agent", "twill-cni"];
    let packages = ["twill-server", "twill-ctl", "twill-agent"];
    for (file, entrypoint) in [
        ("docker/Dockerfile.controller", "twill-controller"),
        ("docker/Dockerfile.agent", "twill-agent"),
    ] {
        let text = read(file);
        let words: Vec<&str> = text.split_whitespace().collect();
        for pair in words.windows(2) {
            match pair[0] {
                "--bin" => assert!(
                    known_bins.contains(&pair[1]),
                    "{file}: unknown binary {}",
                    pair[1]
                ),
                "-p" => assert!(
                    packages.contains(&pair[1]),
                    "{file}: unknown package {}",
                    pair[1]
                ),
                _ => {}
            }
        }
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{entrypoint}\"]")),
            "{file}: entrypoint {entrypoint}"
        );
        assert!(
            text.contains("--locked"),
            "{file}: builds with the lock file"
        );
        for line in text
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
        {
            let src = line.split_whitespace().rev().nth(1).unwrap();
            if src != "." {
                assert!(
                    repo().join(src).exists(),
                    "{file}: COPY source {src} exists"
                );
            }
        }
    }
    let agent = read("docker/Dockerfile.agent");
    for pkg in ["nftables", "ethtool", "containernetworking-plugins"] {
        assert!(agent.contains(pkg), "the agent image installs {pkg}");
    }
    assert!(
        agent.contains("--bin twill-cni"),
        "the agent image carries twill-cni"
    );
    assert!(agent.contains("/usr/local/bin/twill-install-cni"));
    // Binaries named in the Dockerfiles exist in the workspace (built by cargo build --bins).
    for bin in known_bins {
        assert!(
            bin_dir().join(bin).is_file() || bin == "twill-cni",
            "{bin} is built"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The HA variant (issue 14): deploy/kubernetes-ha (an overlay of deploy/kubernetes),
// deploy/kubernetes-ha/cert-manager and deploy/systemd/ha.

/// The controller's flags of the etcd store and HA, the contract the HA variant is
/// written against: `--store sled|etcd`, the etcd endpoints, mutual-TLS files and key
/// prefix, and the URL other replicas and agents reach this replica at.
const CONTROLLER_HA_FLAGS: &[&str] = &[
    "--store",
    "--etcd-endpoints",
    "--etcd-cert",
    "--etcd-key",
    "--etcd-ca",
    "--etcd-prefix",
    "--advertise-url",
];

/// `--etcd-ca` -> `TWILL_ETCD_CA`.
fn flag_env(flag: &str) -> String {
    format!(
        "TWILL_{}",
        flag.trim_start_matches("--")
            .to_ascii_uppercase()
            .replace('-', "_")
    )
}

/// `bin --help`, extended by `contract` while the binary has none of its flags yet
/// (they are being built alongside); once it has any, the binary alone decides, so a
/// flag of the contract that it lacks (or spells differently) fails the checks.
fn help_with_contract(bin: &str, contract: &[&str]) -> String {
    let mut help = help(bin);
    if contract.is_empty() || contract.iter().any(|f| has_flag(&help, f)) {
        return help;
    }
    loud(&format!(
        "NOTE: {bin} has none of {contract:?} yet; the HA variant is checked against \
         the contract (issue 14) instead of `{bin} --help`"
    ));
    for flag in contract {
        help.push_str(&format!(" {flag} <VALUE> [env: {}=]", flag_env(flag)));
    }
    help
}

/// The objects the kustomization in deploy/`rel` renders to: with `kubectl kustomize`
/// when kubectl is installed, else with deploy/check/render_kustomization.py
/// (validate_manifests.py checks that the two agree). None, after a loud SKIPPED (a
/// failure when CI is set), when neither can run.
fn render(rel: &str) -> Option<Vec<Value>> {
    let dir = deploy(rel);
    let skipped = |why: String| {
        skip(&format!("the checks of the rendered {rel}"), &why);
        None
    };
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match Command::new("python3")
                .arg(deploy("check/render_kustomization.py"))
                .arg(&dir)
                .output()
            {
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    if !out.status.success() && stderr.contains("ModuleNotFoundError") {
                        return skipped(format!("no kubectl, and python3 lacks PyYAML: {stderr}"));
                    }
                    out
                }
                Err(e) => return skipped(format!("neither kubectl nor python3 runs ({e})")),
            }
        }
        Err(e) => panic!("kubectl kustomize {}: {e}", dir.display()),
    };
    assert!(
        out.status.success(),
        "rendering {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("the rendering is UTF-8");
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("rendered {rel}: {e}")))
            .filter(|v| !v.is_null())
            .collect(),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

/// Whether a label selector (matchLabels, and matchExpressions with In / NotIn /
/// Exists / DoesNotExist) selects objects with `labels`. An empty selector selects
/// nothing here (in a PDB it would select every pod: never what we want).
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels[k].as_str();
    let match_labels = selector["matchLabels"].as_mapping();
    let exprs = seq(&selector["matchExpressions"]);
    if match_labels.is_none_or(|m| m.is_empty()) && exprs.is_empty() {
        return false;
    }
    match_labels.into_iter().flatten().all(|(k, v)| {
        k.as_str()
            .is_some_and(|k| label(k).is_some() && label(k) == v.as_str())
    }) && exprs.iter().all(|e| {
        let key = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = seq(&e["values"]).iter().filter_map(Value::as_str).collect();
        match e["operator"].as_str() {
            Some("In") => label(key).is_some_and(|l| values.contains(&l)),
            Some("NotIn") => label(key).is_none_or(|l| !values.contains(&l)),
            Some("Exists") => label(key).is_some(),
            Some("DoesNotExist") => label(key).is_none(),
            _ => false,
        }
    })
}

/// `https://HOST:PORT` (an optional path), as the etcd endpoints, the advertise URL
/// and the agent's controller URLs are: the host, and the port when given.
fn https_url(url: &str) -> Option<(String, Option<u16>)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, Some(p.parse().ok()?)),
        _ => (authority, None),
    };
    (!host.is_empty() && !host.contains(char::is_whitespace)).then(|| (host.to_string(), port))
}

/// The env of a container as (name, value) pairs (value "" for valueFrom).
fn env_pairs(c: &Value) -> Vec<(String, String)> {
    seq(&c["env"])
        .iter()
        .map(|e| {
            (
                s(&e["name"], "env name").to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn ha_controller_deployment_meets_the_contract() {
    let Some(ha) = render("kubernetes-ha") else {
        return;
    };
    let Some(base) = render("kubernetes") else {
        return;
    };
    let d = find(&ha, "Deployment", "twill-controller");
    assert_eq!(d["metadata"]["namespace"].as_str(), Some("twill-system"));
    let replicas = d["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3, "three controllers");

    // One replica at a time: a rolling update that keeps two up.
    let strategy = &d["spec"]["strategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
    let max_unavailable = strategy["rollingUpdate"]["maxUnavailable"].as_u64();
    assert_eq!(max_unavailable, Some(1), "maxUnavailable: 1");
    assert!(
        matches!(strategy["rollingUpdate"]["maxSurge"].as_u64(), Some(0 | 1)),
        "maxSurge is 0 or 1: {:?}",
        strategy["rollingUpdate"]["maxSurge"]
    );

    let template = &d["spec"]["template"];
    let pod_labels = &template["metadata"]["labels"];
    assert!(
        selects(&d["spec"]["selector"], pod_labels),
        "the Deployment selects its pods"
    );

    // The PodDisruptionBudget: selects the controller pods (and not the agents), keeps
    // 2 of 3, and agrees with the rolling update.
    let pdbs: Vec<&Value> = ha
        .iter()
        .filter(|o| o["kind"].as_str() == Some("PodDisruptionBudget"))
        .collect();
    assert_eq!(pdbs.len(), 1, "one PodDisruptionBudget");
    let pdb = pdbs[0];
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert_eq!(pdb["metadata"]["namespace"].as_str(), Some("twill-system"));
    let min_available = pdb["spec"]["minAvailable"]
        .as_u64()
        .expect("minAvailable is a number");
    assert_eq!(min_available, 2, "minAvailable: 2");
    assert!(pdb["spec"]["maxUnavailable"].is_null());
    assert!(
        selects(&pdb["spec"]["selector"], pod_labels),
        "the PodDisruptionBudget selects the controller pods"
    );
    let agent = find(&ha, "DaemonSet", "twill-agent");
    assert!(
        !selects(
            &pdb["spec"]["selector"],
            &agent["spec"]["template"]["metadata"]["labels"]
        ),
        "the PodDisruptionBudget does not select the agents"
    );
    assert!(
        min_available < replicas && replicas - max_unavailable.unwrap() >= min_available,
        "a drain can take one controller, and the rolling update keeps minAvailable up"
    );

    // No two controllers on one node.
    let pod = &template["spec"];
    let anti =
        seq(&pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]);
    assert!(
        anti.iter().any(|t| {
            t["topologyKey"].as_str() == Some("kubernetes.io/hostname")
                && selects(&t["labelSelector"], pod_labels)
                && t["namespaces"].is_null()
                && t["namespaceSelector"].is_null()
        }),
        "a required pod anti-affinity on kubernetes.io/hostname against the controller pods: {anti:?}"
    );
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));

    // State in etcd: no PVC, no data volume, no --data-dir.
    for o in &ha {
        assert_ne!(
            o["kind"].as_str(),
            Some("PersistentVolumeClaim"),
            "no PVC in the HA variant (the state is in etcd)"
        );
    }
    assert!(
        seq(&pod["volumes"])
            .iter()
            .all(|v| v["persistentVolumeClaim"].is_null()),
        "no PVC volume"
    );

    // Flags: the binary's (or, until it has them, the contract's).
    let c = container(pod, "controller");
    let mut errors = Vec::new();
    let help = help_with_contract("twill-controller", CONTROLLER_HA_FLAGS);
    check_container_flags_in(
        "twill-controller",
        &help,
        c,
        "HA Deployment twill-controller",
        &mut errors,
    );
    finish(
        "the HA manifests drifted from the controller's flags",
        errors,
    );
    let env = env_pairs(c);
    let get =
        |var: &str| env_of(&env, var).unwrap_or_else(|| panic!("the HA controller sets {var}"));
    assert!(
        env_of(&env, "TWILL_DATA_DIR").is_none(),
        "no --data-dir in etcd mode"
    );
    assert_eq!(get("TWILL_STORE"), "etcd");
    let endpoints: Vec<&str> = get("TWILL_ETCD_ENDPOINTS").split(',').collect();
    for e in &endpoints {
        assert!(
            https_url(e).is_some_and(|(_, port)| port.is_some()),
            "TWILL_ETCD_ENDPOINTS: {e:?} is an https URL with a port"
        );
    }
    if let Some(prefix) = env_of(&env, "TWILL_ETCD_PREFIX") {
        assert!(
            prefix.starts_with('/') && prefix.ends_with('/'),
            "TWILL_ETCD_PREFIX {prefix:?} is a /key/ prefix"
        );
    }
    // The etcd client certificate, key and CA: the keys of the Secret
    // twill-etcd-client, mounted read-only where the variables point.
    for (var, key) in [
        ("TWILL_ETCD_CERT", "tls.crt"),
        ("TWILL_ETCD_KEY", "tls.key"),
        ("TWILL_ETCD_CA", "ca.crt"),
    ] {
        let v = assert_file_from(pod, c, get(var), "secret", "twill-etcd-client", key);
        assert_ne!(
            v["secret"]["optional"].as_bool(),
            Some(true),
            "the etcd client Secret is not optional"
        );
    }
    // The advertise URL: the pod's IP (downward API) on the gRPC port.
    let pod_ip = seq(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("POD_IP"))
        .expect("POD_IP is set");
    assert_eq!(
        pod_ip["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("status.podIP"),
        "POD_IP comes from the downward API"
    );
    let grpc = seq(&c["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .and_then(|p| p["containerPort"].as_u64())
        .expect("grpc port");
    assert_eq!(
        get("TWILL_ADVERTISE_URL"),
        format!("https://$(POD_IP):{grpc}"),
        "the advertise URL is the pod IP on the gRPC port"
    );
    // Ready once connected to etcd and caught up; alive as before.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("metrics"),
            "{probe}"
        );
    }

    // Nothing else changes against the default: the same settings (but --data-dir),
    // the same volumes and mounts (but the data volume), plus the HA ones only.
    let bd = find(&base, "Deployment", "twill-controller");
    let bpod = &bd["spec"]["template"]["spec"];
    let bc = container(bpod, "controller");
    let base_env = env_pairs(bc);
    for (name, value) in &base_env {
        if name != "TWILL_DATA_DIR" {
            assert_eq!(
                env_of(&env, name),
                Some(value.as_str()),
                "the HA controller keeps {name}={value} of the default"
            );
        }
    }
    let mut expected: BTreeSet<String> = base_env
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != "TWILL_DATA_DIR")
        .collect();
    expected.extend(CONTROLLER_HA_FLAGS.iter().map(|f| flag_env(f)));
    expected.insert("POD_IP".into());
    let have: BTreeSet<String> = env.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        have, expected,
        "the HA controller's env is the default's, without TWILL_DATA_DIR, with the HA flags and POD_IP"
    );
    let data_dir = env_of(&base_env, "TWILL_DATA_DIR").unwrap();
    let data_vol = seq(&bc["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(data_dir))
        .map(|m| s(&m["name"], "volumeMount name").to_string())
        .expect("the default mounts a volume at TWILL_DATA_DIR");
    let named = |list: &Value| -> Vec<(String, Value)> {
        seq(list)
            .iter()
            .map(|v| (s(&v["name"], "name").to_string(), v.clone()))
            .collect()
    };
    for (what, ha_list, base_list) in [
        ("volume", &pod["volumes"], &bpod["volumes"]),
        ("volume mount", &c["volumeMounts"], &bc["volumeMounts"]),
    ] {
        let ha_items = named(ha_list);
        let base_items: Vec<(String, Value)> = named(base_list)
            .into_iter()
            .filter(|(n, _)| *n != data_vol)
            .collect();
        for item in &base_items {
            assert!(
                ha_items.contains(item),
                "the HA controller keeps the {what} {item:?}"
            );
        }
        let extra: Vec<&str> = ha_items
            .iter()
            .filter(|i| !base_items.contains(i))
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            extra,
            ["etcd"],
            "the HA controller adds only the {what} etcd"
        );
    }
    for field in [
        "hostNetwork",
        "securityContext",
        "tolerations",
        "serviceAccountName",
    ] {
        assert_eq!(pod[field], bpod[field], "pod {field} as in the default");
    }
    for field in ["securityContext", "resources", "ports", "image"] {
        assert_eq!(c[field], bc[field], "container {field} as in the default");
    }

    // Everything but the controller's Deployment and PVC and the PDB is the default's.
    let key = |o: &Value| {
        format!(
            "{}/{}",
            o["kind"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let changed = [
        "Deployment/twill-controller",
        "PersistentVolumeClaim/twill-controller-data",
        &format!(
            "PodDisruptionBudget/{}",
            pdb["metadata"]["name"].as_str().unwrap()
        ),
    ];
    let ha_rest: Vec<&Value> = ha
        .iter()
        .filter(|o| !changed.contains(&key(o).as_str()))
        .collect();
    let base_rest: Vec<&Value> = base
        .iter()
        .filter(|o| !changed.contains(&key(o).as_str()))
        .collect();
    assert_eq!(
        ha_rest, base_rest,
        "the HA variant changes nothing but the controller (same Services, agents, ConfigMap)"
    );

    // The agents keep the Service, which spreads them over the replicas; the Service
    // selects every controller pod.
    let agent_env = env_pairs(container(&agent["spec"]["template"]["spec"], "agent"));
    assert_eq!(
        env_of(&agent_env, "TWILL_CONTROLLER"),
        Some("https://twill-controller.twill-system.svc:8474"),
        "the agents dial the Service"
    );
    let svc = find(&ha, "Service", "twill-controller");
    let selector = svc["spec"]["selector"]
        .as_mapping()
        .expect("a Service selector");
    assert!(
        !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| pod_labels[k.as_str().unwrap()] == *v),
        "the Service twill-controller selects the controller pods"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(grpc));
}

#[test]
fn ha_controller_certificate_is_for_server_and_client_auth() {
    let Some(ha) = render("kubernetes-ha/cert-manager") else {
        return;
    };
    let Some(base) = render("kubernetes/cert-manager") else {
        return;
    };
    let Some(ha_deploy) = render("kubernetes-ha") else {
        return;
    };
    let cert = find(&ha, "Certificate", "twill-controller");
    let spec = &cert["spec"];
    // The Secret the HA Deployment mounts for TWILL_TLS_CERT/TWILL_TLS_KEY.
    let d = find(&ha_deploy, "Deployment", "twill-controller");
    let pod = &d["spec"]["template"]["spec"];
    let c = container(pod, "controller");
    let env = env_pairs(c);
    for (var, key) in [("TWILL_TLS_CERT", "tls.crt"), ("TWILL_TLS_KEY", "tls.key")] {
        assert_file_from(
            pod,
            c,
            env_of(&env, var).unwrap(),
            "secret",
            s(&spec["secretName"], "secretName"),
            key,
        );
    }
    let usages: BTreeSet<&str> = seq(&spec["usages"]).iter().map(|u| s(u, "usage")).collect();
    for u in ["server auth", "client auth", "digital signature"] {
        assert!(
            usages.contains(u),
            "the HA controller certificate has usage {u}: {usages:?}"
        );
    }
    assert_eq!(
        seq(&spec["subject"]["organizations"])
            .iter()
            .map(|o| s(o, "organization"))
            .collect::<Vec<_>>(),
        ["twill:controllers"],
        "subject O=twill:controllers"
    );
    assert_eq!(spec["commonName"].as_str(), Some("twill-controller"));
    assert!(
        seq(&spec["dnsNames"])
            .iter()
            .any(|n| n.as_str() == Some("twill-controller.twill-system.svc")),
        "the Service name the agents dial"
    );
    let ips = seq(&spec["ipAddresses"]);
    assert!(
        !ips.is_empty(),
        "ipAddresses: the addresses the replicas advertise (https://$(POD_IP):8474)"
    );
    for ip in ips {
        s(ip, "ipAddresses")
            .parse::<std::net::IpAddr>()
            .unwrap_or_else(|e| panic!("ipAddresses: {ip:?}: {e}"));
    }
    assert_eq!(
        spec["privateKey"]["encoding"].as_str(),
        Some("PKCS8"),
        "the key stays PKCS#8"
    );

    // Everything else is the default's.
    let rest = |docs: &[Value]| -> Vec<Value> {
        docs.iter()
            .filter(|o| {
                !(o["kind"].as_str() == Some("Certificate")
                    && o["metadata"]["name"].as_str() == Some("twill-controller"))
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        rest(&ha),
        rest(&base),
        "the HA cert-manager overlay changes only the controller's Certificate"
    );
}

#[test]
fn ha_migration_job_copies_the_default_store_into_the_ha_etcd() {
    let job = object(
        "kubernetes-ha/migrate-from-sled.yaml",
        "Job",
        "twill-migrate-from-sled",
    );
    assert_eq!(job["metadata"]["namespace"].as_str(), Some("twill-system"));
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    assert_eq!(
        pod["hostNetwork"].as_bool(),
        Some(true),
        "like the controller"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = container(pod, "migrate");
    let mut errors = Vec::new();
    let help = help_with_contract("twill-controller", CONTROLLER_HA_FLAGS);
    let env = check_container_flags_in(
        "twill-controller",
        &help,
        c,
        "Job twill-migrate-from-sled",
        &mut errors,
    );
    finish(
        "the migration Job drifted from the controller's flags",
        errors,
    );
    assert!(
        has_env(&help, "TWILL_MIGRATE_FROM_SLED"),
        "twill-controller has --migrate-from-sled (TWILL_MIGRATE_FROM_SLED)"
    );

    // The store: the default's PVC, mounted writable (sled locks it) at
    // TWILL_MIGRATE_FROM_SLED.
    let dir = env_of(&env, "TWILL_MIGRATE_FROM_SLED").expect("TWILL_MIGRATE_FROM_SLED");
    let m = seq(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("a volume is mounted at {dir}"));
    assert_ne!(m["readOnly"].as_bool(), Some(true), "the store is writable");
    let claim = volume(pod, s(&m["name"], "volumeMount name"))["persistentVolumeClaim"]
        ["claimName"]
        .as_str()
        .expect("the store is a PVC")
        .to_string();
    object(
        "kubernetes/controller.yaml",
        "PersistentVolumeClaim",
        &claim,
    );
    let base = object(
        "kubernetes/controller.yaml",
        "Deployment",
        "twill-controller",
    );
    let bc = container(&base["spec"]["template"]["spec"], "controller");
    assert_eq!(
        env_of(&env_pairs(bc), "TWILL_DATA_DIR"),
        Some(dir),
        "the store is where the default controller keeps it"
    );

    // etcd: the HA controllers' settings and Secret.
    let Some(ha) = render("kubernetes-ha") else {
        return;
    };
    let d = find(&ha, "Deployment", "twill-controller");
    let ha_env = env_pairs(container(&d["spec"]["template"]["spec"], "controller"));
    for var in [
        "TWILL_ETCD_ENDPOINTS",
        "TWILL_ETCD_CERT",
        "TWILL_ETCD_KEY",
        "TWILL_ETCD_CA",
        "TWILL_ETCD_PREFIX",
    ] {
        assert_eq!(
            env_of(&env, var),
            env_of(&ha_env, var),
            "the Job's {var} is the HA controllers'"
        );
    }
    for (var, key) in [
        ("TWILL_ETCD_CERT", "tls.crt"),
        ("TWILL_ETCD_KEY", "tls.key"),
        ("TWILL_ETCD_CA", "ca.crt"),
    ] {
        assert_file_from(
            pod,
            c,
            env_of(&env, var).unwrap(),
            "secret",
            "twill-etcd-client",
            key,
        );
    }
    for (var, key) in [
        ("TWILL_TLS_CERT", "tls.crt"),
        ("TWILL_TLS_KEY", "tls.key"),
        ("TWILL_TLS_CLIENT_CA", "ca.crt"),
    ] {
        let file = env_of(&env, var).unwrap_or_else(|| panic!("the Job sets {var}"));
        assert_file_from(pod, c, file, "secret", "twill-controller-tls", key);
    }
    // The image the HA Deployment runs (not rendered by kustomize: kept by hand).
    assert_eq!(
        c["image"],
        container(&d["spec"]["template"]["spec"], "controller")["image"],
        "the Job runs the image the kustomization sets for twill-controller"
    );
}

/// The `TWILL_*=value` lines of an env file: the set ones, and the names of all
/// (commented-out examples included).
fn env_file(rel: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut set = Vec::new();
    let mut all = Vec::new();
    for line in read(rel).lines() {
        let line = line.trim();
        let commented = line.starts_with('#');
        let Some((var, value)) = line.trim_start_matches('#').trim().split_once('=') else {
            continue;
        };
        if var.is_empty()
            || !var
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        all.push(var.to_string());
        if !commented {
            set.push((var.to_string(), value.to_string()));
        }
    }
    (set, all)
}

#[test]
fn systemd_ha_env_files_use_the_ha_contract() {
    // Only flags of the binaries (the controller's: with the HA contract).
    let mut errors = Vec::new();
    for (bin, file, contract) in [
        (
            "twill-controller",
            "systemd/ha/controller.env",
            CONTROLLER_HA_FLAGS,
        ),
        ("twill-agent", "systemd/ha/agent.env", &[][..]),
    ] {
        let help = help_with_contract(bin, contract);
        let (set, all) = env_file(file);
        for var in &all {
            check_env_name(bin, &help, var, file, &mut errors);
        }
        for (var, value) in &set {
            check_env_value(var, value, file, &mut errors);
        }
    }
    finish("the HA env files drifted from the binaries' flags", errors);

    let (controller, _) = env_file("systemd/ha/controller.env");
    let get = |var: &str| {
        env_of(&controller, var).unwrap_or_else(|| panic!("systemd/ha/controller.env sets {var}"))
    };
    assert_eq!(get("TWILL_STORE"), "etcd");
    assert!(
        env_of(&controller, "TWILL_DATA_DIR").is_none(),
        "no --data-dir in etcd mode"
    );
    for var in ["TWILL_ETCD_CERT", "TWILL_ETCD_KEY", "TWILL_ETCD_CA"] {
        assert!(get(var).starts_with('/'), "{var} is an absolute path");
    }
    let prefix = get("TWILL_ETCD_PREFIX");
    assert!(
        prefix.starts_with('/') && prefix.ends_with('/'),
        "TWILL_ETCD_PREFIX {prefix}"
    );
    let etcd_hosts: BTreeSet<String> = get("TWILL_ETCD_ENDPOINTS")
        .split(',')
        .map(|e| {
            https_url(e)
                .and_then(|(host, port)| port.map(|_| host))
                .unwrap_or_else(|| {
                    panic!("TWILL_ETCD_ENDPOINTS: {e:?} is an https URL with a port")
                })
        })
        .collect();
    assert_eq!(etcd_hosts.len(), 3, "three etcd members: {etcd_hosts:?}");
    let listen_port: u16 = get("TWILL_LISTEN")
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("TWILL_LISTEN host:port");
    let advertise = get("TWILL_ADVERTISE_URL");
    let (advertise_host, advertise_port) =
        https_url(advertise).expect("TWILL_ADVERTISE_URL is https");
    assert_eq!(
        advertise_port,
        Some(listen_port),
        "TWILL_ADVERTISE_URL is on the gRPC port"
    );

    // Agents are pointed at all three controllers, one of which is this host; each
    // host runs an etcd member and a controller.
    let (agent, _) = env_file("systemd/ha/agent.env");
    let urls =
        env_of(&agent, "TWILL_CONTROLLER").expect("systemd/ha/agent.env sets TWILL_CONTROLLER");
    let controller_hosts: BTreeSet<String> = urls
        .split(',')
        .map(|u| {
            let (host, port) =
                https_url(u).unwrap_or_else(|| panic!("TWILL_CONTROLLER: {u:?} is https"));
            assert_eq!(
                port,
                Some(listen_port),
                "TWILL_CONTROLLER: {u} on the gRPC port"
            );
            host
        })
        .collect();
    assert_eq!(
        controller_hosts.len(),
        3,
        "the agents know all three controllers: {urls}"
    );
    assert!(
        urls.split(',').any(|u| u == advertise),
        "TWILL_ADVERTISE_URL {advertise} is one of the agents' TWILL_CONTROLLER URLs"
    );
    assert!(controller_hosts.contains(&advertise_host));
    assert_eq!(
        controller_hosts, etcd_hosts,
        "every controller host runs an etcd member"
    );

    // Nothing else differs from the single-controller files.
    let (base_controller, _) = env_file("systemd/controller.env");
    let mut expected: Vec<(String, String)> = base_controller
        .into_iter()
        .filter(|(n, _)| n != "TWILL_DATA_DIR")
        .collect();
    for flag in CONTROLLER_HA_FLAGS {
        let var = flag_env(flag);
        expected.push((var.clone(), get(&var).to_string()));
    }
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(controller.clone()),
        sorted(expected),
        "systemd/ha/controller.env is systemd/controller.env without TWILL_DATA_DIR, with the HA flags"
    );
    let (base_agent, _) = env_file("systemd/agent.env");
    let strip = |v: Vec<(String, String)>| -> Vec<(String, String)> {
        sorted(
            v.into_iter()
                .filter(|(n, _)| n != "TWILL_CONTROLLER")
                .collect(),
        )
    };
    assert_eq!(
        strip(agent),
        strip(base_agent),
        "systemd/ha/agent.env is systemd/agent.env with all three controllers"
    );
}

#[test]
fn readme_documents_the_ha_variant() {
    let readme = read("README.md");
    for text in [
        "kubectl apply -k deploy/kubernetes-ha",
        "kubectl apply -k deploy/kubernetes-ha/cert-manager",
        "twill-etcd-client",
        "twill:controllers",
        "clientAuth",
        "--migrate-from-sled",
        "deploy/kubernetes-ha/migrate-from-sled.yaml",
        "twill-controller-data",
        "deploy/systemd/ha/controller.env",
        "deploy/systemd/ha/agent.env",
        "TWILL_ADVERTISE_URL",
        "/readyz",
    ] {
        assert!(readme.contains(text), "deploy/README.md documents {text}");
    }
}

// ---------------------------------------------------------------------------------------
// External checks

/// Runs a check script; a status of 77 is a skip (loud; a failure when CI is set).
fn run_check(what: &str, cmd: &mut Command) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip(what, &format!("interpreter not found ({e})"));
            return;
        }
        Err(e) => panic!("{what}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    match out.status.code() {
        Some(0) => {}
        Some(SKIPPED) if !in_ci() => {
            let _ = write!(std::io::stderr().lock(), "{stderr}");
            loud(&format!("SKIPPED {what} (see above)"));
        }
        _ => panic!("{what} failed ({}):\n{stdout}\n{stderr}", out.status),
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    run_check(
        "Kubernetes manifest validation (deploy/check/validate_manifests.py)",
        Command::new("python3").arg(deploy("check/validate_manifests.py")),
    );
}

#[test]
fn systemd_units_verify() {
    run_check(
        "systemd unit verification (deploy/check/verify_units.sh)",
        Command::new("bash")
            .arg(deploy("check/verify_units.sh"))
            .arg(bin_dir()),
    );
}

#[test]
fn install_cni_script_installs_plugin_and_conflist() {
    let cm = object("kubernetes/configmap.yaml", "ConfigMap", "twill-cfg");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("cni-conf.json");
    std::fs::write(&conf, s(&cm["data"]["cni-conf.json"], "cni-conf.json")).unwrap();
    // And on a node holding the real twill-cni and Debian's portmap, when there are.
    let mut cmd = Command::new("sh");
    cmd.arg(deploy("check/test_install_cni.sh")).arg(&conf);
    let portmap = Path::new("/usr/lib/cni/portmap");
    if portmap.is_file() {
        cmd.arg(bin_dir().join("twill-cni")).arg(portmap);
    } else {
        skip(
            "twill-install-cni with the real portmap",
            "needs containernetworking-plugins in /usr/lib/cni",
        );
    }
    run_check(
        "twill-install-cni (deploy/check/test_install_cni.sh)",
        &mut cmd,
    );
}
