//! The networks this controller serves (REFERENCE 2.10): `default` from `--net-conf`
//! and one per `<name>.json` in `--networks-dir`, re-read every few seconds. Each
//! reading is merged into what is served by `merge`, which keeps the rules: a network
//! that serves leases is never disturbed by a bad file (a file that does not parse,
//! overlaps another network, shares a VNI, or changes the addresses under existing
//! leases is refused and the version in force stays); a removed file retires its
//! network (no new leases, the existing ones run out) until its last lease is gone.
//! The gRPC services read the current set; the lease writer is sent every change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tracing::{error, info};
use twill_common::networks::{check_against, scan_dir, DirScan, Network, NetworkName};

use crate::events::Hub;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::store::schema::Layout;

/// How often `--networks-dir` is read again (as the TLS files are).
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// A network as served.
#[derive(Debug, Clone)]
pub struct ServedNetwork {
    /// Its name, configuration and `"Nodes"`.
    pub network: Network,
    /// Its file was removed: no new leases or renewals; it stays listed while leases
    /// of it remain.
    pub retired: bool,
}

/// Every network served, by name.
pub type Served = BTreeMap<NetworkName, ServedNetwork>;

/// The served networks, and the files refused at the last reading.
pub struct Registry {
    default: Network,
    dir: Option<PathBuf>,
    current: RwLock<Arc<Served>>,
    refused: RwLock<Vec<(String, String)>>,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// The networks of `default` and `dir` (none when `dir` is `None`); files refused
    /// at start are logged and left out, as on every later reading.
    pub fn load(default: Network, dir: Option<PathBuf>, hub: &Hub, metrics: Arc<Metrics>) -> Self {
        let registry = Registry {
            current: RwLock::new(Arc::new(Served::new())),
            refused: RwLock::new(Vec::new()),
            default,
            dir,
            metrics,
        };
        registry.rescan(hub);
        registry
    }

    /// What is served now.
    pub fn current(&self) -> Arc<Served> {
        self.current.read().clone()
    }

    /// One network as served.
    pub fn get(&self, name: &NetworkName) -> Option<ServedNetwork> {
        self.current.read().get(name).cloned()
    }

    /// Reads the directory again and merges it; true when what is served changed.
    pub fn rescan(&self, hub: &Hub) -> bool {
        let scan = match &self.dir {
            Some(dir) => match scan_dir(dir) {
                Ok(scan) => scan,
                Err(e) => {
                    error!(error = %e, "cannot read the networks directory; serving the networks in force");
                    return false;
                }
            },
            None => DirScan::default(),
        };
        let previous = self.current();
        let (served, refused) = merge(&previous, &self.default, scan, &hub.counts());
        {
            let mut known = self.refused.write();
            for (name, why) in refused.iter().filter(|r| !known.contains(r)) {
                error!(network = %name, error = %why, "network file refused; the network's version in force (if any) is kept");
            }
            self.metrics.network_files_refused.set(refused.len() as i64);
            *known = refused;
        }
        if served_eq(&previous, &served) {
            return false;
        }
        for (name, s) in &served {
            match previous.get(name) {
                None => info!(network = %name, nodes = %s.network.nodes, "network added"),
                Some(p) if p.retired != s.retired && s.retired => {
                    info!(network = %name, "network file removed: no new leases in it, the existing ones run out")
                }
                Some(p) if p.network.conf.raw != s.network.conf.raw || p.retired != s.retired => {
                    info!(network = %name, "network configuration changed")
                }
                Some(_) => {}
            }
        }
        for name in previous.keys().filter(|n| !served.contains_key(*n)) {
            info!(network = %name, "network removed and its last lease is gone");
        }
        *self.current.write() = Arc::new(served);
        true
    }

    /// Reads the directory every few seconds for as long as the process runs, and
    /// hands every change to the lease writer.
    pub fn spawn_watch(self: Arc<Self>, hub: Arc<Hub>, leases: Leases) {
        if self.dir.is_none() {
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Retired networks leave once their last lease is gone, which the table
                // tells: merge again even when no file changed.
                if self.rescan(&hub) {
                    leases.configure(self.current()).await;
                }
            }
        });
    }
}

