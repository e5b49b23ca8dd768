//! The node's pod attachments (REFERENCE 2.11): what `twill-cni` reports after each ADD
//! and DEL, the set the agent keeps from those reports (it survives restarts), and how
//! that set is checked against what the delegated IPAM holds.
//!
//! - [`Report`]: one ADD or DEL, as `twill-cni` sends it (one JSON line).
//! - [`Attachments`]: the set, applied report by report in the order they happened
//!   (a report queued on disk while the agent was down can arrive after a later one).
//! - `ipam`: host-local's directory read back, and the leaks and conflicts found.
//! - `socket`: the agent's end of the Unix socket, and the queue drained from disk.
//!
//! Who may touch what: the socket and the queue directory are root's alone (mode 0700
//! directory, 0600 socket, and the peer's uid checked); nothing here is reachable from
//! the network. A report is still checked field by field: a bad one is refused, never
//! half-applied.

pub mod ipam;
pub mod socket;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest container ID, pod name or namespace accepted (Kubernetes names are at most
/// 253 characters; container IDs 64).
const MAX_NAME: usize = 253;
/// Most addresses one attachment may hold (one per family in practice).
const MAX_IPS: usize = 8;
/// How many deletions are remembered, so a queued ADD older than its DEL is not
/// applied after it. Past this, the oldest are forgotten.
const MAX_TOMBSTONES: usize = 4096;

/// What happened to the attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The container was attached (a successful ADD).
    Add,
    /// It was detached (DEL).
    Del,
}

/// One ADD or DEL, as `twill-cni` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// ADD or DEL.
    pub op: Op,
    /// When the plugin ran (Unix nanoseconds): orders reports that arrive out of order.
    pub at_ns: u64,
    /// The attachment added or deleted.
    pub attachment: Attachment,
}

/// Which attachment: a container's interface in one network.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    /// The Twill network (`default`, or a name of `--networks`).
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// A pod's interface and its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Which attachment.
    #[serde(flatten)]
    pub key: Key,
    /// The container's network namespace (a path; empty when the runtime gave none).
    #[serde(default)]
    pub netns: String,
    /// The pod's namespace (`K8S_POD_NAMESPACE`), and below its name (`K8S_POD_NAME`),
    /// when the runtime gave them.
    #[serde(default)]
    pub namespace: String,
    /// The pod's name.
    #[serde(default)]
    pub pod: String,
    /// The IPAM's directory of held addresses (host-local's `<dataDir>/<name>`), when
    /// the delegate IPAM is host-local.
    #[serde(default)]
    pub ipam_dir: Option<PathBuf>,
    /// Its addresses, as the delegate's result gave them.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// When it was added (Unix nanoseconds).
    #[serde(default)]
    pub added_at_ns: u64,
}

/// Why a report was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    /// Not JSON, or not a report.
    #[error("the report is not JSON of the expected shape: {0}")]
    Shape(String),
    /// A field breaks its rule.
    #[error("{field} {value:?} is not valid: {why}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// Its value (the first 80 characters).
        value: String,
        /// The rule.
        why: &'static str,
    },
}

impl Report {
    /// A report of `op` on `attachment`, made now.
    pub fn now(op: Op, attachment: Attachment) -> Report {
        let at_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Report {
            op,
            at_ns,
            attachment,
        }
    }

    /// Parses one report and checks every field.
    pub fn parse(line: &[u8]) -> Result<Report, ReportError> {
        let r: Report =
            serde_json::from_slice(line).map_err(|e| ReportError::Shape(e.to_string()))?;
        r.attachment.check()?;
        Ok(r)
    }
}

impl Attachment {
    /// The same rules `twill-cni` applies to its environment, so nothing the plugin
    /// could not have sent is kept.
    fn check(&self) -> Result<(), ReportError> {
        let bad = |field, value: &str, why| ReportError::Field {
            field,
            value: value.chars().take(80).collect(),
            why,
        };
        let k = &self.key;
        if !crate::cni::config::valid_cni_name(&k.network) {
            return Err(bad("network", &k.network, "[a-zA-Z0-9][a-zA-Z0-9_.-]*"));
        }
        if k.container_id.len() > MAX_NAME || !crate::cni::config::valid_cni_name(&k.container_id) {
            return Err(bad(
                "containerID",
                &k.container_id,
                "[a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 253 characters",
            ));
        }
        if k.ifname.is_empty()
            || k.ifname.len() > 15
            || k.ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(bad(
                "ifname",
                &k.ifname,
                "1 to 15 characters, no /, : or whitespace",
            ));
        }
        for (field, v) in [("namespace", &self.namespace), ("pod", &self.pod)] {
            if v.len() > MAX_NAME || v.chars().any(char::is_control) {
                return Err(bad(
                    field,
                    v,
                    "at most 253 characters, no control characters",
                ));
            }
        }
        if self.netns.len() > 4096 || self.netns.chars().any(char::is_control) {
            return Err(bad("netns", &self.netns, "a path"));
        }
        if let Some(dir) = &self.ipam_dir {
            let text = dir.to_string_lossy();
            if !dir.is_absolute()
                || dir
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(bad("ipamDir", &text, "an absolute path without .."));
            }
        }
        if self.ips.len() > MAX_IPS {
            return Err(bad("ips", "", "at most 8 addresses"));
        }
        Ok(())
    }
}

