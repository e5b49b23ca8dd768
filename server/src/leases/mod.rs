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
//! a lease's addresses change, and it is released, only by its holder's key (the key
//! of the certificate that took it, or of one renewed from it: `Lease.holder_key`);
//! a subnet's bit in the allocator is set exactly when a lease holds it or a
//! reservation that can be honoured keeps it; a revision is never issued twice. When
//! the store fails, the writer reloads what the store holds instead of guessing.

mod pacing;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use twill_common::model::{self, validate_node_name, Family, Mac, Peer, PerFamily};
use twill_common::NetConf;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use crate::events::Hub;
use twill_common::now_unix;

use crate::metrics::Metrics;
use crate::store::{Batch, Reservation, Store, StoreError};
use crate::subnets::{self, FamilySubnets, Refusal};
use pacing::Pacing;

/// Requests queued beyond this wait for room (backpressure instead of unbounded memory).
const QUEUE_LEN: usize = 4096;
/// Requests decided and flushed together at most.
const MAX_BATCH: usize = 1024;
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
    /// The caller's key does not hold the lease it would change or release.
    #[error("{0}")]
    Forbidden(String),
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

pub use request::{AcquireParams, FamilyRequest};

impl From<Refusal> for LeaseOpError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid(m) => LeaseOpError::Invalid(m),
            Refusal::Conflict(m) => LeaseOpError::Conflict(m),
            Refusal::Exhausted(m) => LeaseOpError::Exhausted(m),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, LeaseOpError>>;

/// An operation, with the channel its caller waits on (the periodic sweep has none).
enum Op {
    Acquire(AcquireParams, Reply<Lease>),
    Release {
        node: String,
        key: Vec<u8>,
        reply: Reply<bool>,
    },
    /// The lease held by key `from` passes to key `to` (a renewed certificate); with
    /// `from` empty the lease is held by nobody until its next acquisition (the node's
    /// certificates were revoked).
    Rekey {
        node: String,
        from: Vec<u8>,
        to: Vec<u8>,
        reply: Reply<bool>,
    },
    Revoke {
        node: String,
        by: String,
        reply: Reply<bool>,
    },
    Reserve {
        node: String,
        subnet: Reservation,
        reply: Reply<bool>,
    },
    Unreserve(String, Reply<bool>),
    Sweep,
}

/// An operation and when it was queued.
struct Queued {
    op: Op,
    queued: Instant,
}

/// A decided request's answer, sent once its events are published: the lease, or
/// whether the operation changed anything.
enum Answer {
    Lease(Reply<Lease>, Result<Lease, LeaseOpError>),
    Done(Reply<bool>, Result<bool, LeaseOpError>),
}

impl Answer {
    fn send(self) {
        // A caller that went away no longer needs its answer.
        let _ = match self {
            Answer::Lease(reply, result) => reply.send(result).map_err(drop),
            Answer::Done(reply, result) => reply.send(result).map_err(drop),
        };
    }

    /// After a failed write: a change that was decided becomes the error `e`;
    /// refusals wrote nothing and stay what they were.
    fn failed(self, e: impl Fn() -> LeaseOpError) -> Answer {
        match self {
            Answer::Lease(reply, Ok(_)) => Answer::Lease(reply, Err(e())),
            Answer::Done(reply, Ok(_)) => Answer::Done(reply, Err(e())),
            refused => refused,
        }
    }
}

/// An answer and when its request was queued.
struct Waiting {
    answer: Answer,
    queued: Instant,
}

