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

mod net;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use twill_common::networks::NetworkName;
use twill_common::now_unix;
use twill_proto::{Lease, LeaseEvent};

use crate::events::{Hub, Unpublished};
use crate::metrics::Metrics;
use crate::networks::Served;
use crate::store::schema::network_of;
use crate::store::{Batch, Layout, LeaseKey, Reservation, Store, StoreError};
use crate::subnets::Refusal;
use net::{Changes, Clock, Net};

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
    /// The request names a network this controller does not serve.
    #[error("{0}")]
    UnknownNetwork(String),
    /// The network's file was removed: its leases are neither granted nor renewed.
    #[error("{0}")]
    Retired(String),
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
    /// Network, node and the key of the agent's certificate.
    Release(NetworkName, String, Vec<u8>, Reply<bool>),
    /// Node, `from` and `to`: the node's leases held by key `from` pass to key `to` (a
    /// renewed certificate); with `from` empty they are held by nobody until their next
    /// acquisition (the node's certificates were revoked). In every network.
    Rekey(String, Vec<u8>, Vec<u8>, Reply<bool>),
    /// Network, node and the admin who revokes.
    Revoke(NetworkName, String, String, Reply<bool>),
    Reserve(NetworkName, String, Reservation, Reply<bool>),
    Unreserve(NetworkName, String, Reply<bool>),
    /// The served networks changed (`--networks-dir`).
    Configure(Arc<Served>),
    Sweep,
}

/// An operation and when it was queued.
struct Queued {
    op: Op,
    queued: Instant,
}

impl Queued {
    fn now(op: Op) -> Self {
        Queued {
            op,
            queued: Instant::now(),
        }
    }
}

/// A decided request's answer, sent once its events are published: the lease, or
/// whether the operation changed anything.
enum Answer {
    /// Boxed: a granted lease is most of the size of every answer otherwise.
    Lease(Reply<Lease>, Box<Result<Lease, LeaseOpError>>),
    Done(Reply<bool>, Result<bool, LeaseOpError>),
}

impl Answer {
    fn send(self) {
        // A caller that went away no longer needs its answer.
        let _ = match self {
            Answer::Lease(reply, result) => reply.send(*result).map_err(drop),
            Answer::Done(reply, result) => reply.send(result).map_err(drop),
        };
    }

