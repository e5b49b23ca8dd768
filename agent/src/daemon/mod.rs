//! The agent's main loop: the networks to join (`--networks`), each one's
//! configuration, devices and lease, then one watch for all of them + reconcile +
//! renew until SIGTERM. Kernel state is never torn down here while the controller is
//! away: the data plane keeps forwarding with what it has. Only a network the
//! controller stopped offering (`--networks '*'`) is taken down, once its lease ends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::{error, info, warn};
use twill_agent::client::{self, no_answer, Dial, TlsFiles};
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::Underlay;
use twill_agent::identity::rotation::{self, Credentials, RotateError};
use twill_agent::identity::{self, CertInfo};
use twill_agent::iface::{self, Selection};
use twill_agent::plane::vxlan_overhead;
use twill_agent::pods::socket::{self, Pods};
use twill_agent::schedule::{later, Retry};
use twill_agent::watch::{Opened, WatchSession};
use twill_common::model::{Family, Lease, Mac, PerFamily};
use twill_common::netconf::{BackendType, Pool, PoolNet};
use twill_common::networks::NetworkName;
use twill_common::{now_unix, subnet_env, NetConf, SubnetEnv};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, ListNetworksRequest, NetworkConfig,
    ReleaseRequest, WatchResponse,
};

use crate::http::{self, Stats};

mod kernel;
mod networks;
mod pods;
mod rotating;
#[cfg(test)]
mod tests;

use crate::Args;
use kernel::Kernel;
use networks::{Membership, Wanted};
use pods::PodView;
use rotating::{Managed, Rotation};

/// Longest wait between retries of a controller call.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

type Api = AgentServiceClient<Channel>;

pub async fn run(args: Args) -> Result<()> {
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name; pass --node-name")?
            .trim()
            .to_string(),
    };
    twill_common::model::validate_node_name(&node).context("--node-name")?;
    let wanted = Wanted::new(&args.networks).context("--networks")?;
    let mut selection = Selection {
        ifaces: args.iface.clone(),
        iface_regex: args
            .iface_regex
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .context("--iface-regex")?,
        public_ip: args.public_ip,
        public_ipv6: args.public_ipv6,
        can_reach: None,
    };
    let stats = Arc::new(Stats::default());
    let listener = twill_runtime::bind(args.metrics_addr).await?;
    tokio::spawn(twill_runtime::serve(listener, http::routes(stats.clone())));

    let shutdown = twill_runtime::shutdown_signal();
    tokio::pin!(shutdown);

    rotation::finish_install(&args.tls_cert, &args.tls_key)
        .context("node certificate rotation left unfinished")?;
    if let Some(managed) = Managed::of(&args) {
        let cfg = managed.bootstrap(&node);
        let bootstrap = identity::bootstrap(&cfg);
        tokio::pin!(bootstrap);
        // /livez keeps answering while the controller refuses or is away.
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                r = &mut bootstrap => {
                    r.context("node certificate bootstrap")?;
                    break;
                }
                _ = beat.tick() => stats.health.loop_turned.store(now_unix(), Ordering::Relaxed),
                () = &mut shutdown => {
                    info!(node = %node, "exiting before a node certificate was issued");
                    return Ok(());
                }
            }
        }
    }
    let (creds, channel) = Credentials::load(
        &args.controller,
        &node,
        &TlsFiles {
            cert: &args.tls_cert,
            key: &args.tls_key,
            ca: &args.tls_ca,
        },
        Dial::mtls(),
    )?;
    stats
        .cert_expiry
        .set(creds.info.as_ref().map_or(0, |i| i.not_after));
    let dp = Netlink::new()?;
    if let Some(addr) = args.iface_can_reach {
        selection.can_reach = Some((addr, dp.route_interface(addr).await?));
    }
    let interfaces = dp.interfaces().await?;
    // Both families are looked for up front: which ones are needed is known only once
    // the networks' configurations are in, and with `*` networks come later.
    let mut underlays = Underlays::default();
    for family in [Family::V4, Family::V6] {
        let default = dp.default_route_of(family).await.ok();
        match iface::select_family(&selection, family, &interfaces, default.as_ref()) {
            Ok(p) => *underlays.found.slot(family) = Some(p),
            Err(e) => *underlays.missing.slot(family) = Some(e.to_string()),
        }
    }
    let kernel = Kernel::new(Box::new(dp), stats.clone());
    let attachments = Arc::new(Pods::open(&args.attachments_file));
    let cni_socket = (!args.cni_socket.as_os_str().is_empty()).then(|| args.cni_socket.clone());
    if let Some(path) = &cni_socket {
        // The pod view is not worth the overlay: without the socket (an old systemd
        // unit that does not make /run/twill, say) the agent still does its job, and
        // twill-cni queues its reports.
        match socket::bind(path) {
            Ok(listener) => {
                tokio::spawn(socket::serve(listener, attachments.clone()));
            }
            Err(e) => {
                error!(socket = %path.display(), error = %e, "cannot listen for twill-cni's pod reports (--cni-socket); pods are not tracked until this is fixed and the agent restarted")
            }
        }
    }
    let pods = PodView::new(attachments, cni_socket.as_deref());
    let mut agent = Agent {
        node,
        args,
        wanted,
        underlays,
        api: client::agent_client(channel.clone()),
        channel,
        creds,
        stats,
        kernel,
        networks: BTreeMap::new(),
        shut_out: BTreeSet::new(),
        pods,
    };
    agent.main_loop(&mut shutdown).await
}

