//! Lease allocation and the single lease writer.
//!
//! Every change to the lease table goes through one task (`Writer`, on a thread of its
//! own): it takes a batch of queued requests, decides each one against the allocator,
//! writes the batch to the store, flushes once (group commit: a join storm costs one
//! fsync per batch, not per node), then commits the events to the `Hub` (in a burst
//! with thousands of watchers, the batches of a few milliseconds together) and answers. A reply therefore always
//! means "durably stored, and visible to watchers".

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use twill_common::lease::{parse_subnet, validate_node_name, Mac};
use twill_common::NetConf;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use crate::alloc::Allocator;
use crate::events::Hub;
use crate::metrics::{now_unix, Metrics};
use crate::store::{Store, StoreError};

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

/// Why a lease operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseOpError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// No free subnet is left.
    #[error("{0}")]
    Exhausted(String),
    /// The request conflicts with the current table (e.g. a reservation of a leased subnet).
    #[error("{0}")]
    Conflict(String),
    /// The store failed; nothing was acknowledged.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The controller is shutting down.
    #[error("the controller is shutting down")]
    Stopped,
}

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct AcquireParams {
    /// The node (from its certificate).
    pub node: String,
    /// Subnet from the node's previous subnet.env, if any.
    pub requested: Option<Ipv4Net>,
    /// The node's public address.
    pub public_ip: Ipv4Addr,
    /// The node's VTEP MAC.
    pub vtep_mac: Mac,
}

impl AcquireParams {
    /// Validates the raw request fields; errors name the field.
    pub fn parse(
        node: &str,
        requested: &str,
        public_ip: &str,
        backend: &str,
        vtep_mac: &str,
    ) -> Result<Self, LeaseOpError> {
        let invalid = |m: String| LeaseOpError::Invalid(m);
        validate_node_name(node).map_err(|e| invalid(e.to_string()))?;
        if !(backend.is_empty() || backend == "vxlan") {
            return Err(invalid(format!(
                "backend_type {backend:?} is not supported: this controller runs \"vxlan\""
            )));
        }
        let requested = match requested {
            "" => None,
            s => Some(parse_subnet(s).map_err(|e| invalid(format!("requested_subnet: {e}")))?),
        };
        let public_ip = public_ip
            .parse()
            .map_err(|_| invalid(format!("public_ip {public_ip:?} is not an IPv4 address")))?;
        let vtep_mac = vtep_mac
            .parse()
            .map_err(|e| invalid(format!("vtep_mac: {e}")))?;
        Ok(AcquireParams {
            node: node.to_string(),
            requested,
            public_ip,
            vtep_mac,
        })
    }
}

enum Op {
    Acquire(AcquireParams),
    Release(String),
    Revoke { node: String, by: String },
    Reserve { node: String, subnet: Ipv4Net },
    Unreserve(String),
    Sweep,
}

/// What a successful operation returns.
enum Outcome {
    Lease(Box<Lease>),
    Done(bool),
}

type Reply = oneshot::Sender<Result<Outcome, LeaseOpError>>;

/// An operation, who waits for it, and when it was queued.
type Queued = (Op, Option<Reply>, Instant);

/// A decided request's answer, sent once its events are published.
type Answer = (Reply, Result<Outcome, LeaseOpError>, Instant);

/// Handle to the lease writer; cheap to clone.
#[derive(Clone)]
pub struct Leases {
    tx: mpsc::Sender<Queued>,
    ttl: Duration,
}

