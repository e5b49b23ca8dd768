//! The plugin's network configuration and the delegate configuration built from it and
//! subnet.env, exactly as flannel's CNI plugin builds it (`flannel_linux.go`, `doCmdAdd`).
//! Everything here is pure: no files are touched except reading subnet.env.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::{json, Map, Value};
use twill_common::{subnet_env, SubnetEnv};

use super::error::{code, CniError};

/// The CNI specification versions we accept in a network configuration.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// flannel's default `subnetFile`.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// The agent's default `--subnet-dir`, where a named network's env file is.
pub const DEFAULT_SUBNET_DIR: &str = "/run/flannel/networks";
/// flannel's default `dataDir` (where delegate configs are saved for DEL).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// The bridge flannel's default delegate (the bridge plugin) creates.
pub const DEFAULT_BRIDGE: &str = "cni0";
/// Where STATUS asks the node's agent whether it is healthy (`agentURL`; the agent's
/// default `--metrics-addr` is 0.0.0.0:8476).
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:8476";

/// One attachment the runtime still holds (CNI 1.1 GC, `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `containerID`.
    pub container_id: String,
    /// `ifname`.
    pub ifname: String,
}

/// The plugin's own network configuration (one entry of a conflist, as the runtime
/// hands it over on stdin).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name`: the network name; becomes the delegate's name.
    pub name: String,
    /// `network` (Twill's own key, default `default`): whose env file to read.
    pub network: String,
    /// `subnetFile`; when not given, the `default` network's is flannel's
    /// `/run/flannel/subnet.env` and another's `<subnetDir>/<network>.env`.
    pub subnet_file: PathBuf,
    /// `dataDir`.
    pub data_dir: PathBuf,
    /// `delegate`: merged over the generated delegate configuration.
    pub delegate: Map<String, Value>,
    /// `ipam`: the base of the delegate's IPAM section (flannel's Linux behaviour).
    pub ipam: Option<Map<String, Value>>,
    /// `runtimeConfig`: passed to the delegate as is.
    pub runtime_config: Option<Value>,
    /// `prevResult`: passed to the delegate on CHECK.
    pub prev_result: Option<Value>,
    /// `agentURL` (Twill's own key): the agent STATUS asks for `/healthz`; `None`
    /// (`""`) to check subnet.env alone.
    pub agent_url: Option<String>,
    /// The agent's socket for attachment reports (`agentSocket`; default
    /// `/run/twill/agent.sock`, `""` for none).
    pub agent_socket: Option<PathBuf>,
    /// `cni.dev/valid-attachments` (GC): the attachments to keep.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// The `cniVersion` a configuration declares, if it is JSON with a string `cniVersion`;
/// used to answer errors in the caller's version even when the rest is bad.
pub fn declared_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let s = v.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS.contains(&s).then(|| s.to_string())
}

/// Whether `s` is a valid container ID or network name: libcni's
/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. It also makes the container ID safe as a file name.
pub fn valid_cni_name(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The version the delegate is asked in for a configuration of `version`: 1.1.0 adds
/// verbs (STATUS, GC), not result fields, so a 1.1.0 call goes to the delegate as 1.0.0,
/// which every 1.x plugin speaks (Debian's 1.1.1 plugins stop there), and its result
/// is relabelled [`relabel`].
pub fn delegate_version(version: &str) -> &str {
    if version_at_least(version, "1.1.0") {
        "1.0.0"
    } else {
        version
    }
}

/// Gives a delegate's result (or a prevResult going to it) the `cniVersion` of the
/// other side.
pub fn relabel(result: &mut Value, version: &str) {
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cniVersion".into(), json!(version));
    }
}

/// Compares two dotted versions numerically (`0.4.0` < `1.0.0`).
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