/// The node's attachments, and the deletions recent enough to outrank a late ADD.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Saved", into = "Saved")]
pub struct Attachments {
    live: BTreeMap<Key, Attachment>,
    /// When each key was last deleted (Unix nanoseconds).
    deleted: BTreeMap<Key, u64>,
}

/// [`Attachments`] as saved: lists, since JSON object keys are strings.
#[derive(Serialize, Deserialize)]
struct Saved {
    live: Vec<Attachment>,
    deleted: Vec<(Key, u64)>,
}

impl From<Saved> for Attachments {
    fn from(s: Saved) -> Self {
        Attachments {
            live: s.live.into_iter().map(|a| (a.key.clone(), a)).collect(),
            deleted: s.deleted.into_iter().collect(),
        }
    }
}

impl From<Attachments> for Saved {
    fn from(a: Attachments) -> Self {
        Saved {
            live: a.live.into_values().collect(),
            deleted: a.deleted.into_iter().collect(),
        }
    }
}

impl Attachments {
    /// Applies `r` unless a later report about the same attachment was applied
    /// already; whether the set changed.
    pub fn apply(&mut self, r: Report) -> bool {
        let key = r.attachment.key.clone();
        let latest = self
            .live
            .get(&key)
            .map(|a| a.added_at_ns)
            .into_iter()
            .chain(self.deleted.get(&key).copied())
            .max();
        if latest.is_some_and(|t| t > r.at_ns) {
            return false;
        }
        match r.op {
            Op::Add => {
                self.deleted.remove(&key);
                let mut a = r.attachment;
                a.added_at_ns = r.at_ns;
                self.live.insert(key, a);
            }
            Op::Del => {
                self.live.remove(&key);
                self.deleted.insert(key, r.at_ns);
                if self.deleted.len() > MAX_TOMBSTONES {
                    let oldest = self.deleted.iter().min_by_key(|(_, t)| **t);
                    if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                        self.deleted.remove(&k);
                    }
                }
            }
        }
        true
    }

    /// The attachments, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Attachment> {
        self.live.values()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Reads the set saved at `path`; an empty set when there is no file. A file that
    /// does not parse is an error: the caller decides (the agent starts empty and says
    /// so, and the reconcile with the IPAM refills what it can).
    pub fn load(path: &Path) -> Result<Attachments, std::io::Error> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Attachments::default()),
            Err(e) => Err(e),
        }
    }

    /// Saves the set at `path`, whole or not at all, not synced: the agent answers a
    /// pod's ADD after this, and a machine that crashes takes its pods with it.
    pub fn save(&self, path: &Path) -> Result<(), std::io::Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        twill_common::fs::write_whole(path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn report(op: Op, at_ns: u64, id: &str, ip: &str) -> Report {
        Report {
            op,
            at_ns,
            attachment: Attachment {
                key: Key {
                    network: "default".into(),
                    container_id: id.into(),
                    ifname: "eth0".into(),
                },
                netns: format!("/var/run/netns/{id}"),
                namespace: "web".into(),
                pod: format!("pod-{id}"),
                ipam_dir: Some("/var/lib/cni/networks/cbr0".into()),
                ips: vec![ip.parse().unwrap()],
                added_at_ns: 0,
            },
        }
    }

    #[test]
    fn reports_apply_in_the_order_they_happened_whatever_order_they_arrive_in() {
        let mut set = Attachments::default();
        assert!(set.apply(report(Op::Add, 10, "a", "10.244.1.2")));
        assert!(set.apply(report(Op::Add, 11, "b", "10.244.1.3")));
        assert_eq!(set.len(), 2);
        // b's DEL arrives, then its ADD that was queued on disk: the ADD is older.
        assert!(set.apply(report(Op::Del, 20, "b", "10.244.1.3")));
        assert!(!set.apply(report(Op::Add, 11, "b", "10.244.1.3")));
        assert_eq!(
            set.iter()
                .map(|a| a.key.container_id.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        // A DEL older than the ADD in force changes nothing.
        assert!(!set.apply(report(Op::Del, 5, "a", "10.244.1.2")));
        // Added again later: live again.
        assert!(set.apply(report(Op::Add, 30, "b", "10.244.1.9")));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn the_set_survives_a_restart_and_a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/attachments.json");
        assert!(Attachments::load(&path).unwrap().is_empty(), "no file yet");
        let mut set = Attachments::default();
        set.apply(report(Op::Add, 10, "a", "10.244.1.2"));
        set.apply(report(Op::Del, 12, "b", "10.244.1.3"));
        set.save(&path).unwrap();
        assert_eq!(Attachments::load(&path).unwrap(), set);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Attachments::load(&path).is_err());
    }

    #[test]
    fn a_report_is_checked_field_by_field() {
        let good = report(Op::Add, 1, "abc", "10.244.1.2");
        let line = serde_json::to_vec(&good).unwrap();
        assert_eq!(Report::parse(&line).unwrap(), good);
        assert!(matches!(
            Report::parse(b"{\"op\":\"add\"}"),
            Err(ReportError::Shape(_))
        ));
        let mut bad = good.clone();
        bad.attachment.key.container_id = "../etc".into();
        let e = Report::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("containerID"), "{e}");
        let mut bad = good.clone();
        bad.attachment.ipam_dir = Some("/var/lib/cni/networks/../../etc".into());
        let e = Report::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("ipamDir"), "{e}");
        let mut bad = good.clone();
        bad.attachment.key.ifname = "a-very-long-interface".into();
        assert!(Report::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        let mut bad = good;
        bad.attachment.pod = "x\ny".into();
        assert!(Report::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
    }
}
