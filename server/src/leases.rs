//! Lease allocation and the single lease writer.
//!
//! Every change to the lease table goes through one task (`Writer`, on a thread of its
//! own): it takes a batch of queued requests, decides each one against the allocator,
//! writes the batch to the store, flushes once (group commit: a join storm costs one
//! fsync per batch, not per node), then commits the events to the `Hub` (in a burst
//! with thousands of watchers, the batches of a few milliseconds together) and
//! answers. A reply therefore always means "durably stored, and visible to watchers".
//!
//! The writer keeps the table's invariants: no two leases share a subnet or a VTEP MAC;
//! a subnet's bit in the allocator is set exactly when a lease holds it or a
//! reservation that can be honoured keeps it; a revision is never issued twice. When
//! the store fails, the writer reloads what the store holds instead of guessing.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use twill_common::lease::{
    check_public_ip, check_public_ipv6, parse_subnet, parse_subnet6, validate_node_name, Mac,
};
use twill_common::netconf::{BackendType, Ipv6Pool, PoolNet};
use twill_common::NetConf;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use crate::events::Hub;
use crate::metrics::{now_unix, Metrics};
use crate::store::{Batch, Reservation, Store, StoreError};
use crate::subnets::Subnets;

/// Requests queued beyond this wait for room (backpressure instead of unbounded memory).
const QUEUE_LEN: usize = 4096;
/// Requests decided and flushed together at most.
const MAX_BATCH: usize = 1024;
/// Durable batches are published to the watchers at most once per this much time per
/// open watch stream, up to `MAX_PUBLISH_INTERVAL` (reached at 100 watchers). A
/// publication wakes every watch stream, which costs the same for one event as for
/// hundreds: with 5,000 watchers a join storm's hundreds of small batches a second took
/// all the CPU, so the batches of one interval go out together. With a handful of
/// watchers the interval is next to nothing, so a lone client issuing one request after
/// another is not held back (a flat 20 ms capped it at 47 leases/s); a change after a
/// quiet spell goes out at once.
const PUBLISH_INTERVAL_PER_WATCHER: Duration = Duration::from_micros(200);
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// Longest lease TTL accepted: far beyond any use (flannel's is 24 h), short enough
/// that expiry times never overflow.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why a lease operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseOpError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// A field names something another node holds (a VTEP MAC).
    #[error("{0}")]
    AlreadyExists(String),
    /// No free subnet is left.
    #[error("{0}")]
    Exhausted(String),
    /// The request conflicts with the current table (e.g. a reservation of a leased subnet).
    #[error("{0}")]
    Conflict(String),
    /// The store failed while writing the batch this request was in: the change may or
    /// may not be stored, and the table now shows what the store holds.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The controller is shutting down, or its lease writer stopped.
    #[error("the controller is shutting down or its lease writer stopped")]
    Stopped,
    /// This replica has no lease writer: it is not the elected leader (etcd store), or
    /// was elected and is still loading the table.
    #[error("this controller replica is not the leader right now (an election is under way or etcd is unreachable); retry in a few seconds")]
    NotLeader,
}

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct AcquireParams {
    /// The node (from its certificate).
    pub node: String,
    /// The IPv4 side, present exactly when the network has IPv4.
    pub v4: Option<FamilyRequest<Ipv4Net, Ipv4Addr>>,
    /// The IPv6 side, present exactly when the network has IPv6.
    pub v6: Option<FamilyRequest<Ipv6Net, Ipv6Addr>>,
    /// Prefix length of the node's underlay subnet (0: not known).
    pub public_prefix_len: u8,
}

/// One family's side of an acquisition.
#[derive(Debug, Clone)]
pub struct FamilyRequest<N, A> {
    /// Subnet from the node's previous subnet.env, if any.
    pub requested: Option<N>,
    /// The node's public address of this family.
    pub public_ip: A,
    /// The MAC of the node's VXLAN device of this family; `None` with host-gw.
    pub vtep_mac: Option<Mac>,
}

/// The raw fields of an acquisition request, as the wire carries them.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcquireFields<'a> {
    /// `requested_subnet`.
    pub requested: &'a str,
    /// `public_ip`.
    pub public_ip: &'a str,
    /// `backend_type`.
    pub backend: &'a str,
    /// `vtep_mac`.
    pub vtep_mac: &'a str,
    /// `requested_ipv6_subnet`.
    pub requested_ipv6: &'a str,
    /// `public_ipv6`.
    pub public_ipv6: &'a str,
    /// `vtep_mac_v6`.
    pub vtep_mac_v6: &'a str,
    /// `public_ip_prefix_len`.
    pub public_prefix_len: u32,
}

impl AcquireParams {
    /// Validates the raw request fields for a node of `conf`'s network; errors name
    /// the field. The fields of a family the network does not have are ignored.
    pub fn parse(conf: &NetConf, node: &str, f: AcquireFields<'_>) -> Result<Self, LeaseOpError> {
        let invalid = |m: String| LeaseOpError::Invalid(m);
        validate_node_name(node).map_err(|e| invalid(e.to_string()))?;
        let kind = conf.backend.kind;
        if !(f.backend.is_empty() || f.backend == kind.as_str()) {
            return Err(invalid(format!(
                "backend_type {:?} is not supported: this controller runs \"{kind}\"",
                f.backend
            )));
        }
        let v4 = match &conf.ipv4 {
            Some(pool) => {
                let requested = match f.requested {
                    "" => None,
                    s => Some(
                        parse_subnet(s).map_err(|e| invalid(format!("requested_subnet: {e}")))?,
                    ),
                };
                let public_ip = f.public_ip.parse().map_err(|_| {
                    invalid(format!(
                        "public_ip {:?} is not an IPv4 address",
                        f.public_ip
                    ))
                })?;
                check_public_ip(public_ip, pool.network).map_err(|e| invalid(e.to_string()))?;
                Some(FamilyRequest {
                    requested,
                    public_ip,
                    vtep_mac: vtep_mac_of(kind, "vtep_mac", f.vtep_mac)?,
                })
            }
            None => None,
        };
        let v6 = match &conf.ipv6 {
            Some(pool) => Some(parse_v6(kind, pool, f)?),
            None => None,
        };
        if let (Some(m), Some(m6)) = (
            v4.as_ref().and_then(|v| v.vtep_mac),
            v6.as_ref().and_then(|v| v.vtep_mac),
        ) {
            if m == m6 {
                return Err(invalid(format!(
                    "vtep_mac_v6 {m6} is the MAC of the IPv4 device too; flannel.<VNI> and \
                     flannel-v6.<VNI> are two devices with a MAC each"
                )));
            }
        }
        let max = if v4.is_some() { 32 } else { 128 };
        let public_prefix_len = u8::try_from(f.public_prefix_len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| {
                invalid(format!(
                    "public_ip_prefix_len {} is not a prefix length of the node's public address (0 to {max})",
                    f.public_prefix_len
                ))
            })?;
        Ok(AcquireParams {
            node: node.to_string(),
            v4,
            v6,
            public_prefix_len,
        })
    }

    /// The MACs this request claims, of both families.
    fn macs(&self) -> impl Iterator<Item = Mac> + '_ {
        self.v4
            .as_ref()
            .and_then(|v| v.vtep_mac)
            .into_iter()
            .chain(self.v6.as_ref().and_then(|v| v.vtep_mac))
    }
}

fn parse_v6(
    kind: BackendType,
    pool: &Ipv6Pool,
    f: AcquireFields<'_>,
) -> Result<FamilyRequest<Ipv6Net, Ipv6Addr>, LeaseOpError> {
    let invalid = |m: String| LeaseOpError::Invalid(m);
    if f.public_ipv6.is_empty() {
        return Err(invalid(
            "public_ipv6 is empty, but this network has EnableIPv6: give the node's public \
             interface an IPv6 address, or start the agent with --public-ipv6 (an agent \
             older than dual-stack support cannot join this network)"
                .into(),
        ));
    }
    let requested = match f.requested_ipv6 {
        "" => None,
        s => Some(parse_subnet6(s).map_err(|e| invalid(format!("requested_ipv6_subnet: {e}")))?),
    };
    let public_ip: Ipv6Addr = f.public_ipv6.parse().map_err(|_| {
        invalid(format!(
            "public_ipv6 {:?} is not an IPv6 address",
            f.public_ipv6
        ))
    })?;
    check_public_ipv6(public_ip, pool.network).map_err(|e| invalid(e.to_string()))?;
    Ok(FamilyRequest {
        requested,
        public_ip,
        vtep_mac: vtep_mac_of(kind, "vtep_mac_v6", f.vtep_mac_v6)?,
    })
}

