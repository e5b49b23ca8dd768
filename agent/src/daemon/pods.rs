//! The node's pod attachments as a part of the loop: reports queued while the agent
//! was down are taken in, the set is checked against what host-local holds and which
//! network namespaces exist, and the findings become metrics and log lines (a subnet
//! at 90 % is a warning before the ADD that fails). The set goes to the controller
//! (`ReportAttachments`, the whole set) when it changed, when the watch (re)opens (a
//! restarted controller or a new leader has none) and every [`REFRESH`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;
use twill_agent::client;
use twill_agent::pods::{Attachments, Key, Op, Report};
use twill_proto::{PodAddressFinding, PodAddressUsage, PodAttachment, ReportAttachmentsRequest};

use ipnet::IpNet;
use tracing::{info, warn};
use twill_agent::pods::ipam::{self, Held};
use twill_agent::pods::socket::{self, Pods};
use twill_common::model::{Family, PerFamily};
use twill_common::networks::NetworkName;

use crate::http::{PodIpLabels, Stats};

/// How often the whole set goes to the controller even when nothing changed: the
/// controller keeps it in memory only, and a replica that became leader behind an
/// agent's back has none.
const REFRESH: Duration = Duration::from_secs(300);

/// The attachments' part of the loop.
pub(super) struct PodView {
    pods: Arc<Pods>,
    /// Where twill-cni queues reports the socket did not take.
    queue: Option<PathBuf>,
    /// What was last logged, so each finding is logged once, when it appears.
    leaked: BTreeSet<String>,
    conflicts: BTreeSet<String>,
    full: BTreeSet<(NetworkName, Family)>,
    /// Addresses host-local holds per network and family, as the last check found.
    usage: Vec<PodAddressUsage>,
    /// Leaks and conflicts in this node's subnets, as the last check found.
    findings: Vec<PodAddressFinding>,
    /// The last report the controller took, and when it is due again regardless.
    sent: Option<Shown>,
    refresh_at: Instant,
    /// The report in flight, with what it carries.
    sending: Option<(Reporting, Shown)>,
}

/// A report in flight; it ends with the releases the controller asked for.
type Reporting = JoinHandle<Result<Vec<PodAddressFinding>, Status>>;

/// What a report carries: the attachments, the address usage and the findings.
type Shown = (
    Vec<PodAttachment>,
    Vec<PodAddressUsage>,
    Vec<PodAddressFinding>,
);

impl PodView {
    /// The view of `pods`, draining `socket`'s queue when there is a socket.
    pub(super) fn new(pods: Arc<Pods>, socket: Option<&std::path::Path>) -> Self {
        PodView {
            pods,
            queue: socket.map(socket::queue_dir),
            leaked: BTreeSet::new(),
            conflicts: BTreeSet::new(),
            full: BTreeSet::new(),
            usage: Vec::new(),
            findings: Vec::new(),
            sent: None,
            refresh_at: Instant::now(),
            sending: None,
        }
    }

    /// The controller may have lost the set (its watch was reopened): send it again.
    pub(super) fn resend(&mut self) {
        self.sent = None;
    }

    /// Sends the set of `subnets`' networks to the controller over `api` as `node`
    /// when it changed since the controller last took it, or is due again; one report
    /// at a time, the previous one's end read first.
    pub(super) fn report(
        &mut self,
        api: &super::Api,
        node: &str,
        subnets: &BTreeMap<NetworkName, PerFamily<IpNet>>,
        deadline: Duration,
    ) {
        if let Some((handle, set)) = self.sending.take() {
            if !handle.is_finished() {
                self.sending = Some((handle, set));
                return;
            }
            match handle.now_or_never() {
                Some(Ok(Ok(release))) => {
                    self.sent = Some(set);
                    self.refresh_at = Instant::now() + REFRESH;
                    self.release(&release);
                }
                Some(Ok(Err(s))) => {
                    warn!(code = %s.code(), error = %s.message(), "the controller did not take the node's pods; sending them again")
                }
                _ => {}
            }
        }
        if subnets.is_empty() {
            // No lease yet: nothing the controller could take.
            return;
        }
        let shown = (
            reportable(&self.pods.snapshot(), subnets),
            self.usage.clone(),
            self.findings.clone(),
        );
        // While leaks are known, every tick: an admin's release order comes back with
        // the answer.
        let leaking = self.findings.iter().any(|f| f.kind == "leaked");
        if self.sent.as_ref() == Some(&shown) && Instant::now() < self.refresh_at && !leaking {
            return;
        }
        let req = ReportAttachmentsRequest {
            node_name: node.to_string(),
            attachments: shown.0.clone(),
            usage: shown.1.clone(),
            findings: shown.2.clone(),
        };
        let mut api = api.clone();
        let call = tokio::spawn(async move {
            client::within(
                deadline,
                api.report_attachments(client::request(req, deadline)),
            )
            .await
            .map(|r| r.into_inner().release)
        });
        self.sending = Some((call, shown));
    }