/// The public interface and address of each family, or why none was found.
#[derive(Default)]
struct Underlays {
    found: PerFamily<(Underlay, IpAddr)>,
    missing: PerFamily<String>,
}

impl Underlays {
    /// The underlays of each family `conf` has.
    fn of(&self, conf: &NetConf) -> Result<PerFamily<(Underlay, IpAddr)>> {
        conf.networks()
            .try_map(|family, _| match self.found.get(family) {
                Some(u) => Ok(u.clone()),
                None => Err(anyhow!(
                    "{}",
                    self.missing
                        .get(family)
                        .cloned()
                        .unwrap_or_else(|| format!("no {family} public interface"))
                )),
            })
    }
}

/// A network's pod MTU (`FLANNEL_MTU`), one for both families so that a pod's packets
/// fit either tunnel: `Backend.MTU` when set; else the public interface's MTU less the
/// VXLAN overhead, the larger IPv6 one when the node has an IPv6 tunnel (flannel
/// #1781); with host-gw, the interface's MTU.
fn pod_mtu(conf: &NetConf, underlays: &PerFamily<(Underlay, IpAddr)>) -> u32 {
    let host = underlays.values().map(|(u, _)| u.mtu).min().unwrap_or(1500);
    match conf.backend.kind {
        BackendType::HostGw => host,
        BackendType::Vxlan => conf.backend.mtu.unwrap_or_else(|| {
            let family = if underlays.has(Family::V6) {
                Family::V6
            } else {
                Family::V4
            };
            host.saturating_sub(vxlan_overhead(family))
        }),
    }
}

/// The subnet of one family a previous run left in a network's env file, when it
/// belongs to that network (one left by another network, e.g. a rebuilt cluster, is
/// no claim here).
fn previous_of<N: PoolNet>(pool: Option<&Pool<N>>, previous: Option<N>) -> Option<N> {
    let (pool, s) = (pool?, previous?);
    if !pool.fits(s) {
        info!(subnet = %s, network = %pool.network, "not asking for the subnet in the env file: it is not a subnet of this network");
        return None;
    }
    Some(s)
}

/// The networks the controller offered: each with its configuration as sent.
type Offered = Vec<(NetworkName, NetworkConfig)>;

/// Asks the controller for the configuration of `missing` (listed networks not yet
/// joined), or with `*` for every network that admits this node. A controller that
/// predates ListNetworks offers `default` only.
async fn discover(
    mut api: Api,
    every: bool,
    missing: Vec<NetworkName>,
    deadline: Duration,
) -> Result<Offered, (Option<NetworkName>, Status)> {
    let config = |api: &mut Api, network: &NetworkName| {
        let req = GetNetworkConfigRequest {
            network: network.wire().into(),
        };
        let mut api = api.clone();
        async move {
            client::within(
                deadline,
                api.get_network_config(client::request(req, deadline)),
            )
            .await
            .map(tonic::Response::into_inner)
        }
    };
    if every {
        let req = client::request(ListNetworksRequest {}, deadline);
        return match client::within(deadline, api.list_networks(req)).await {
            Ok(r) => Ok(r
                .into_inner()
                .networks
                .into_iter()
                .filter_map(|c| match NetworkName::from_wire(&c.name) {
                    Ok(name) => Some((name, c)),
                    Err(e) => {
                        warn!(error = %e, "ignoring a network the controller offered");
                        None
                    }
                })
                .collect()),
            Err(s) if s.code() == Code::Unimplemented => {
                let default = NetworkName::default_network();
                let c = config(&mut api, &default)
                    .await
                    .map_err(|s| (Some(default.clone()), s))?;
                Ok(vec![(default, c)])
            }
            Err(s) => Err((None, s)),
        };
    }
    let mut offered = Vec::new();
    for network in missing {
        match config(&mut api, &network).await {
            Ok(c) => offered.push((network, c)),
            Err(s) => return Err((Some(network), s)),
        }
    }
    Ok(offered)
}

