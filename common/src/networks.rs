//! Several networks (REFERENCE 2.10): a network's name, who may join it (`"Nodes"`),
//! one network file (`<name>.json` under `--networks-dir`: flannel's net-conf.json plus
//! `"Nodes"`), the directory as a whole, and the rules between networks (no two
//! overlap or share a VXLAN VNI). The controller decides with these; the agent and
//! twill-cni only use the names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::validate_node_name;
use crate::netconf::{BackendType, NetConf, NetConfError};

/// The network `--net-conf` configures, and the one every request without a network
/// name means (so agents and stores from before several networks keep working).
pub const DEFAULT_NETWORK: &str = "default";

/// Longest network name: a DNS label, as it lands in file names, store keys and
/// metrics labels.
pub const MAX_NETWORK_NAME_LEN: usize = 63;

/// Why a network name, a network file or a set of networks was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The name is not a DNS label.
    #[error("network name {0:?} is not valid: use 1 to 63 lower-case letters, digits and '-', starting and ending with a letter or digit")]
    Name(String),
    /// The file's net-conf.json part was refused.
    #[error("network {name} ({path}): {source}")]
    Conf {
        /// The network.
        name: String,
        /// Its file.
        path: String,
        /// What is wrong.
        source: NetConfError,
    },
    /// The `"Nodes"` rule was refused.
    #[error("network {name}: \"Nodes\" {why}")]
    Nodes {
        /// The network.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Two networks overlap or share a VNI.
    #[error("{0}")]
    Conflict(String),
    /// The directory could not be read.
    #[error("cannot read the networks directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A network's name, checked: a DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkName(String);

impl NetworkName {
    /// Checks `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NetworkError> {
        let name = name.into();
        let label = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = !name.is_empty()
            && name.len() <= MAX_NETWORK_NAME_LEN
            && name.bytes().all(|b| label(b) || b == b'-')
            && name.bytes().next().is_some_and(label)
            && name.bytes().last().is_some_and(label);
        if ok {
            Ok(NetworkName(name))
        } else {
            Err(NetworkError::Name(name))
        }
    }

    /// The network `--net-conf` configures.
    pub fn default_network() -> Self {
        NetworkName(DEFAULT_NETWORK.into())
    }

    /// The name a wire field means: empty is `default`.
    pub fn from_wire(s: &str) -> Result<Self, NetworkError> {
        if s.is_empty() {
            Ok(Self::default_network())
        } else {
            Self::new(s)
        }
    }

    /// The name as a wire field spells it: empty for `default`, so messages to and from
    /// agents that predate several networks are unchanged.
    pub fn wire(&self) -> &str {
        if self.is_default() {
            ""
        } else {
            &self.0
        }
    }

    /// True for the `default` network.
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_NETWORK
    }
}

checked_name!(NetworkName, NetworkError);

impl Default for NetworkName {
    fn default() -> Self {
        Self::default_network()
    }
}

/// Who may join a network: exact node names and `prefix*` patterns. Empty admits
/// every node (a network file without `"Nodes"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nodes(Vec<String>);

impl Nodes {
    /// Checks the patterns: each a node name, or a node-name prefix followed by one
    /// `*` (`*` alone admits everyone).
    pub fn new(patterns: Vec<String>) -> Result<Self, String> {
        for p in &patterns {
            let stem = p.strip_suffix('*').unwrap_or(p);
            if stem.contains('*') {
                return Err(format!(
                    "entry {p:?} has a '*' before its end: only a trailing '*' (a prefix) is understood"
                ));
            }
            if !stem.is_empty() || !p.ends_with('*') {
                validate_node_name(stem).map_err(|e| format!("entry {p:?}: {e}"))?;
            }
        }
        Ok(Nodes(patterns))
    }

    /// Whether `node` may join.
    pub fn admits(&self, node: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => node.starts_with(prefix),
                None => p == node,
            })
    }

    /// The patterns, as written.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("every node")
        } else {
            write!(f, "\"Nodes\": {:?}", self.0)
        }
    }
}

#[derive(Deserialize)]
struct RawNodes {
    #[serde(rename = "Nodes")]
    nodes: Option<Vec<String>>,
}

/// One network the controller serves.
#[derive(Debug, Clone)]
pub struct Network {
    /// Its name.
    pub name: NetworkName,
    /// Its flannel configuration (the whole file, `"Nodes"` ignored there).
    pub conf: NetConf,
    /// Who may join.
    pub nodes: Nodes,
}