impl NetConf {
    /// Parses and validates the configuration on stdin: JSON object (code 6), a
    /// supported `cniVersion` (code 1), a valid `name` and well-typed fields (code 7).
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!("network configuration on stdin is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(CniError::new(
                code::DECODING_FAILURE,
                "network configuration on stdin is not a JSON object",
            ));
        };
        let invalid = |msg: String| CniError::new(code::INVALID_NETWORK_CONFIG, msg);
        let string_field = |key: &str| -> Result<Option<String>, CniError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid(format!("{key} must be a string, found {other}"))),
            }
        };
        // An empty string is as good as none.
        let given = |key: &str| Ok::<_, CniError>(string_field(key)?.filter(|s| !s.is_empty()));
        let object_field = |key: &str| -> Result<Option<Map<String, Value>>, CniError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m.clone())),
                Some(other) => Err(invalid(format!("{key} must be an object, found {other}"))),
            }
        };

        let supported = SUPPORTED_VERSIONS.join(", ");
        let cni_version = match obj.get("cniVersion") {
            Some(Value::String(v)) if SUPPORTED_VERSIONS.contains(&v.as_str()) => v.clone(),
            found => {
                let why = match found {
                    Some(Value::String(v)) => {
                        format!("incompatible CNI version {v:?}: twill-cni supports {supported}")
                    }
                    None | Some(Value::Null) => format!(
                        "network configuration has no cniVersion; twill-cni supports {supported}"
                    ),
                    Some(other) => format!("cniVersion must be a string, found {other}"),
                };
                return Err(CniError::new(code::INCOMPATIBLE_VERSION, why));
            }
        };

        let name = string_field("name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(invalid("network configuration has no name".into()));
        }
        if !valid_cni_name(&name) {
            return Err(invalid(format!(
                "invalid characters in network name {name:?} (allowed: [a-zA-Z0-9][a-zA-Z0-9_.-]*)"
            )));
        }

        let network = given("network")?.unwrap_or_else(|| subnet_env::DEFAULT_NETWORK.into());
        if !valid_cni_name(&network) {
            return Err(invalid(format!(
                "invalid characters in network {network:?} (allowed: [a-zA-Z0-9][a-zA-Z0-9_.-]*)"
            )));
        }
        let subnet_dir = given("subnetDir")?.unwrap_or_else(|| DEFAULT_SUBNET_DIR.into());
        let subnet_file = match given("subnetFile")? {
            Some(file) => PathBuf::from(file),
            None if network == subnet_env::DEFAULT_NETWORK => DEFAULT_SUBNET_FILE.into(),
            None => subnet_env::network_file(Path::new(&subnet_dir), &network),
        };
        let data_dir = given("dataDir")?.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let delegate = object_field("delegate")?.unwrap_or_default();
        // flannel's rules for the delegate dictionary.
        if let Some(t) = delegate.get("type") {
            if !t.is_string() {
                return Err(invalid(
                    "'delegate' dictionary, if present, must have (string) 'type' field".into(),
                ));
            }
        }
        if delegate.contains_key("name") {
            return Err(invalid(
                "'delegate' dictionary must not have 'name' field, it'll be set by twill-cni"
                    .into(),
            ));
        }
        if delegate.contains_key("ipam") {
            return Err(invalid(
                "'delegate' dictionary must not have 'ipam' field, it'll be set by twill-cni \
                 (put IPAM settings such as dataDir in the top-level 'ipam' object)"
                    .into(),
            ));
        }
        let ipam = object_field("ipam")?;
        if let Some(routes) = ipam.as_ref().and_then(|i| i.get("routes")) {
            if !routes.is_array() && !routes.is_null() {
                return Err(invalid(format!(
                    "failed to parse ipam.routes: must be an array, found {routes}"
                )));
            }
        }
        let runtime_config = obj.get("runtimeConfig").filter(|v| !v.is_null()).cloned();
        let prev_result = obj.get("prevResult").filter(|v| !v.is_null()).cloned();
        let agent_url = match string_field("agentURL")? {
            None => Some(DEFAULT_AGENT_URL.to_string()),
            Some(u) if u.is_empty() => None,
            Some(u) if u.starts_with("http://") => Some(u.trim_end_matches('/').to_string()),
            Some(u) => {
                return Err(invalid(format!(
                    "agentURL {u:?} must start with http:// (the agent's HTTP endpoint, e.g. \
                     {DEFAULT_AGENT_URL}), or be empty to check subnet.env alone"
                )))
            }
        };
        let agent_socket = match string_field("agentSocket")? {
            None => Some(PathBuf::from(crate::pods::socket::DEFAULT_SOCKET)),
            Some(p) if p.is_empty() => None,
            Some(p) if Path::new(&p).is_absolute() => Some(PathBuf::from(p)),
            Some(p) => {
                return Err(invalid(format!(
                    "agentSocket {p:?} must be an absolute path (the agent's --cni-socket), or \
                     empty to report nothing"
                )))
            }
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| {
                        let field =
                            |k: &str| item.get(k).and_then(Value::as_str).map(str::to_string);
                        match (field("containerID"), field("ifname")) {
                            (Some(container_id), Some(ifname)) => Ok(Attachment {
                                container_id,
                                ifname,
                            }),
                            _ => Err(invalid(format!(
                                "cni.dev/valid-attachments: {item} is not an object with string \
                                 containerID and ifname"
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "cni.dev/valid-attachments must be an array, found {other}"
                )))
            }
        };
        Ok(Self {
            cni_version,
            name,
            network,
            subnet_file,
            data_dir: data_dir.into(),
            delegate,
            ipam,
            runtime_config,
            prev_result,
            agent_url,
            agent_socket,
            valid_attachments,
        })
    }
}