impl Leases {
    /// Starts the writer over a loaded store. `hub` must hold the same leases;
    /// `reservations` maps node names to their reserved subnets.
    pub fn start(
        conf: &NetConf,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        reservations: BTreeMap<String, Ipv4Net>,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let (leases, revision) = hub.leases();
        let mut writer = Writer {
            conf: conf.clone(),
            store,
            hub,
            ttl,
            alloc: Allocator::new(conf),
            leases: BTreeMap::new(),
            reservations,
            revision,
            metrics,
            unpublished: Vec::new(),
            waiting: Vec::new(),
            last_publish: Instant::now(),
        };
        writer.rebuild(leases)?;
        writer.update_gauges();
        writer.hub.set_reservations(writer.reservations.clone());
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        // The writer gets an OS thread of its own instead of a place in the shared
        // runtime: after a commit, thousands of watch streams wake at once, and a
        // writer queued behind them waited seconds to take the next batch (perf and
        // flush timings in a 5,000-node join storm), which stalled every grant.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the lease writer: {e}"))?;
        std::thread::Builder::new()
            .name("lease-writer".into())
            .spawn(move || runtime.block_on(writer.run(rx)))
            .map_err(|e| format!("cannot start the lease writer thread: {e}"))?;
        let sweeper = tx.clone();
        tokio::spawn(async move {
            let period = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if sweeper
                    .send((Op::Sweep, None, Instant::now()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Leases { tx, ttl })
    }

    /// Lease time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn call(&self, op: Op) -> Result<Outcome, LeaseOpError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((op, Some(reply), Instant::now()))
            .await
            .map_err(|_| LeaseOpError::Stopped)?;
        rx.await.map_err(|_| LeaseOpError::Stopped)?
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

    /// Reserves `subnet` for `node`: nobody else is ever given it.
    pub async fn reserve(&self, node: &str, subnet: Ipv4Net) -> Result<(), LeaseOpError> {
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

struct Writer {
    conf: NetConf,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    ttl: Duration,
    alloc: Allocator,
    leases: BTreeMap<String, Lease>,
    reservations: BTreeMap<String, Ipv4Net>,
    revision: u64,
    metrics: Arc<Metrics>,
    /// Durable events not yet published, and the answers waiting for them: a reply
    /// means stored and visible to every reader of the hub.
    unpublished: Vec<LeaseEvent>,
    waiting: Vec<Answer>,
    last_publish: Instant,
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
            self.process(std::mem::take(&mut ops)).await;
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
        for (reply, result, queued) in self.waiting.drain(..) {
            self.metrics
                .allocation_seconds
                .observe(queued.elapsed().as_secs_f64());
            // A caller that went away no longer needs its answer.
            let _ = reply.send(result);
        }
    }

    async fn process(&mut self, ops: Vec<Queued>) {
        let start_revision = self.revision;
        let mut events = Vec::new();
        let mut replies = Vec::with_capacity(ops.len());
        let mut reservations_changed = false;
        let now = now_unix();
        for (op, reply, queued) in ops {
            let result = match op {
                Op::Acquire(p) => self
                    .acquire(p, now, &mut events)
                    .map(|l| Outcome::Lease(Box::new(l))),
                Op::Release(node) => {
                    let released = self.remove(&node, &mut events);
                    if released {
                        info!(node = %node, "lease released by its agent");
                    }
                    Ok(Outcome::Done(released))
                }
                Op::Revoke { node, by } => {
                    let revoked = self.remove(&node, &mut events);
                    if revoked {
                        info!(node = %node, admin = %by, "lease revoked");
                    }
                    Ok(Outcome::Done(revoked))
                }
                Op::Reserve { node, subnet } => {
                    let r = self.reserve(&node, subnet);
                    reservations_changed |= r.is_ok();
                    r.map(|()| Outcome::Done(true))
                }
                Op::Unreserve(node) => {
                    let done = self.unreserve(&node);
                    reservations_changed |= done;
                    Ok(Outcome::Done(done))
                }
                Op::Sweep => {
                    self.sweep(now, &mut events);
                    continue;
                }
            };
            if let Some(reply) = reply {
                replies.push((reply, result, queued));
            }
        }
        if !events.is_empty() || reservations_changed {
            if let Err(e) = self.persist(&events, reservations_changed).await {
                warn!(error = %e, "store write failed; nothing in this batch was acknowledged");
                // Earlier batches are durable: publish them, so that the rollback (to
                // what the hub holds) keeps them.
                self.publish();
                self.rollback(start_revision);
                for (reply, _, _) in replies {
                    let _ =
                        reply.send(Err(LeaseOpError::Store(StoreError::Backend(e.to_string()))));
                }
                return;
            }
            self.unpublished.extend(events);
            if reservations_changed {
                self.hub.set_reservations(self.reservations.clone());
            }
            self.update_gauges();
        }
        self.waiting.extend(replies);
    }

    async fn persist(
        &self,
        events: &[LeaseEvent],
        reservations_changed: bool,
    ) -> Result<(), StoreError> {
        self.store.apply(events)?;
        if reservations_changed {
            self.store.set_reservations(&self.reservations)?;
        }
        let started = Instant::now();
        self.store.flush().await?;
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            events = events.len(),
            flush_ms = started.elapsed().as_millis() as u64,
            "batch flushed"
        );
        Ok(())
    }

    /// Forgets undurable decisions: back to what the hub (the committed table) and the
    /// store hold.
    fn rollback(&mut self, revision: u64) {
        let (leases, _) = self.hub.leases();
        if let Ok(snap) = self.store.load() {
            self.reservations = snap.reservations;
        }
        if let Err(e) = self.rebuild(leases) {
            warn!(error = %e, "rebuilding the subnet index after a failed write");
        }
        self.revision = revision;
    }

    /// Rebuilds the lease map and the free-subnet index from `leases` and the
    /// reservations.
    fn rebuild(&mut self, leases: Vec<Lease>) -> Result<(), String> {
        self.alloc = Allocator::new(&self.conf);
        self.leases.clear();
        for l in leases {
            let subnet = parse_subnet(&l.subnet)
                .map_err(|e| format!("stored lease of {}: {e}", l.node_name))?;
            if !self.alloc.take(subnet) {
                return Err(format!(
                    "stored lease of {} holds {subnet}, which is outside SubnetMin..SubnetMax of the \
                     configured network or overlaps another lease; restore the previous net-conf.json \
                     or move the data directory aside to start a new network",
                    l.node_name
                ));
            }
            self.leases.insert(l.node_name.clone(), l);
        }
        for (node, subnet) in &self.reservations {
            let held_by_node = self
                .leases
                .get(node)
                .is_some_and(|l| l.subnet == subnet.to_string());
            if !held_by_node && !self.alloc.take(*subnet) {
                warn!(node = %node, subnet = %subnet, "reservation is outside the range or held by another node; ignoring it until that changes");
            }
        }
        Ok(())
    }

    fn update_gauges(&self) {
        self.metrics.leases.set(self.leases.len() as i64);
        self.metrics
            .subnets_free
            .set(i64::from(self.alloc.capacity()) - i64::from(self.alloc.taken()));
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn acquire(
        &mut self,
        p: AcquireParams,
        now: i64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<Lease, LeaseOpError> {
        if let Some(r) = p.requested {
            if !self.conf.network.contains(&r) || r.prefix_len() != self.conf.subnet_len {
                return Err(LeaseOpError::Invalid(format!(
                    "requested_subnet {r} is not a /{} subnet of Network {}",
                    self.conf.subnet_len, self.conf.network
                )));
            }
        }
        let expires = now + self.ttl.as_secs() as i64;
        let existing = self
            .leases
            .get(&p.node)
            .filter(|l| l.expires_at_unix > now)
            .cloned();
        let (subnet, renewal) = match existing {
            Some(l) => {
                let subnet =
                    parse_subnet(&l.subnet).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
                if let Some(r) = p.requested.filter(|r| *r != subnet) {
                    info!(node = %p.node, subnet = %subnet, requested = %r, "node asked for another subnet; keeping the one it holds");
                }
                (subnet, true)
            }
            None => {
                // An expired lease not yet swept: give its subnet back first.
                if let Some(old) = self.leases.remove(&p.node) {
                    warn!(node = %p.node, subnet = %old.subnet, expired_secs_ago = now - old.expires_at_unix, "renewal missed: the lease had expired; granting again");
                    if let Ok(s) = parse_subnet(&old.subnet) {
                        self.free(&p.node, s);
                    }
                }
                (self.pick(&p)?, false)
            }
        };
        let lease = Lease {
            node_name: p.node.clone(),
            subnet: subnet.to_string(),
            public_ip: p.public_ip.to_string(),
            backend_type: "vxlan".into(),
            vtep_mac: p.vtep_mac.to_string(),
            expires_at_unix: expires,
            revision: self.next_revision(),
            vni: self.conf.backend.vni,
            reserved: false,
        };
        if renewal {
            tracing::debug!(node = %p.node, subnet = %subnet, revision = lease.revision, "lease renewed");
        } else {
            info!(node = %p.node, subnet = %subnet, public_ip = %p.public_ip, revision = lease.revision, "lease granted");
        }
        self.leases.insert(p.node, lease.clone());
        events.push(LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(lease.clone()),
            revision: lease.revision,
        });
        Ok(lease)
    }

    fn pick(&mut self, p: &AcquireParams) -> Result<Ipv4Net, LeaseOpError> {
        if let Some(reserved) = self.reservations.get(&p.node) {
            // Its bit is already set on the node's behalf, unless another node held it
            // when the reservation was loaded.
            if !self
                .leases
                .values()
                .any(|l| l.subnet == reserved.to_string())
            {
                info!(node = %p.node, subnet = %reserved, "granting the node its reserved subnet");
                return Ok(*reserved);
            }
            warn!(node = %p.node, subnet = %reserved, "reserved subnet is held by another node; allocating another");
        }
        if let Some(r) = p.requested {
            if self.alloc.take(r) {
                return Ok(r);
            }
            let why = if self.conf.index_of(r).is_none() {
                "it is outside SubnetMin..SubnetMax"
            } else {
                "another node holds it"
            };
            info!(node = %p.node, requested = %r, "requested subnet not granted: {why}; allocating a fresh one");
        }
        self.alloc.allocate().ok_or_else(|| {
            warn!(node = %p.node, "out of subnets");
            LeaseOpError::Exhausted(format!(
                "out of subnets: all {} subnets between SubnetMin {} and SubnetMax {} are leased",
                self.alloc.capacity(),
                self.conf.subnet_min,
                self.conf.subnet_max
            ))
        })
    }

    fn remove(&mut self, node: &str, events: &mut Vec<LeaseEvent>) -> bool {
        let Some(mut lease) = self.leases.remove(node) else {
            return false;
        };
        if let Ok(s) = parse_subnet(&lease.subnet) {
            self.free(node, s);
        }
        lease.revision = self.next_revision();
        events.push(LeaseEvent {
            r#type: EventType::Delete as i32,
            revision: lease.revision,
            lease: Some(lease),
        });
        true
    }

    /// Returns a subnet to the pool unless it is reserved for `node`.
    fn free(&mut self, node: &str, subnet: Ipv4Net) {
        if self.reservations.get(node) != Some(&subnet) {
            self.alloc.free(subnet);
        }
    }

    fn reserve(&mut self, node: &str, subnet: Ipv4Net) -> Result<(), LeaseOpError> {
        validate_node_name(node).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
        if self.conf.index_of(subnet).is_none() {
            return Err(LeaseOpError::Invalid(format!(
                "{subnet} is not a /{} subnet between SubnetMin {} and SubnetMax {}",
                self.conf.subnet_len, self.conf.subnet_min, self.conf.subnet_max
            )));
        }
        if let Some((other, _)) = self
            .reservations
            .iter()
            .find(|(n, s)| **s == subnet && n.as_str() != node)
        {
            return Err(LeaseOpError::Conflict(format!(
                "{subnet} is already reserved for node {other}"
            )));
        }
        if let Some(holder) = self
            .leases
            .values()
            .find(|l| l.subnet == subnet.to_string() && l.node_name != node)
        {
            return Err(LeaseOpError::Conflict(format!(
                "{subnet} is leased to node {}; revoke that lease first",
                holder.node_name
            )));
        }
        if let Some(own) = self
            .leases
            .get(node)
            .filter(|l| l.subnet != subnet.to_string())
        {
            return Err(LeaseOpError::Conflict(format!(
                "node {node} holds {}; revoke its lease first or reserve that subnet",
                own.subnet
            )));
        }
        if let Some(previous) = self.reservations.insert(node.to_string(), subnet) {
            if previous != subnet && !self.leases.contains_key(node) {
                self.alloc.free(previous);
            }
        }
        // Taken now, so the allocator never hands it to anyone else.
        self.alloc.take(subnet);
        info!(node = %node, subnet = %subnet, "subnet reserved");
        Ok(())
    }

    fn unreserve(&mut self, node: &str) -> bool {
        let Some(subnet) = self.reservations.remove(node) else {
            return false;
        };
        if !self.leases.contains_key(node) {
            self.alloc.free(subnet);
        }
        info!(node = %node, subnet = %subnet, "reservation removed");
        true
    }

    fn sweep(&mut self, now: i64, events: &mut Vec<LeaseEvent>) {
        let expired: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.expires_at_unix <= now)
            .map(|l| l.node_name.clone())
            .collect();
        for node in expired {
            let subnet = self
                .leases
                .get(&node)
                .map(|l| l.subnet.clone())
                .unwrap_or_default();
            info!(node = %node, subnet = %subnet, "lease expired");
            self.remove(&node, events);
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

    fn params(node: &str, requested: &str) -> AcquireParams {
        AcquireParams::parse(node, requested, "192.0.2.1", "vxlan", "0a:00:00:00:00:01").unwrap()
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
        assert!(again.revision > b.revision);
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
        f.leases.reserve("x", reserved).await.unwrap();
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
        let mut sub = f.hub.subscribe(0);
        f.leases.acquire(params("a", "")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let batch = tokio::time::timeout_at(deadline, sub.feed.recv())
                .await
                .expect("expiry")
                .unwrap();
            let batch = crate::events::decode(&batch.encoded).unwrap();
            if batch
                .events
                .iter()
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
        assert!(e(AcquireParams::parse(
            "",
            "",
            "192.0.2.1",
            "vxlan",
            "0a:00:00:00:00:01"
        ))
        .contains("empty"));
        assert!(e(AcquireParams::parse(
            "a",
            "10.244.1.5/24",
            "192.0.2.1",
            "vxlan",
            "0a:00:00:00:00:01"
        ))
        .contains("requested_subnet"));
        assert!(e(AcquireParams::parse(
            "a",
            "",
            "nope",
            "vxlan",
            "0a:00:00:00:00:01"
        ))
        .contains("public_ip"));
        assert!(e(AcquireParams::parse(
            "a",
            "",
            "192.0.2.1",
            "udp",
            "0a:00:00:00:00:01"
        ))
        .contains("backend_type"));
        assert!(e(AcquireParams::parse("a", "", "192.0.2.1", "vxlan", "zz")).contains("vtep_mac"));
    }
}