/// A requested subnet must be a node subnet of the pool's network (inside
/// SubnetMin..SubnetMax or not: outside, the node is simply given another).
fn check_requested<N: PoolNet>(
    f: Option<&Subnets<N>>,
    field: &str,
    requested: Option<N>,
) -> Result<(), LeaseOpError> {
    match (f.map(Subnets::pool), requested) {
        (Some(pool), Some(r)) if !pool.fits(r) => Err(LeaseOpError::Invalid(format!(
            "{field} {r} is not a /{} subnet of {}Network {}",
            pool.subnet_len,
            N::KEY,
            pool.network
        ))),
        _ => Ok(()),
    }
}

/// A VTEP MAC field: required and unicast with VXLAN; host-gw leases carry no backend
/// data (flannel's neither), so a MAC sent anyway names no device and is dropped.
fn vtep_mac_of(kind: BackendType, field: &str, text: &str) -> Result<Option<Mac>, LeaseOpError> {
    match kind {
        BackendType::HostGw => Ok(None),
        BackendType::Vxlan => {
            let mac: Mac = text
                .parse()
                .map_err(|e| LeaseOpError::Invalid(format!("{field}: {e}")))?;
            mac.check_unicast()
                .map_err(|e| LeaseOpError::Invalid(e.to_string().replacen("vtep_mac", field, 1)))?;
            Ok(Some(mac))
        }
    }
}

/// Where a family's subnet sits in a lease.
trait LeaseNet: PoolNet {
    fn of(l: &Lease) -> Option<Self>;
}

impl LeaseNet for Ipv4Net {
    fn of(l: &Lease) -> Option<Self> {
        parse_subnet(&l.subnet).ok()
    }
}

impl LeaseNet for Ipv6Net {
    fn of(l: &Lease) -> Option<Self> {
        parse_subnet6(&l.ipv6_subnet).ok()
    }
}

/// The lease fields one family's request sets: public address and VTEP MAC, as text.
fn family_fields<N, A: std::fmt::Display>(r: Option<&FamilyRequest<N, A>>) -> (String, String) {
    r.map_or_else(Default::default, |r| {
        (r.public_ip.to_string(), mac_text(r.vtep_mac))
    })
}

fn mac_text(mac: Option<Mac>) -> String {
    mac.map(|m| m.to_string()).unwrap_or_default()
}

enum Op {
    Acquire(AcquireParams),
    Release(String),
    Revoke { node: String, by: String },
    Reserve { node: String, subnet: Reservation },
    Unreserve(String),
    Sweep,
}

/// What a successful operation returns.
enum Outcome {
    Lease(Box<Lease>),
    Done(bool),
}

type Reply = oneshot::Sender<Result<Outcome, LeaseOpError>>;

/// An operation and who waits for it.
struct Queued {
    op: Op,
    reply: Option<Reply>,
    queued: Instant,
}

/// A decided request's answer, sent once its events are published.
struct Answer {
    reply: Reply,
    result: Result<Outcome, LeaseOpError>,
    queued: Instant,
}

/// Handle to the lease writer; cheap to clone. With the etcd store a replica holds a
/// writer only while it leads: `standby` makes a handle without one, `attach` and
/// `detach` follow the election.
#[derive(Clone)]
pub struct Leases {
    writer: Arc<std::sync::RwLock<Option<Running>>>,
    ttl: Duration,
    /// Made by `standby` (etcd store): a writer that stops means this replica no longer
    /// leads, which is what callers are told.
    replicated: bool,
}

/// A started writer: its queue, and whether its thread still runs.
#[derive(Clone)]
struct Running {
    tx: mpsc::Sender<Queued>,
    running: Arc<AtomicBool>,
}

/// The lease writer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The stored leases do not fit the configured network.
    #[error("{0}")]
    Inconsistent(String),
    /// The writer's thread or runtime could not be made.
    #[error("cannot start the lease writer: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Clears the writer's liveness flag when its thread ends, however it ends.
struct RunningGuard(Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
        if std::thread::panicking() {
            error!("the lease writer panicked; no lease can be granted or renewed until the controller restarts");
        }
    }
}

impl Leases {
    /// Starts the writer over a loaded store. `hub` must hold the same leases;
    /// `reservations` maps node names to their reserved subnets.
    pub fn start(
        conf: &NetConf,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        reservations: BTreeMap<String, Reservation>,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let leases = Leases {
            replicated: false,
            ..Self::standby(ttl)
        };
        leases.attach(conf, store, hub, reservations, metrics)?;
        Ok(leases)
    }

    /// A handle with no writer yet: every operation answers `NotLeader`.
    pub fn standby(ttl: Duration) -> Self {
        Leases {
            writer: Arc::default(),
            ttl: ttl.min(MAX_LEASE_TTL),
            replicated: true,
        }
    }