/// Whether two served sets are the same (configurations compared as loaded).
fn served_eq(a: &Served, b: &Served) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((an, a), (bn, b))| {
            an == bn
                && a.retired == b.retired
                && a.network.conf.raw == b.network.conf.raw
                && a.network.nodes == b.network.nodes
        })
}

/// What may not change under a network's leases: where its subnets come from (the
/// store's layout) and what its devices are (VNI and port: nodes on the old and the
/// new one could not reach each other).
fn pinned(n: &Network) -> (Layout, u32, u16) {
    let b = &n.conf.backend;
    (Layout::from(&n.conf), b.vni, b.port)
}

/// What to serve after a reading of the directory (`scan`), given what is served
/// (`previous`) and how many leases each network holds (`leases`); and the files
/// refused, with why. Networks served before are decided first, so a new file can
/// never push out a network in use by conflicting with it.
pub fn merge(
    previous: &Served,
    default: &Network,
    mut scan: DirScan,
    leases: &BTreeMap<NetworkName, usize>,
) -> (Served, Vec<(String, String)>) {
    let mut served = Served::new();
    let mut refused: Vec<(String, String)> = scan
        .errors
        .drain(..)
        .map(|(name, e)| (name, e.to_string()))
        .collect();
    let serve = |network, retired| ServedNetwork { network, retired };
    served.insert(default.name.clone(), serve(default.clone(), false));
    let held = |name: &NetworkName| leases.get(name).copied().unwrap_or(0);
    let (known, new): (Vec<NetworkName>, Vec<NetworkName>) = scan
        .networks
        .keys()
        .cloned()
        .partition(|n| previous.contains_key(n));
    // Networks whose file is gone, or refused now, keep their place while they hold
    // leases; they are checked against like any other.
    for (name, p) in previous.iter().filter(|(n, _)| !n.is_default()) {
        let file_refused = refused.iter().any(|(r, _)| r == name.as_str());
        if file_refused {
            served.insert(name.clone(), p.clone());
        } else if !scan.networks.contains_key(name) && held(name) > 0 {
            served.insert(name.clone(), serve(p.network.clone(), true));
        }
    }
    for name in known.into_iter().chain(new) {
        let Some(candidate) = scan.networks.remove(&name) else {
            continue;
        };
        let before = previous.get(&name);
        let moved =
            before.is_some_and(|b| pinned(&b.network) != pinned(&candidate) && held(&name) > 0);
        let verdict = if moved {
            Err(format!(
                "network {name}: its Network, SubnetLen, IPv6 keys, Backend.Type, VNI or Port \
                 changed while {} node(s) hold leases in it; put the previous values back, or \
                 move the file away, let the leases run out and add it again",
                held(&name)
            ))
        } else {
            check_against(&candidate, served.values().map(|s| &s.network))
                .map_err(|e| e.to_string())
        };
        match verdict {
            Ok(()) => {
                served.insert(name, serve(candidate, false));
            }
            Err(why) => {
                refused.push((name.to_string(), why));
                if let Some(b) = before {
                    served.insert(name, b.clone());
                }
            }
        }
    }
    refused.sort();
    (served, refused)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use twill_common::NetConf;

    use super::*;

    fn net(name: &str, text: &str) -> Network {
        Network::parse(NetworkName::new(name).unwrap(), text, Path::new("x.json")).unwrap()
    }

    fn default() -> Network {
        Network::default_from(
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap(),
        )
    }

    fn blue() -> Network {
        net(
            "blue",
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2},"Nodes":["node-a"]}"#,
        )
    }

    fn scan(networks: Vec<Network>) -> DirScan {
        DirScan {
            networks: networks.into_iter().map(|n| (n.name.clone(), n)).collect(),
            errors: Vec::new(),
        }
    }

    fn names(s: &Served) -> Vec<(&str, bool)> {
        s.iter().map(|(n, s)| (n.as_str(), s.retired)).collect()
    }

    fn name(s: &str) -> NetworkName {
        NetworkName::new(s).unwrap()
    }

    #[test]
    fn files_add_networks_and_removal_retires_them_while_leases_remain() {
        let none = BTreeMap::new();
        let (served, refused) = merge(&Served::new(), &default(), scan(vec![blue()]), &none);
        assert!(refused.is_empty());
        assert_eq!(names(&served), [("blue", false), ("default", false)]);
        let leases = [(name("blue"), 2)].into();
        let (retired, _) = merge(&served, &default(), scan(vec![]), &leases);
        assert_eq!(names(&retired), [("blue", true), ("default", false)]);
        let (gone, _) = merge(&retired, &default(), scan(vec![]), &none);
        assert_eq!(
            names(&gone),
            [("default", false)],
            "forgotten once its leases ran out"
        );
        let (back, _) = merge(&retired, &default(), scan(vec![blue()]), &leases);
        assert_eq!(
            names(&back),
            [("blue", false), ("default", false)],
            "the file came back"
        );
    }

    #[test]
    fn a_bad_file_is_refused_and_the_network_in_force_stays() {
        let none = BTreeMap::new();
        let (served, _) = merge(&Served::new(), &default(), scan(vec![blue()]), &none);
        // blue's file now fails to parse.
        let broken = DirScan {
            networks: BTreeMap::new(),
            errors: vec![(
                "blue".into(),
                twill_common::networks::NetworkError::Conflict("cannot parse".into()),
            )],
        };
        let (kept, refused) = merge(&served, &default(), broken, &none);
        assert_eq!(names(&kept), [("blue", false), ("default", false)]);
        assert_eq!(refused.len(), 1);
        assert_eq!(kept[&name("blue")].network.conf.raw, blue().conf.raw);
    }

    #[test]
    fn overlaps_and_shared_vnis_are_refused_naming_both_and_never_push_out_a_network_in_use() {
        let none = BTreeMap::new();
        let (served, _) = merge(&Served::new(), &default(), scan(vec![blue()]), &none);
        // "aqua" sorts before "blue" and takes blue's VNI: the newcomer is refused.
        let aqua = net(
            "aqua",
            r#"{"Network":"10.11.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#,
        );
        let (after, refused) = merge(&served, &default(), scan(vec![aqua, blue()]), &none);
        assert_eq!(names(&after), [("blue", false), ("default", false)]);
        assert_eq!(refused[0].0, "aqua");
        assert!(
            refused[0].1.contains("aqua") && refused[0].1.contains("blue"),
            "{}",
            refused[0].1
        );
        let inside = net(
            "green",
            r#"{"Network":"10.244.8.0/24","Backend":{"Type":"vxlan","VNI":3}}"#,
        );
        let (_, refused) = merge(&served, &default(), scan(vec![blue(), inside]), &none);
        assert!(
            refused[0].1.contains("green") && refused[0].1.contains("default"),
            "{}",
            refused[0].1
        );
    }

    #[test]
    fn addresses_under_leases_do_not_move_but_other_settings_may() {
        let leases = [(name("blue"), 1)].into();
        let (served, _) = merge(&Served::new(), &default(), scan(vec![blue()]), &leases);
        let moved = net(
            "blue",
            r#"{"Network":"10.12.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#,
        );
        let (kept, refused) = merge(&served, &default(), scan(vec![moved.clone()]), &leases);
        assert!(
            refused[0].1.contains("changed while 1 node(s) hold leases"),
            "{}",
            refused[0].1
        );
        let new_vni = net(
            "blue",
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#,
        );
        let (_, refused) = merge(&served, &default(), scan(vec![new_vni]), &leases);
        assert_eq!(refused.len(), 1, "a VNI under leases is pinned too");
        assert_eq!(kept[&name("blue")].network.conf.raw, blue().conf.raw);
        let (moved_free, refused) = merge(&served, &default(), scan(vec![moved]), &BTreeMap::new());
        assert!(refused.is_empty(), "no leases: the network may move");
        assert!(moved_free[&name("blue")]
            .network
            .conf
            .raw
            .contains("10.12.0.0"));
        let more_nodes = net(
            "blue",
            r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2},"Nodes":["node-*"]}"#,
        );
        let (changed, refused) = merge(&served, &default(), scan(vec![more_nodes]), &leases);
        assert!(refused.is_empty());
        assert!(changed[&name("blue")].network.nodes.admits("node-z"));
    }
}
