//! The node's pod attachments as a part of the loop: reports queued while the agent
//! was down are taken in, the set is checked against what host-local holds and which
//! network namespaces exist, and the findings become metrics and log lines (a subnet
//! at 90 % is a warning before the ADD that fails).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use tracing::{info, warn};
use twill_agent::pods::ipam::{self, Held};
use twill_agent::pods::socket::{self, Pods};
use twill_common::model::{Family, PerFamily};
use twill_common::networks::NetworkName;

use crate::http::{PodIpLabels, Stats};

/// A network's subnet is reported as nearly full from this share of its addresses.
const NEARLY_FULL: f64 = 0.9;

/// The attachments' part of the loop.
pub(super) struct PodView {
    pods: Arc<Pods>,
    /// Where twill-cni queues reports the socket did not take.
    queue: Option<PathBuf>,
    /// What was last logged, so each finding is logged once, when it appears.
    leaked: BTreeSet<String>,
    conflicts: BTreeSet<String>,
    full: BTreeSet<(NetworkName, Family)>,
}

impl PodView {
    /// The view of `pods`, draining `socket`'s queue when there is a socket.
    pub(super) fn new(pods: Arc<Pods>, socket: Option<&std::path::Path>) -> Self {
        PodView {
            pods,
            queue: socket.map(socket::queue_dir),
            leaked: BTreeSet::new(),
            conflicts: BTreeSet::new(),
            full: BTreeSet::new(),
        }
    }

    /// Takes in queued reports and checks the set against the IPAM; `subnets` are the
    /// joined networks' subnets.
    pub(super) fn check(
        &mut self,
        subnets: &BTreeMap<NetworkName, PerFamily<IpNet>>,
        stats: &Stats,
    ) {
        if let Some(queue) = &self.queue {
            let n = self.pods.drain(queue);
            if n > 0 {
                info!(reports = n, "pod attachment reports taken from the queue");
            }
        }
        let set = self.pods.snapshot();
        let mut dirs: BTreeMap<PathBuf, Vec<Held>> = BTreeMap::new();
        let mut dirs_of: BTreeMap<&str, BTreeSet<PathBuf>> = BTreeMap::new();
        for a in set.iter() {
            let Some(dir) = &a.ipam_dir else { continue };
            dirs_of
                .entry(a.key.network.as_str())
                .or_default()
                .insert(dir.clone());
            if dirs.contains_key(dir) {
                continue;
            }
            match ipam::held(dir) {
                Ok(h) => {
                    dirs.insert(dir.clone(), h);
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot read the IPAM's addresses")
                }
            }
        }
        let netns_exists = |p: &str| std::path::Path::new(p).exists();
        let found = ipam::check(&set, &dirs, &netns_exists);
        stats.pod_attachments.set(set.len() as i64);
        stats.pod_ips_leaked.set(found.leaked.len() as i64);
        stats.pod_ips_conflicts.set(found.conflicts.len() as i64);
        let leaked = log_new(&mut self.leaked, &found.leaked);
        for (k, ip) in found
            .leaked
            .iter()
            .filter(|(k, ip)| leaked.contains(&key_text(k, ip)))
        {
            warn!(network = %k.network, container = %k.container_id, ifname = %k.ifname, ip = %ip, "pod address leaked: held by the IPAM for a network namespace that is gone (a runtime that crashed before DEL)");
        }
        let conflicts = log_new(&mut self.conflicts, &found.conflicts);
        for (k, ip) in found
            .conflicts
            .iter()
            .filter(|(k, ip)| conflicts.contains(&key_text(k, ip)))
        {
            warn!(network = %k.network, container = %k.container_id, ifname = %k.ifname, ip = %ip, "pod address conflict: the attachment reports an address its IPAM does not hold");
        }

        for (network, subnets) in subnets {
            let held: Vec<Held> = dirs_of
                .get(network.to_string().as_str())
                .into_iter()
                .flatten()
                .filter_map(|d| dirs.get(d))
                .flatten()
                .cloned()
                .collect();
            for (family, subnet) in subnets.iter() {
                let (used, total) = (ipam::used(&held, *subnet), ipam::usable(*subnet));
                let labels = PodIpLabels {
                    network: network.to_string(),
                    family: family.name().to_ascii_lowercase(),
                };
                stats.pod_ips_used.get_or_create(&labels).set(used as i64);
                stats
                    .pod_ips_total
                    .get_or_create(&labels)
                    .set(total.min(i64::MAX as u64) as i64);
                let full = total > 0 && used as f64 >= total as f64 * NEARLY_FULL;
                let key = (network.clone(), family);
                if full && self.full.insert(key.clone()) {
                    warn!(network = %network, subnet = %subnet, used, total, "the node's pod subnet is nearly full: pods will fail to get an address once it is");
                } else if !full && self.full.remove(&key) {
                    info!(network = %network, subnet = %subnet, used, total, "the node's pod subnet has room again");
                }
            }
        }
    }
}

fn key_text(k: &twill_agent::pods::Key, ip: &std::net::IpAddr) -> String {
    format!("{}/{}/{}/{ip}", k.network, k.container_id, k.ifname)
}

/// Replaces `seen` with `now`'s entries; the ones not seen before.
fn log_new(
    seen: &mut BTreeSet<String>,
    now: &[(twill_agent::pods::Key, std::net::IpAddr)],
) -> BTreeSet<String> {
    let now: BTreeSet<String> = now.iter().map(|(k, ip)| key_text(k, ip)).collect();
    let new = now.difference(seen).cloned().collect();
    *seen = now;
    new
}