    /// After a failed write: a change that was decided becomes the error `e`;
    /// refusals wrote nothing and stay what they were.
    fn failed(self, e: impl Fn() -> LeaseOpError) -> Answer {
        match self {
            Answer::Lease(reply, result) if result.is_ok() => {
                Answer::Lease(reply, Box::new(Err(e())))
            }
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
    /// Starts the writer over a loaded store, serving the networks `served`. `hub`
    /// must hold the same leases.
    pub fn start(
        served: &Served,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        reservations: BTreeMap<LeaseKey, Reservation>,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let leases = Leases {
            replicated: false,
            ..Self::standby(ttl)
        };
        leases.attach(served, store, hub, reservations, metrics)?;
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
        served: &Served,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        reservations: BTreeMap<LeaseKey, Reservation>,
        metrics: Arc<Metrics>,
    ) -> Result<(), StartError> {
        let ttl = self.ttl;
        let (leases, revision) = hub.leases();
        let nets = served
            .iter()
            .map(|(name, s)| {
                let conf = Some(s.network.conf.clone());
                (name.clone(), Net::new(name.clone(), conf, s.retired))
            })
            .collect();
        let mut writer = Writer {
            nets,
            orphans: BTreeMap::new(),
            store,
            hub,
            ttl,
            revision,
            metrics,
            unpublished: Unpublished::default(),
            waiting: Vec::new(),
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
                if tx.send(Queued::now(Op::Sweep)).await.is_err() {
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
        let queued = Queued::now(op(reply));
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

    /// Releases a node's lease in `network` at its agent's request, made with the
    /// certificate key `key`; `Ok(false)` when it held none.
    pub async fn release(
        &self,
        network: &NetworkName,
        node: &str,
        key: &[u8],
    ) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Release(network.clone(), node.to_string(), key.to_vec(), reply))
            .await
    }

    /// Hands `node`'s leases (in every network) from their holder's key `from` to the
    /// key `to` of the certificate renewed from it; `Ok(false)` when the node holds no
    /// lease, or only ones another key holds.
    pub async fn rekey(
        &self,
        node: &str,
        from: [u8; 32],
        to: [u8; 32],
    ) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Rekey(node.to_string(), from.to_vec(), to.to_vec(), reply))
            .await
    }

    /// Frees `node`'s leases from the key that holds them (its certificates were
    /// revoked): the next certificate of the node to acquire one holds it.
    pub async fn disown(&self, node: &str) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Rekey(node.to_string(), Vec::new(), Vec::new(), reply))
            .await
    }

    /// Removes a node's lease in `network` on an operator's order; `Ok(false)` when it
    /// held none.
    pub async fn revoke(
        &self,
        network: &NetworkName,
        node: &str,
        by: &str,
    ) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Revoke(network.clone(), node.to_string(), by.to_string(), reply))
            .await
    }

    /// Reserves `subnet` (one subnet per family) of `network` for `node`, replacing the
    /// node's reservation there: nobody else is ever given them.
    pub async fn reserve(
        &self,
        network: &NetworkName,
        node: &str,
        subnet: Reservation,
    ) -> Result<(), LeaseOpError> {
        self.call(|reply| Op::Reserve(network.clone(), node.to_string(), subnet, reply))
            .await
            .map(|_| ())
    }

    /// Drops a node's reservation in `network`; `Ok(false)` when it had none.
    pub async fn unreserve(&self, network: &NetworkName, node: &str) -> Result<bool, LeaseOpError> {
        self.call(|reply| Op::Unreserve(network.clone(), node.to_string(), reply))
            .await
    }

    /// Hands the writer the networks served now (after `--networks-dir` changed). A
    /// replica without a writer has nothing to tell: the next one to attach is given
    /// the current set.
    pub async fn configure(&self, served: Arc<Served>) {
        if let Some(writer) = self.running() {
            // A writer that stopped has nothing to configure.
            let _ = writer.tx.send(Queued::now(Op::Configure(served))).await;
        }
    }
}

/// The refusal of an operation in a network this controller does not serve.
pub(crate) fn unknown(network: &NetworkName) -> LeaseOpError {
    LeaseOpError::UnknownNetwork(format!(
        "this controller serves no network named {network}; `twillctl networks` lists them"
    ))
}

