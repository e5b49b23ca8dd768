//! The agent's main loop: configuration, device, lease, then watch + reconcile +
//! renew until SIGTERM. Kernel state is never torn down here: while the controller is
//! away the data plane keeps forwarding with what it has.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::{error, info, warn};
use twill_agent::client::{self, no_answer, Backoff, TlsFiles};
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::Underlay;
use twill_agent::identity::rotation::{self, Credentials, RotateError};
use twill_agent::identity::{self, CertCheck, CertInfo};
use twill_agent::iface::{self, Selection};
use twill_agent::peers::PeerTable;
use twill_agent::plane::{vxlan_overhead, Plane};
use twill_agent::schedule::{later, LeaseKeeping, Retry};
use twill_agent::watch::{Opened, WatchSession};
use twill_common::model::{Family, Lease, Mac, PerFamily};
use twill_common::netconf::{BackendType, Pool, PoolNet};
use twill_common::{now_unix, subnet_env, NetConf, SubnetEnv};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, ReleaseRequest, WatchResponse};

use crate::http::{self, Stats};

mod kernel;
#[cfg(test)]
mod tests;

use crate::Args;
use kernel::Kernel;

/// Longest wait between retries of a controller call.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

type Api = AgentServiceClient<Channel>;

/// Errors that retrying cannot fix: the operator must change something.
fn is_fatal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated
    )
}

pub async fn run(args: Args) -> Result<()> {
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name; pass --node-name")?
            .trim()
            .to_string(),
    };
    twill_common::model::validate_node_name(&node).context("--node-name")?;
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
    if let Some(token_file) = &args.bootstrap_token_file {
        let cfg = identity::Bootstrap {
            controller: &args.controller,
            node: &node,
            cert: &args.tls_cert,
            key: &args.tls_key,
            ca: &args.tls_ca,
            token_file,
            call_timeout: args.call_timeout,
            backoff_cap: BACKOFF_CAP,
        };
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
    let (mut creds, mut channel) = Credentials::load(
        &args.controller,
        &node,
        &TlsFiles {
            cert: &args.tls_cert,
            key: &args.tls_key,
            ca: &args.tls_ca,
        },
    )?;
    stats
        .cert_expiry
        .set(creds.info.as_ref().map_or(0, |i| i.not_after));
    let conf = tokio::select! {
        c = fetch_config(&mut creds, &mut channel, args.call_timeout) => c?,
        () = &mut shutdown => return Ok(()),
    };
    let api = client::agent_client(channel.clone());
    stats.contact(now_unix());
    let dp = Netlink::new()?;
    if let Some(addr) = args.iface_can_reach {
        selection.can_reach = Some((addr, dp.route_interface(addr).await?));
    }
    let interfaces = dp.interfaces().await?;
    let mut underlays: PerFamily<(Underlay, IpAddr)> = PerFamily::default();
    for (family, _) in conf.networks().iter() {
        // Each family has its own default route and its own selection flags.
        let picked = match family {
            Family::V4 => {
                let default = dp.default_route_interface().await.ok();
                iface::select(&selection, &interfaces, default.as_ref())
                    .map(|(u, ip)| (u, IpAddr::from(ip)))?
            }
            Family::V6 => {
                let default = dp.default_route_interface_v6().await.ok();
                iface::select6(&selection, &interfaces, default.as_ref())
                    .map(|(u, ip)| (u, IpAddr::from(ip)))?
            }
        };
        *underlays.slot(family) = Some(picked);
    }
    let mtu = pod_mtu(&conf, &underlays);
    let mut planes = PerFamily::default();
    for (family, (u, ip)) in underlays.iter() {
        *planes.slot(family) = Some(Plane::start(&dp, &conf.backend, u.clone(), *ip, mtu).await?);
    }
    for plane in planes.values() {
        match plane.mac() {
            Some(mac) => {
                info!(node = %node, device = %plane.name(), vtep_mac = %mac, iface = %plane.topo.underlay.name, public_ip = %plane.public_ip, mtu, "VXLAN device ready")
            }
            None => {
                info!(node = %node, iface = %plane.topo.underlay.name, public_ip = %plane.public_ip, mtu, "host-gw backend: peers are routed via their public addresses")
            }
        }
    }

    let peers = PeerTable::new(&node, conf.networks());
    let kernel = Kernel::new(Box::new(dp), planes, peers, stats.clone());
    let mut agent = Agent {
        node,
        args,
        conf,
        api,
        channel,
        creds,
        stats,
        mtu,
        kernel,
        lease: None,
    };
    agent.main_loop(&mut shutdown).await
}