impl Network {
    /// The `default` network: `--net-conf`, which every node may join.
    pub fn default_from(conf: NetConf) -> Self {
        Network {
            name: NetworkName::default_network(),
            conf,
            nodes: Nodes::default(),
        }
    }

    /// Parses a network file's text; `path` only names it in errors.
    pub fn parse(name: NetworkName, text: &str, path: &Path) -> Result<Self, NetworkError> {
        let conf = NetConf::parse(text).map_err(|source| NetworkError::Conf {
            name: name.to_string(),
            path: path.display().to_string(),
            source,
        })?;
        let raw: RawNodes =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| NetworkError::Nodes {
                    name: name.to_string(),
                    why: format!("must be a list of node names and \"prefix*\" patterns ({e})"),
                })?;
        let nodes =
            Nodes::new(raw.nodes.unwrap_or_default()).map_err(|why| NetworkError::Nodes {
                name: name.to_string(),
                why,
            })?;
        Ok(Network { name, conf, nodes })
    }

    /// The device names its VXLAN backend uses, if it has one (`flannel.<VNI>`):
    /// what two networks may not share.
    pub fn vni(&self) -> Option<u32> {
        (self.conf.backend.kind == BackendType::Vxlan).then_some(self.conf.backend.vni)
    }
}

/// What reading `--networks-dir` found: the networks that parsed, and the files that
/// did not (each with its error), by network name.
#[derive(Debug, Default)]
pub struct DirScan {
    /// Networks that parsed.
    pub networks: BTreeMap<NetworkName, Network>,
    /// Files that did not parse, by the network they would name.
    pub errors: Vec<(String, NetworkError)>,
}

/// Reads every `<name>.json` in `dir` (other files are ignored, as Kubernetes'
/// ConfigMap volumes hold `..data` links beside the keys). A missing directory holds
/// no networks. `default.json` is refused: the `default` network is `--net-conf`.
pub fn scan_dir(dir: &Path) -> Result<DirScan, NetworkError> {
    let dir_error = |source| NetworkError::Dir {
        path: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirScan::default()),
        Err(e) => return Err(dir_error(e)),
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry.map_err(dir_error)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") && !name.starts_with('.') {
            files.push(path);
        }
    }
    files.sort();
    let mut scan = DirScan::default();
    for path in files {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let parsed = NetworkName::new(stem.clone()).and_then(|name| {
            if name.is_default() {
                return Err(NetworkError::Nodes {
                    name: stem.clone(),
                    why: format!(
                        "cannot be configured in {}: the default network is --net-conf",
                        path.display()
                    ),
                });
            }
            let text = std::fs::read_to_string(&path).map_err(|source| NetworkError::Conf {
                name: name.to_string(),
                path: path.display().to_string(),
                source: NetConfError::Io {
                    path: path.display().to_string(),
                    source,
                },
            })?;
            Network::parse(name, &text, &path)
        });
        match parsed {
            Ok(n) => {
                scan.networks.insert(n.name.clone(), n);
            }
            Err(e) => scan.errors.push((stem, e)),
        }
    }
    Ok(scan)
}