struct Writer {
    nets: BTreeMap<NetworkName, Net>,
    /// Stored reservations in networks not configured now: kept (and stored again with
    /// every reservation write) until their network comes back.
    orphans: BTreeMap<LeaseKey, Reservation>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    ttl: Duration,
    /// The last revision issued, in every network.
    revision: u64,
    metrics: Arc<Metrics>,
    /// Durable events not yet published, and the answers waiting for them: a reply
    /// means stored and visible to every reader of the hub.
    unpublished: Unpublished,
    waiting: Vec<Waiting>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = if self.unpublished.is_empty() {
                rx.recv_many(&mut ops, MAX_BATCH).await
            } else {
                tokio::select! {
                    n = rx.recv_many(&mut ops, MAX_BATCH) => n,
                    () = self.unpublished.until_due(&self.hub) => {
                        if self.unpublished.is_due(&self.hub) {
                            self.publish();
                        }
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
            if self.unpublished.is_empty() || self.unpublished.is_due(&self.hub) {
                self.publish();
            }
        }
    }

    /// Commits the unpublished events to the hub and sends the answers that waited.
    fn publish(&mut self) {
        self.unpublished.publish(&self.hub);
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
                Op::Acquire(p, reply) => {
                    let (ttl, revision) = (self.ttl, &mut self.revision);
                    let at = Clock { now, ttl, revision };
                    let granted = match self.nets.get_mut(&p.network) {
                        Some(net) => net.acquire(p, at, &mut changes),
                        None => Err(unknown(&p.network)),
                    };
                    Answer::Lease(reply, Box::new(granted))
                }
                Op::Release(network, node, key, reply) => {
                    let revision = &mut self.revision;
                    let released = match self.nets.get_mut(&network) {
                        Some(net) => net.release(&node, &key, revision, &mut changes.events),
                        None => Ok(false),
                    };
                    if let Ok(true) = released {
                        info!(network = %network, node = %node, "lease released by its agent");
                    }
                    Answer::Done(reply, released)
                }
                Op::Rekey(node, from, to, reply) => {
                    // Every network's lease of the node passes to the new key.
                    let moved = self.nets.values_mut().fold(false, |moved, net| {
                        net.rekey(&node, &from, to.clone(), &mut changes) | moved
                    });
                    Answer::Done(reply, Ok(moved))
                }
                Op::Revoke(network, node, by, reply) => {
                    let revision = &mut self.revision;
                    let revoked = self
                        .nets
                        .get_mut(&network)
                        .is_some_and(|net| net.remove(&node, revision, &mut changes.events));
                    if revoked {
                        info!(network = %network, node = %node, admin = %by, "lease revoked");
                    }
                    Answer::Done(reply, Ok(revoked))
                }
                Op::Reserve(network, node, subnet, reply) => {
                    let r = self
                        .net(&network)
                        .and_then(|net| net.reserve(&node, subnet));
                    changes.reservations |= r.is_ok();
                    Answer::Done(reply, r.map(|()| true))
                }
                Op::Unreserve(network, node, reply) => {
                    let done = self
                        .nets
                        .get_mut(&network)
                        .is_some_and(|n| n.unreserve(&node))
                        || self.orphans.remove(&(network, node)).is_some();
                    changes.reservations |= done;
                    Answer::Done(reply, Ok(done))
                }
                Op::Configure(served) => {
                    self.configure(&served);
                    continue;
                }
                Op::Sweep => {
                    for net in self.nets.values_mut() {
                        net.sweep(now, &mut self.revision, &mut changes.events);
                    }
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
        let writing = Instant::now();
        self.store.write(batch).await?;
        let started = Instant::now();
        self.store.flush().await?;
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        // With etcd the write is the durable part (its transactions), with sled the flush.
        tracing::debug!(
            events = batch.events.len(),
            renewed = batch.renewed.len(),
            write_ms = (started - writing).as_millis() as u64,
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

    /// The network an operation names, refused when the controller serves none by that
    /// name.
    fn net(&mut self, network: &NetworkName) -> Result<&mut Net, LeaseOpError> {
        self.nets.get_mut(network).ok_or_else(|| unknown(network))
    }

    /// Takes the reservations (as the store holds them) for the next `rebuild`; those
    /// of networks not configured are kept aside.
    fn load_reservations(&mut self, all: BTreeMap<LeaseKey, Reservation>) {
        let mut by_net: BTreeMap<NetworkName, Vec<(String, Reservation)>> = BTreeMap::new();
        self.orphans.clear();
        for ((network, node), r) in all {
            match self.nets.get(&network).filter(|n| n.conf.is_some()) {
                Some(_) => by_net.entry(network).or_default().push((node, r)),
                None => {
                    self.orphans.insert((network, node), r);
                }
            }
        }
        for (name, net) in &mut self.nets {
            net.load_reservations(by_net.get(name).map_or(&[], |v| v.as_slice()));
        }
    }

    /// Rebuilds every network's table from `leases` and the reservations. Leases of a
    /// network not configured form a network of their own with no configuration: they
    /// run out.
    fn rebuild(&mut self, leases: Vec<Lease>) -> Result<(), String> {
        let mut by_net: BTreeMap<NetworkName, Vec<Lease>> = BTreeMap::new();
        for l in leases {
            by_net.entry(network_of(&l)).or_default().push(l);
        }
        for name in by_net.keys() {
            if !self.nets.contains_key(name) {
                warn!(network = %name, "the store holds leases of a network that is not configured; they are not renewed and run out");
                self.nets
                    .insert(name.clone(), Net::new(name.clone(), None, false));
            }
        }
        for (name, net) in &mut self.nets {
            net.rebuild(by_net.remove(name).unwrap_or_default())?;
        }
        Ok(())
    }

    /// Takes the served networks after a change of `--networks-dir`: new ones start
    /// empty (with their stored reservations), removed ones retire and are forgotten
    /// once their leases ran out. The registry has refused any change of a network's
    /// addresses while it has leases, so a network's allocation never moves under them.
    fn configure(&mut self, served: &Served) {
        for (name, s) in served {
            let conf = s.network.conf.clone();
            match self.nets.get_mut(name) {
                Some(net) if net.conf.as_ref().map(Layout::from) == Some(Layout::from(&conf)) => {
                    net.conf = Some(conf);
                    net.retired = s.retired;
                }
                Some(net) if !net.leases.is_empty() => {
                    error!(network = %name, "a network's addresses changed while it has leases; keeping the ones the leases were granted in");
                    net.retired = s.retired;
                }
                _ => {
                    let mut net = Net::new(name.clone(), Some(conf), s.retired);
                    let mine: Vec<(String, Reservation)> = self
                        .orphans
                        .iter()
                        .filter(|((n, _), _)| n == name)
                        .map(|((_, node), r)| (node.clone(), *r))
                        .collect();
                    self.orphans.retain(|(n, _), _| n != name);
                    net.load_reservations(&mine);
                    if let Err(why) = net.rebuild(Vec::new()) {
                        error!(network = %name, error = %why, "cannot start the network");
                        continue;
                    }
                    info!(network = %name, "serving a new network");
                    self.nets.insert(name.clone(), net);
                }
            }
        }
        let gone: Vec<NetworkName> = self
            .nets
            .iter_mut()
            .filter(|(name, _)| !served.contains_key(*name))
            .filter_map(|(name, net)| {
                if !net.retired && net.conf.is_some() {
                    info!(network = %name, leases = net.leases.len(), "network removed: no new leases, the existing ones run out");
                }
                net.retired = true;
                net.leases.is_empty().then(|| name.clone())
            })
            .collect();
        for name in gone {
            self.metrics.forget_network(&name);
            if let Some(net) = self.nets.remove(&name) {
                for (node, r) in net.reservations() {
                    self.orphans.insert((name.clone(), node), r);
                }
                info!(network = %name, "a removed network has no leases left; forgotten");
            }
        }
        self.publish_reservations();
        self.update_gauges();
    }

    /// Every reservation of every network (those of networks not configured too).
    fn reservations(&self) -> BTreeMap<LeaseKey, Reservation> {
        let mut all = self.orphans.clone();
        for (name, net) in &self.nets {
            for (node, r) in net.reservations() {
                all.insert((name.clone(), node), r);
            }
        }
        all
    }

    /// Publishes the reservations and why some cannot be honoured, when they changed
    /// (`stored`: the set itself was just written) or a family's view moved.
    fn publish_reservations_if_changed(&mut self, stored: bool) {
        // Every network's flag is taken (no short circuit).
        let moved = self
            .nets
            .values_mut()
            .fold(false, |moved, n| n.take_changed() | moved);
        if stored || moved {
            self.publish_reservations();
        }
    }

    fn publish_reservations(&self) {
        let mut stale: BTreeMap<LeaseKey, String> = BTreeMap::new();
        for (name, net) in &self.nets {
            for (node, why) in net.stale() {
                stale.insert((name.clone(), node), why);
            }
        }
        self.metrics.reservations_stale.set(stale.len() as i64);
        self.hub.set_reservations(self.reservations(), stale);
    }

    /// The gauges: each network's, and their sums.
    fn update_gauges(&self) {
        let (mut leases, mut free) = (0, 0);
        for (name, net) in &self.nets {
            let (capacity, taken) = net.capacity();
            let net_free = i64::from(capacity) - i64::from(taken);
            self.metrics
                .set_network(name, net.leases.len() as i64, net_free);
            leases += net.leases.len() as i64;
            free += net_free;
        }
        self.metrics.leases.set(leases);
        self.metrics.subnets_free.set(free);
    }
}

#[cfg(test)]
mod tests;