/// Handle to the lease writer; cheap to clone. With the etcd store a replica holds a
/// writer only while it leads: `standby` makes a handle without one, `attach` and
/// `detach` follow the election.
#[derive(Clone)]
pub struct Leases {
    writer: Arc<parking_lot::RwLock<Option<Running>>>,
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
            subnets: PerFamily::default(),
            leases: BTreeMap::new(),
            by_mac: HashMap::new(),
            revision,
            metrics,
            unpublished: Vec::new(),
            waiting: Vec::new(),
            pacing: Pacing::default(),
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
                    queued: Instant::now(),
                };
                if tx.send(sweep).await.is_err() {
                    return;
                }
            }
        });
        *self.writer.write() = Some(Running { tx, running });
        Ok(())
    }

    /// Lets the writer go: it finishes what it holds and stops; later operations
    /// answer `NotLeader`.
    pub fn detach(&self) {
        self.writer.write().take();
    }

    fn running(&self) -> Option<Running> {
        self.writer.read().clone()
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

    /// Queues the operation `op` makes around its reply channel and waits for the
    /// answer.
    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, LeaseOpError> {
        let (reply, rx) = oneshot::channel();
        let queued = Queued {
            op: op(reply),
            queued: Instant::now(),
        };
        let Some(writer) = self.running() else {
            return Err(LeaseOpError::NotLeader);
        };
        writer.tx.send(queued).await.map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Acquires or renews a lease; returns once it is durable.
    pub async fn acquire(&self, params: AcquireParams) -> Result<Lease, LeaseOpError> {
        self.call(|reply| Op::Acquire(params, reply)).await
    }

    /// Releases a node's lease at its agent's request, made with the certificate key
    /// `key`; `Ok(false)` when it held none.
    pub async fn release(&self, node: &str, key: &[u8]) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Release {
            node: node.to_string(),
            key: key.to_vec(),
            reply,
        })
        .await
    }

    /// Hands `node`'s lease from its holder's key `from` to the key `to` of the
    /// certificate renewed from it; `Ok(false)` when the node holds no lease, or one
    /// another key holds.
    pub async fn rekey(
        &self,
        node: &str,
        from: [u8; 32],
        to: [u8; 32],
    ) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Rekey {
            node: node.to_string(),
            from: from.to_vec(),
            to: to.to_vec(),
            reply,
        })
        .await
    }

    /// Frees `node`'s lease from the key that holds it (its certificates were revoked):
    /// the next certificate of the node to acquire it holds it.
    pub async fn disown(&self, node: &str) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Rekey {
            node: node.to_string(),
            from: Vec::new(),
            to: Vec::new(),
            reply,
        })
        .await
    }

    /// Removes a node's lease on an operator's order; `Ok(false)` when it held none.
    pub async fn revoke(&self, node: &str, by: &str) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Revoke {
            node: node.to_string(),
            by: by.to_string(),
            reply,
        })
        .await
    }

    /// Reserves `subnet` (one subnet per family) for `node`, replacing the node's
    /// reservation: nobody else is ever given them.
    pub async fn reserve(&self, node: &str, subnet: Reservation) -> Result<(), LeaseOpError> {
        self.call(|reply| Op::Reserve {
            node: node.to_string(),
            subnet,
            reply,
        })
        .await
        .map(|_| ())
    }

    /// Drops a node's reservation; `Ok(false)` when it had none.
    pub async fn unreserve(&self, node: &str) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Unreserve(node.to_string(), reply))
            .await
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
    subnets: PerFamily<Box<dyn FamilySubnets>>,
    leases: BTreeMap<String, model::Lease>,
    /// The node holding each VTEP MAC (both devices' MACs share one index: no MAC may
    /// name two nodes).
    by_mac: HashMap<Mac, String>,
    revision: u64,
    metrics: Arc<Metrics>,
    /// Durable events not yet published, and the answers waiting for them: a reply
    /// means stored and visible to every reader of the hub.
    unpublished: Vec<LeaseEvent>,
    waiting: Vec<Waiting>,
    pacing: Pacing,
}