/// Whether two pod networks share an address.
fn overlap(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks `candidate` against `others` (by name; an entry of the same name is the one
/// it replaces and is skipped): no pod network of one may overlap one of another, and
/// two VXLAN networks may not share a VNI (their devices would be the same). The error
/// names both networks.
pub fn check_against<'a>(
    candidate: &Network,
    others: impl IntoIterator<Item = &'a Network>,
) -> Result<(), NetworkError> {
    for other in others {
        if other.name == candidate.name {
            continue;
        }
        for mine in candidate.conf.networks().values() {
            for theirs in other.conf.networks().values() {
                if overlap(*mine, *theirs) {
                    return Err(NetworkError::Conflict(format!(
                        "network {} ({mine}) overlaps network {} ({theirs}): pod networks must \
                         not share addresses; give {} a Network of its own",
                        candidate.name, other.name, candidate.name
                    )));
                }
            }
        }
        if let (Some(a), Some(b)) = (candidate.vni(), other.vni()) {
            if a == b {
                return Err(NetworkError::Conflict(format!(
                    "network {} uses VXLAN VNI {a}, as network {} does: each network needs a \
                     device of its own (flannel.<VNI>); set a different \"Backend\": {{\"VNI\": ...}} \
                     in {}",
                    candidate.name, other.name, candidate.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, text: &str) -> Network {
        Network::parse(NetworkName::new(name).unwrap(), text, Path::new("x.json")).unwrap()
    }

    #[test]
    fn names_are_dns_labels_and_empty_on_the_wire_is_default() {
        for ok in ["blue", "a", "net-2", &"x".repeat(63)] {
            assert!(NetworkName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Blue", "-a", "a-", "a_b", "a.b", "a/b", &"x".repeat(64)] {
            let e = NetworkName::new(bad).unwrap_err().to_string();
            assert!(e.contains("lower-case"), "{bad}: {e}");
        }
        assert!(NetworkName::from_wire("").unwrap().is_default());
        assert_eq!(NetworkName::default_network().wire(), "");
        assert_eq!(NetworkName::new("blue").unwrap().wire(), "blue");
    }

    #[test]
    fn nodes_admit_exact_names_and_prefixes_and_everyone_when_absent() {
        let n = Nodes::new(vec!["node-a".into(), "gpu-*".into()]).unwrap();
        assert!(n.admits("node-a") && n.admits("gpu-7") && n.admits("gpu-"));
        assert!(!n.admits("node-ab") && !n.admits("node-c") && !n.admits("gp"));
        assert!(Nodes::default().admits("anyone"));
        assert!(Nodes::new(vec!["*".into()]).unwrap().admits("anyone"));
        for bad in ["a*b", "**", "a b", ""] {
            assert!(Nodes::new(vec![bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_network_file_is_net_conf_plus_nodes() {
        let n = net(
            "blue",
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2},"Nodes":["node-a"]}"#,
        );
        assert_eq!((n.vni(), n.nodes.patterns().len()), (Some(2), 1));
        let bad = Network::parse(
            NetworkName::new("blue").unwrap(),
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan"},"Nodes":"node-a"}"#,
            Path::new("blue.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("network blue") && bad.contains("Nodes"),
            "{bad}"
        );
        let bad = Network::parse(
            NetworkName::new("blue").unwrap(),
            r#"{"Network":"10.10.0.0/33"}"#,
            Path::new("/etc/twill/networks/blue.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("/etc/twill/networks/blue.json"), "{bad}");
        let host_gw = net(
            "red",
            r#"{"Network":"10.20.0.0/16","Backend":{"Type":"host-gw"}}"#,
        );
        assert_eq!(host_gw.vni(), None);
    }

    #[test]
    fn overlapping_networks_and_shared_vnis_are_refused_naming_both() {
        let default = Network::default_from(
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap(),
        );
        let inside = net(
            "blue",
            r#"{"Network":"10.244.8.0/21","Backend":{"Type":"vxlan","VNI":2}}"#,
        );
        let e = check_against(&inside, [&default]).unwrap_err().to_string();
        assert!(
            e.contains("blue") && e.contains("default") && e.contains("overlaps"),
            "{e}"
        );
        let same_vni = net(
            "green",
            r#"{"Network":"10.30.0.0/16","Backend":{"Type":"vxlan"}}"#,
        );
        let e = check_against(&same_vni, [&default])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("green") && e.contains("default") && e.contains("VNI 1"),
            "{e}"
        );
        let fine = net(
            "blue",
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#,
        );
        let host_gw = net(
            "red",
            r#"{"Network":"10.20.0.0/16","Backend":{"Type":"host-gw"}}"#,
        );
        check_against(&fine, [&default, &host_gw, &fine]).unwrap();
        check_against(&host_gw, [&default, &fine]).unwrap();
        let v6 = net(
            "six",
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan","VNI":6}}"#,
        );
        let v6b = net(
            "six-b",
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:0:8::/64","Backend":{"Type":"vxlan","VNI":7}}"#,
        );
        assert!(check_against(&v6b, [&v6]).is_err());
    }

    #[test]
    fn the_directory_holds_json_files_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("blue.json"),
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), "{not json").unwrap();
        std::fs::write(
            dir.path().join("default.json"),
            r#"{"Network":"10.9.0.0/16"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "ignored").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let scan = scan_dir(dir.path()).unwrap();
        assert_eq!(
            scan.networks.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["blue"]
        );
        let named: Vec<&str> = scan.errors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(named, ["broken", "default"]);
        assert!(scan.errors[0].1.to_string().contains("broken.json"));
        let none = scan_dir(&dir.path().join("missing")).unwrap();
        assert!(none.networks.is_empty() && none.errors.is_empty());
    }
}