/// Reads subnet.env for ADD. Missing: the agent is not running here (yet), code 11 so the
/// runtime retries. Malformed or incomplete (flannel requires a network, a subnet, the
/// MTU and the masquerade flag): code 100, naming the file (and line).
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    let env = match SubnetEnv::read(path) {
        Ok(Some(env)) => env,
        Ok(None) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{} does not exist: the twill-agent is not running on this node or has not \
                     written it yet",
                    path.display()
                ),
            )
            .with_details(
                "check the twill-agent pod/service on this node; retry once it has a lease",
            ))
        }
        Err(e) => {
            return Err(CniError::new(
                code::BAD_SUBNET_ENV,
                format!("failed to load subnet.env: {e}"),
            ))
        }
    };
    let mut missing = Vec::new();
    if env.network.is_none() && env.ipv6_network.is_none() {
        missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
    }
    if env.subnet.is_none() && env.ipv6_subnet.is_none() {
        missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
    }
    if env.mtu.is_none() {
        missing.push("FLANNEL_MTU");
    }
    if env.ipmasq.is_none() {
        missing.push("FLANNEL_IPMASQ");
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::BAD_SUBNET_ENV,
            format!("{} is missing {}", path.display(), missing.join(", ")),
        ));
    }
    Ok(env)
}