    /// Starts a writer behind this handle (see `start`), replacing any other.
    pub fn attach(
        &self,
        conf: &NetConf,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        reservations: BTreeMap<String, Reservation>,
        metrics: Arc<Metrics>,
    ) -> Result<(), StartError> {
        let ttl = self.ttl;
        let (leases, revision) = hub.leases();
        let mut writer = Writer {
            conf: conf.clone(),
            store,
            hub,
            ttl,
            v4: None,
            v6: None,
            leases: BTreeMap::new(),
            by_mac: HashMap::new(),
            revision,
            metrics,
            unpublished: Vec::new(),
            waiting: Vec::new(),
            last_publish: Instant::now(),
        };
        writer.load_reservations(reservations);
        writer.rebuild(leases).map_err(StartError::Inconsistent)?;
        writer.update_gauges();
        writer.publish_reservations();
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        // The writer gets an OS thread of its own instead of a place in the shared
        // runtime: after a commit, thousands of watch streams wake at once, and a
        // writer queued behind them waited seconds to take the next batch (perf and
        // flush timings in a 5,000-node join storm), which stalled every grant.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let running = Arc::new(AtomicBool::new(true));
        let guard = RunningGuard(running.clone());
        std::thread::Builder::new()
            .name("lease-writer".into())
            .spawn(move || {
                let _guard = guard;
                runtime.block_on(writer.run(rx));
            })?;
        // Weak: once the handle lets the writer go (detach), the sweeper must not keep
        // its queue open.
        let sweeper = tx.downgrade();
        tokio::spawn(async move {
            let period = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(tx) = sweeper.upgrade() else { return };
                let sweep = Queued {
                    op: Op::Sweep,
                    reply: None,
                    queued: Instant::now(),
                };
                if tx.send(sweep).await.is_err() {
                    return;
                }
            }
        });
        *self.writer.write().unwrap_or_else(|p| p.into_inner()) = Some(Running { tx, running });
        Ok(())
    }

    /// Lets the writer go: it finishes what it holds and stops; later operations
    /// answer `NotLeader`.
    pub fn detach(&self) {
        self.writer
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn running(&self) -> Option<Running> {
        self.writer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Lease time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// False once an attached writer has stopped (it panicked, could not read the
    /// store back after a failed write, or lost its leadership): no lease can be
    /// granted or renewed through it. True when none is attached.
    pub fn is_running(&self) -> bool {
        self.running()
            .is_none_or(|r| r.running.load(Ordering::Relaxed))
    }

    /// True while a writer is attached and running.
    pub fn is_writing(&self) -> bool {
        self.running()
            .is_some_and(|r| r.running.load(Ordering::Relaxed))
    }

    /// Why a writer that went away did not answer.
    fn stopped(&self) -> LeaseOpError {
        if self.replicated {
            LeaseOpError::NotLeader
        } else {
            LeaseOpError::Stopped
        }
    }

    async fn call(&self, op: Op) -> Result<Outcome, LeaseOpError> {
        let (reply, rx) = oneshot::channel();
        let queued = Queued {
            op,
            reply: Some(reply),
            queued: Instant::now(),
        };
        let Some(writer) = self.running() else {
            return Err(LeaseOpError::NotLeader);
        };
        writer.tx.send(queued).await.map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    async fn call_done(&self, op: Op) -> Result<bool, LeaseOpError> {
        match self.call(op).await? {
            Outcome::Done(done) => Ok(done),
            Outcome::Lease(_) => Ok(true),
        }
    }

    /// Acquires or renews a lease; returns once it is durable.
    pub async fn acquire(&self, params: AcquireParams) -> Result<Lease, LeaseOpError> {
        match self.call(Op::Acquire(params)).await? {
            Outcome::Lease(l) => Ok(*l),
            Outcome::Done(_) => Err(LeaseOpError::Stopped),
        }
    }

    /// Releases a node's lease at its agent's request; `Ok(false)` when it held none.
    pub async fn release(&self, node: &str) -> Result<bool, LeaseOpError> {
        self.call_done(Op::Release(node.to_string())).await
    }

    /// Removes a node's lease on an operator's order; `Ok(false)` when it held none.
    pub async fn revoke(&self, node: &str, by: &str) -> Result<bool, LeaseOpError> {
        self.call_done(Op::Revoke {
            node: node.to_string(),
            by: by.to_string(),
        })
        .await
    }

    /// Reserves `subnet` (one subnet per family) for `node`, replacing the node's
    /// reservation: nobody else is ever given them.
    pub async fn reserve(&self, node: &str, subnet: Reservation) -> Result<(), LeaseOpError> {
        self.call_done(Op::Reserve {
            node: node.to_string(),
            subnet,
        })
        .await
        .map(|_| ())
    }

    /// Drops a node's reservation; `Ok(false)` when it had none.
    pub async fn unreserve(&self, node: &str) -> Result<bool, LeaseOpError> {
        self.call_done(Op::Unreserve(node.to_string())).await
    }
}

/// What one batch changed, to be written to the store as one.
#[derive(Default)]
struct Changes {
    events: Vec<LeaseEvent>,
    renewed: Vec<Lease>,
    reservations: bool,
}

struct Writer {
    conf: NetConf,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    ttl: Duration,
    /// Each family's subnets, present exactly when the network has the family.
    v4: Option<Subnets<Ipv4Net>>,
    v6: Option<Subnets<Ipv6Net>>,
    leases: BTreeMap<String, Lease>,
    /// The node holding each VTEP MAC (both devices' MACs share one index: no MAC may
    /// name two nodes).
    by_mac: HashMap<Mac, String>,
    revision: u64,
    metrics: Arc<Metrics>,
    /// Durable events not yet published, and the answers waiting for them: a reply
    /// means stored and visible to every reader of the hub.
    unpublished: Vec<LeaseEvent>,
    waiting: Vec<Answer>,
    last_publish: Instant,
}

/// A stored lease's VTEP MACs (stored leases were checked when granted).
fn lease_macs(l: &Lease) -> [Option<Mac>; 2] {
    [l.vtep_mac.parse().ok(), l.vtep_mac_v6.parse().ok()]
}

/// Splits stored reservations by family; a part for a family the network does not
/// have cannot be honoured and is dropped (the store layout pins the families, so
/// only a hand-edited store holds one).
fn split_reservations(
    conf: &NetConf,
    all: BTreeMap<String, Reservation>,
) -> (BTreeMap<String, Ipv4Net>, BTreeMap<String, Ipv6Net>) {
    let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
    for (node, r) in all {
        if let Some(s) = r.v4 {
            if conf.ipv4.is_some() {
                v4.insert(node.clone(), s);
            } else {
                warn!(node = %node, subnet = %s, "dropping a stored IPv4 reservation: the network has no IPv4");
            }
        }
        if let Some(s) = r.v6 {
            if conf.ipv6.is_some() {
                v6.insert(node, s);
            } else {
                warn!(node = %node, subnet = %s, "dropping a stored IPv6 reservation: the network has no IPv6");
            }
        }
    }
    (v4, v6)
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = if self.unpublished.is_empty() {
                rx.recv_many(&mut ops, MAX_BATCH).await
            } else {
                let due =
                    tokio::time::Instant::from_std(self.last_publish + self.publish_interval());
                tokio::select! {
                    n = rx.recv_many(&mut ops, MAX_BATCH) => n,
                    () = tokio::time::sleep_until(due) => {
                        self.publish();
                        continue;
                    }
                }
            };
            if received == 0 {
                self.publish();
                return;
            }
            if !self.process(std::mem::take(&mut ops)).await {
                return;
            }
            if self.unpublished.is_empty() || self.last_publish.elapsed() >= self.publish_interval()
            {
                self.publish();
            }
        }
    }

    fn publish_interval(&self) -> Duration {
        PUBLISH_INTERVAL_PER_WATCHER
            .saturating_mul(self.hub.watchers() as u32)
            .min(MAX_PUBLISH_INTERVAL)
    }

    /// Commits the unpublished events to the hub and sends the answers that waited.
    fn publish(&mut self) {
        if !self.unpublished.is_empty() {
            self.hub.commit(std::mem::take(&mut self.unpublished));
            self.last_publish = Instant::now();
        }
        for a in self.waiting.drain(..) {
            self.metrics
                .allocation_seconds
                .observe(a.queued.elapsed().as_secs_f64());
            // A caller that went away no longer needs its answer.
            let _ = a.reply.send(a.result);
        }
    }

    /// Decides, stores and queues the answers of one batch. False when the writer must
    /// stop (the store failed and could not be read back).
    async fn process(&mut self, ops: Vec<Queued>) -> bool {
        let mut changes = Changes::default();
        let mut answers = Vec::with_capacity(ops.len());
        let now = now_unix();
        for Queued { op, reply, queued } in ops {
            let result = match op {
                Op::Acquire(p) => self
                    .acquire(p, now, &mut changes)
                    .map(|l| Outcome::Lease(Box::new(l))),
                Op::Release(node) => {
                    let released = self.remove(&node, &mut changes.events);
                    if released {
                        info!(node = %node, "lease released by its agent");
                    }
                    Ok(Outcome::Done(released))
                }
                Op::Revoke { node, by } => {
                    let revoked = self.remove(&node, &mut changes.events);
                    if revoked {
                        info!(node = %node, admin = %by, "lease revoked");
                    }
                    Ok(Outcome::Done(revoked))
                }
                Op::Reserve { node, subnet } => {
                    let r = self.reserve(&node, subnet);
                    changes.reservations |= r.is_ok();
                    r.map(|()| Outcome::Done(true))
                }
                Op::Unreserve(node) => {
                    let done = self.unreserve(&node);
                    changes.reservations |= done;
                    Ok(Outcome::Done(done))
                }
                Op::Sweep => {
                    self.sweep(now, &mut changes.events);
                    continue;
                }
            };
            if let Some(reply) = reply {
                answers.push(Answer {
                    reply,
                    result,
                    queued,
                });
            }
        }
        let reservations = changes.reservations.then(|| self.reservations());
        let batch = Batch {
            events: &changes.events,
            renewed: &changes.renewed,
            reservations: reservations.as_ref(),
        };
        if !batch.is_empty() {
            if let Err(e) = self.persist(&batch).await {
                return self.recover(e, answers).await;
            }
            self.unpublished.extend(changes.events);
            self.hub.renew(&changes.renewed);
            self.update_gauges();
        }
        self.publish_reservations_if_changed(changes.reservations);
        self.waiting.extend(answers);
        true
    }

    async fn persist(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
        self.store.write(batch).await?;
        let started = Instant::now();
        self.store.flush().await?;
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            events = batch.events.len(),
            renewed = batch.renewed.len(),
            flush_ms = started.elapsed().as_millis() as u64,
            "batch flushed"
        );
        Ok(())
    }

    /// After a failed write or flush: the store may hold all of the batch, part of it
    /// (written but not confirmed on disk) or none of it, so the decisions made in
    /// memory are dropped and the table is reloaded from what the store holds. Events
    /// the store kept are published (they would surface at the next start anyway); the
    /// revision only moves forward, so no revision ever names two different events.
    /// Returns false when the store cannot even be read: the writer stops.
    async fn recover(&mut self, e: StoreError, answers: Vec<Answer>) -> bool {
        self.metrics.store_failures.inc();
        // Earlier batches are durable: publish them first.
        self.publish();
        if let StoreError::NotLeader(why) = &e {
            // Deposed: the new leader decides from now on, from what etcd holds.
            warn!(reason = %why, "lost the leadership while writing; the lease writer stops");
            for a in answers {
                let result = match a.result {
                    Ok(_) => Err(LeaseOpError::NotLeader),
                    refused => refused,
                };
                let _ = a.reply.send(result);
            }
            return false;
        }
        let message = format!(
            "the lease store failed while writing this change ({e}); it may or may not have \
             been stored, and the controller now serves what the store holds: retry (a retry \
             of the same request is safe)"
        );
        let reloaded = self.store.load().await;
        for a in answers {
            // Refusals wrote nothing and stay what they were.
            let result = match a.result {
                Ok(_) => Err(LeaseOpError::Store(StoreError::Backend(message.clone()))),
                refused => refused,
            };
            let _ = a.reply.send(result);
        }
        let snap = match reloaded {
            Ok(snap) => snap,
            Err(load) => {
                error!(error = %e, reload_error = %load, "the lease store failed and cannot be read back; the lease writer stops (restart the controller once the store is healthy)");
                return false;
            }
        };
        let (committed, committed_revision) = self.hub.leases();
        let kept: Vec<LeaseEvent> = snap
            .history
            .into_iter()
            .filter(|e| e.revision > committed_revision)
            .collect();
        let renewed: Vec<Lease> = {
            let committed: HashMap<&str, i64> = committed
                .iter()
                .map(|l| (l.node_name.as_str(), l.expires_at_unix))
                .collect();
            snap.leases
                .iter()
                .filter(|l| {
                    committed
                        .get(l.node_name.as_str())
                        .is_some_and(|exp| *exp != l.expires_at_unix)
                })
                .cloned()
                .collect()
        };
        warn!(error = %e, kept_events = kept.len(), stored_revision = snap.revision, "store write failed; reloaded the table from the store and answered the batch with an error");
        self.hub.commit(kept);
        self.hub.renew(&renewed);
        self.load_reservations(snap.reservations);
        let (leases, revision) = self.hub.leases();
        if let Err(why) = self.rebuild(leases) {
            error!(error = %why, "the reloaded store is inconsistent; the lease writer stops");
            return false;
        }
        self.revision = self.revision.max(revision).max(snap.revision);
        self.publish_reservations();
        self.update_gauges();
        true
    }

    /// Takes the reservations (as the store holds them) for the next `rebuild`.
    fn load_reservations(&mut self, all: BTreeMap<String, Reservation>) {
        let (r4, r6) = split_reservations(&self.conf, all);
        self.v4 = self.conf.ipv4.clone().map(|p| Subnets::new(p, r4));
        self.v6 = self.conf.ipv6.clone().map(|p| Subnets::new(p, r6));
    }

    /// Rebuilds the lease map, its indexes and the free-subnet indexes from `leases` and
    /// the reservations; reservations that cannot be honoured are recorded as stale.
    fn rebuild(&mut self, leases: Vec<Lease>) -> Result<(), String> {
        if let Some(f) = self.v4.as_mut() {
            f.reset(f.reservations().clone());
        }
        if let Some(f) = self.v6.as_mut() {
            f.reset(f.reservations().clone());
        }
        self.leases.clear();
        self.by_mac.clear();
        // Every lease holds a subnet of the network's first family; an IPv6 subnet is
        // optional on a dual-stack network (a lease granted before the network had IPv6
        // gets one at its next renewal).
        let v4_first = self.v4.is_some();
        for l in leases {
            restore(self.v4.as_mut(), &l, true)?;
            restore(self.v6.as_mut(), &l, !v4_first)?;
            for m in lease_macs(&l).into_iter().flatten() {
                if let Some(other) = self.by_mac.get(&m) {
                    warn!(node = %l.node_name, other = %other, vtep_mac = %m, "stored leases share a VTEP MAC; the next acquisition of either must change it");
                }
            }
            self.index_macs(&l);
            self.leases.insert(l.node_name.clone(), l);
        }
        if let Some(f) = self.v4.as_mut() {
            f.honour_reservations();
        }
        if let Some(f) = self.v6.as_mut() {
            f.honour_reservations();
        }
        Ok(())
    }

    /// Every reservation, both families of a node together.
    fn reservations(&self) -> BTreeMap<String, Reservation> {
        let mut all: BTreeMap<String, Reservation> = BTreeMap::new();
        for (node, s) in self.v4.iter().flat_map(|f| f.reservations()) {
            all.entry(node.clone()).or_default().v4 = Some(*s);
        }
        for (node, s) in self.v6.iter().flat_map(|f| f.reservations()) {
            all.entry(node.clone()).or_default().v6 = Some(*s);
        }
        all
    }

    /// Publishes the reservations and why some cannot be honoured, when they changed
    /// (`stored`: the set itself was just written) or a family's view moved.
    fn publish_reservations_if_changed(&mut self, stored: bool) {
        let moved4 = self.v4.as_mut().is_some_and(Subnets::take_changed);
        let moved6 = self.v6.as_mut().is_some_and(Subnets::take_changed);
        if stored || moved4 || moved6 {
            self.publish_reservations();
        }
    }

    fn publish_reservations(&self) {
        let mut stale: BTreeMap<String, String> = BTreeMap::new();
        let reasons = self
            .v4
            .iter()
            .flat_map(|f| f.stale())
            .chain(self.v6.iter().flat_map(|f| f.stale()));
        for (node, why) in reasons {
            stale
                .entry(node.clone())
                .and_modify(|w| {
                    w.push_str("; ");
                    w.push_str(why);
                })
                .or_insert_with(|| why.clone());
        }
        self.metrics.reservations_stale.set(stale.len() as i64);
        self.hub.set_reservations(self.reservations(), stale);
    }

    fn update_gauges(&self) {
        self.metrics.leases.set(self.leases.len() as i64);
        let (capacity, taken) = match (&self.v4, &self.v6) {
            (Some(f), _) => (f.capacity(), f.taken()),
            (None, Some(f)) => (f.capacity(), f.taken()),
            (None, None) => (0, 0),
        };
        self.metrics
            .subnets_free
            .set(i64::from(capacity) - i64::from(taken));
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn index_macs(&mut self, l: &Lease) {
        for m in lease_macs(l).into_iter().flatten() {
            self.by_mac.entry(m).or_insert_with(|| l.node_name.clone());
        }
    }

    fn unindex_macs(&mut self, l: &Lease) {
        for m in lease_macs(l).into_iter().flatten() {
            if self.by_mac.get(&m) == Some(&l.node_name) {
                self.by_mac.remove(&m);
            }
        }
    }

    /// Forgets a lease that ended: its MACs and both subnets go back.
    fn forget(&mut self, l: &Lease) {
        self.unindex_macs(l);
        release(self.v4.as_mut(), l);
        release(self.v6.as_mut(), l);
    }

    fn acquire(
        &mut self,
        p: AcquireParams,
        now: i64,
        changes: &mut Changes,
    ) -> Result<Lease, LeaseOpError> {
        check_requested(
            self.v4.as_ref(),
            "requested_subnet",
            p.v4.as_ref().and_then(|r| r.requested),
        )?;
        check_requested(
            self.v6.as_ref(),
            "requested_ipv6_subnet",
            p.v6.as_ref().and_then(|r| r.requested),
        )?;
        if let Some((mac, holder)) = p
            .macs()
            .find_map(|m| self.by_mac.get(&m).map(|h| (m, h)))
            .filter(|(_, h)| **h != p.node)
        {
            warn!(node = %p.node, vtep_mac = %mac, holder = %holder, "refused a lease whose VTEP MAC another node holds");
            return Err(LeaseOpError::AlreadyExists(format!(
                "vtep_mac {mac} is the VTEP MAC of node {holder}'s lease; every node's VXLAN device \
                 needs a MAC of its own (delete and recreate the device to get a new one)"
            )));
        }
        let expires = now.saturating_add(self.ttl.as_secs() as i64);
        let (public_ip, vtep_mac) = family_fields(p.v4.as_ref());
        let (public_ipv6, vtep_mac_v6) = family_fields(p.v6.as_ref());
        let existing = self
            .leases
            .get(&p.node)
            .filter(|l| l.expires_at_unix > now)
            .cloned();
        match &existing {
            Some(l)
                if l.public_ip == public_ip
                    && l.vtep_mac == vtep_mac
                    && l.public_ipv6 == public_ipv6
                    && l.vtep_mac_v6 == vtep_mac_v6
                    && l.public_ip_prefix_len == u32::from(p.public_prefix_len)
                    && Ipv4Net::of(l).is_some() == p.v4.is_some()
                    && Ipv6Net::of(l).is_some() == p.v6.is_some() =>
            {
                // Only the expiry moves: stored, but no revision and no broadcast.
                let mut renewed = l.clone();
                renewed.expires_at_unix = expires;
                tracing::debug!(node = %p.node, subnet = %renewed.subnet, ipv6_subnet = %renewed.ipv6_subnet, "lease renewed");
                self.leases.insert(p.node, renewed.clone());
                changes.renewed.retain(|r| r.node_name != renewed.node_name);
                changes.renewed.push(renewed.clone());
                return Ok(renewed);
            }
            Some(_) => {}
            None => {
                // An expired lease not yet swept: give its subnets back first.
                if let Some(old) = self.leases.remove(&p.node) {
                    warn!(node = %p.node, subnet = %old.subnet, ipv6_subnet = %old.ipv6_subnet, expired_secs_ago = now - old.expires_at_unix, "renewal missed: the lease had expired; granting again");
                    self.forget(&old);
                }
            }
        }
        let held = existing.as_ref();
        let s4 = grant(
            self.v4.as_mut(),
            held,
            &p.node,
            p.v4.as_ref().map(|r| r.requested),
        )?;
        let s6 = match grant(
            self.v6.as_mut(),
            held,
            &p.node,
            p.v6.as_ref().map(|r| r.requested),
        ) {
            Ok(s6) => s6,
            Err(e) => {
                if let (Some(f), Some((s, true))) = (self.v4.as_mut(), s4) {
                    f.free(s, &p.node);
                }
                return Err(e);
            }
        };
        let lease = Lease {
            node_name: p.node.clone(),
            subnet: s4.map(|(s, _)| s.to_string()).unwrap_or_default(),
            public_ip,
            backend_type: self.conf.backend.kind.as_str().into(),
            vtep_mac,
            expires_at_unix: expires,
            revision: self.next_revision(),
            vni: self.conf.backend.vni,
            reserved: false,
            ipv6_subnet: s6.map(|(s, _)| s.to_string()).unwrap_or_default(),
            public_ipv6,
            vtep_mac_v6,
            public_ip_prefix_len: p.public_prefix_len.into(),
        };
        if existing.is_some() {
            info!(node = %p.node, subnet = %lease.subnet, ipv6_subnet = %lease.ipv6_subnet, public_ip = %lease.public_ip, public_ipv6 = %lease.public_ipv6, vtep_mac = %lease.vtep_mac, revision = lease.revision, "lease renewed with a new address or VTEP MAC");
        } else {
            info!(node = %p.node, subnet = %lease.subnet, ipv6_subnet = %lease.ipv6_subnet, public_ip = %lease.public_ip, public_ipv6 = %lease.public_ipv6, revision = lease.revision, "lease granted");
        }
        if let (Some(f), Some((s, _))) = (self.v4.as_mut(), s4) {
            f.hold(s, &p.node);
        }
        if let (Some(f), Some((s, _))) = (self.v6.as_mut(), s6) {
            f.hold(s, &p.node);
        }
        if let Some(old) = self.leases.insert(p.node, lease.clone()) {
            self.unindex_macs(&old);
        }
        self.index_macs(&lease);
        changes.events.push(LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(lease.clone()),
            revision: lease.revision,
        });
        Ok(lease)
    }

    fn remove(&mut self, node: &str, events: &mut Vec<LeaseEvent>) -> bool {
        let Some(mut lease) = self.leases.remove(node) else {
            return false;
        };
        self.forget(&lease);
        lease.revision = self.next_revision();
        events.push(LeaseEvent {
            r#type: EventType::Delete as i32,
            revision: lease.revision,
            lease: Some(lease),
        });
        true
    }

    fn reserve(&mut self, node: &str, r: Reservation) -> Result<(), LeaseOpError> {
        validate_node_name(node).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
        if r.v4.is_none() && r.v6.is_none() {
            return Err(LeaseOpError::Invalid(
                "no subnet to reserve: give an IPv4 subnet, an IPv6 subnet, or one of each".into(),
            ));
        }
        let own = self.leases.get(node);
        check_reserve(
            self.v4.as_ref(),
            node,
            r.v4,
            own,
            "IPv4 (EnableIPv4 is false)",
        )?;
        check_reserve(
            self.v6.as_ref(),
            node,
            r.v6,
            own,
            "IPv6 (EnableIPv6 is not set)",
        )?;
        replace_reservation(self.v4.as_mut(), node, r.v4);
        replace_reservation(self.v6.as_mut(), node, r.v6);
        Ok(())
    }

    fn unreserve(&mut self, node: &str) -> bool {
        let v4 = self.v4.as_mut().and_then(|f| f.unreserve(node)).is_some();
        let v6 = self.v6.as_mut().and_then(|f| f.unreserve(node)).is_some();
        v4 || v6
    }

    fn sweep(&mut self, now: i64, events: &mut Vec<LeaseEvent>) {
        let expired: Vec<(String, String)> = self
            .leases
            .values()
            .filter(|l| l.expires_at_unix <= now)
            .map(|l| (l.node_name.clone(), l.subnet.clone()))
            .collect();
        for (node, subnet) in expired {
            info!(node = %node, subnet = %subnet, "lease expired");
            self.remove(&node, events);
        }
    }
}