struct Agent {
    node: String,
    args: Args,
    wanted: Wanted,
    underlays: Underlays,
    /// The controller API for new calls, over `channel`, which presents the
    /// certificate `creds` last loaded.
    api: Api,
    channel: Channel,
    creds: Credentials,
    stats: Arc<Stats>,
    /// The overlays, the peer sets and everything else this agent does to the kernel.
    kernel: Kernel,
    /// Each joined network's lease keeping, by name.
    networks: BTreeMap<NetworkName, Membership>,
    /// Listed networks that stopped admitting this node after it joined them: not
    /// joined again until the agent restarts (when a refusal ends it, naming them).
    shut_out: BTreeSet<NetworkName>,
    /// The node's pod attachments, checked against the IPAM every tick.
    pods: PodView,
}

/// A controller call in flight. Calls run as tasks of their own, so the main loop keeps
/// reconciling, answering ticks and SIGTERM while the controller is slow or silent.
type Call<T, E = Status> = Option<JoinHandle<Result<T, E>>>;

/// An error a call task reports when the task itself failed (panicked).
trait TaskError {
    fn lost(e: tokio::task::JoinError) -> Self;
}

impl TaskError for Status {
    fn lost(e: tokio::task::JoinError) -> Self {
        Status::internal(format!("controller call task: {e}"))
    }
}

impl TaskError for RotateError {
    fn lost(e: tokio::task::JoinError) -> Self {
        RotateError::Local(anyhow::anyhow!("certificate rotation task: {e}"))
    }
}

impl TaskError for (Option<NetworkName>, Status) {
    fn lost(e: tokio::task::JoinError) -> Self {
        (None, Status::lost(e))
    }
}

/// The result of the call in flight; never resolves when there is none.
async fn finished<T, E: TaskError>(call: &mut Call<T, E>) -> Result<T, E> {
    let Some(handle) = call.as_mut() else {
        return std::future::pending().await;
    };
    let result = handle.await.unwrap_or_else(|e| Err(E::lost(e)));
    *call = None;
    result
}

/// The Acquires in flight, one at most per network.
#[derive(Default)]
struct Acquiring {
    calls: JoinSet<Result<AcquireResponse, Status>>,
    networks: HashMap<tokio::task::Id, NetworkName>,
}

impl Acquiring {
    fn start(
        &mut self,
        network: NetworkName,
        call: impl std::future::Future<Output = Result<AcquireResponse, Status>> + Send + 'static,
    ) {
        let id = self.calls.spawn(call).id();
        self.networks.insert(id, network);
    }

    /// The next one to finish, with its network; never resolves when none is in
    /// flight.
    async fn next(&mut self) -> (NetworkName, Result<AcquireResponse, Status>) {
        let (id, result) = match self.calls.join_next_with_id().await {
            Some(Ok((id, r))) => (id, r),
            Some(Err(e)) => (e.id(), Err(Status::lost(e))),
            None => return std::future::pending().await,
        };
        let network = self
            .networks
            .remove(&id)
            .unwrap_or_else(NetworkName::default_network);
        (network, result)
    }
}