/// Builds the delegate configuration flannel's plugin builds (`doCmdAdd`):
///
/// - `name` = our name; `type` defaults to `bridge`;
/// - `ipMasq` defaults to `!FLANNEL_IPMASQ` (the agent masquerades, or the bridge must);
/// - `mtu` defaults to `FLANNEL_MTU`;
/// - for `bridge`: `isGateway` defaults to true, and (Twill's addition, what kube-flannel's
///   conflist always sets) `hairpinMode` defaults to true; `bridge` defaults to `cni0`;
/// - `cniVersion` = ours, `runtimeConfig` = ours when given;
/// - `ipam` = our top-level `ipam` (or `{}`), `type` defaulting to `host-local`, `ranges`
///   replaced by the node's subnets (network form), `routes` = the given routes followed by
///   one per `FLANNEL_*NETWORK`. Routes are kept even with `isDefaultGateway`, as flannel does.
///
/// Keys the `delegate` object sets win over every default above.
pub fn build_delegate(conf: &NetConf, env: &SubnetEnv) -> Map<String, Value> {
    let mut d = conf.delegate.clone();
    d.insert("name".into(), Value::String(conf.name.clone()));
    d.entry("type").or_insert_with(|| json!("bridge"));
    if let Some(ipmasq) = env.ipmasq {
        d.entry("ipMasq").or_insert_with(|| json!(!ipmasq));
    }
    if let Some(mtu) = env.mtu {
        d.entry("mtu").or_insert_with(|| json!(mtu));
    }
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("bridge").or_insert_with(|| json!(DEFAULT_BRIDGE));
        d.entry("isGateway").or_insert_with(|| json!(true));
        d.entry("hairpinMode").or_insert_with(|| json!(true));
    }
    d.insert(
        "cniVersion".into(),
        json!(delegate_version(&conf.cni_version)),
    );
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }

    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| json!("host-local"));
    let subnets = [env.subnet.map(IpNet::V4), env.ipv6_subnet.map(IpNet::V6)];
    let ranges = subnets
        .iter()
        .flatten()
        .map(|sn| json!([{ "subnet": sn.to_string() }]));
    ipam.insert("ranges".into(), Value::Array(ranges.collect()));
    let mut routes = match ipam.get("routes") {
        Some(Value::Array(r)) => r.clone(),
        _ => Vec::new(),
    };
    let networks = [env.network.map(IpNet::V4), env.ipv6_network.map(IpNet::V6)];
    routes.extend(
        networks
            .iter()
            .flatten()
            .map(|nw| json!({ "dst": nw.to_string() })),
    );
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_v4() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            "subnet.env",
        )
        .unwrap()
    }

    fn conf(json: Value) -> NetConf {
        NetConf::parse(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    fn build(c: Value, env: &SubnetEnv) -> Value {
        Value::Object(build_delegate(&conf(c), env))
    }

    #[test]
    fn ipv4_delegate_is_flannels() {
        let d = build(
            json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "twill-cni"}),
            &env_v4(),
        );
        assert_eq!(
            d,
            json!({
                "name": "cbr0",
                "cniVersion": "1.0.0",
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "hairpinMode": true,
                "ipMasq": true,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.3.0/24"}]],
                    "routes": [{"dst": "10.244.0.0/16"}]
                }
            })
        );
    }

    #[test]
    fn ipmasq_is_inverted_and_mtu_copied() {
        let env = SubnetEnv {
            ipmasq: Some(true),
            mtu: Some(8951),
            ..env_v4()
        };
        let d = build(json!({"cniVersion": "0.3.1", "name": "n"}), &env);
        assert_eq!(d["ipMasq"], json!(false));
        assert_eq!(d["mtu"], json!(8951));
        assert_eq!(d["cniVersion"], json!("0.3.1"));
    }

    #[test]
    fn dual_stack_gets_two_ranges_and_two_routes() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
            "subnet.env",
        )
        .unwrap();
        let d = build(json!({"cniVersion": "1.0.0", "name": "n"}), &env);
        assert_eq!(
            d["ipam"],
            json!({
                "type": "host-local",
                "ranges": [[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:10:244:3::/64"}]],
                "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"}]
            })
        );
        assert_eq!(d["mtu"], json!(1430));
    }

    #[test]
    fn ipv6_only() {
        let env = SubnetEnv::parse(
            "FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:4::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
            "f",
        )
        .unwrap();
        let d = build(json!({"cniVersion": "1.0.0", "name": "n"}), &env);
        assert_eq!(
            d["ipam"]["ranges"],
            json!([[{"subnet": "fd00:0:0:4::/64"}]])
        );
        assert_eq!(d["ipam"]["routes"], json!([{"dst": "fd00::/56"}]));
    }

    #[test]
    fn delegate_keys_override_and_merge() {
        // kube-flannel's conflist entry, plus overrides of every default.
        let d = build(
            json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "twill-cni",
                "delegate": {
                    "hairpinMode": false, "isDefaultGateway": true, "bridge": "br-pods",
                    "mtu": 1400, "ipMasq": false, "isGateway": false, "cniVersion": "9.9.9",
                    "extra": {"x": 1}
                }
            }),
            &env_v4(),
        );
        assert_eq!(d["hairpinMode"], json!(false));
        assert_eq!(d["isDefaultGateway"], json!(true));
        assert_eq!(d["bridge"], json!("br-pods"));
        assert_eq!(d["mtu"], json!(1400));
        assert_eq!(d["ipMasq"], json!(false));
        assert_eq!(d["isGateway"], json!(false));
        assert_eq!(d["extra"], json!({"x": 1}));
        // flannel always sets cniVersion from its own config.
        assert_eq!(d["cniVersion"], json!("0.3.1"));
        // flannel keeps the network routes even with isDefaultGateway.
        assert_eq!(d["ipam"]["routes"], json!([{"dst": "10.244.0.0/16"}]));
    }

    #[test]
    fn other_delegate_types_get_no_bridge_defaults() {
        let d = build(
            json!({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "ipvlan", "master": "eth0"}}),
            &env_v4(),
        );
        assert_eq!(d["type"], json!("ipvlan"));
        for k in ["bridge", "isGateway", "hairpinMode"] {
            assert!(d.get(k).is_none(), "{k} set for ipvlan");
        }
        assert_eq!(d["ipMasq"], json!(true));
    }

    #[test]
    fn top_level_ipam_is_the_base() {
        let d = build(
            json!({
                "cniVersion": "1.0.0", "name": "n",
                "ipam": {"dataDir": "/tmp/x", "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.3.254"}],
                         "ranges": "ignored"}
            }),
            &env_v4(),
        );
        assert_eq!(
            d["ipam"],
            json!({
                "type": "host-local",
                "dataDir": "/tmp/x",
                "ranges": [[{"subnet": "10.244.3.0/24"}]],
                "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.3.254"}, {"dst": "10.244.0.0/16"}]
            })
        );
    }

    #[test]
    fn runtime_config_is_passed_through() {
        let d = build(
            json!({"cniVersion": "1.0.0", "name": "n", "runtimeConfig": {"portMappings": [{"hostPort": 80}]}}),
            &env_v4(),
        );
        assert_eq!(
            d["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 80}]})
        );
    }

    #[test]
    fn network_picks_the_env_file_and_subnet_file_wins() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "network": "default"}));
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "network": "blue"}));
        assert_eq!(
            (c.network.as_str(), c.subnet_file),
            ("blue", PathBuf::from("/run/flannel/networks/blue.env"))
        );
        let c =
            conf(json!({"cniVersion": "1.0.0", "name": "n", "network": "blue", "subnetDir": "/x"}));
        assert_eq!(c.subnet_file, PathBuf::from("/x/blue.env"));
        let c = conf(
            json!({"cniVersion": "1.0.0", "name": "n", "network": "blue", "subnetFile": "/y.env"}),
        );
        assert_eq!(c.subnet_file, PathBuf::from("/y.env"));
        let e = NetConf::parse(br#"{"cniVersion": "1.0.0", "name": "n", "network": "../x"}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG, "{e}");
    }

    #[test]
    fn defaults_and_custom_paths() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n"}));
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let c =
            conf(json!({"cniVersion": "1.0.0", "name": "n", "subnetFile": "/a", "dataDir": "/b"}));
        assert_eq!(c.subnet_file, PathBuf::from("/a"));
        assert_eq!(c.data_dir, PathBuf::from("/b"));
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        let err = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err();
        assert_eq!(err("{nope").code, code::DECODING_FAILURE);
        assert_eq!(err("[1]").code, code::DECODING_FAILURE);
        assert_eq!(err(r#"{"name":"n"}"#).code, code::INCOMPATIBLE_VERSION);
        let e = err(r#"{"cniVersion":"0.2.0","name":"n"}"#);
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(
            e.msg.contains("0.2.0") && e.msg.contains("1.0.0"),
            "{}",
            e.msg
        );
        assert_eq!(
            err(r#"{"cniVersion":"1.0.0"}"#).code,
            code::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            err(r#"{"cniVersion":"1.0.0","name":"a/b"}"#).code,
            code::INVALID_NETWORK_CONFIG
        );
        for bad in [
            r#"{"cniVersion":"1.0.0","name":"n","delegate":{"name":"x"}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":{"ipam":{}}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":{"type":1}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","delegate":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnetFile":3}"#,
            r#"{"cniVersion":"1.0.0","name":"n","ipam":{"routes":"x"}}"#,
        ] {
            assert_eq!(err(bad).code, code::INVALID_NETWORK_CONFIG, "{bad}");
        }
    }

    #[test]
    fn subnet_env_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let e = load_subnet_env(&path).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("twill-agent") && e.msg.contains(&path.display().to_string()));

        std::fs::write(
            &path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=oops\n",
        )
        .unwrap();
        let e = load_subnet_env(&path).unwrap_err();
        assert_eq!(e.code, code::BAD_SUBNET_ENV);
        assert!(
            e.msg.contains(&format!("{} line 2", path.display())),
            "{}",
            e.msg
        );

        std::fs::write(
            &path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n",
        )
        .unwrap();
        let e = load_subnet_env(&path).unwrap_err();
        assert_eq!(e.code, code::BAD_SUBNET_ENV);
        assert!(
            e.msg.ends_with("is missing FLANNEL_MTU, FLANNEL_IPMASQ"),
            "{}",
            e.msg
        );

        std::fs::write(&path, env_v4().render()).unwrap();
        assert_eq!(load_subnet_env(&path).unwrap(), env_v4());
    }

    #[test]
    fn names_and_versions() {
        assert!(valid_cni_name("abc-1.2_3"));
        for bad in ["", ".x", "../x", "a/b", "a b", "-a"] {
            assert!(!valid_cni_name(bad), "{bad}");
        }
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert_eq!(
            declared_version(br#"{"cniVersion":"0.3.1"}"#).as_deref(),
            Some("0.3.1")
        );
        assert_eq!(declared_version(br#"{"cniVersion":"7"}"#), None);
        assert_eq!(declared_version(b"nope"), None);
    }
}
