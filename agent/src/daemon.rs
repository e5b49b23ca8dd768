//! The agent's main loop: configuration, device, lease, then watch + reconcile +
//! renew until SIGTERM. Kernel state is never torn down here: while the controller is
//! away the data plane keeps forwarding with what it has.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::time::{sleep_until, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::{error, info, warn};
use twill_agent::client::{self, Backoff, TlsFiles};
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::{masq, DataPlane, KernelState, VxlanSpec};
use twill_agent::iface::{self, Selection};
use twill_agent::reconcile::{self, Topology};
use twill_common::lease::{parse_subnet, Peer};
use twill_common::{NetConf, SubnetEnv};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{
    lease_event::Type as EventType, AcquireRequest, Lease, ReleaseRequest, WatchRequest,
    WatchResponse,
};

use crate::http::{self, Stats};
use crate::Args;

/// Longest wait between retries of a controller call.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

type Api = AgentServiceClient<Channel>;

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

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
    twill_common::lease::validate_node_name(&node).context("--node-name")?;
    let mut selection = Selection {
        ifaces: args.iface.clone(),
        iface_regex: args
            .iface_regex
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .context("--iface-regex")?,
        public_ip: args.public_ip,
        can_reach: None,
    };
    let channel = client::channel(
        &args.controller,
        &TlsFiles {
            cert: &args.tls_cert,
            key: &args.tls_key,
            ca: &args.tls_ca,
        },
    )?;
    let mut api = AgentServiceClient::new(channel);
    let stats = Arc::new(Stats::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))?;
    tokio::spawn(http::serve(listener, stats.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("interrupt received"),
        }
    };
    tokio::pin!(shutdown);

    let conf = tokio::select! {
        c = fetch_config(&mut api) => c?,
        () = &mut shutdown => return Ok(()),
    };
    stats.last_contact.set(now_unix());
    let dp = Netlink::new()?;
    if let Some(addr) = args.iface_can_reach {
        selection.can_reach = Some((addr, dp.route_interface(addr).await?));
    }
    let interfaces = dp.interfaces().await?;
    let default = dp.default_route_interface().await.ok();
    let (underlay, public_ip) = iface::select(&selection, &interfaces, default.as_ref())?;
    let mtu = conf.backend.mtu.unwrap_or(underlay.mtu.saturating_sub(50));
    let spec = VxlanSpec {
        name: conf.backend.device_name(),
        vni: conf.backend.vni,
        local: underlay.addr.addr(),
        port: conf.backend.port,
        underlay_index: underlay.index,
        mtu,
        learning: conf.backend.learning,
        gbp: conf.backend.gbp,
    };
    let device = dp.ensure_device(&spec).await?;
    info!(node = %node, device = %spec.name, vtep_mac = %device.mac, iface = %underlay.name, public_ip = %public_ip, mtu, "VXLAN device ready");

    let mut agent = Agent {
        node,
        args,
        conf,
        dp,
        api,
        stats,
        spec,
        topo: Topology {
            device,
            underlay,
            direct_routing: false,
        },
        public_ip,
        lease: None,
        peers: BTreeMap::new(),
        revision: 0,
        heard: false,
        applied: None,
    };
    agent.topo.direct_routing = agent.conf.backend.direct_routing;
    agent.main_loop(&mut shutdown).await
}