/// The pod MTU (`FLANNEL_MTU`), one for both families so that a pod's packets fit
/// either tunnel: `Backend.MTU` when set; else the public interface's MTU less the
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

/// The subnet of one family a previous run left in subnet.env, when it belongs to
/// this network (one left by another network, e.g. a rebuilt cluster, is no claim
/// here).
fn previous_of<N: PoolNet>(pool: Option<&Pool<N>>, previous: Option<N>) -> Option<N> {
    let (pool, s) = (pool?, previous?);
    if !pool.fits(s) {
        info!(subnet = %s, network = %pool.network, "not asking for the subnet in subnet.env: it is not a subnet of this network");
        return None;
    }
    Some(s)
}

/// The network configuration, from whichever controller answers first; `channel` is
/// left on that one.
async fn fetch_config(
    creds: &mut Credentials,
    channel: &mut Channel,
    deadline: Duration,
) -> Result<NetConf> {
    let mut backoff = Backoff::new(BACKOFF_CAP);
    loop {
        let req = client::request(twill_proto::GetNetworkConfigRequest {}, deadline);
        let mut api = client::agent_client(channel.clone());
        match client::within(deadline, api.get_network_config(req)).await {
            Ok(r) => {
                return NetConf::parse(&r.into_inner().net_conf_json)
                    .context("the controller's net-conf.json");
            }
            Err(s) if is_fatal(&s) => bail!("controller refused us: {}: {}", s.code(), s.message()),
            Err(s) => {
                let wait = backoff.next_delay();
                warn!(controller = %creds.url(), code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot reach the controller");
                if let Some(next) = creds.fail_over() {
                    *channel = next;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct Agent {
    node: String,
    args: Args,
    conf: NetConf,
    /// The controller API for new calls, over `channel`, which presents the
    /// certificate `creds` last loaded.
    api: Api,
    channel: Channel,
    creds: Credentials,
    stats: Arc<Stats>,
    /// The pod MTU written to subnet.env.
    mtu: u32,
    /// The planes, the peer set and everything else this agent does to the kernel.
    kernel: Kernel,
    lease: Option<Lease>,
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

/// The result of the call in flight; never resolves when there is none.
async fn finished<T, E: TaskError>(call: &mut Call<T, E>) -> Result<T, E> {
    let Some(handle) = call.as_mut() else {
        return std::future::pending().await;
    };
    let result = handle.await.unwrap_or_else(|e| Err(E::lost(e)));
    *call = None;
    result
}

impl Agent {
    async fn main_loop(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<()> {
        let deadline = self.args.call_timeout;
        let mut renew = LeaseKeeping::new(BACKOFF_CAP, self.args.renew_margin);
        let mut acquiring: Call<twill_proto::AcquireResponse> = None;
        let mut watch: WatchSession<Streaming<WatchResponse>, Api> = WatchSession::new(BACKOFF_CAP);
        let mut opening: Call<(Streaming<WatchResponse>, Api)> = None;
        let mut rotate = Retry::at(self.next_rotation(), BACKOFF_CAP);
        let mut rotating: Call<CertInfo, RotateError> = None;
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
            tokio::select! {
                () = &mut *shutdown => break,
                () = sleep_until(renew.due()), if acquiring.is_none() => {
                    let req = self.acquire_request();
                    let mut api = self.api.clone();
                    acquiring = Some(tokio::spawn(async move {
                        client::within(deadline, api.acquire(client::request(req, deadline)))
                            .await
                            .map(tonic::Response::into_inner)
                    }));
                }
                r = finished(&mut acquiring) => {
                    let result = match r {
                        Ok(resp) => {
                            self.stats.contact(now_unix());
                            self.on_lease(resp).await
                        }
                        Err(s) => {
                            if no_answer(&s) {
                                self.stats.no_contact(now_unix());
                                self.fail_over();
                            }
                            if is_fatal(&s) {
                                bail!("the controller refused our lease: {}: {}", s.code(), s.message());
                            }
                            Err(anyhow::Error::new(s))
                        }
                    };
                    match result {
                        Ok(ttl) => {
                            let margin = renew.granted(ttl);
                            self.stats.health.contact_margin_secs.store(margin.as_secs() as i64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let moved = e.downcast_ref::<tonic::Status>().is_some_and(no_answer);
                            let wait = renew.failed(moved, self.creds.replicas());
                            warn!(node = %self.node, error = %format!("{e:#}"), retry_in = ?wait, "lease acquire/renew failed; keeping the data plane as it is");
                        }
                    }
                }
                () = sleep_until(watch.due()), if watch.wants_open() && opening.is_none() && self.lease.is_some() => {
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
                            match watch.opened(stream, api) {
                                Opened::Moved => info!(from_revision = watch.revision(), "lease watch moved to a connection with the current certificate"),
                                Opened::First => info!(from_revision = watch.revision(), "watching leases"),
                            }
                        }
                        Err(s) => {
                            if no_answer(&s) {
                                self.stats.no_contact(now_unix());
                                self.fail_over();
                            }
                            let wait = watch.open_failed(no_answer(&s), self.creds.replicas());
                            warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot open the lease watch");
                        }
                    }
                }
                msg = next_message(watch.stream()) => {
                    match msg {
                        Ok(Some(resp)) => {
                            self.stats.contact(now_unix());
                            if let Some(whole) = watch.message(resp) {
                                if self.apply(&whole) {
                                    renew.now();
                                }
                                self.kernel.reconcile(false, watch.revision()).await;
                            }
                        }
                        Ok(None) | Err(_) => {
                            self.stats.no_contact(now_unix());
                            let moved = msg.as_ref().err().is_none_or(no_answer);
                            if moved {
                                self.fail_over();
                            }
                            let wait = watch.broke(moved, self.creds.replicas());
                            match msg {
                                Err(s) => warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "lease watch broke; keeping routes, resuming"),
                                _ => warn!(retry_in = ?wait, "controller closed the lease watch; keeping routes, resuming"),
                            }
                        }
                    }
                }
                () = sleep_until(rotate.due()), if rotating.is_none() => {
                    rotating = Some(self.start_rotation());
                }
                r = finished(&mut rotating) => {
                    match r {
                        Ok(info) => {
                            self.stats.cert_rotations.inc();
                            info!(node = %self.node, serial = %info.serial, not_after = %info.not_after_rfc3339(), "node certificate rotated");
                            rotate.settled();
                            if self.reload_credentials() {
                                watch.move_to_current();
                                rotate.set(self.next_rotation());
                            } else {
                                // Still on the old certificate, which is due: do not
                                // ask for certificates in a tight loop.
                                rotate.failed(false, 0);
                            }
                        }
                        Err(e) => {
                            self.stats.cert_rotation_failures.inc();
                            let wait = rotate.failed(false, 0);
                            warn!(node = %self.node, error = %e, hint = e.hint(), retry_in = ?wait, "cannot rotate the node certificate; the current one stays in use");
                        }
                    }
                }
                _ = tick.tick() => {
                    if rotating.is_none() && self.reload_credentials() {
                        watch.move_to_current();
                        rotate.set(self.next_rotation());
                    }
                    if self.kernel.check_devices(self.lease.as_ref()).await {
                        renew.now();
                    }
                    if self.args.ip_masq {
                        self.kernel.masquerade(&self.conf, true, self.lease.as_ref()).await;
                    }
                    self.kernel.reconcile(true, watch.revision()).await;
                }
            }
        }
        drop(watch);
        for call in [
            acquiring.map(|h| h.abort_handle()),
            opening.map(|h| h.abort_handle()),
            rotating.map(|h| h.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            call.abort();
        }
        if self.args.release_on_exit {
            let req = ReleaseRequest {
                node_name: self.node.clone(),
            };
            match client::within(deadline, self.api.release(client::request(req, deadline))).await {
                Ok(_) => info!(node = %self.node, "lease released (--release-on-exit)"),
                Err(s) => {
                    error!(code = %s.code(), error = %s.message(), "could not release the lease")
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

    /// When to rotate the node certificate: at a jittered 70–90 % of its lifetime when
    /// the agent manages it (`--bootstrap-token-file`), else never (certificates
    /// brought by the operator are theirs to replace; the agent picks them up).
    fn next_rotation(&self) -> Instant {
        let never = later(Duration::MAX);
        if self.args.bootstrap_token_file.is_none() {
            return never;
        }
        let Some(info) = &self.creds.info else {
            return never;
        };
        let delay =
            rotation::rotation_delay(info, self.creds.received_at, now_unix(), rotation::jitter());
        info!(node = %self.node, serial = %info.serial, not_after = %info.not_after_rfc3339(), rotate_in = ?delay, "node certificate rotation scheduled");
        later(delay)
    }

    /// Gets a new node certificate: renewed with the current one while it is valid;
    /// once it is not (the controller was away past its expiry, or the files were
    /// damaged), only the bootstrap token can get one.
    fn start_rotation(&self) -> JoinHandle<Result<CertInfo, RotateError>> {
        let node = self.node.clone();
        let (cert, key) = (self.args.tls_cert.clone(), self.args.tls_key.clone());
        let deadline = self.args.call_timeout;
        if let CertCheck::Needed(why) = identity::check_certificate(&cert, &key, &node, now_unix())
        {
            warn!(node = %node, reason = %why, "the node certificate cannot be renewed; bootstrapping again with the token");
            let controller = self.args.controller.clone();
            let ca = self.args.tls_ca.clone();
            let token_file = self.args.bootstrap_token_file.clone().unwrap_or_default();
            return tokio::spawn(async move {
                let cfg = identity::Bootstrap {
                    controller: &controller,
                    node: &node,
                    cert: &cert,
                    key: &key,
                    ca: &ca,
                    token_file: &token_file,
                    call_timeout: deadline,
                    backoff_cap: BACKOFF_CAP,
                };
                match identity::bootstrap(&cfg).await? {
                    identity::Outcome::Issued(info) | identity::Outcome::Present(info) => Ok(info),
                }
            });
        }
        let channel = self.channel.clone();
        tokio::spawn(async move { rotation::renew(channel, &node, &cert, &key, deadline).await })
    }

    /// Moves new calls to another controller URL, if there is more than one: the one
    /// in use did not answer. An open watch stays where it is until it breaks.
    fn fail_over(&mut self) {
        let from = self.creds.url().to_string();
        if let Some(channel) = self.creds.fail_over() {
            info!(from = %from, to = %self.creds.url(), "moving to the next controller");
            self.api = client::agent_client(channel.clone());
            self.channel = channel;
        }
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
                self.api = client::agent_client(channel.clone());
                self.channel = channel;
                true
            }
            Ok(None) => false,
            Err(why) => {
                warn!(node = %self.node, reason = %why, "the TLS files changed but cannot be used; keeping the ones in use");
                false
            }
        }
    }

    /// What to ask the controller for: the subnets held, else the ones a previous run
    /// left in subnet.env.
    fn acquire_request(&self) -> AcquireRequest {
        let requested = match self.lease.as_ref() {
            Some(l) => l.parts.map(|_, p| p.subnet),
            None => self.previous_subnets(),
        };
        let e = self.kernel.endpoints();
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
            backend_type: self.conf.backend.kind.as_str().into(),
            vtep_mac: text(Family::V4, mac),
            requested_ipv6_subnet: requested(Family::V6),
            public_ipv6: text(Family::V6, ip),
            vtep_mac_v6: text(Family::V6, mac),
            public_ip_prefix_len: e.public_ip_prefix_len,
        }
    }

    /// Applies a granted or renewed lease locally (subnet.env, device addresses,
    /// masquerade); returns the TTL.
    async fn on_lease(&mut self, resp: twill_proto::AcquireResponse) -> Result<Duration> {
        let wire = resp.lease.context("controller answered without a lease")?;
        let lease = Lease::try_from(&wire).context("the controller's lease")?;
        for (family, _) in self.kernel.families().iter() {
            if !lease.parts.has(family) {
                bail!("the controller granted no {family} subnet on an {family} network");
            }
        }
        let subnets = lease.parts.map(|_, p| p.subnet);
        let changed = self
            .lease
            .as_ref()
            .is_none_or(|l| l.parts.map(|_, p| p.subnet) != subnets);
        if changed {
            if let Some(old) = self.lease.as_ref().map(twill_proto::Lease::from) {
                warn!(node = %self.node, old = %old.subnet, subnet = %wire.subnet, old_ipv6 = %old.ipv6_subnet, ipv6_subnet = %wire.ipv6_subnet, "the controller gave this node a different subnet");
            }
            let env = SubnetEnv {
                network: self.conf.network4(),
                subnet: subnets.v4.and_then(Ipv4Net::from_net),
                ipv6_network: self.conf.network6(),
                ipv6_subnet: subnets.v6.and_then(Ipv6Net::from_net),
                mtu: Some(self.mtu),
                ipmasq: Some(self.args.ip_masq),
            };
            let network_file = self.network_file();
            env.write(&self.args.subnet_file)?;
            env.write(&network_file)?;
            self.kernel.address(&lease).await?;
            self.kernel
                .masquerade(&self.conf, self.args.ip_masq, Some(&lease))
                .await;
            info!(node = %self.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, revision = wire.revision, file = %self.args.subnet_file.display(), network_file = %network_file.display(), "lease held; subnet.env written");
        }
        self.stats.health.lease_expiry.set(lease.expires_at_unix);
        self.kernel.set_own(Some(&lease));
        self.lease = Some(lease);
        Ok(Duration::from_secs(resp.ttl_seconds.max(3)))
    }

    /// The `default` network's env file under --subnet-dir.
    fn network_file(&self) -> PathBuf {
        subnet_env::network_file(&self.args.subnet_dir, subnet_env::DEFAULT_NETWORK)
    }

    /// The subnets of the subnet.env a previous run left, when they belong to this
    /// network (ones left by another network, e.g. a rebuilt cluster, are no claim
    /// here).
    fn previous_subnets(&self) -> PerFamily<IpNet> {
        let previous = match SubnetEnv::read(&self.args.subnet_file) {
            Ok(env) => env.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "ignoring unreadable subnet.env");
                SubnetEnv::default()
            }
        };
        PerFamily::new(
            previous_of(self.conf.ipv4.as_ref(), previous.subnet).map(IpNet::from),
            previous_of(self.conf.ipv6.as_ref(), previous.ipv6_subnet).map(IpNet::from),
        )
    }

    /// Folds a complete watch message into the peer set. Returns true when our own
    /// lease disappeared (revoked or expired) and must be acquired again now.
    fn apply(&mut self, resp: &WatchResponse) -> bool {
        if resp.reset {
            self.stats.watch_resets.inc();
        }
        let applied = self.kernel.apply(resp);
        if applied.lost_own {
            warn!(node = %self.node, "our lease is gone from the controller (revoked or expired); acquiring again");
            self.lease = None;
            self.stats.health.lease_expiry.set(0);
        }
        applied.lost_own
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
