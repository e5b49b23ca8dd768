//! flannel's `subnet.env` (docs/compatibility.md, subnet.env): the file the agent writes
//! and CNI plugins read.
//!
//! The node subnet is written with its first usable address (`10.244.74.1/24`) because
//! flannel's CNI plugin uses it as the bridge gateway; we keep the network form internally.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use thiserror::Error;

/// Why a subnet.env could not be read or written.
#[derive(Debug, Error)]
pub enum SubnetEnvError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is not `KEY=value` or a value does not parse.
    #[error("{path} line {line}: {msg}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

/// The contents of a subnet.env file; each field is written only when set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the whole pod network.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`: this node's subnet, in network form (`10.244.74.0/24`).
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET`, in network form.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: Option<bool>,
}

/// The network a node's one lease belongs to (`--net-conf`), by name.
pub use crate::networks::DEFAULT_NETWORK;

/// A network's env file in `dir` (`--subnet-dir`): `<network>.env`.
pub fn network_file(dir: &Path, network: &str) -> PathBuf {
    dir.join(format!("{network}.env"))
}

impl SubnetEnv {
    /// Renders the file in flannel's order and format.
    pub fn render(&self) -> String {
        [
            self.network.map(|n| format!("FLANNEL_NETWORK={n}\n")),
            // The subnets in their gateway form: `10.244.74.0/24` → `10.244.74.1/24`.
            self.subnet.map(|s| {
                let first = Ipv4Addr::from(u32::from(s.network()) + 1);
                format!("FLANNEL_SUBNET={first}/{}\n", s.prefix_len())
            }),
            self.ipv6_network
                .map(|n| format!("FLANNEL_IPV6_NETWORK={n}\n")),
            self.ipv6_subnet.map(|s| {
                let first = Ipv6Addr::from(u128::from(s.network()) + 1);
                format!("FLANNEL_IPV6_SUBNET={first}/{}\n", s.prefix_len())
            }),
            self.mtu.map(|m| format!("FLANNEL_MTU={m}\n")),
            self.ipmasq.map(|m| format!("FLANNEL_IPMASQ={m}\n")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Parses the text of a subnet.env; `path` is only used in error messages.
    /// Unknown keys, blank lines and `#` comments are ignored, as a shell would.
    pub fn parse(text: &str, path: &str) -> Result<Self, SubnetEnvError> {
        let mut env = SubnetEnv::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |msg: String| SubnetEnvError::Malformed {
                path: path.to_string(),
                line: i + 1,
                msg,
            };
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("expected KEY=value, found {line:?}")))?;
            let value = value.trim().trim_matches('"');
            let v4 = |v: &str| -> Result<Ipv4Net, SubnetEnvError> {
                v.parse::<Ipv4Net>()
                    .map(|n| n.trunc())
                    .map_err(|_| bad(format!("{key}={v:?} is not an IPv4 CIDR")))
            };
            let v6 = |v: &str| -> Result<Ipv6Net, SubnetEnvError> {
                v.parse::<Ipv6Net>()
                    .map(|n| n.trunc())
                    .map_err(|_| bad(format!("{key}={v:?} is not an IPv6 CIDR")))
            };
            match key.trim() {
                "FLANNEL_NETWORK" => env.network = Some(v4(value)?),
                "FLANNEL_SUBNET" => env.subnet = Some(v4(value)?),
                "FLANNEL_IPV6_NETWORK" => env.ipv6_network = Some(v6(value)?),
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(v6(value)?),
                "FLANNEL_MTU" => {
                    env.mtu = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("FLANNEL_MTU={value:?} is not a number")))?,
                    )
                }
                "FLANNEL_IPMASQ" => {
                    env.ipmasq = Some(value.parse().map_err(|_| {
                        bad(format!("FLANNEL_IPMASQ={value:?} is not true or false"))
                    })?)
                }
                _ => {}
            }
        }
        Ok(env)
    }

    /// Reads a subnet.env; `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>, SubnetEnvError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SubnetEnvError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes the file atomically: a temp file in the same directory, fsync, rename.
    /// A reader (a CNI plugin) sees either the old file or the new one, never half.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let io = |source| SubnetEnvError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::fs::write_atomic(path, self.render().as_bytes(), 0o644).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.74.0/24".parse().unwrap()),
            mtu: Some(1450),
            ipmasq: Some(false),
            ..Default::default()
        }
    }

    #[test]
    fn renders_flannel_format() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flannel/subnet.env");
        sample().write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(sample()));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SubnetEnv::read(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn parses_dual_stack_and_ignores_unknown_keys() {
        let env = SubnetEnv::parse(
            "# written by flanneld\nFLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.74.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:4a::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nOTHER=1\n",
            "x",
        )
        .unwrap();
        assert_eq!(env.subnet.unwrap().to_string(), "10.244.74.0/24");
        assert_eq!(env.ipv6_subnet.unwrap().to_string(), "fd00:0:0:4a::/64");
        assert_eq!(env.ipmasq, Some(true));
        assert!(env
            .render()
            .contains("FLANNEL_IPV6_SUBNET=fd00:0:0:4a::1/64\n"));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=big\n",
            "/run/flannel/subnet.env",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "/run/flannel/subnet.env line 2: FLANNEL_MTU=\"big\" is not a number"
        );
        assert!(SubnetEnv::parse("garbage", "f")
            .unwrap_err()
            .to_string()
            .contains("expected KEY=value"));
    }
}