async fn fetch_config(api: &mut Api) -> Result<NetConf> {
    let mut backoff = Backoff::new(BACKOFF_CAP);
    loop {
        match api
            .get_network_config(twill_proto::GetNetworkConfigRequest {})
            .await
        {
            Ok(r) => {
                return NetConf::parse(&r.into_inner().net_conf_json)
                    .context("the controller's net-conf.json");
            }
            Err(s) if is_fatal(&s) => bail!("controller refused us: {}: {}", s.code(), s.message()),
            Err(s) => {
                let wait = backoff.next_delay();
                warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot reach the controller");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct Agent {
    node: String,
    args: Args,
    conf: NetConf,
    dp: Netlink,
    api: Api,
    stats: Arc<Stats>,
    spec: VxlanSpec,
    topo: Topology,
    public_ip: std::net::Ipv4Addr,
    lease: Option<Lease>,
    peers: BTreeMap<String, Peer>,
    revision: u64,
    /// False until the first watch message: peers are not removed before the
    /// controller has said who they are (an agent restart must not flap routes).
    heard: bool,
    /// What the last fully successful run left in the kernel; `None` forces a read.
    applied: Option<KernelState>,
}

impl Agent {
    async fn main_loop(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<()> {
        let mut renew_at = Instant::now();
        let mut renew_backoff = Backoff::new(BACKOFF_CAP);
        let mut watch: Option<Streaming<WatchResponse>> = None;
        let mut watch_at = Instant::now();
        let mut watch_backoff = Backoff::new(BACKOFF_CAP);
        let mut tick = tokio::time::interval(self.args.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                () = &mut *shutdown => break,
                () = sleep_until(renew_at) => {
                    match self.acquire().await {
                        Ok(ttl) => {
                            renew_backoff.reset();
                            // Renew once less than the margin (default a third of the TTL) remains.
                            let margin = self.args.renew_margin.unwrap_or(ttl / 3).min(ttl);
                            renew_at = Instant::now() + (ttl - margin).max(Duration::from_secs(1));
                        }
                        Err(e) => {
                            if let Some(s) = e.downcast_ref::<Status>().filter(|s| is_fatal(s)) {
                                bail!("the controller refused our lease: {}: {}", s.code(), s.message());
                            }
                            let wait = renew_backoff.next_delay();
                            warn!(node = %self.node, error = %format!("{e:#}"), retry_in = ?wait, "lease acquire/renew failed; keeping the data plane as it is");
                            renew_at = Instant::now() + wait;
                        }
                    }
                }
                () = sleep_until(watch_at), if watch.is_none() && self.lease.is_some() => {
                    match self.api.watch(WatchRequest { from_revision: self.revision }).await {
                        Ok(r) => {
                            info!(from_revision = self.revision, "watching leases");
                            watch = Some(r.into_inner());
                        }
                        Err(s) => {
                            let wait = watch_backoff.next_delay();
                            warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "cannot open the lease watch");
                            watch_at = Instant::now() + wait;
                        }
                    }
                }
                msg = next_message(&mut watch) => {
                    match msg {
                        Ok(Some(resp)) => {
                            watch_backoff.reset();
                            self.stats.last_contact.set(now_unix());
                            if self.apply(resp) {
                                renew_at = Instant::now();
                            }
                            self.reconcile(false).await;
                        }
                        Ok(None) | Err(_) => {
                            let wait = watch_backoff.next_delay();
                            match msg {
                                Err(s) => warn!(code = %s.code(), error = %s.message(), retry_in = ?wait, "lease watch broke; keeping routes, resuming"),
                                _ => warn!(retry_in = ?wait, "controller closed the lease watch; keeping routes, resuming"),
                            }
                            watch = None;
                            watch_at = Instant::now() + wait;
                        }
                    }
                }
                _ = tick.tick() => {
                    self.check_device(&mut renew_at).await;
                    if self.args.ip_masq {
                        self.ensure_masquerade().await;
                    }
                    if self.heard {
                        self.reconcile(true).await;
                    }
                }
            }
        }
        if self.args.release_on_exit {
            let req = ReleaseRequest {
                node_name: self.node.clone(),
            };
            match tokio::time::timeout(Duration::from_secs(5), self.api.release(req)).await {
                Ok(Ok(_)) => info!(node = %self.node, "lease released (--release-on-exit)"),
                Ok(Err(s)) => {
                    error!(code = %s.code(), error = %s.message(), "could not release the lease")
                }
                Err(_) => {
                    error!("could not release the lease: the controller did not answer in 5s")
                }
            }
        }
        if self.args.teardown_on_exit {
            self.teardown().await;
        } else {
            info!("exiting; kernel state left in place");
        }
        Ok(())
    }

    /// Acquires or renews the lease and applies its subnet locally; returns the TTL.
    async fn acquire(&mut self) -> Result<Duration> {
        let requested = match self.lease.as_ref() {
            Some(l) => parse_subnet(&l.subnet).ok(),
            None => self.previous_subnet(),
        };
        let resp = self
            .api
            .acquire(AcquireRequest {
                node_name: self.node.clone(),
                requested_subnet: requested.map(|s| s.to_string()).unwrap_or_default(),
                public_ip: self.public_ip.to_string(),
                backend_type: "vxlan".into(),
                vtep_mac: self.topo.device.mac.to_string(),
            })
            .await?
            .into_inner();
        self.stats.last_contact.set(now_unix());
        let lease = resp.lease.context("controller answered without a lease")?;
        let subnet = parse_subnet(&lease.subnet)?;
        let changed = self.lease.as_ref().map(|l| l.subnet.as_str()) != Some(lease.subnet.as_str());
        if changed {
            if let Some(old) = self.lease.as_ref() {
                warn!(node = %self.node, old = %old.subnet, subnet = %subnet, "the controller gave this node a different subnet");
            }
            let env = SubnetEnv {
                network: Some(self.conf.network),
                subnet: Some(subnet),
                mtu: Some(self.spec.mtu),
                ipmasq: Some(self.args.ip_masq),
                ..Default::default()
            };
            env.write(&self.args.subnet_file)?;
            self.dp
                .ensure_address(&self.topo.device, subnet.network())
                .await?;
            self.lease = Some(lease.clone());
            self.ensure_masquerade().await;
            info!(node = %self.node, subnet = %subnet, revision = lease.revision, file = %self.args.subnet_file.display(), "lease held; subnet.env written");
        }
        self.stats.lease_expiry.set(lease.expires_at_unix);
        self.stats.healthy.store(true, Ordering::Relaxed);
        self.lease = Some(lease);
        Ok(Duration::from_secs(resp.ttl_seconds.max(3)))
    }

    /// The subnet of the subnet.env a previous run left, when it belongs to this network
    /// (one left by another network, e.g. a rebuilt cluster, is no claim here).
    fn previous_subnet(&self) -> Option<ipnet::Ipv4Net> {
        let previous = match SubnetEnv::read(&self.args.subnet_file) {
            Ok(env) => env.and_then(|e| e.subnet),
            Err(e) => {
                warn!(error = %e, "ignoring unreadable subnet.env");
                None
            }
        };
        previous.filter(|s| {
            let fits = self.conf.network.contains(s) && s.prefix_len() == self.conf.subnet_len;
            if !fits {
                info!(subnet = %s, network = %self.conf.network, "not asking for the subnet in subnet.env: it is not a subnet of this network");
            }
            fits
        })
    }

    /// Folds a watch message into the peer set. Returns true when our own lease
    /// disappeared (revoked or expired) and must be acquired again now.
    fn apply(&mut self, resp: WatchResponse) -> bool {
        let mut lost_own = false;
        if resp.reset {
            self.peers.clear();
            lost_own = !resp
                .events
                .iter()
                .any(|e| e.lease.as_ref().is_some_and(|l| l.node_name == self.node));
        }
        for ev in &resp.events {
            let Some(lease) = &ev.lease else { continue };
            if lease.node_name == self.node {
                if ev.r#type == EventType::Delete as i32 {
                    lost_own = true;
                }
                continue;
            }
            if ev.r#type == EventType::Delete as i32 {
                if self.peers.remove(&lease.node_name).is_some() {
                    info!(peer = %lease.node_name, subnet = %lease.subnet, revision = ev.revision, "peer left");
                }
                continue;
            }
            match Peer::try_from(lease) {
                Ok(p) => {
                    if self.peers.insert(lease.node_name.clone(), p) != Some(p) {
                        info!(peer = %lease.node_name, subnet = %p.subnet, public_ip = %p.public_ip, revision = ev.revision, "peer up");
                    }
                }
                Err(e) => warn!(peer = %lease.node_name, error = %e, "ignoring malformed lease"),
            }
        }
        self.revision = resp.revision;
        self.heard = true;
        if lost_own {
            warn!(node = %self.node, "our lease is gone from the controller (revoked or expired); acquiring again");
            self.lease = None;
        }
        lost_own
    }

    /// Removes everything this agent put in the kernel; reports every failure and
    /// keeps going.
    async fn teardown(&self) {
        // Routes through the underlay (DirectRouting) outlive the device: remove ours first.
        let want = reconcile::desired(&BTreeMap::new(), &self.topo);
        match reconcile::reconcile(&self.dp, &self.topo.device, &want).await {
            Ok(r) => r.errors.iter().for_each(|e| warn!(error = %e, "teardown")),
            Err(e) => warn!(error = %e, "teardown: cannot read kernel state"),
        }
        if let Err(e) = self.dp.delete_device(&self.spec.name).await {
            warn!(error = %e, "teardown");
        }
        if let Err(e) = masq::remove().await {
            warn!(error = %e, "teardown");
        }
        info!(device = %self.spec.name, "exiting; kernel state removed (--teardown-on-exit)");
    }

    /// Makes the masquerade table what `--ip-masq` says: present with the current
    /// subnet's rules (re-applied on every tick, like flannel's re-check), or absent
    /// (removed once, when the lease is first applied).
    async fn ensure_masquerade(&self) {
        let result = match (
            self.args.ip_masq,
            self.lease
                .as_ref()
                .and_then(|l| parse_subnet(&l.subnet).ok()),
        ) {
            (true, Some(subnet)) => masq::apply(self.conf.network, subnet).await,
            (true, None) => return,
            (false, _) => masq::remove().await,
        };
        if let Err(e) = result {
            self.stats.netlink_errors.inc();
            warn!(error = %e, "cannot program IP masquerade");
        }
    }

    /// Brings the kernel to what the peers call for. After a watch batch the diff is
    /// taken against what was last applied; `full` (the periodic run) reads the kernel
    /// to repair what was changed behind our back.
    async fn reconcile(&mut self, full: bool) {
        let want = reconcile::desired(&self.peers, &self.topo);
        let result = match self.applied.take().filter(|_| !full) {
            Some(have) => {
                Ok(reconcile::apply_diff(&self.dp, &self.topo.device, &have, &want).await)
            }
            None => reconcile::reconcile(&self.dp, &self.topo.device, &want).await,
        };
        match result {
            Ok(report) => {
                if report.errors.is_empty() {
                    self.applied = Some(want);
                }
                let runs = self.stats.reconciles.inc();
                if runs > 0 {
                    self.stats
                        .changes
                        .inc_by((report.added + report.removed) as u64);
                }
                self.stats.peers.set(self.peers.len() as i64);
                self.stats.netlink_errors.inc_by(report.errors.len() as u64);
                if report.added + report.removed > 0 {
                    info!(
                        peers = self.peers.len(),
                        added = report.added,
                        removed = report.removed,
                        revision = self.revision,
                        "kernel state reconciled"
                    );
                }
                for e in &report.errors {
                    warn!(error = %e, "kernel operation failed; will retry");
                }
            }
            Err(e) => {
                self.stats.netlink_errors.inc();
                warn!(error = %e, "cannot read kernel state; will retry");
            }
        }
    }

    /// Recreates the device if it was deleted; a new MAC must reach the peers, so the
    /// lease is renewed at once in that case.
    async fn check_device(&mut self, renew_at: &mut Instant) {
        match self.dp.ensure_device(&self.spec).await {
            Ok(dev) if dev != self.topo.device => {
                warn!(device = %self.spec.name, vtep_mac = %dev.mac, "VXLAN device was recreated");
                let mac_changed = dev.mac != self.topo.device.mac;
                self.topo.device = dev;
                self.applied = None;
                if let Some(subnet) = self
                    .lease
                    .as_ref()
                    .and_then(|l| parse_subnet(&l.subnet).ok())
                {
                    if let Err(e) = self.dp.ensure_address(&dev, subnet.network()).await {
                        warn!(error = %e, "cannot address the VXLAN device");
                    }
                }
                if mac_changed {
                    *renew_at = Instant::now();
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.stats.netlink_errors.inc();
                warn!(error = %e, "cannot check the VXLAN device");
            }
        }
    }
}

async fn next_message(
    watch: &mut Option<Streaming<WatchResponse>>,
) -> Result<Option<WatchResponse>, Status> {
    match watch {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}