impl Agent {
    async fn main_loop(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<()> {
        let deadline = self.args.call_timeout;
        let mut discovery = Retry::now(BACKOFF_CAP);
        let mut discovering: Call<Offered, (Option<NetworkName>, Status)> = None;
        let mut acquiring = Acquiring::default();
        let mut watch: WatchSession<Streaming<WatchResponse>, Api> = WatchSession::new(BACKOFF_CAP);
        let mut opening: Call<(Streaming<WatchResponse>, Api)> = None;
        let mut rotation = Rotation::new(&self.args, &self.node, &self.creds);
        let mut tick = tokio::time::interval(self.args.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let grace = (self.args.reconcile_interval.as_secs() as i64 * 3).max(60);
        self.stats
            .health
            .loop_grace_secs
            .store(grace, Ordering::Relaxed);

        loop {
            self.stats
                .health
                .loop_turned
                .store(now_unix(), Ordering::Relaxed);
            let renewal = self.next_renewal();
            tokio::select! {
                () = &mut *shutdown => break,
                () = sleep_until(discovery.due()), if discovering.is_none() && self.discovery_wanted() => {
                    let every = self.wanted == Wanted::Every;
                    discovering = Some(tokio::spawn(discover(self.api.clone(), every, self.missing(), deadline)));
                }
                r = finished(&mut discovering) => {
                    match r {
                        Ok(offered) => {
                            self.stats.contact(now_unix());
                            discovery.succeeded(later(self.args.reconcile_interval));
                            self.on_offered(offered).await?;
                            self.follow(&mut watch);
                        }
                        Err((network, s)) => {
                            self.unanswered(&s);
                            let what = network.as_ref().map_or_else(|| "the list of networks".to_string(), |n| format!("the configuration of network {n}"));
                            if self.wanted.fatal(network.as_ref().unwrap_or(&NetworkName::default_network()), &s) {
                                bail!("the controller refused {what}: {}: {}", s.code(), s.message());
                            }
                            let wait = discovery.failed(no_answer(&s), self.creds.replicas());
                            warn!(controller = %self.creds.url(), code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot get {what}");
                        }
                    }
                }
                () = sleep_until(renewal.unwrap_or_else(|| later(Duration::MAX))), if renewal.is_some() => {
                    self.start_acquires(&mut acquiring);
                }
                (network, r) = acquiring.next() => {
                    self.on_acquired(&network, r).await?;
                    self.follow(&mut watch);
                }
                () = sleep_until(watch.due()), if watch.wants_open() && opening.is_none() && self.watch_ready() => {
                    let req = watch.request();
                    let mut api = self.api.clone();
                    opening = Some(tokio::spawn(async move {
                        client::within(deadline, api.watch(req))
                            .await
                            .map(|r| (r.into_inner(), api))
                    }));
                }
                r = finished(&mut opening) => {
                    match r {
                        Ok((stream, api)) => {
                            self.stats.contact(now_unix());
                            let before = watch.streaming().to_vec();
                            let kind = watch.opened(stream, api);
                            let names: Vec<String> = networks::streamed(watch.streaming()).iter().map(ToString::to_string).collect();
                            match kind {
                                Opened::Moved if before != watch.streaming() => info!(networks = ?names, "lease watch reopened from scratch for the networks joined now"),
                                Opened::Moved => info!(from_revision = watch.revision(), networks = ?names, "lease watch moved to a connection with the current certificate"),
                                Opened::First => info!(from_revision = watch.revision(), networks = ?names, "watching leases"),
                            }
                            self.pods.resend();
                        }
                        Err(s) => {
                            self.unanswered(&s);
                            let wait = watch.open_failed(no_answer(&s), self.creds.replicas());
                            warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot open the lease watch");
                        }
                    }
                }
                msg = next_message(watch.stream()) => {
                    match msg {
                        Ok(Some(resp)) => {
                            self.stats.contact(now_unix());
                            if resp.report_pods {
                                // A new leader: it keeps pods in memory and has none.
                                info!("the controller asks for this node's pods again (a new leader)");
                                self.pods.resend();
                            }
                            if let Some(whole) = watch.message(resp) {
                                let covered = networks::streamed(watch.streaming());
                                self.apply(&whole, &covered).await;
                                self.kernel.reconcile(false, watch.revision()).await;
                                self.follow(&mut watch);
                            }
                        }
                        Ok(None) | Err(_) => {
                            let rebalanced = msg.as_ref().err().is_some_and(client::asked_to_move);
                            if !rebalanced {
                                self.stats.no_contact(now_unix());
                            }
                            let moved = msg.as_ref().err().is_none_or(no_answer);
                            if moved {
                                self.fail_over();
                            }
                            let wait = watch.broke(moved, self.creds.replicas());
                            match msg {
                                Err(_) if rebalanced => info!(to = %self.creds.url(), retry_in = ?wait, "the controller replica asked this agent to resume its lease watch on another (spreading agents over replicas)"),
                                Err(s) => warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "lease watch broke; keeping routes, resuming"),
                                _ => warn!(retry_in = ?wait, "controller closed the lease watch; keeping routes, resuming"),
                            }
                        }
                    }
                }
                () = sleep_until(rotation.due()), if rotation.idle() => {
                    rotation.start(self.channel.clone());
                }
                r = rotation.finished() => self.on_rotated(r, &mut rotation, &mut watch),
                _ = tick.tick() => {
                    if rotation.idle() && self.reload_credentials() {
                        watch.move_to_current();
                        rotation.schedule(&self.creds);
                    }
                    self.on_tick().await;
                    self.kernel.reconcile(true, watch.revision()).await;
                    self.follow(&mut watch);
                }
            }
        }
        drop(watch);
        drop(acquiring);
        rotation.abort();
        for call in [
            discovering.map(|h| h.abort_handle()),
            opening.map(|h| h.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            call.abort();
        }
        if self.args.release_on_exit {
            for network in self.networks.keys() {
                let req = ReleaseRequest {
                    node_name: self.node.clone(),
                    network: network.wire().into(),
                };
                let mut api = self.api.clone();
                match client::within(deadline, api.release(client::request(req, deadline))).await {
                    Ok(_) => {
                        info!(network = %network, node = %self.node, "lease released (--release-on-exit)")
                    }
                    Err(s) => {
                        error!(network = %network, code = %s.code(), error = %s.message(), "could not release the lease")
                    }
                }
            }
        }
        if self.args.teardown_on_exit {
            self.kernel.teardown().await;
        } else {
            info!("exiting; kernel state left in place");
        }
        Ok(())
    }

    /// A rotation ended: on success the channel and the watch move to the new
    /// certificate and the next rotation is counted from it.
    fn on_rotated(
        &mut self,
        r: Result<CertInfo, RotateError>,
        rotation: &mut Rotation,
        watch: &mut WatchSession<Streaming<WatchResponse>, Api>,
    ) {
        match r {
            Ok(info) => {
                self.stats.cert_rotations.inc();
                info!(node = %self.node, serial = %info.serial, not_after = %info.not_after_rfc3339(), "node certificate rotated");
                if self.reload_credentials() {
                    watch.move_to_current();
                    rotation.schedule(&self.creds);
                } else {
                    // Still on the old certificate, which is due.
                    rotation.retry_later();
                }
            }
            Err(e) => {
                self.stats.cert_rotation_failures.inc();
                let wait = rotation.retry_later();
                warn!(node = %self.node, error = %e, hint = e.hint(), retry_in = ?wait, "cannot rotate the node certificate; the current one stays in use");
            }
        }
    }

    /// A call failed with `s`: when the controller did not answer, contact is lost and
    /// new calls move on.
    fn unanswered(&mut self, s: &Status) {
        if no_answer(s) {
            self.stats.no_contact(now_unix());
            self.fail_over();
        }
    }

    /// Moves new calls to another controller URL, if there is more than one: the one
    /// in use did not answer. An open watch stays where it is until it breaks.
    fn fail_over(&mut self) {
        let from = self.creds.url().to_string();
        if let Some(channel) = self.creds.fail_over() {
            info!(from = %from, to = %self.creds.url(), "moving to the next controller");
            self.use_channel(channel);
        }
    }

    /// New calls go over `channel`.
    fn use_channel(&mut self, channel: Channel) {
        self.api = client::agent_client(channel.clone());
        self.channel = channel;
    }

    /// Moves new calls to a new channel when the TLS files changed and are usable;
    /// whether it did.
    fn reload_credentials(&mut self) -> bool {
        match self.creds.reload() {
            Ok(Some(channel)) => {
                let info = self.creds.info.as_ref();
                self.stats.cert_expiry.set(info.map_or(0, |i| i.not_after));
                info!(
                    node = %self.node,
                    serial = info.map_or("", |i| i.serial.as_str()),
                    "TLS files changed; new connections to the controller use them"
                );
                self.use_channel(channel);
                true
            }
            Ok(None) => false,
            Err(why) => {
                warn!(node = %self.node, reason = %why, "the TLS files changed but cannot be used; keeping the ones in use");
                false
            }
        }
    }

    /// Whether the controller is to be asked about networks: with `*` always (every
    /// reconcile interval), else while a listed network is not joined yet.
    fn discovery_wanted(&self) -> bool {
        match &self.wanted {
            Wanted::Every => true,
            Wanted::Listed(_) => !self.missing().is_empty(),
        }
    }

    /// The listed networks not joined yet.
    fn missing(&self) -> Vec<NetworkName> {
        match &self.wanted {
            Wanted::Every => Vec::new(),
            Wanted::Listed(names) => names
                .iter()
                .filter(|n| !self.networks.contains_key(*n) && !self.shut_out.contains(*n))
                .cloned()
                .collect(),
        }
    }

    /// Joins the networks offered that are not joined yet; with `*`, the joined ones
    /// no longer offered start leaving (their leases are not renewed) and ones offered
    /// again stay. A listed network that cannot be joined is an error; with `*` it is
    /// tried again at the next check.
    async fn on_offered(&mut self, offered: Offered) -> Result<()> {
        let every = self.wanted == Wanted::Every;
        let names: BTreeSet<NetworkName> = offered.iter().map(|(n, _)| n.clone()).collect();
        for (network, config) in offered {
            if let Some(m) = self.networks.get_mut(&network) {
                if m.leaving {
                    info!(network = %network, node = %self.node, "network offered again; keeping its lease");
                    m.leaving = false;
                    m.renew.now();
                }
                continue;
            }
            match self.join(&network, &config).await {
                Ok(()) => {}
                Err(e) if !every => return Err(e),
                Err(e) => {
                    warn!(network = %network, node = %self.node, error = %format!("{e:#}"), "cannot join the network; trying again at the next check")
                }
            }
        }
        if every {
            for (network, m) in &mut self.networks {
                // `default` admits every node: a controller that stops offering it
                // is not one to leave it for.
                if names.contains(network) || m.leaving || network.is_default() {
                    continue;
                }
                info!(network = %network, node = %self.node, "network no longer offered; its lease is not renewed and it is left when the lease ends");
                m.leaving = true;
            }
            self.leave_ended().await;
        }
        Ok(())
    }

    /// Joins `network` with the configuration the controller sent: its devices are
    /// made and its lease is due at once.
    async fn join(&mut self, network: &NetworkName, config: &NetworkConfig) -> Result<()> {
        let answered = NetworkName::from_wire(&config.name).ok();
        if answered.as_ref() != Some(network) {
            bail!(
                "network {network}: the controller answered with the configuration of network {:?}: \
                 it does not serve several networks (REFERENCE 2.10); upgrade it, or drop {network} \
                 from --networks",
                answered.map_or(config.name.clone(), |n| n.to_string())
            );
        }
        let conf = NetConf::parse(&config.net_conf_json)
            .with_context(|| format!("network {network}: the controller's net-conf.json"))?;
        let underlays = self
            .underlays
            .of(&conf)
            .with_context(|| format!("network {network}"))?;
        let mtu = pod_mtu(&conf, &underlays);
        self.kernel
            .join(network, &self.node, &conf, &underlays, mtu)
            .await
            .with_context(|| format!("network {network}"))?;
        self.stats.health.lease_expiry.set(network, 0);
        let m = Membership::new(conf, mtu, BACKOFF_CAP, self.args.renew_margin);
        self.networks.insert(network.clone(), m);
        info!(network = %network, node = %self.node, "network joined");
        Ok(())
    }

    /// Takes `network` down: its devices, routes, masquerade rules and env file (never
    /// `default`'s: it is never left).
    async fn leave(&mut self, network: &NetworkName) {
        // The env file first: twill-cni attaches no new pod to a network going away.
        let file = self.network_file(network);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(network = %network, file = %file.display(), error = %e, "cannot remove the network's env file")
            }
        }
        self.kernel.leave(network).await;
        self.networks.remove(network);
        self.stats.health.lease_expiry.remove(network);
        info!(network = %network, node = %self.node, "left the network: its devices, routes, masquerade rules and env file are removed");
    }

    /// Leaves the networks no longer offered whose lease has ended.
    async fn leave_ended(&mut self) {
        let now = now_unix();
        let ended: Vec<NetworkName> = self
            .networks
            .iter()
            .filter(|(n, m)| !n.is_default() && m.ended(now))
            .map(|(n, _)| n.clone())
            .collect();
        for network in &ended {
            self.leave(network).await;
        }
    }

    /// When the next lease is due to be acquired or renewed, if any is.
    fn next_renewal(&self) -> Option<Instant> {
        self.networks
            .values()
            .filter(|m| !m.acquiring && !m.leaving)
            .map(|m| m.renew.due())
            .min()
    }

    /// Starts an Acquire for every network whose lease is due.
    fn start_acquires(&mut self, acquiring: &mut Acquiring) {
        let now = Instant::now();
        let due: Vec<NetworkName> = self
            .networks
            .iter()
            .filter(|(_, m)| !m.acquiring && !m.leaving && m.renew.due() <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let deadline = self.args.call_timeout;
        for network in due {
            let req = self.acquire_request(&network);
            let mut api = self.api.clone();
            acquiring.start(network.clone(), async move {
                client::within(deadline, api.acquire(client::request(req, deadline)))
                    .await
                    .map(tonic::Response::into_inner)
            });
            if let Some(m) = self.networks.get_mut(&network) {
                m.acquiring = true;
            }
        }
    }

    /// Handles the answer to `network`'s Acquire: the lease applied and its renewal
    /// scheduled, or the refusal retried (or, when the operator must act, returned).
    async fn on_acquired(
        &mut self,
        network: &NetworkName,
        r: Result<AcquireResponse, Status>,
    ) -> Result<()> {
        let Some(m) = self.networks.get_mut(network) else {
            return Ok(());
        };
        m.acquiring = false;
        m.answered = true;
        let result = match r {
            Ok(resp) => {
                self.stats.contact(now_unix());
                self.on_lease(network, resp).await
            }
            Err(s) => {
                self.unanswered(&s);
                // A network the node is in that stops admitting it (its "Nodes" changed)
                // or is no longer served: left once its lease ends, as with `*`. Ending
                // the agent here would stop the renewals of every other network, the
                // default one's too, and take the whole node off the overlay.
                let joined = !network.is_default()
                    && self
                        .networks
                        .get(network)
                        .is_some_and(|m| m.lease.is_some());
                if joined && matches!(s.code(), Code::PermissionDenied | Code::NotFound) {
                    error!(network = %network, node = %self.node, code = %s.code(), error = %s.message(), "the controller no longer lets this node renew its lease in the network; leaving the network when the lease ends");
                    if let Some(m) = self.networks.get_mut(network) {
                        m.leaving = true;
                    }
                    self.shut_out.insert(network.clone());
                    return Ok(());
                }
                if self.wanted.fatal(network, &s) {
                    // A network that never let the node in leaves no device behind.
                    if !network.is_default()
                        && self.networks.get(network).is_some_and(|m| !m.watched)
                    {
                        self.leave(network).await;
                    }
                    bail!(
                        "network {network}: the controller refused our lease: {}: {}",
                        s.code(),
                        s.message()
                    );
                }
                Err(anyhow::Error::new(s))
            }
        };
        let Some(m) = self.networks.get_mut(network) else {
            return Ok(());
        };
        match result {
            Ok(ttl) => {
                let margin = m.renew.granted(ttl);
                self.stats
                    .health
                    .contact_margin_secs
                    .store(margin.as_secs() as i64, Ordering::Relaxed);
            }
            Err(e) => {
                let moved = e.downcast_ref::<tonic::Status>().is_some_and(no_answer);
                let wait = m.renew.failed(moved, self.creds.replicas());
                warn!(network = %network, node = %self.node, error = %format!("{e:#}"), retry_in = ?wait, "lease acquire/renew failed; keeping the data plane as it is");
            }
        }
        Ok(())
    }

    /// Whether the watch may open: a lease is held, and every network's first
    /// Acquire was answered, so that the stream starts with all of them.
    fn watch_ready(&self) -> bool {
        self.networks.values().any(|m| m.watched)
            && self.networks.values().all(|m| m.answered || m.leaving)
    }

    /// Points the watch at the networks that hold (or held) a lease.
    fn follow(&self, watch: &mut WatchSession<Streaming<WatchResponse>, Api>) {
        let mut watched = self
            .networks
            .iter()
            .filter(|(_, m)| m.watched)
            .map(|(n, _)| n)
            .peekable();
        if watched.peek().is_some() {
            watch.watch_networks(networks::watch_list(watched));
        }
    }

    /// The periodic checks: devices deleted behind our back, the masquerade rules, and
    /// networks whose leases ended after they were no longer offered.
    async fn on_tick(&mut self) {
        let names: Vec<NetworkName> = self.networks.keys().cloned().collect();
        for network in &names {
            let Some(m) = self.networks.get(network) else {
                continue;
            };
            let lease = m.lease.clone();
            if self.kernel.check_devices(network, lease.as_ref()).await {
                if let Some(m) = self.networks.get_mut(network) {
                    m.renew.now();
                }
            }
            if self.args.ip_masq {
                if let Some(m) = self.networks.get(network) {
                    self.kernel
                        .masquerade(network, &m.conf, true, lease.as_ref())
                        .await;
                }
            }
        }
        self.leave_ended().await;
        let subnets = self
            .networks
            .iter()
            .filter_map(|(n, m)| {
                let parts = m.lease.as_ref()?.parts;
                Some((n.clone(), parts.map(|_, p| p.subnet)))
            })
            .collect();
        self.pods.check(&subnets, &self.stats);
        self.pods
            .report(&self.api, &self.node, &subnets, self.args.call_timeout);
    }

    /// What to ask the controller for in `network`: the subnets held, else the ones a
    /// previous run left in the network's env file.
    fn acquire_request(&self, network: &NetworkName) -> AcquireRequest {
        let m = self.networks.get(network);
        let requested = match m.and_then(|m| m.lease.as_ref()) {
            Some(l) => l.parts.map(|_, p| p.subnet),
            None => self.previous_subnets(network),
        };
        let e = self.kernel.endpoints(network);
        let text = |family: Family, get: fn(&(IpAddr, Option<Mac>)) -> String| {
            e.parts.get(family).map(get).unwrap_or_default()
        };
        let ip = |p: &(IpAddr, Option<Mac>)| p.0.to_string();
        let mac = |p: &(IpAddr, Option<Mac>)| p.1.map(|m| m.to_string()).unwrap_or_default();
        let requested = |family: Family| {
            requested
                .get(family)
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        AcquireRequest {
            node_name: self.node.clone(),
            requested_subnet: requested(Family::V4),
            public_ip: text(Family::V4, ip),
            backend_type: m
                .map(|m| m.conf.backend.kind.as_str().to_string())
                .unwrap_or_default(),
            vtep_mac: text(Family::V4, mac),
            requested_ipv6_subnet: requested(Family::V6),
            public_ipv6: text(Family::V6, ip),
            vtep_mac_v6: text(Family::V6, mac),
            public_ip_prefix_len: e.public_ip_prefix_len,
            network: network.wire().into(),
        }
    }

    /// Applies a granted or renewed lease of `network` locally (env files, device
    /// addresses, masquerade); returns the TTL.
    async fn on_lease(&mut self, network: &NetworkName, resp: AcquireResponse) -> Result<Duration> {
        let wire = resp.lease.context("controller answered without a lease")?;
        let lease = Lease::try_from(&wire).context("the controller's lease")?;
        if lease.network != *network {
            bail!(
                "the controller granted a lease in network {} when asked for one in {network}",
                lease.network
            );
        }
        for (family, _) in self.kernel.families(network).iter() {
            if !lease.parts.has(family) {
                bail!("the controller granted no {family} subnet on an {family} network");
            }
        }
        let Some(m) = self.networks.get(network) else {
            bail!("network {network} was left meanwhile");
        };
        let subnets = lease.parts.map(|_, p| p.subnet);
        let changed = m
            .lease
            .as_ref()
            .is_none_or(|l| l.parts.map(|_, p| p.subnet) != subnets);
        if changed {
            if let Some(old) = m.lease.as_ref().map(twill_proto::Lease::from) {
                warn!(network = %network, node = %self.node, old = %old.subnet, subnet = %wire.subnet, old_ipv6 = %old.ipv6_subnet, ipv6_subnet = %wire.ipv6_subnet, "the controller gave this node a different subnet");
            }
            let env = SubnetEnv {
                network: m.conf.network4(),
                subnet: subnets.v4.and_then(Ipv4Net::from_net),
                ipv6_network: m.conf.network6(),
                ipv6_subnet: subnets.v6.and_then(Ipv6Net::from_net),
                mtu: Some(m.mtu),
                ipmasq: Some(self.args.ip_masq),
            };
            let (file, network_file) = (self.env_file(network), self.network_file(network));
            if network.is_default() {
                env.write(&file)?;
            }
            env.write(&network_file)?;
            self.kernel.address(network, &lease).await?;
            self.kernel
                .masquerade(network, &m.conf, self.args.ip_masq, Some(&lease))
                .await;
            info!(network = %network, node = %self.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, revision = wire.revision, file = %file.display(), network_file = %network_file.display(), "lease held; env file written");
        }
        self.stats
            .health
            .lease_expiry
            .set(network, lease.expires_at_unix);
        self.kernel.set_own(network, Some(&lease));
        if let Some(m) = self.networks.get_mut(network) {
            m.lease = Some(lease);
            m.watched = true;
        }
        Ok(Duration::from_secs(resp.ttl_seconds.max(3)))
    }

    /// `network`'s env file under --subnet-dir.
    fn network_file(&self, network: &NetworkName) -> PathBuf {
        subnet_env::network_file(&self.args.subnet_dir, network)
    }

    /// The env file twill-cni reads for `network`: --subnet-file for `default`.
    fn env_file(&self, network: &NetworkName) -> PathBuf {
        if network.is_default() {
            self.args.subnet_file.clone()
        } else {
            self.network_file(network)
        }
    }

    /// The subnets of the env file a previous run left for `network`, when they belong
    /// to the network (ones left by another network, e.g. a rebuilt cluster, are no
    /// claim here).
    fn previous_subnets(&self, network: &NetworkName) -> PerFamily<IpNet> {
        let Some(m) = self.networks.get(network) else {
            return PerFamily::default();
        };
        let previous = match SubnetEnv::read(&self.env_file(network)) {
            Ok(env) => env.unwrap_or_default(),
            Err(e) => {
                warn!(network = %network, error = %e, "ignoring an unreadable env file");
                SubnetEnv::default()
            }
        };
        PerFamily::new(
            previous_of(m.conf.ipv4.as_ref(), previous.subnet).map(IpNet::from),
            previous_of(m.conf.ipv6.as_ref(), previous.ipv6_subnet).map(IpNet::from),
        )
    }

    /// Folds a complete watch message, from a stream carrying `covered`, into each
    /// network's peer set. A network whose own lease disappeared (revoked or expired)
    /// acquires again at once, unless it is being left: then it is left now.
    async fn apply(&mut self, resp: &WatchResponse, covered: &BTreeSet<NetworkName>) {
        if resp.reset {
            self.stats.watch_resets.inc();
        }
        let mut ended = Vec::new();
        for (network, applied) in self.kernel.apply(resp, covered) {
            let Some(m) = self.networks.get_mut(&network) else {
                continue;
            };
            if !applied.lost_own {
                continue;
            }
            m.lease = None;
            if m.leaving {
                ended.push(network);
                continue;
            }
            warn!(network = %network, node = %self.node, "our lease is gone from the controller (revoked or expired); acquiring again");
            m.renew.now();
            self.stats.health.lease_expiry.set(&network, 0);
        }
        for network in &ended {
            self.leave(network).await;
        }
    }
}

async fn next_message(
    watch: Option<&mut Streaming<WatchResponse>>,
) -> Result<Option<WatchResponse>, Status> {
    match watch {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}