/// What a network without `family` lacks, for refusals.
fn missing(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4 (EnableIPv4 is false)",
        Family::V6 => "IPv6 (EnableIPv6 is not set)",
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = if self.unpublished.is_empty() {
                rx.recv_many(&mut ops, MAX_BATCH).await
            } else {
                let due = tokio::time::Instant::from_std(self.pacing.due(self.hub.watchers()));
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
            if self.unpublished.is_empty() || self.pacing.is_due(self.hub.watchers()) {
                self.publish();
            }
        }
    }

    /// Commits the unpublished events to the hub and sends the answers that waited.
    fn publish(&mut self) {
        if !self.unpublished.is_empty() {
            self.hub.commit(std::mem::take(&mut self.unpublished));
            self.pacing.published();
        }
        for w in self.waiting.drain(..) {
            self.metrics
                .allocation_seconds
                .observe(w.queued.elapsed().as_secs_f64());
            w.answer.send();
        }
    }

    /// Decides, stores and queues the answers of one batch. False when the writer must
    /// stop (the store failed and could not be read back).
    async fn process(&mut self, ops: Vec<Queued>) -> bool {
        let mut changes = Changes::default();
        let mut answers = Vec::with_capacity(ops.len());
        let now = now_unix();
        for Queued { op, queued } in ops {
            let answer = match op {
                Op::Acquire(p, reply) => Answer::Lease(reply, self.acquire(p, now, &mut changes)),
                Op::Release { node, key, reply } => {
                    let released = self.release(&node, &key, &mut changes.events);
                    if let Ok(true) = released {
                        info!(node = %node, "lease released by its agent");
                    }
                    Answer::Done(reply, released)
                }
                Op::Rekey {
                    node,
                    from,
                    to,
                    reply,
                } => Answer::Done(reply, Ok(self.rekey(&node, &from, to, &mut changes))),
                Op::Revoke { node, by, reply } => {
                    let revoked = self.remove(&node, &mut changes.events);
                    if revoked {
                        info!(node = %node, admin = %by, "lease revoked");
                    }
                    Answer::Done(reply, Ok(revoked))
                }
                Op::Reserve {
                    node,
                    subnet,
                    reply,
                } => {
                    let r = self.reserve(&node, subnet);
                    changes.reservations |= r.is_ok();
                    Answer::Done(reply, r.map(|()| true))
                }
                Op::Unreserve(node, reply) => {
                    let done = self.unreserve(&node);
                    changes.reservations |= done;
                    Answer::Done(reply, Ok(done))
                }
                Op::Sweep => {
                    self.sweep(now, &mut changes.events);
                    continue;
                }
            };
            answers.push(Waiting { answer, queued });
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
    async fn recover(&mut self, e: StoreError, answers: Vec<Waiting>) -> bool {
        self.metrics.store_failures.inc();
        // Earlier batches are durable: publish them first.
        self.publish();
        if let StoreError::NotLeader(why) = &e {
            // Deposed: the new leader decides from now on, from what etcd holds.
            warn!(reason = %why, "lost the leadership while writing; the lease writer stops");
            for w in answers {
                w.answer.failed(|| LeaseOpError::NotLeader).send();
            }
            return false;
        }
        let message = format!(
            "the lease store failed while writing this change ({e}); it may or may not have \
             been stored, and the controller now serves what the store holds: retry (a retry \
             of the same request is safe)"
        );
        let reloaded = self.store.load().await;
        for w in answers {
            w.answer
                .failed(|| LeaseOpError::Store(StoreError::Backend(message.clone())))
                .send();
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

    /// Takes the reservations (as the store holds them) for the next `rebuild`. A
    /// part for a family the network does not have cannot be honoured and is dropped
    /// (the store layout pins the families, so only a hand-edited store holds one).
    fn load_reservations(&mut self, all: BTreeMap<String, Reservation>) {
        let parts: Vec<(String, PerFamily<IpNet>)> =
            all.iter().map(|(node, r)| (node.clone(), r.0)).collect();
        let networks = self.conf.networks();
        for (node, p) in &parts {
            for (family, s) in p.iter().filter(|(f, _)| !networks.has(*f)) {
                warn!(node = %node, subnet = %s, "dropping a stored {family} reservation: the network has no {family}");
            }
        }
        let of = |family: Family| {
            parts
                .iter()
                .filter_map(move |(node, p)| p.get(family).map(|s| (node.clone(), *s)))
        };
        self.subnets = PerFamily::new(
            self.conf
                .ipv4
                .clone()
                .map(|pool| subnets::family(pool, of(Family::V4))),
            self.conf
                .ipv6
                .clone()
                .map(|pool| subnets::family(pool, of(Family::V6))),
        );
    }

    /// Rebuilds the lease map, its indexes and the free-subnet indexes from `leases` and
    /// the reservations; reservations that cannot be honoured are recorded as stale.
    fn rebuild(&mut self, leases: Vec<Lease>) -> Result<(), String> {
        for (_, f) in self.subnets.iter_mut() {
            f.reset();
        }
        self.leases.clear();
        self.by_mac.clear();
        // Every lease holds a subnet of the network's first family; an IPv6 subnet is
        // optional on a dual-stack network (a lease granted before the network had IPv6
        // gets one at its next renewal).
        let first = self.subnets.iter().next().map(|(f, _)| f);
        for stored in leases {
            let l = model::Lease::try_from(&stored).map_err(|e| {
                format!(
                    "stored lease of {} cannot be read ({e}); restore the previous \
                     net-conf.json or move the data directory aside to start a new network",
                    stored.node_name
                )
            })?;
            for (family, f) in self.subnets.iter_mut() {
                match l.parts.get(family) {
                    Some(p) => f.restore(&l.node, p.subnet)?,
                    None if Some(family) == first => {
                        return Err(format!(
                            "stored lease of {} has no {family} subnet, which the configured \
                             network needs; restore the previous net-conf.json or move the \
                             data directory aside to start a new network",
                            l.node
                        ))
                    }
                    None => {}
                }
            }
            for m in l.macs() {
                if let Some(other) = self.by_mac.get(&m) {
                    warn!(node = %l.node, other = %other, vtep_mac = %m, "stored leases share a VTEP MAC; the next acquisition of either must change it");
                }
            }
            self.index_macs(&l);
            self.leases.insert(l.node.to_string(), l);
        }
        for (_, f) in self.subnets.iter_mut() {
            f.honour_reservations();
        }
        Ok(())
    }

    /// Every reservation, both families of a node together.
    fn reservations(&self) -> BTreeMap<String, Reservation> {
        let mut all: BTreeMap<String, Reservation> = BTreeMap::new();
        for (node, s) in self.subnets.values().flat_map(|f| f.reservations()) {
            *all.entry(node).or_default().0.slot(Family::of_net(s)) = Some(s);
        }
        all
    }

    /// Publishes the reservations and why some cannot be honoured, when they changed
    /// (`stored`: the set itself was just written) or a family's view moved.
    fn publish_reservations_if_changed(&mut self, stored: bool) {
        // Every family's flag is taken (no short circuit).
        let moved = self
            .subnets
            .iter_mut()
            .fold(false, |moved, (_, f)| f.take_changed() | moved);
        if stored || moved {
            self.publish_reservations();
        }
    }

    fn publish_reservations(&self) {
        let mut stale: BTreeMap<String, String> = BTreeMap::new();
        for (node, why) in self.subnets.values().flat_map(|f| f.stale()) {
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
        let (capacity, taken) = self
            .subnets
            .first()
            .map_or((0, 0), |f| (f.capacity(), f.taken()));
        self.metrics
            .subnets_free
            .set(i64::from(capacity) - i64::from(taken));
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn index_macs(&mut self, l: &model::Lease) {
        for m in l.macs() {
            self.by_mac.entry(m).or_insert_with(|| l.node.to_string());
        }
    }

    fn unindex_macs(&mut self, l: &model::Lease) {
        for m in l.macs() {
            if self.by_mac.get(&m).is_some_and(|n| *n == *l.node) {
                self.by_mac.remove(&m);
            }
        }
    }

    /// Forgets a lease that ended: its MACs and its subnets go back.
    fn forget(&mut self, l: &model::Lease) {
        self.unindex_macs(l);
        for (family, f) in self.subnets.iter_mut() {
            if let Some(p) = l.parts.get(family) {
                f.free(p.subnet, &l.node);
            }
        }
    }

    fn acquire(
        &mut self,
        p: AcquireParams,
        now: i64,
        changes: &mut Changes,
    ) -> Result<Lease, LeaseOpError> {
        for (family, r) in p.parts.iter() {
            if let (Some(f), Some(requested)) = (self.subnets.get(family), r.requested) {
                f.check_requested(family.wire().requested, requested)?;
            }
        }
        if let Some((mac, holder)) = p
            .macs()
            .find_map(|m| self.by_mac.get(&m).map(|h| (m, h)))
            .filter(|(_, h)| **h != *p.node)
        {
            warn!(node = %p.node, vtep_mac = %mac, holder = %holder, "refused a lease whose VTEP MAC another node holds");
            return Err(LeaseOpError::AlreadyExists(format!(
                "vtep_mac {mac} is the VTEP MAC of node {holder}'s lease; every node's VXLAN device \
                 needs a MAC of its own (delete and recreate the device to get a new one)"
            )));
        }
        let expires = now.saturating_add(self.ttl.as_secs() as i64);
        let existing = self
            .leases
            .get(p.node.as_str())
            .filter(|l| l.expires_at_unix > now)
            .cloned();
        // Whose the lease is: the holder's, or nobody's yet (granted before holders
        // were kept, or its certificates revoked) and then the caller's from now on.
        let holder = match existing.as_ref().map(|l| &l.holder_key) {
            Some(h) if !h.is_empty() => h.clone(),
            _ => p.key.clone(),
        };
        let endpoints = p.parts.map(|_, r| (r.public_ip, r.vtep_mac));
        match &existing {
            Some(l)
                if l.parts.map(|_, x| (x.public_ip, x.vtep_mac)) == endpoints
                    && l.public_prefix_len == p.public_prefix_len =>
            {
                // Only the expiry moves: stored, but no revision and no broadcast. Any
                // certificate of the node may renew it unchanged (the holder stays).
                let mut renewed = l.clone();
                renewed.expires_at_unix = expires;
                renewed.holder_key = holder;
                let wire = Lease::from(&renewed);
                tracing::debug!(node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, "lease renewed");
                self.leases.insert(p.node.to_string(), renewed);
                changes.renewed.retain(|r| r.node_name != wire.node_name);
                changes.renewed.push(wire.clone());
                return Ok(wire);
            }
            Some(_) if holder != p.key => {
                warn!(node = %p.node, "refused a change of the lease's address or VTEP MAC from a key that does not hold it");
                return Err(LeaseOpError::Forbidden(format!(
                    "the lease of node {} is held by another key: only the certificate that took \
                     it (or one renewed from it) may change its public address or VTEP MAC. If \
                     this node really lost its key, an admin can run `twillctl certs revoke {}` \
                     (or `twillctl lease revoke {}`)",
                    p.node, p.node, p.node
                )));
            }
            Some(_) => {}
            None => {
                // An expired lease not yet swept: give its subnets back first.
                if let Some(old) = self.leases.remove(p.node.as_str()) {
                    let old_wire = Lease::from(&old);
                    warn!(node = %p.node, subnet = %old_wire.subnet, ipv6_subnet = %old_wire.ipv6_subnet, expired_secs_ago = now - old.expires_at_unix, "renewal missed: the lease had expired; granting again");
                    self.forget(&old);
                }
            }
        }
        let mut granted: PerFamily<(IpNet, bool)> = PerFamily::default();
        for (family, r) in p.parts.iter() {
            let Some(f) = self.subnets.get_mut(family) else {
                continue;
            };
            let held = existing
                .as_ref()
                .and_then(|l| l.parts.get(family))
                .map(|x| x.subnet);
            match grant(f.as_mut(), held, &p.node, r.requested) {
                Ok(g) => *granted.slot(family) = Some(g),
                Err(e) => {
                    // The families granted before give back what was picked for them.
                    for (family, (s, picked)) in granted.iter() {
                        if let (true, Some(f)) = (*picked, self.subnets.get_mut(family)) {
                            f.free(*s, &p.node);
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        let lease = model::Lease {
            node: p.node.clone(),
            parts: granted.zip(p.parts).map(|_, ((subnet, _), r)| Peer {
                subnet,
                public_ip: r.public_ip,
                vtep_mac: r.vtep_mac,
            }),
            backend: self.conf.backend.kind,
            vni: self.conf.backend.vni,
            expires_at_unix: expires,
            revision: self.next_revision(),
            reserved: false,
            public_prefix_len: p.public_prefix_len,
            holder_key: holder,
        };
        let wire = Lease::from(&lease);
        if existing.is_some() {
            info!(node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, public_ip = %wire.public_ip, public_ipv6 = %wire.public_ipv6, vtep_mac = %wire.vtep_mac, revision = wire.revision, "lease renewed with a new address or VTEP MAC");
        } else {
            info!(node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, public_ip = %wire.public_ip, public_ipv6 = %wire.public_ipv6, revision = wire.revision, "lease granted");
        }
        for (family, part) in lease.parts.iter() {
            if let Some(f) = self.subnets.get_mut(family) {
                f.hold(part.subnet, &p.node);
            }
        }
        if let Some(old) = self.leases.insert(p.node.to_string(), lease.clone()) {
            self.unindex_macs(&old);
        }
        self.index_macs(&lease);
        changes.events.push(LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(wire.clone()),
            revision: wire.revision,
        });
        Ok(wire)
    }

    /// Releases `node`'s lease for a caller with certificate key `key`.
    fn release(
        &mut self,
        node: &str,
        key: &[u8],
        events: &mut Vec<LeaseEvent>,
    ) -> Result<bool, LeaseOpError> {
        match self.leases.get(node) {
            Some(l) if !l.holder_key.is_empty() && l.holder_key != key => {
                warn!(node = %node, "refused a release from a key that does not hold the lease");
                Err(LeaseOpError::Forbidden(format!(
                    "the lease of node {node} is held by another key: only the certificate that \
                     took it (or one renewed from it) may release it"
                )))
            }
            _ => Ok(self.remove(node, events)),
        }
    }

    /// See `Op::Rekey`.
    fn rekey(&mut self, node: &str, from: &[u8], to: Vec<u8>, changes: &mut Changes) -> bool {
        let Some(l) = self.leases.get_mut(node) else {
            return false;
        };
        if !from.is_empty() && l.holder_key != from {
            return false;
        }
        if l.holder_key == to {
            return true;
        }
        l.holder_key = to;
        let renewed = Lease::from(&*l);
        changes.renewed.retain(|r| r.node_name != node);
        changes.renewed.push(renewed);
        true
    }

    fn remove(&mut self, node: &str, events: &mut Vec<LeaseEvent>) -> bool {
        let Some(lease) = self.leases.remove(node) else {
            return false;
        };
        self.forget(&lease);
        let mut wire = Lease::from(&lease);
        wire.revision = self.next_revision();
        events.push(LeaseEvent {
            r#type: EventType::Delete as i32,
            revision: wire.revision,
            lease: Some(wire),
        });
        true
    }

    fn reserve(&mut self, node: &str, r: Reservation) -> Result<(), LeaseOpError> {
        validate_node_name(node).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
        let parts = r.0;
        if parts.is_empty() {
            return Err(LeaseOpError::Invalid(
                "no subnet to reserve: give an IPv4 subnet, an IPv6 subnet, or one of each".into(),
            ));
        }
        let own = self.leases.get(node);
        for (family, s) in parts.iter() {
            let Some(f) = self.subnets.get(family) else {
                return Err(LeaseOpError::Invalid(format!(
                    "cannot reserve {s}: this network has no {}",
                    missing(family)
                )));
            };
            let held = own.and_then(|l| l.parts.get(family)).map(|p| p.subnet);
            f.check_reserve(node, *s, held)?;
        }
        for (family, f) in self.subnets.iter_mut() {
            match parts.get(family) {
                Some(s) => f.reserve(node, *s),
                None => {
                    f.unreserve(node);
                }
            }
        }
        Ok(())
    }

    fn unreserve(&mut self, node: &str) -> bool {
        // Every family's reservation goes (no short circuit).
        self.subnets
            .iter_mut()
            .fold(false, |done, (_, f)| f.unreserve(node).is_some() | done)
    }

    fn sweep(&mut self, now: i64, events: &mut Vec<LeaseEvent>) {
        let expired: Vec<(String, String)> = self
            .leases
            .values()
            .filter(|l| l.expires_at_unix <= now)
            .map(|l| {
                let first = l.parts.first().map(|p| p.subnet.to_string());
                (l.node.to_string(), first.unwrap_or_default())
            })
            .collect();
        for (node, subnet) in expired {
            info!(node = %node, subnet = %subnet, "lease expired");
            self.remove(&node, events);
        }
    }
}

/// The node's subnet of one family: the one its live lease holds (`held`, when the
/// family's index still names the node), else a new pick. The flag says whether it
/// was picked now (and must be freed if the grant fails).
fn grant(
    f: &mut dyn FamilySubnets,
    held: Option<IpNet>,
    node: &str,
    requested: Option<IpNet>,
) -> Result<(IpNet, bool), Refusal> {
    if let Some(s) = held.filter(|s| f.holder(*s) == Some(node)) {
        if let Some(r) = requested.filter(|r| *r != s) {
            info!(node = %node, subnet = %s, requested = %r, "node asked for another subnet; keeping the one it holds");
        }
        return Ok((s, false));
    }
    f.pick(node, requested).map(|s| (s, true))
}

#[cfg(test)]
mod tests;