/// Records a stored lease's subnet of one family; `required`: a lease without one is
/// inconsistent with the network.
fn restore<N: LeaseNet>(
    f: Option<&mut Subnets<N>>,
    l: &Lease,
    required: bool,
) -> Result<(), String> {
    let Some(f) = f else { return Ok(()) };
    match N::of(l) {
        Some(s) => f.restore(&l.node_name, s),
        None if required => Err(format!(
            "stored lease of {} has no {} subnet, which the configured network needs; restore \
             the previous net-conf.json or move the data directory aside to start a new network",
            l.node_name,
            N::FAMILY
        )),
        None => Ok(()),
    }
}

/// Gives a lease's subnet of one family back to its pool.
fn release<N: LeaseNet>(f: Option<&mut Subnets<N>>, l: &Lease) {
    if let (Some(f), Some(s)) = (f, N::of(l)) {
        f.free(s, &l.node_name);
    }
}

/// The node's subnet of one family (`None` when the network lacks the family): the one
/// its live lease holds, else a new pick. The flag says whether it was picked now (and
/// must be freed if the grant fails).
fn grant<N: LeaseNet>(
    f: Option<&mut Subnets<N>>,
    held: Option<&Lease>,
    node: &str,
    requested: Option<Option<N>>,
) -> Result<Option<(N, bool)>, LeaseOpError> {
    let (Some(f), Some(requested)) = (f, requested) else {
        return Ok(None);
    };
    let own = held.and_then(N::of).filter(|s| f.holder(*s) == Some(node));
    if let Some(s) = own {
        if let Some(r) = requested.filter(|r| *r != s) {
            info!(node = %node, subnet = %s, requested = %r, "node asked for another subnet; keeping the one it holds");
        }
        return Ok(Some((s, false)));
    }
    f.pick(node, requested).map(|s| Some((s, true)))
}