    /// Releases the leaked addresses the controller passed on from an admin
    /// (`twillctl ipam release --leaked`): each one this node still finds leaked (its
    /// attachment's namespace gone) is released from host-local's files, as its DEL
    /// would, and the attachment forgotten. Anything else is left alone.
    fn release(&mut self, asked: &[PodAddressFinding]) {
        if asked.is_empty() {
            return;
        }
        let set = self.pods.snapshot();
        for f in asked {
            let Ok(ip) = f.ip.parse::<IpAddr>() else {
                continue;
            };
            let still = f.kind == "leaked"
                && self.findings.iter().any(|mine| {
                    mine.kind == "leaked" && mine.ip == f.ip && mine.container_id == f.container_id
                });
            let attachment = set.iter().find(|a| {
                a.key.container_id == f.container_id
                    && a.ips.contains(&ip)
                    && !a.netns.is_empty()
                    && !std::path::Path::new(&a.netns).exists()
            });
            let (true, Some(a)) = (still, attachment) else {
                info!(ip = %f.ip, container = %f.container_id, "not releasing an address that is no longer leaked here");
                continue;
            };
            let Some(dir) = &a.ipam_dir else { continue };
            match ipam::release(dir, ip, &a.key.container_id) {
                Ok(released) => {
                    if released {
                        info!(network = %a.key.network, ip = %ip, container = %a.key.container_id, "leaked pod address released (asked by an admin)");
                    }
                    if let Err(e) = self.pods.apply(Report::now(Op::Del, a.clone())) {
                        warn!(error = %e, "cannot record the released attachment");
                    }
                }
                Err(e) => {
                    warn!(ip = %ip, dir = %dir.display(), error = %e, "cannot release a leaked pod address")
                }
            }
        }
        self.findings.retain(|f| f.kind != "leaked");
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
        for (k, ip) in log_new(&mut self.leaked, &found.leaked) {
            warn!(network = %k.network, container = %k.container_id, ifname = %k.ifname, ip = %ip, "pod address leaked: held by the IPAM for a network namespace that is gone (a runtime that crashed before DEL)");
        }
        for (k, ip) in log_new(&mut self.conflicts, &found.conflicts) {
            warn!(network = %k.network, container = %k.container_id, ifname = %k.ifname, ip = %ip, "pod address conflict: the attachment reports an address its IPAM does not hold");
        }

        self.findings = [("leaked", &found.leaked), ("conflict", &found.conflicts)]
            .into_iter()
            .flat_map(|(kind, list)| list.iter().map(move |f| (kind, f)))
            .filter_map(|(kind, (k, ip))| {
                let (network, nets) = subnets.iter().find(|(n, _)| n.to_string() == k.network)?;
                nets.values()
                    .any(|n| n.contains(ip))
                    .then(|| PodAddressFinding {
                        kind: kind.into(),
                        network: network.wire().to_string(),
                        ip: ip.to_string(),
                        container_id: k.container_id.clone(),
                        node_name: String::new(),
                    })
            })
            .collect();
        self.usage.clear();
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
                let (used, total) = (
                    ipam::used(&held, *subnet),
                    twill_common::pods::usable(*subnet),
                );
                let labels = PodIpLabels {
                    network: network.to_string(),
                    family: family.name().to_ascii_lowercase(),
                };
                stats.pod_ips_used.get_or_create(&labels).set(used as i64);
                self.usage.push(PodAddressUsage {
                    network: network.wire().to_string(),
                    family: labels.family.clone(),
                    used,
                    ..Default::default()
                });
                stats
                    .pod_ips_total
                    .get_or_create(&labels)
                    .set(total.min(i64::MAX as u64) as i64);
                let full = twill_common::pods::nearly_full(used, total);
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

/// The attachments of `set` the controller can take: in networks this node holds a
/// lease in (`subnets`), with the addresses inside those subnets (a conflict stays a
/// node-side finding, it would get the whole report refused).
fn reportable(
    set: &Attachments,
    subnets: &BTreeMap<NetworkName, PerFamily<IpNet>>,
) -> Vec<PodAttachment> {
    set.iter()
        .filter_map(|a| {
            let (network, nets) = subnets
                .iter()
                .find(|(n, _)| n.to_string() == a.key.network)?;
            let ips = a
                .ips
                .iter()
                .filter(|ip| nets.values().any(|n| n.contains(*ip)))
                .map(ToString::to_string)
                .collect();
            Some(PodAttachment {
                network: network.wire().to_string(),
                container_id: a.key.container_id.clone(),
                ifname: a.key.ifname.clone(),
                namespace: a.namespace.clone(),
                pod: a.pod.clone(),
                ips,
                added_at_unix: (a.added_at_ns / 1_000_000_000) as i64,
                node_name: String::new(),
            })
        })
        .collect()
}

/// Replaces `seen` with `now`'s entries; the ones not seen before.
fn log_new<'a>(seen: &mut BTreeSet<String>, now: &'a [(Key, IpAddr)]) -> Vec<&'a (Key, IpAddr)> {
    let text =
        |(k, ip): &(Key, IpAddr)| format!("{}/{}/{}/{ip}", k.network, k.container_id, k.ifname);
    let new = now.iter().filter(|f| !seen.contains(&text(f))).collect();
    *seen = now.iter().map(text).collect();
    new
}