fn check_reserve<N: LeaseNet>(
    f: Option<&Subnets<N>>,
    node: &str,
    subnet: Option<N>,
    own: Option<&Lease>,
    missing: &str,
) -> Result<(), LeaseOpError> {
    match (f, subnet) {
        (_, None) => Ok(()),
        (None, Some(s)) => Err(LeaseOpError::Invalid(format!(
            "cannot reserve {s}: this network has no {missing}"
        ))),
        (Some(f), Some(s)) => f.check_reserve(node, s, own.and_then(N::of)),
    }
}

/// Sets `node`'s reservation of one family to `subnet`, or drops it.
fn replace_reservation<N: LeaseNet>(f: Option<&mut Subnets<N>>, node: &str, subnet: Option<N>) {
    if let Some(f) = f {
        match subnet {
            Some(s) => f.reserve(node, s),
            None => {
                f.unreserve(node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    struct Fixture {
        leases: Leases,
        hub: Arc<Hub>,
        _dir: tempfile::TempDir,
    }

    fn start(network: &str, ttl: Duration) -> Fixture {
        let conf = NetConf::parse(&format!(
            r#"{{"Network": "{network}", "Backend": {{"Type": "vxlan"}}}}"#
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let hub = Arc::new(Hub::new(vec![], vec![], 0));
        let leases = Leases::start(
            &conf,
            store,
            hub.clone(),
            BTreeMap::new(),
            ttl,
            Arc::default(),
        )
        .unwrap();
        Fixture {
            leases,
            hub,
            _dir: dir,
        }
    }

    /// A unicast MAC of a node's own.
    fn mac_of(node: &str) -> String {
        let h = node
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let b = h.to_be_bytes();
        format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
    }

    fn conf_of(network: &str, backend: &str) -> NetConf {
        NetConf::parse(&format!(
            r#"{{"Network": "{network}", "Backend": {{"Type": "{backend}"}}}}"#
        ))
        .unwrap()
    }

    fn fields<'a>(requested: &'a str, public_ip: &'a str, vtep_mac: &'a str) -> AcquireFields<'a> {
        AcquireFields {
            requested,
            public_ip,
            backend: "vxlan",
            vtep_mac,
            ..Default::default()
        }
    }

    fn params(node: &str, requested: &str) -> AcquireParams {
        let conf = conf_of("10.0.0.0/8", "vxlan");
        AcquireParams::parse(&conf, node, fields(requested, "192.0.2.1", &mac_of(node))).unwrap()
    }

    #[tokio::test]
    async fn a_node_asking_again_keeps_its_subnet() {
        let f = start("10.244.0.0/16", Duration::from_secs(3600));
        let a = f.leases.acquire(params("a", "")).await.unwrap();
        let b = f.leases.acquire(params("b", "")).await.unwrap();
        assert_ne!(a.subnet, b.subnet);
        let again = f
            .leases
            .acquire(params("a", "10.244.77.0/24"))
            .await
            .unwrap();
        assert_eq!(again.subnet, a.subnet, "sticky while the lease lives");
        assert_eq!(
            again.revision, a.revision,
            "an unchanged renewal is no new revision"
        );
        assert_eq!(f.hub.leases().0.len(), 2);
    }

    #[tokio::test]
    async fn requested_subnet_is_granted_when_free_and_in_range() {
        let f = start("10.244.0.0/16", Duration::from_secs(3600));
        assert_eq!(
            f.leases
                .acquire(params("a", "10.244.77.0/24"))
                .await
                .unwrap()
                .subnet,
            "10.244.77.0/24"
        );
        let b = f
            .leases
            .acquire(params("b", "10.244.77.0/24"))
            .await
            .unwrap();
        assert_ne!(b.subnet, "10.244.77.0/24", "taken: a fresh one");
        let c = f
            .leases
            .acquire(params("c", "10.244.0.0/24"))
            .await
            .unwrap();
        assert_ne!(c.subnet, "10.244.0.0/24", "before SubnetMin: a fresh one");
        let e = f
            .leases
            .acquire(params("d", "10.9.0.0/24"))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not a /24 subnet of Network 10.244.0.0/16"),
            "{e}"
        );
        let e = f
            .leases
            .acquire(params("d", "10.244.0.0/25"))
            .await
            .unwrap_err();
        assert!(matches!(e, LeaseOpError::Invalid(_)), "{e}");
    }

    #[tokio::test]
    async fn exhaustion_release_and_reuse() {
        let f = start("10.1.0.0/26", Duration::from_secs(3600));
        for n in ["a", "b", "c"] {
            f.leases.acquire(params(n, "")).await.unwrap();
        }
        let e = f.leases.acquire(params("d", "")).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::Exhausted(_)), "{e}");
        assert!(e.to_string().contains("out of subnets"));
        assert!(f.leases.release("b").await.unwrap());
        assert!(
            !f.leases.release("b").await.unwrap(),
            "releasing twice is no error"
        );
        f.leases.acquire(params("d", "")).await.unwrap();
    }

    #[tokio::test]
    async fn reservations_are_never_handed_to_others() {
        let f = start("10.1.0.0/26", Duration::from_secs(3600));
        let reserved: Ipv4Net = "10.1.0.32/28".parse().unwrap();
        f.leases.reserve("x", reserved.into()).await.unwrap();
        let a = f.leases.acquire(params("a", "10.1.0.32/28")).await.unwrap();
        let b = f.leases.acquire(params("b", "")).await.unwrap();
        assert!(a.subnet != reserved.to_string() && b.subnet != reserved.to_string());
        assert!(matches!(
            f.leases.acquire(params("c", "")).await.unwrap_err(),
            LeaseOpError::Exhausted(_)
        ));
        assert_eq!(
            f.leases.acquire(params("x", "")).await.unwrap().subnet,
            reserved.to_string()
        );
        assert!(f.leases.release("x").await.unwrap());
        assert!(
            matches!(
                f.leases.acquire(params("c", "")).await.unwrap_err(),
                LeaseOpError::Exhausted(_)
            ),
            "released but still reserved"
        );
        let e = f
            .leases
            .reserve("y", a.subnet.parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(e, LeaseOpError::Conflict(_)) && e.to_string().contains("leased to node a"),
            "{e}"
        );
        let e = f
            .leases
            .reserve("y", "10.2.0.0/28".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, LeaseOpError::Invalid(_)), "{e}");
        assert!(f.leases.unreserve("x").await.unwrap());
        f.leases.acquire(params("c", "")).await.unwrap();
    }

    #[tokio::test]
    async fn expired_leases_are_swept_and_announced() {
        let f = start("10.244.0.0/16", Duration::from_secs(1));
        let mut sub = f.hub.subscribe(0, "");
        f.leases.acquire(params("a", "")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let batch = tokio::time::timeout_at(deadline, sub.feed.recv())
                .await
                .expect("expiry")
                .unwrap();
            let parts = crate::events::decode(&batch.encoded).unwrap();
            if parts
                .iter()
                .flat_map(|p| &p.events)
                .any(|e| e.r#type == EventType::Delete as i32)
            {
                break;
            }
        }
        assert!(f.hub.leases().0.is_empty());
    }

    #[test]
    fn bad_requests_name_the_field() {
        let e = |r: Result<AcquireParams, LeaseOpError>| r.unwrap_err().to_string();
        let c = conf_of("10.0.0.0/8", "vxlan");
        let mac = "0a:00:00:00:00:01";
        let parse = |node, f| AcquireParams::parse(&c, node, f);
        assert!(e(parse("", fields("", "192.0.2.1", mac))).contains("empty"));
        assert!(
            e(parse("a", fields("10.244.1.5/24", "192.0.2.1", mac))).contains("requested_subnet")
        );
        assert!(e(parse("a", fields("", "nope", mac))).contains("public_ip"));
        let udp = AcquireFields {
            backend: "udp",
            ..fields("", "192.0.2.1", mac)
        };
        assert!(e(parse("a", udp)).contains("backend_type"));
        assert!(e(parse("a", fields("", "192.0.2.1", "zz"))).contains("vtep_mac"));
    }

    fn dual_conf() -> NetConf {
        NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap()
    }

    fn dual_params(conf: &NetConf, node: &str, requested6: &str) -> AcquireParams {
        let mac = mac_of(node);
        let mac6 = format!("0a:59{}", &mac[5..]);
        let f = AcquireFields {
            requested_ipv6: requested6,
            public_ipv6: "2001:db8::1",
            vtep_mac_v6: &mac6,
            ..fields("", "192.0.2.1", &mac)
        };
        AcquireParams::parse(conf, node, f).unwrap()
    }

    #[tokio::test]
    async fn ipv6_only_leases_and_reservations_hold_across_a_restart() {
        let conf = NetConf::parse(
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let (leases, hub) = start_on(&conf, store.clone()).await;
        let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
        assert_eq!(
            (a.subnet.as_str(), a.public_ip.as_str(), a.vtep_mac.as_str()),
            ("", "", ""),
            "no IPv4 side: the request's IPv4 fields are ignored"
        );
        assert_eq!(a.ipv6_subnet, "fd00:10:244:1::/64");
        let e = leases
            .reserve("c", "10.244.1.0/24".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, LeaseOpError::Invalid(m) if m.contains("no IPv4")),
            "{e}"
        );
        let e = leases
            .reserve("c", "fd00:10:244:1::/64".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, LeaseOpError::Conflict(_)), "a's subnet: {e}");
        leases
            .reserve("b", "fd00:10:244:7::/64".parse().unwrap())
            .await
            .unwrap();
        let c = leases
            .acquire(dual_params(&conf, "c", "fd00:10:244:7::/64"))
            .await
            .unwrap();
        assert_ne!(c.ipv6_subnet, "fd00:10:244:7::/64", "reserved for b");
        let b = leases.acquire(dual_params(&conf, "b", "")).await.unwrap();
        assert_eq!(b.ipv6_subnet, "fd00:10:244:7::/64");
        assert_no_shared_subnet(&hub);
        drop(leases);

        let (leases, hub) = start_on(&conf, store.clone()).await;
        assert_eq!(
            hub.reservations()["b"].to_string(),
            "fd00:10:244:7::/64",
            "the IPv6 reservation was stored"
        );
        for (node, before) in [("a", &a), ("b", &b), ("c", &c)] {
            let again = leases.acquire(dual_params(&conf, node, "")).await.unwrap();
            assert_eq!(
                again.ipv6_subnet, before.ipv6_subnet,
                "{node} keeps its subnet"
            );
        }
        assert!(leases.unreserve("b").await.unwrap());
        assert!(!hub.reservations().contains_key("b"));
    }

    #[tokio::test]
    async fn a_dual_stack_reservation_keeps_both_subnets() {
        let conf = dual_conf();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let (leases, hub) = start_on(&conf, store.clone()).await;
        let both: Reservation = "10.244.9.0/24,fd00:10:244:9::/64".parse().unwrap();
        leases.reserve("r", both).await.unwrap();
        let other = leases
            .acquire(dual_params(&conf, "x", "fd00:10:244:9::/64"))
            .await
            .unwrap();
        assert_ne!(other.ipv6_subnet, "fd00:10:244:9::/64");
        let r = leases.acquire(dual_params(&conf, "r", "")).await.unwrap();
        assert_eq!(
            (r.subnet.as_str(), r.ipv6_subnet.as_str()),
            ("10.244.9.0/24", "fd00:10:244:9::/64")
        );
        drop(leases);
        let (_leases, hub2) = start_on(&conf, store).await;
        assert_eq!(hub2.reservations()["r"], both, "stored as one record");
        assert_eq!(hub.reservations()["r"], both);
    }

    #[tokio::test]
    async fn dual_stack_leases_get_a_subnet_of_each_family_and_keep_both() {
        let conf = dual_conf();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let (leases, hub) = start_on(&conf, store.clone()).await;
        for bad in ["fd00:99::/64", "fd00:10:244:1::/80"] {
            let e = leases
                .acquire(dual_params(&conf, "bad", bad))
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("requested_ipv6_subnet"), "{bad}: {e}");
        }
        let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
        let b = leases
            .acquire(dual_params(&conf, "b", "fd00:10:244:9::/64"))
            .await
            .unwrap();
        assert_eq!(a.ipv6_subnet, "fd00:10:244:1::/64");
        assert_eq!(
            b.ipv6_subnet, "fd00:10:244:9::/64",
            "the requested one, free"
        );
        assert_eq!(
            (a.public_ipv6.as_str(), a.vtep_mac_v6.is_empty()),
            ("2001:db8::1", false)
        );
        let again = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
        assert_eq!(
            (again.revision, again.ipv6_subnet),
            (a.revision, a.ipv6_subnet.clone())
        );

        // The v6 subnets come back after a restart of the writer, so c cannot get b's.
        drop(leases);
        let (leases, _hub) = start_on(&conf, store).await;
        let c = leases
            .acquire(dual_params(&conf, "c", "fd00:10:244:9::/64"))
            .await
            .unwrap();
        assert_ne!(c.ipv6_subnet, b.ipv6_subnet);
        assert!(leases.release("b").await.unwrap());
        let d = leases
            .acquire(dual_params(&conf, "d", "fd00:10:244:9::/64"))
            .await
            .unwrap();
        assert_eq!(d.ipv6_subnet, b.ipv6_subnet, "released with its lease");
        drop(hub);
    }

    #[tokio::test]
    async fn a_v6_vtep_mac_held_by_another_node_is_refused_and_nothing_is_written() {
        let conf = dual_conf();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let (leases, hub) = start_on(&conf, store).await;
        let a = leases.acquire(dual_params(&conf, "a", "")).await.unwrap();
        let mut spoof = dual_params(&conf, "mallory", "");
        spoof.v6.as_mut().unwrap().vtep_mac = a.vtep_mac_v6.parse().ok();
        let e = leases.acquire(spoof).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::AlreadyExists(_)), "{e}");
        assert!(e.to_string().contains("node a"), "{e}");
        let mut cross = dual_params(&conf, "mallory", "");
        cross.v6.as_mut().unwrap().vtep_mac = a.vtep_mac.parse().ok();
        assert!(
            leases.acquire(cross).await.is_err(),
            "a's IPv4 MAC as an IPv6 one"
        );
        let (table, revision) = hub.leases();
        assert_eq!((table.len(), revision), (1, a.revision), "nothing written");
    }

    #[test]
    fn bad_ipv6_fields_name_the_field() {
        let conf = dual_conf();
        let mac = "0a:00:00:00:00:01";
        let e = |ip6: &str, mac6: &str, req6: &str| {
            let f = AcquireFields {
                requested_ipv6: req6,
                public_ipv6: ip6,
                vtep_mac_v6: mac6,
                ..fields("", "192.0.2.1", mac)
            };
            AcquireParams::parse(&conf, "a", f).unwrap_err().to_string()
        };
        let m6 = "0a:00:00:00:06:01";
        assert!(e("", m6, "").contains("public_ipv6 is empty"));
        for bad in ["ff02::1", "fe80::1", "::", "::1", "fd00:10:244:1::5"] {
            assert!(e(bad, m6, "").contains("public_ipv6"), "{bad}");
        }
        assert!(e("2001:db8::1", "33:33:00:00:00:01", "").contains("vtep_mac_v6"));
        assert!(e("2001:db8::1", "", "").contains("vtep_mac_v6"));
        assert!(e("2001:db8::1", mac, "").contains("MAC of the IPv4 device"));
        // On an IPv4-only network the IPv6 fields are ignored (an agent of the
        // previous version sends none).
        let v4 = conf_of("10.244.0.0/16", "vxlan");
        let p = AcquireParams::parse(&v4, "a", fields("", "192.0.2.1", mac)).unwrap();
        assert!(p.v6.is_none());
    }

    #[test]
    fn host_gw_leases_carry_no_vtep_mac() {
        let c = conf_of("10.244.0.0/16", "host-gw");
        let f = AcquireFields {
            backend: "host-gw",
            ..fields("", "192.0.2.1", "")
        };
        let p = AcquireParams::parse(&c, "a", f).unwrap();
        assert_eq!(p.v4.unwrap().vtep_mac, None);
        let e = AcquireParams::parse(&c, "a", fields("", "192.0.2.1", "0a:00:00:00:00:01"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("this controller runs \"host-gw\""), "{e}");
    }

    #[tokio::test]
    async fn host_gw_grants_leases_without_backend_data() {
        let conf = conf_of("10.244.0.0/16", "host-gw");
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let (leases, hub) = start_on(&conf, store).await;
        let p = |node: &str| {
            let f = AcquireFields {
                backend: "",
                ..fields("", "192.0.2.1", "")
            };
            AcquireParams::parse(&conf, node, f).unwrap()
        };
        let a = leases.acquire(p("a")).await.unwrap();
        let b = leases.acquire(p("b")).await.unwrap();
        assert_eq!(
            (a.backend_type.as_str(), a.vtep_mac.as_str()),
            ("host-gw", "")
        );
        assert_ne!(a.subnet, b.subnet);
        assert_eq!(
            leases.acquire(p("a")).await.unwrap().revision,
            a.revision,
            "a plain renewal"
        );
        assert_eq!(hub.leases().0.len(), 2);
    }

    /// Starts the writer over what `store` holds, as the controller does at start.
    async fn start_on(conf: &NetConf, store: Arc<dyn Store>) -> (Leases, Arc<Hub>) {
        let snap = store.load().await.unwrap();
        let hub =
            Arc::new(Hub::new(snap.leases, snap.history, snap.revision).with_epoch(snap.epoch));
        let leases = Leases::start(
            conf,
            store,
            hub.clone(),
            snap.reservations,
            Duration::from_secs(3600),
            Arc::default(),
        )
        .unwrap();
        (leases, hub)
    }

    fn assert_no_shared_subnet(hub: &Hub) {
        let (leases, _) = hub.leases();
        let mut seen = BTreeMap::new();
        for l in &leases {
            for s in [&l.subnet, &l.ipv6_subnet]
                .into_iter()
                .filter(|s| !s.is_empty())
            {
                if let Some(other) = seen.insert(s.clone(), l.node_name.clone()) {
                    panic!("{} and {other} share {s}", l.node_name);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_vtep_mac_held_by_another_node_is_refused_and_nothing_is_written() {
        let f = start("10.244.0.0/16", Duration::from_secs(3600));
        let a = f.leases.acquire(params("a", "")).await.unwrap();
        let mut spoof = params("mallory", "");
        let v4 = spoof.v4.as_mut().unwrap();
        v4.vtep_mac = a.vtep_mac.parse().ok();
        v4.public_ip = "198.51.100.66".parse().unwrap();
        let e = f.leases.acquire(spoof.clone()).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::AlreadyExists(_)), "{e}");
        assert!(
            e.to_string().contains("vtep_mac") && e.to_string().contains("node a"),
            "{e}"
        );
        let (leases, revision) = f.hub.leases();
        assert_eq!((leases.len(), revision), (1, a.revision), "nothing written");
        // A node may keep its own MAC, and once a's lease is gone the MAC is free.
        f.leases.acquire(params("a", "")).await.unwrap();
        assert!(f.leases.release("a").await.unwrap());
        f.leases.acquire(spoof).await.unwrap();
    }

    #[test]
    fn lease_fields_must_be_unicast_and_outside_the_pod_network() {
        let parse = |ip: &str, mac: &str| {
            AcquireParams::parse(&conf_of("10.244.0.0/16", "vxlan"), "a", fields("", ip, mac))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parse("192.0.2.1", "0a:58:00:00:00:01").is_ok());
        for (ip, mac, field) in [
            ("192.0.2.1", "00:00:00:00:00:00", "vtep_mac"),
            ("192.0.2.1", "ff:ff:ff:ff:ff:ff", "vtep_mac"),
            ("192.0.2.1", "01:00:5e:00:00:01", "vtep_mac"),
            ("0.0.0.0", "0a:58:00:00:00:01", "public_ip"),
            ("127.0.0.1", "0a:58:00:00:00:01", "public_ip"),
            ("224.0.0.5", "0a:58:00:00:00:01", "public_ip"),
            ("255.255.255.255", "0a:58:00:00:00:01", "public_ip"),
            ("10.244.9.1", "0a:58:00:00:00:01", "public_ip"),
        ] {
            let e = parse(ip, mac).unwrap_err();
            assert!(e.contains(field), "{ip} {mac}: {e}");
        }
    }

    #[tokio::test]
    async fn reservations_that_disagree_with_stored_leases_never_yield_a_shared_subnet() {
        // 10.1.0.0/24 in /28s: SubnetMin is 10.1.0.16/28, so 15 subnets.
        let conf = NetConf::parse(
            r#"{"Network": "10.1.0.0/24", "SubnetLen": 28, "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100).unwrap());
        let lease = |node: &str, subnet: &str, rev: u64| Lease {
            node_name: node.into(),
            subnet: subnet.into(),
            public_ip: "192.0.2.1".into(),
            vtep_mac: mac_of(node),
            backend_type: "vxlan".into(),
            expires_at_unix: now_unix() + 3600,
            revision: rev,
            ..Default::default()
        };
        let put = |l: Lease| LeaseEvent {
            r#type: EventType::Put as i32,
            revision: l.revision,
            lease: Some(l),
        };
        // Written straight into the store: what no sequence of API calls makes, but a
        // narrowed range, a restored backup or another version can leave behind.
        let reservations: BTreeMap<String, Reservation> = [
            ("x", "10.1.0.32/28"),  // leased to a
            ("y", "10.1.0.0/28"),   // before SubnetMin
            ("z", "10.1.0.64/28"),  // fine
            ("zz", "10.1.0.64/28"), // the same subnet again
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s.parse().unwrap()))
        .collect();
        store
            .write(&Batch {
                events: &[put(lease("a", "10.1.0.32/28", 1))],
                reservations: Some(&reservations),
                ..Batch::default()
            })
            .await
            .unwrap();
        store.flush().await.unwrap();

        let (leases, hub) = start_on(&conf, store.clone()).await;
        let stale = hub.stale_reservations();
        assert_eq!(
            stale.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["x", "y", "zz"],
            "{stale:?}"
        );
        assert!(stale["x"].contains("leased to node a"), "{stale:?}");
        assert!(stale["y"].contains("outside"), "{stale:?}");
        let y = leases.acquire(params("y", "")).await.unwrap();
        assert_ne!(
            y.subnet, "10.1.0.0/28",
            "a reservation outside the range is not granted"
        );
        let x = leases.acquire(params("x", "")).await.unwrap();
        assert_ne!(x.subnet, "10.1.0.32/28", "held by a");
        assert!(leases.release("x").await.unwrap());
        assert!(
            leases.unreserve("x").await.unwrap(),
            "dropping a stale reservation"
        );
        assert!(leases.release("a").await.unwrap());
        // .32 is free now: exactly one node may get it.
        let mut n = 0;
        loop {
            match leases
                .acquire(params(&format!("n{n}"), "10.1.0.32/28"))
                .await
            {
                Ok(_) => assert_no_shared_subnet(&hub),
                Err(LeaseOpError::Exhausted(_)) => break,
                Err(e) => panic!("{e}"),
            }
            n += 1;
        }
        assert_no_shared_subnet(&hub);
        assert!(
            hub.leases().0.iter().all(|l| l.subnet != "10.1.0.64/28"),
            "z's reserved subnet went to nobody else"
        );
        leases
            .acquire(params("z", ""))
            .await
            .map(|l| assert_eq!(l.subnet, "10.1.0.64/28"))
            .unwrap();
        // What was stored starts again without complaint, and still shares nothing.
        let (again, hub) = start_on(&conf, store.clone()).await;
        assert_no_shared_subnet(&hub);
        assert!(matches!(
            again.acquire(params("late", "")).await.unwrap_err(),
            LeaseOpError::Exhausted(_)
        ));
    }

    /// A sled store whose writes or flushes fail on demand (sled has applied a batch
    /// in memory before its flush can fail, as after a disk error).
    struct FailingStore {
        inner: SledStore,
        fail_write: std::sync::atomic::AtomicBool,
        fail_flush: std::sync::atomic::AtomicBool,
        fail_load: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for FailingStore {
        async fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
            if self.fail_load.load(Ordering::Relaxed) {
                return Err(StoreError::Backend("injected read failure".into()));
            }
            self.inner.load().await
        }
        async fn write(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
            if self.fail_write.load(Ordering::Relaxed) {
                return Err(StoreError::Backend("injected write failure".into()));
            }
            self.inner.write(batch).await
        }
        async fn put_record(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_record(kind, id, value).await
        }
        async fn delete_record(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
            self.inner.delete_record(kind, id).await
        }
        async fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.records(kind).await
        }
        async fn set_layout(&self, layout: &str) -> Result<(), StoreError> {
            self.inner.set_layout(layout).await
        }
        fn size_on_disk(&self) -> u64 {
            self.inner.size_on_disk()
        }
        async fn flush(&self) -> Result<(), StoreError> {
            if self.fail_flush.load(Ordering::Relaxed) {
                return Err(StoreError::Backend("injected flush failure".into()));
            }
            self.inner.flush().await
        }
    }

    /// A failing store (nothing failing yet) in a temp dir, and a network for it.
    fn failing_store() -> (Arc<FailingStore>, NetConf, tempfile::TempDir) {
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore {
            inner: SledStore::open(dir.path(), 100).unwrap(),
            fail_write: false.into(),
            fail_flush: false.into(),
            fail_load: false.into(),
        });
        (store, conf, dir)
    }

    #[tokio::test]
    async fn a_failed_store_write_never_reuses_a_revision_and_memory_matches_the_store() {
        let (failing, conf, _dir) = failing_store();
        let store: Arc<dyn Store> = failing.clone();
        let (leases, hub) = start_on(&conf, store.clone()).await;
        let mut seen: BTreeMap<u64, LeaseEvent> = BTreeMap::new();
        let mut feed = hub.subscribe(0, "").feed;
        let mut record = |feed: &mut tokio::sync::broadcast::Receiver<_>| {
            while let Ok(m) = feed.try_recv() {
                let m: crate::events::WatchMessage = m;
                for part in crate::events::decode(&m.encoded).unwrap() {
                    for e in part.events {
                        if let Some(before) = seen.insert(e.revision, e.clone()) {
                            assert_eq!(
                                before, e,
                                "revision {} announced as two events",
                                e.revision
                            );
                        }
                    }
                }
            }
        };
        leases.acquire(params("a", "")).await.unwrap();

        // The flush fails after sled applied the batch; the write fails before it.
        failing.fail_flush.store(true, Ordering::Relaxed);
        let e = leases.acquire(params("b", "")).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
        assert!(e.to_string().contains("may or may not"), "{e}");
        failing.fail_flush.store(false, Ordering::Relaxed);
        failing.fail_write.store(true, Ordering::Relaxed);
        let e = leases.acquire(params("c", "")).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
        failing.fail_write.store(false, Ordering::Relaxed);

        let stored = store.load().await.unwrap();
        let names = |ls: &[Lease]| {
            let mut v: Vec<(String, String, u64)> = ls
                .iter()
                .map(|l| (l.node_name.clone(), l.subnet.clone(), l.revision))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(&hub.leases().0),
            names(&stored.leases),
            "memory is what the store holds"
        );
        let d = leases.acquire(params("d", "")).await.unwrap();
        assert!(
            d.revision > stored.revision,
            "revision {} reused",
            d.revision
        );
        record(&mut feed);
        assert_no_shared_subnet(&hub);

        // A restart serves exactly what watchers were told, with the same revisions.
        let (_again, restarted) = start_on(&conf, store.clone()).await;
        assert_eq!(names(&restarted.leases().0), names(&hub.leases().0));
        for e in store.load().await.unwrap().history {
            if let Some(told) = seen.get(&e.revision) {
                assert_eq!(told, &e, "stored history differs from what was announced");
            }
        }
        assert!(leases.is_running());
    }

    #[tokio::test]
    async fn an_unchanged_renewal_costs_no_revision_and_a_changed_one_does() {
        let f = start("10.244.0.0/16", Duration::from_secs(3600));
        let a = f.leases.acquire(params("a", "")).await.unwrap();
        let mut feed = f.hub.subscribe(a.revision, "").feed;
        let again = f.leases.acquire(params("a", "")).await.unwrap();
        assert_eq!(
            (again.subnet.as_str(), again.revision),
            (a.subnet.as_str(), a.revision)
        );
        assert!(feed.try_recv().is_err(), "no watcher woken");
        assert_eq!(f.hub.leases().1, a.revision);
        let mut moved = params("a", "");
        moved.v4.as_mut().unwrap().public_ip = "192.0.2.77".parse().unwrap();
        let moved = f.leases.acquire(moved).await.unwrap();
        assert_eq!(moved.subnet, a.subnet);
        assert!(
            moved.revision > a.revision,
            "a new address is news to every peer"
        );
        assert!(feed.recv().await.is_ok());
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_read_back_stops_the_writer_visibly() {
        let (failing, conf, _dir) = failing_store();
        failing.fail_flush.store(true, Ordering::Relaxed);
        let (leases, _hub) = start_on(&conf, failing.clone()).await;
        failing.fail_load.store(true, Ordering::Relaxed);
        assert!(leases.is_running());
        let e = leases.acquire(params("a", "")).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::Store(_)), "{e}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while leases.is_running() {
            assert!(Instant::now() < deadline, "the writer should have stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = leases.acquire(params("b", "")).await.unwrap_err();
        assert!(matches!(e, LeaseOpError::Stopped), "{e}");
    }
}
