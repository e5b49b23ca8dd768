//! The committed lease table, its revision log and the fan-out to watchers (the
//! gRPC framing of what goes out is `wire`'s; when the lease writer and a replica's
//! mirror publish is `pacing`'s).
//!
//! The lease writer commits each durable batch here; `commit` applies it to the table,
//! appends it to a bounded history and broadcasts it, all under one write lock, so a
//! watcher that snapshots or replays under the read lock and subscribes in the same
//! critical section never misses or repeats an event.
//!
//! A batch is broadcast as its `WatchResponse` already framed as gRPC messages (the
//! 5-byte prefix, then the protobuf encoding), made once and shared by every watcher:
//! fanning out to 5,000 agents hands the same bytes to 5,000 connections without
//! cloning, encoding or copying per watcher.
//!
//! No message is larger than [`MAX_MESSAGE_BYTES`] of events: a large reset snapshot
//! goes out in parts (`more` set on all but the last), a large batch or replay as
//! several complete batches. Every message carries the store's epoch, which a resuming
//! watcher must match (a replaced store reuses revision numbers for other events).
//!
//! The table holds every network's leases under one revision sequence (as etcd's), so
//! one watch follows several networks and one revision resumes them all. A watcher
//! names its networks ([`Networks`]): snapshots and replays hold only theirs, and a
//! batch that mixes networks is framed once more for each set of networks that wants
//! part of it (a batch of one network, the usual case, is never framed twice).

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::broadcast;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent, WatchResponse};

use twill_common::networks::NetworkName;

use crate::store::schema::network_of;
use crate::store::{LeaseKey, Reservation};

mod pacing;
mod wire;

pub(crate) use pacing::Unpublished;
use wire::Framer;
pub use wire::{decode, DecodeError};

/// Batches a watcher may fall behind before it is sent a reset snapshot instead.
const BROADCAST_CAPACITY: usize = 1024;
/// Events kept (here and in the store) for watchers that resume from a revision.
pub const HISTORY_LEN: usize = 16 * 1024;
/// Most bytes of events in one `WatchResponse`: far below the 4 MiB that gRPC
/// decoders accept by default, whatever the size of the table. Small enough that a
/// receiver's buffer stays small too: with 1 MiB parts every watch stream of the
/// bench's 5,000 simulated nodes grew its own megabyte, and zeroing the fresh pages
/// was a third of their CPU in a storm.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// The networks one watcher follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Networks(BTreeSet<NetworkName>);

impl Networks {
    /// These networks.
    pub fn new(names: impl IntoIterator<Item = NetworkName>) -> Self {
        Networks(names.into_iter().collect())
    }

    /// Only `default` (a watcher that names none).
    pub fn default_only() -> Self {
        Self::new([NetworkName::default_network()])
    }

    /// Whether it follows `network`.
    pub fn contains(&self, network: &NetworkName) -> bool {
        self.0.contains(network)
    }
}

impl std::fmt::Display for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|n| n.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// A lease's place in the table.
fn key_of(l: &Lease) -> LeaseKey {
    (network_of(l), l.node_name.clone())
}

/// One event of the history: its revision, its network and its encoding.
type Logged = (u64, NetworkName, Bytes);

#[derive(Default)]
struct Table {
    /// The leases as watchers see them: without `holder_key`, which stays in `holders`
    /// (the controller's own business, never sent to agents).
    leases: BTreeMap<LeaseKey, Lease>,
    holders: HashMap<LeaseKey, Vec<u8>>,
    reservations: BTreeMap<LeaseKey, Reservation>,
    /// Why some reservations cannot be honoured now.
    stale: BTreeMap<LeaseKey, String>,
    revision: u64,
    /// Recent events, oldest first, each encoded once (a `LeaseEvent`): a replay clones
    /// references under the lock and frames them after it.
    history: VecDeque<Logged>,
}

/// The lease table as committed to the store, shared by readers.
pub struct Hub {
    table: RwLock<Table>,
    tx: broadcast::Sender<WatchMessage>,
    closing: tokio::sync::watch::Sender<bool>,
    epoch: String,
    /// The encoded reset snapshots, one per set of networks, each with the events
    /// since it was made. Watchers that start together (a join storm, or a controller
    /// restart under thousands of agents) want the same snapshot; encoding the table for
    /// each of them was most of the controller's CPU in a 5,000-node storm (perf), and
    /// so was encoding it again at every revision for watchers whose requests reach the
    /// controller one after another while leases are granted.
    snapshot: Mutex<Vec<Snapshot>>,
    /// The last replay made, by the revision it starts after and its networks: agents
    /// that resume together (a controller restart) mostly resume from the same revision.
    replay: Mutex<Option<(u64, Networks, WatchMessage)>>,
    /// The last batch broadcast: how far it has got through the watchers.
    delivery: Mutex<Option<Arc<Delivery>>>,
}

/// An encoded `WatchResponse` (one or more gRPC messages): a committed batch, the
/// missed events of a resumed watch, or a reset snapshot.
#[derive(Debug, Clone)]
pub struct WatchMessage {
    /// A reset snapshot (the full table), not missed events.
    pub reset: bool,
    /// The revision it brings the watcher to.
    pub revision: u64,
    /// The `WatchResponse` parts as gRPC messages, back to back (see [`decode`]).
    pub encoded: Bytes,
    /// The networks its events belong to.
    networks: Arc<BTreeSet<NetworkName>>,
    /// A committed batch of several networks: its events, to frame the part a watcher
    /// of only some of them wants, and those framings, one per set of networks.
    mixed: Option<Arc<Mixed>>,
    /// A committed batch: how far it has got through the watchers.
    delivery: Option<Arc<Delivery>>,
}

/// See `WatchMessage::mixed`.
#[derive(Debug)]
struct Mixed {
    events: Vec<Logged>,
    epoch: String,
    framed: Mutex<Vec<(Networks, Bytes)>>,
}

impl WatchMessage {
    fn new(reset: bool, revision: u64, encoded: Bytes, networks: BTreeSet<NetworkName>) -> Self {
        WatchMessage {
            reset,
            revision,
            encoded,
            networks: Arc::new(networks),
            mixed: None,
            delivery: None,
        }
    }

    /// Tells the hub that one more watcher has taken this batch off the feed.
    pub fn taken(&self) {
        if let Some(d) = &self.delivery {
            d.take();
        }
    }

    /// What a watcher of `want` is sent of this message: all of it when every event is
    /// of its networks (shared bytes), nothing when none is, else its own events framed
    /// once for every watcher of the same networks.
    pub fn for_networks(&self, want: &Networks) -> Option<Bytes> {
        if self.networks.is_subset(&want.0) {
            return Some(self.encoded.clone());
        }
        if self.networks.is_disjoint(&want.0) {
            return None;
        }
        let mixed = self.mixed.as_ref()?;
        let mut framed = mixed.framed.lock();
        if let Some((_, b)) = framed.iter().find(|(n, _)| n == want) {
            return Some(b.clone());
        }
        let mut framer = Framer::new(false, self.revision, &mixed.epoch, 256);
        for (rev, _, e) in mixed.events.iter().filter(|(_, n, _)| want.contains(n)) {
            framer.push(*rev, e);
        }
        let b = framer.finish();
        framed.push((want.clone(), b.clone()));
        Some(b)
    }
}

/// How far the last publication has got through the watchers (see `Hub::fan_out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanOut {
    /// It reached nearly every watcher, this long after it was made (zero when there
    /// was nobody to reach, or no publication).
    Done(Duration),
    /// Watchers are still taking it.
    Going,
}

/// A publication's way through the watchers subscribed when it was made.
#[derive(Debug)]
struct Delivery {
    /// Watchers that must take it before it counts as delivered: nearly all that were
    /// subscribed, so that one stuck agent does not hold up the pacing of everybody's.
    needed: usize,
    taken: AtomicUsize,
    made: Instant,
    /// How long after `made` it was done; unset while it is going.
    done: OnceLock<Duration>,
}

impl Delivery {
    fn new(watchers: usize) -> Self {
        let needed = watchers - watchers / 32;
        let done = OnceLock::new();
        if needed == 0 {
            let _ = done.set(Duration::ZERO);
        }
        Delivery {
            needed,
            taken: AtomicUsize::new(0),
            made: Instant::now(),
            done,
        }
    }

    fn take(&self) {
        if self.taken.fetch_add(1, Ordering::Relaxed) + 1 == self.needed {
            let _ = self.done.set(self.made.elapsed());
        }
    }

    fn state(&self) -> FanOut {
        self.done
            .get()
            .map_or(FanOut::Going, |&took| FanOut::Done(took))
    }
}

/// The start of a watch: what to send first, and the live feed after it.
pub struct Subscription {
    /// Sent before anything from `feed`: a reset snapshot or the missed events.
    pub initial: Option<WatchMessage>,
    /// Sent after a reset snapshot made at an earlier revision: the events since, which
    /// bring the watcher to the table's revision.
    pub catch_up: Option<WatchMessage>,
    /// Batches committed after `initial` (and `catch_up`).
    pub feed: broadcast::Receiver<WatchMessage>,
}

/// What a new watcher is sent first, decided under the lock.
enum Start {
    UpToDate,
    Replay(Vec<Logged>, u64),
    Reset(WatchMessage, Option<WatchMessage>),
}

/// A reset snapshot of one set of networks, kept to be shared by every watcher that
/// starts while it is recent, and the events since (framed once per revision).
struct Snapshot {
    networks: Networks,
    /// The reset snapshot, at its revision.
    table: WatchMessage,
    /// Leases in it: once the events since outnumber a quarter of them, a new snapshot
    /// costs less than sending them to every new watcher.
    leases: usize,
    /// The events after `table` up to the hub's revision when last asked.
    since: Option<WatchMessage>,
}

impl Hub {
    /// A hub holding the leases and the event history loaded from the store.
    pub fn new(leases: Vec<Lease>, history: Vec<LeaseEvent>, revision: u64) -> Self {
        Self::with_capacity(leases, history, revision, BROADCAST_CAPACITY)
    }

    /// Like `new`, with `capacity` batches of slack before a slow watcher lags.
    pub fn with_capacity(
        leases: Vec<Lease>,
        history: Vec<LeaseEvent>,
        revision: u64,
        capacity: usize,
    ) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        let skip = history.len().saturating_sub(HISTORY_LEN);
        let history = history
            .into_iter()
            .skip(skip)
            .map(|mut e| {
                let network = e.lease.as_ref().map(network_of).unwrap_or_default();
                if let Some(l) = e.lease.as_mut() {
                    l.holder_key.clear();
                }
                (e.revision, network, Bytes::from(e.encode_to_vec()))
            })
            .collect();
        let mut holders = HashMap::new();
        let leases = leases
            .into_iter()
            .map(|mut l| {
                hold(&mut holders, &mut l);
                (key_of(&l), l)
            })
            .collect();
        let table = Table {
            leases,
            holders,
            revision,
            history,
            ..Table::default()
        };
        Hub {
            table: RwLock::new(table),
            tx,
            closing: tokio::sync::watch::Sender::new(false),
            epoch: String::new(),
            snapshot: Mutex::new(Vec::new()),
            replay: Mutex::new(None),
            delivery: Mutex::new(None),
        }
    }

    /// The same hub serving the store epoch `epoch`.
    pub fn with_epoch(mut self, epoch: impl Into<String>) -> Self {
        self.epoch = epoch.into();
        self
    }

    /// The store epoch every message carries.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Applies durable events and fans them out. Events must carry consecutive
    /// revisions.
    ///
    /// Events at or below the hub's revision are skipped: with the etcd store a
    /// leader's hub hears of its writes twice (from its writer and from its watch).
    pub fn commit(&self, mut events: Vec<LeaseEvent>) {
        let mut t = self.table.write();
        events.retain(|e| e.revision > t.revision);
        let Some(last) = events.last().map(|e| e.revision) else {
            return;
        };
        let mut framer = Framer::new(false, last, &self.epoch, 256 * events.len());
        let mut networks = BTreeSet::new();
        let first = t.history.len();
        for mut e in events {
            let deleted = e.r#type == EventType::Delete as i32;
            let network = e.lease.as_ref().map(network_of).unwrap_or_default();
            if let Some(lease) = e.lease.as_mut() {
                if deleted {
                    lease.holder_key.clear();
                    t.holders.remove(&key_of(lease));
                } else {
                    hold(&mut t.holders, lease);
                }
            }
            let encoded = Bytes::from(e.encode_to_vec());
            framer.push(e.revision, &encoded);
            networks.insert(network.clone());
            t.history.push_back((e.revision, network, encoded));
            let Some(lease) = e.lease else { continue };
            if deleted {
                t.leases.remove(&key_of(&lease));
            } else {
                t.leases.insert(key_of(&lease), lease);
            }
        }
        let mixed = (networks.len() > 1).then(|| {
            Arc::new(Mixed {
                events: t.history.range(first..).cloned().collect(),
                epoch: self.epoch.clone(),
                framed: Mutex::new(Vec::new()),
            })
        });
        while t.history.len() > HISTORY_LEN {
            t.history.pop_front();
        }
        t.revision = last;
        let mut message = WatchMessage::new(false, last, framer.finish(), networks);
        message.mixed = mixed;
        let delivery = Arc::new(Delivery::new(self.tx.receiver_count()));
        message.delivery = Some(delivery.clone());
        *self.delivery.lock() = Some(delivery);
        // No receivers is fine: nobody is watching yet.
        let _ = self.tx.send(message);
    }

    /// Asks the agent behind every watch to send its pods again (a new leader holds
    /// none): a message of no events at the current revision, to every watcher.
    pub fn ask_pods(&self) {
        let t = self.table.read();
        let msg = WatchResponse {
            revision: t.revision,
            epoch: self.epoch.clone(),
            report_pods: true,
            ..Default::default()
        };
        // No networks: every watcher's networks hold the empty set.
        let message = WatchMessage::new(false, t.revision, wire::frame(&msg), BTreeSet::new());
        // Sent under the lock, so that no batch of a later revision goes out before it.
        let _ = self.tx.send(message);
    }

    /// How far the last batch broadcast has got through the watchers (done when there
    /// was none).
    pub fn fan_out(&self) -> FanOut {
        self.delivery
            .lock()
            .as_ref()
            .map_or(FanOut::Done(Duration::ZERO), |d| d.state())
    }

    /// Moves the expiry (and the holder's key) of leases whose renewal changed nothing
    /// else: no revision, no broadcast (agents do not act on a peer's expiry), only what
    /// readers of the table (the admin API, new watchers' snapshots) see.
    pub fn renew(&self, renewed: &[Lease]) {
        if renewed.is_empty() {
            return;
        }
        let mut t = self.table.write();
        let t = &mut *t;
        for r in renewed {
            let key = key_of(r);
            if let Some(l) = t.leases.get_mut(&key) {
                l.expires_at_unix = r.expires_at_unix;
                if r.holder_key.is_empty() {
                    t.holders.remove(&key);
                } else {
                    t.holders.insert(key, r.holder_key.clone());
                }
            }
        }
        // Same revision, other content: the cached snapshots are out of date.
        self.snapshot.lock().clear();
    }

    /// Ends every watch stream (at shutdown: a stream never ends on its own, and a
    /// graceful server shutdown waits for every open call).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Open subscriptions to the live feed (watch streams).
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Becomes true when the hub closes.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Replaces the committed reservations (after they were stored) and the reasons
    /// some of them cannot be honoured now.
    pub fn set_reservations(
        &self,
        reservations: BTreeMap<LeaseKey, Reservation>,
        stale: BTreeMap<LeaseKey, String>,
    ) {
        let mut t = self.table.write();
        t.reservations = reservations;
        t.stale = stale;
    }

    /// The committed reservations.
    pub fn reservations(&self) -> BTreeMap<LeaseKey, Reservation> {
        self.table.read().reservations.clone()
    }

    /// Why reservations cannot be honoured now.
    pub fn stale_reservations(&self) -> BTreeMap<LeaseKey, String> {
        self.table.read().stale.clone()
    }

    /// One node's lease in `network`.
    pub fn lease(&self, network: &NetworkName, node: &str) -> Option<Lease> {
        let key = (network.clone(), node.to_string());
        self.table.read().leases.get(&key).cloned()
    }

    /// Whether `node` holds a lease in any network that has not expired at `now` and
    /// that a key holds (one whose certificates were revoked is held by none until its
    /// next grant).
    pub fn held(&self, node: &str, now: i64) -> bool {
        let t = self.table.read();
        t.holders
            .keys()
            .filter(|(_, n)| n == node)
            .any(|key| t.leases.get(key).is_some_and(|l| l.expires_at_unix > now))
    }

    /// How many nodes hold a lease, in any network.
    pub fn nodes(&self) -> usize {
        let t = self.table.read();
        t.leases
            .keys()
            .map(|(_, node)| node)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Leases in each network: how many.
    pub fn counts(&self) -> BTreeMap<NetworkName, usize> {
        let mut counts: BTreeMap<NetworkName, usize> = BTreeMap::new();
        for (network, _) in self.table.read().leases.keys() {
            // A name is copied once per network, not once per lease (read every 2 s).
            match counts.get_mut(network) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(network.clone(), 1);
                }
            }
        }
        counts
    }

    /// Up to `limit` leases (0: no limit) of `network` with node names after `after`,
    /// that `keep` accepts, ordered by node name; and whether more remain.
    pub fn page(
        &self,
        network: &NetworkName,
        after: &str,
        limit: usize,
        keep: impl Fn(&Lease) -> bool,
    ) -> (Vec<Lease>, bool, u64) {
        use std::ops::Bound::{Excluded, Included};
        let t = self.table.read();
        let start = if after.is_empty() {
            Included((network.clone(), String::new()))
        } else {
            Excluded((network.clone(), after.to_string()))
        };
        let mut matching = t
            .leases
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|((n, _), _)| n == network)
            .map(|(_, l)| l)
            .filter(|l| keep(l));
        let limit = if limit == 0 { usize::MAX } else { limit };
        let page: Vec<Lease> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        (page, more, t.revision)
    }

    /// The current leases, ordered by node name, with their holders' keys (for the
    /// lease writer), and the revision they reflect.
    pub fn leases(&self) -> (Vec<Lease>, u64) {
        let t = self.table.read();
        let leases = t
            .leases
            .values()
            .map(|l| {
                let mut l = l.clone();
                if let Some(h) = t.holders.get(&key_of(&l)) {
                    l.holder_key.clone_from(h);
                }
                l
            })
            .collect();
        (leases, t.revision)
    }

    /// Starts a watch of `networks` after `from_revision` (0: from scratch) of store
    /// `epoch` (empty: not checked). Returns the missed events when the history still
    /// has them, else a reset snapshot. A replay is framed after the lock is released,
    /// so a resuming watcher never holds up the writer's next commit.
    pub fn subscribe(&self, from_revision: u64, epoch: &str, networks: &Networks) -> Subscription {
        let (start, feed) = {
            let t = self.table.read();
            let feed = self.tx.subscribe();
            let same_store = epoch.is_empty() || epoch == self.epoch;
            let start = if !same_store || from_revision == 0 || from_revision > t.revision {
                // From scratch, or a revision of another store or one this store never
                // issued (it was replaced): the watcher must start over.
                let (table, since) = self.snapshot(&t, networks);
                Start::Reset(table, since)
            } else if from_revision == t.revision {
                Start::UpToDate
            } else if let Some(missed) = missed(&t, from_revision, networks) {
                Start::Replay(missed, t.revision)
            } else {
                // Compacted away.
                let (table, since) = self.snapshot(&t, networks);
                Start::Reset(table, since)
            };
            (start, feed)
        };
        let (initial, catch_up) = match start {
            Start::UpToDate => (None, None),
            Start::Reset(table, since) => (Some(table), since),
            Start::Replay(events, revision) => (
                Some(self.replay(from_revision, networks, &events, revision)),
                None,
            ),
        };
        Subscription {
            initial,
            catch_up,
            feed,
        }
    }

    /// The missed events of `networks` after `from` up to `revision`, framed once per
    /// (from, networks, revision).
    fn replay(
        &self,
        from: u64,
        networks: &Networks,
        events: &[Logged],
        revision: u64,
    ) -> WatchMessage {
        let mut cached = self.replay.lock();
        if let Some((_, _, m)) = cached
            .as_ref()
            .filter(|(f, n, m)| *f == from && n == networks && m.revision == revision)
        {
            return m.clone();
        }
        let m = self.frame(events, revision, networks);
        *cached = Some((from, networks.clone(), m.clone()));
        m
    }

    /// `events` of `networks` as one batch (or several complete ones) that brings a
    /// watcher to `revision`.
    fn frame(&self, events: &[Logged], revision: u64, networks: &Networks) -> WatchMessage {
        let size = events.iter().map(|(_, _, e)| e.len() + 4).sum::<usize>() + 64;
        let mut framer = Framer::new(false, revision, &self.epoch, size);
        for (rev, _, e) in events {
            framer.push(*rev, e);
        }
        WatchMessage::new(false, revision, framer.finish(), networks.0.clone())
    }

    /// A reset snapshot of `networks` (and the events since it) with a fresh feed, for
    /// a watcher that fell behind.
    pub fn resubscribe(&self, networks: &Networks) -> Subscription {
        let t = self.table.read();
        let (table, since) = self.snapshot(&t, networks);
        Subscription {
            initial: Some(table),
            catch_up: since,
            feed: self.tx.subscribe(),
        }
    }

    /// The reset snapshot of `networks` in `t` (read-locked, so its revision holds
    /// still) and, when it was made at an earlier revision, the events since. A
    /// snapshot is made again only once the events since it outnumber a quarter of its
    /// leases, so watchers that start one after another during a storm share a few
    /// snapshots instead of each encoding the table.
    fn snapshot(&self, t: &Table, networks: &Networks) -> (WatchMessage, Option<WatchMessage>) {
        let mut cached = self.snapshot.lock();
        if let Some(at) = cached.iter().position(|c| &c.networks == networks) {
            let c = &mut cached[at];
            if c.table.revision == t.revision {
                return (c.table.clone(), None);
            }
            if let Some(since) = c.since.as_ref().filter(|m| m.revision == t.revision) {
                return (c.table.clone(), Some(since.clone()));
            }
            let events = (c.table.revision < t.revision)
                .then(|| missed(t, c.table.revision, networks))
                .flatten()
                .filter(|events| events.len() <= c.leases / 4 + 64);
            if let Some(events) = events {
                let since = self.frame(&events, t.revision, networks);
                c.since = Some(since.clone());
                return (c.table.clone(), Some(since));
            }
            cached.swap_remove(at);
        }
        let (encoded, leases) = encode_snapshot(t, networks, &self.epoch);
        let table = WatchMessage::new(true, t.revision, encoded, networks.0.clone());
        cached.push(Snapshot {
            networks: networks.clone(),
            table: table.clone(),
            leases,
            since: None,
        });
        (table, None)
    }
}

/// The events of `networks` in `t`'s history after revision `from`, or `None` when the
/// history no longer reaches back that far.
fn missed(t: &Table, from: u64, networks: &Networks) -> Option<Vec<Logged>> {
    let oldest_kept = t.history.front().map_or(t.revision + 1, |e| e.0);
    if from + 1 < oldest_kept {
        return None;
    }
    let first = t.history.partition_point(|e| e.0 <= from);
    Some(
        t.history
            .range(first..)
            .filter(|e| networks.contains(&e.1))
            .cloned()
            .collect(),
    )
}

/// Takes a lease's holder key out into `holders` (or forgets the node's there when it
/// has none): what the table keeps and watchers are sent carries none.
fn hold(holders: &mut HashMap<LeaseKey, Vec<u8>>, l: &mut Lease) {
    let key = std::mem::take(&mut l.holder_key);
    if key.is_empty() {
        holders.remove(&key_of(l));
    } else {
        holders.insert(key_of(l), key);
    }
}

/// The reset snapshot of `networks` in `t`: a PUT per lease, encoded from the table
/// without cloning a lease, in parts of bounded size; and how many leases it holds.
fn encode_snapshot(t: &Table, networks: &Networks, epoch: &str) -> (Bytes, usize) {
    use prost::encoding::{int32, message, uint64};
    const PUT: i32 = EventType::Put as i32;
    let event_len = |l: &Lease| {
        int32::encoded_len(1, &PUT)
            + message::encoded_len(2, l)
            + if l.revision != 0 {
                uint64::encoded_len(3, &l.revision)
            } else {
                0
            }
    };
    // One range of the table per network (it is ordered by network first), not a
    // test of every lease's network.
    let leases = || {
        networks.0.iter().flat_map(|network| {
            t.leases
                .range((network.clone(), String::new())..)
                .take_while(move |((n, _), _)| n == network)
                .map(|(_, l)| l)
        })
    };
    let lens: Vec<usize> = leases().map(event_len).collect();
    let count = lens.len();
    let capacity = lens.iter().map(|n| n + 4).sum::<usize>() + 64;
    let mut framer = Framer::new(true, t.revision, epoch, capacity);
    for (l, len) in leases().zip(lens) {
        framer.push_with(l.revision, len, |out| {
            int32::encode(1, &PUT, out);
            message::encode(2, l, out);
            if l.revision != 0 {
                uint64::encode(3, &l.revision, out);
            }
        });
    }
    (framer.finish(), count)
}

#[cfg(test)]
mod tests {
    use twill_proto::WatchResponse;

    use super::wire::GRPC_PREFIX;
    use super::*;

    fn only() -> Networks {
        Networks::default_only()
    }

    pub(super) fn put(node: &str, rev: u64) -> LeaseEvent {
        LeaseEvent {
            r#type: EventType::Put as i32,
            revision: rev,
            lease: Some(Lease {
                node_name: node.into(),
                revision: rev,
                ..Default::default()
            }),
        }
    }

    /// `msg` as one gRPC message, as prost encodes it.
    fn grpc_message(msg: &WatchResponse) -> Bytes {
        let mut buf = vec![0];
        buf.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut buf).unwrap();
        buf.into()
    }

    #[test]
    fn a_request_for_pods_reaches_every_watcher_alone_at_the_current_revision() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("n1", 1)]);
        let blue = Networks::new([NetworkName::from_wire("blue").unwrap()]);
        let mut subs = [hub.subscribe(1, "", &only()), hub.subscribe(0, "", &blue)];
        hub.ask_pods();
        for sub in &mut subs {
            let msg = sub.feed.try_recv().expect("the request");
            assert_eq!((msg.reset, msg.revision), (false, 1));
            let bytes = msg.for_networks(&only()).expect("for every watcher");
            assert_eq!(msg.for_networks(&blue), Some(bytes.clone()));
            let got = decode(&bytes).unwrap();
            assert_eq!(
                got,
                [WatchResponse {
                    revision: 1,
                    epoch: hub.epoch.clone(),
                    report_pods: true,
                    ..Default::default()
                }]
            );
        }
    }

    fn decoded(i: WatchMessage) -> WatchResponse {
        let mut msgs = decode(&i.encoded).unwrap();
        assert_eq!(msgs.len(), 1, "one part");
        let msg = msgs.remove(0);
        assert_eq!((msg.reset, msg.revision), (i.reset, i.revision));
        msg
    }

    #[test]
    fn resume_gets_exactly_the_missed_events() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        hub.commit(vec![put("c", 3)]);
        let sub = hub.subscribe(1, "", &only());
        let initial = decoded(sub.initial.unwrap());
        assert!(!initial.reset);
        assert_eq!(
            initial
                .events
                .iter()
                .map(|e| e.revision)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(
            hub.subscribe(3, "", &only()).initial.is_none(),
            "up to date: nothing to replay"
        );
    }

    #[test]
    fn scratch_or_unknown_revision_gets_a_reset() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        for from in [0, 99] {
            let initial = decoded(hub.subscribe(from, "", &only()).initial.unwrap());
            assert!(initial.reset);
            assert_eq!(initial.events.len(), 2);
            assert_eq!(initial.revision, 2);
        }
    }

    #[test]
    fn revision_before_history_after_restart_gets_a_reset() {
        let hub = Hub::new(vec![put("a", 5).lease.unwrap()], vec![], 5);
        assert!(
            hub.subscribe(3, "", &only()).initial.unwrap().reset,
            "no history: reset"
        );
        assert!(hub.subscribe(5, "", &only()).initial.is_none());
        let hub = Hub::new(
            vec![put("a", 5).lease.unwrap()],
            vec![put("b", 4), put("a", 5)],
            5,
        );
        let replay = decoded(hub.subscribe(3, "", &only()).initial.unwrap());
        assert!(!replay.reset, "history survived the restart");
        assert_eq!(replay.events.len(), 2);
    }

    #[test]
    fn the_snapshot_is_what_prost_encodes_and_is_made_once_per_revision() {
        let full = |node: &str, rev: u64| Lease {
            node_name: node.into(),
            subnet: "10.244.7.0/24".into(),
            public_ip: "198.18.0.7".into(),
            backend_type: "vxlan".into(),
            vtep_mac: "0a:58:00:00:07:01".into(),
            expires_at_unix: 1_900_000_000,
            revision: rev,
            vni: 1,
            reserved: false,
            ipv6_subnet: "fd00:10:244:7::/64".into(),
            public_ipv6: "fd18:0:0:7::1".into(),
            vtep_mac_v6: "0a:58:00:00:07:06".into(),
            public_ip_prefix_len: 24,
            holder_key: Vec::new(),
            network: String::new(),
        };
        let held = |node: &str, rev: u64| Lease {
            holder_key: vec![7; 32],
            ..full(node, rev)
        };
        let hub = Hub::new(vec![held("a", 0)], vec![], 0).with_epoch("0123456789abcdef");
        hub.commit(vec![LeaseEvent {
            r#type: EventType::Put as i32,
            revision: 300,
            lease: Some(held("b", 300)),
        }]);
        let first = hub.subscribe(0, "", &only()).initial.unwrap();
        let want = WatchResponse {
            reset: true,
            events: [full("a", 0), full("b", 300)]
                .into_iter()
                .map(|l| LeaseEvent {
                    r#type: EventType::Put as i32,
                    revision: l.revision,
                    lease: Some(l),
                })
                .collect(),
            revision: 300,
            more: false,
            epoch: "0123456789abcdef".into(),
            report_pods: false,
        };
        assert_eq!(
            first.encoded,
            grpc_message(&want),
            "byte for byte, without the holders' keys"
        );
        assert!(
            hub.leases().0.iter().all(|l| l.holder_key == [7; 32]),
            "the writer still gets the holders' keys"
        );
        let len = u32::try_from(first.encoded.len() - GRPC_PREFIX).unwrap();
        assert_eq!(first.encoded[0], 0, "uncompressed");
        assert_eq!(
            first.encoded[1..GRPC_PREFIX],
            len.to_be_bytes(),
            "its length"
        );
        let again = hub.subscribe(0, "", &only()).initial.unwrap();
        assert_eq!(
            again.encoded.as_ptr(),
            first.encoded.as_ptr(),
            "same revision: the same bytes, shared"
        );
        hub.commit(vec![put("c", 301)]);
        let after = hub.resubscribe(&only());
        let (table, since) = (after.initial.unwrap(), after.catch_up.unwrap());
        assert_eq!(
            table.encoded.as_ptr(),
            first.encoded.as_ptr(),
            "one event later: the same snapshot, shared"
        );
        let since = decoded(since);
        assert!(!since.reset);
        assert_eq!((since.revision, since.events.len()), (301, 1));
    }

    /// The leases a watcher holds after `sub`'s reset and catch-up, by node, and the
    /// revision they bring it to.
    fn state_after(sub: Subscription) -> (BTreeMap<String, u64>, u64) {
        let mut leases = BTreeMap::new();
        let mut revision = 0;
        for m in sub.initial.into_iter().chain(sub.catch_up) {
            for part in decode(&m.encoded).unwrap() {
                if part.reset {
                    leases.clear();
                }
                for e in part.events {
                    let l = e.lease.unwrap();
                    if e.r#type == EventType::Delete as i32 {
                        leases.remove(&l.node_name);
                    } else {
                        leases.insert(l.node_name, e.revision);
                    }
                }
                revision = part.revision;
            }
        }
        (leases, revision)
    }

    #[test]
    fn watchers_starting_one_after_another_share_a_snapshot_until_the_events_since_outgrow_it() {
        let hub = Hub::new(vec![], vec![], 0);
        let grant = |hub: &Hub, rev: &mut u64, n: usize| {
            for _ in 0..n {
                *rev += 1;
                hub.commit(vec![put(&format!("n{rev:05}"), *rev)]);
            }
        };
        let mut rev = 0;
        grant(&hub, &mut rev, 400);
        let first = hub.subscribe(0, "", &only());
        assert!(first.catch_up.is_none(), "made now: nothing since");
        let shared = first.initial.as_ref().unwrap().encoded.as_ptr();
        let mut snapshots = 1;
        let mut last = shared;
        // Watchers arrive one revision apart while leases are granted, as in a storm.
        for i in 0..2000 {
            grant(&hub, &mut rev, 1);
            let sub = hub.subscribe(0, "", &only());
            let table = sub.initial.as_ref().unwrap();
            assert!(table.reset);
            if table.encoded.as_ptr() != last {
                snapshots += 1;
                last = table.encoded.as_ptr();
            }
            if i % 50 == 0 || i == 1999 {
                let (leases, revision) = state_after(sub);
                assert_eq!(revision, rev, "brought to the table's revision");
                assert_eq!(leases.len() as u64, rev, "every lease, once");
            }
        }
        assert!(
            (2..=20).contains(&snapshots),
            "{snapshots} snapshots for 2,000 watchers over 2,000 revisions"
        );
        hub.commit(vec![LeaseEvent {
            r#type: EventType::Delete as i32,
            revision: rev + 1,
            lease: put("n00001", 0).lease,
        }]);
        let (leases, revision) = state_after(hub.subscribe(0, "", &only()));
        assert_eq!((leases.len() as u64, revision), (rev - 1, rev + 1));
        assert!(
            !leases.contains_key("n00001"),
            "a deletion since is sent too"
        );
    }

    #[tokio::test]
    async fn live_events_follow_the_subscription() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut sub = hub.subscribe(0, "", &only());
        hub.commit(vec![put("a", 1)]);
        let got = decode(&sub.feed.recv().await.unwrap().encoded).unwrap();
        assert_eq!(got[0].revision, 1);
        assert_eq!(hub.leases().0.len(), 1);
    }

    fn big(node: usize, rev: u64) -> Lease {
        Lease {
            node_name: format!("{}-{node:06}", "n".repeat(200)),
            subnet: "10.244.7.0/24".into(),
            revision: rev,
            ..Default::default()
        }
    }

    #[test]
    fn a_large_table_goes_out_in_bounded_parts_that_add_up_to_the_reset() {
        let n = 20_000;
        let leases: Vec<Lease> = (0..n).map(|i| big(i, i as u64 + 1)).collect();
        let hub = Hub::new(leases, vec![], n as u64).with_epoch("e");
        let initial = hub.subscribe(0, "", &only()).initial.unwrap();
        let parts = decode(&initial.encoded).unwrap();
        assert!(parts.len() > 2, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert!(
                p.encoded_len() <= MAX_MESSAGE_BYTES + 512,
                "part {i}: {}",
                p.encoded_len()
            );
            assert_eq!(p.reset, i == 0, "only the first part resets");
            assert_eq!(p.more, i + 1 < parts.len(), "more on all but the last");
            assert_eq!((p.revision, p.epoch.as_str()), (n as u64, "e"));
        }
        let names: Vec<&str> = parts
            .iter()
            .flat_map(|p| &p.events)
            .map(|e| e.lease.as_ref().unwrap().node_name.as_str())
            .collect();
        assert_eq!(names.len(), n, "every lease once");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn a_large_batch_or_replay_goes_out_as_complete_batches() {
        let n = 12_000u64;
        let hub = Hub::new(vec![], vec![], 0);
        let events: Vec<LeaseEvent> = (1..=n)
            .map(|rev| LeaseEvent {
                r#type: EventType::Put as i32,
                revision: rev,
                lease: Some(big(rev as usize, rev)),
            })
            .collect();
        let mut feed = hub.subscribe(0, "", &only()).feed;
        hub.commit(events);
        let check = |encoded: &Bytes, from: u64| {
            let parts = decode(encoded).unwrap();
            assert!(parts.len() > 1);
            let mut next = from + 1;
            for p in &parts {
                assert!(!p.reset && !p.more);
                assert!(p.encoded_len() <= MAX_MESSAGE_BYTES + 512);
                for e in &p.events {
                    assert_eq!(e.revision, next);
                    next += 1;
                }
                assert_eq!(
                    p.revision,
                    next - 1,
                    "each part brings the watcher to its last event"
                );
            }
            assert_eq!(next - 1, n);
        };
        check(&feed.try_recv().unwrap().encoded, 0);
        check(&hub.subscribe(5, "", &only()).initial.unwrap().encoded, 5);
    }

    #[test]
    fn a_resume_from_another_store_gets_a_reset() {
        let hub = Hub::new(vec![], vec![], 0).with_epoch("new-store");
        hub.commit(vec![put("a", 1), put("b", 2), put("c", 3)]);
        assert!(
            !hub.subscribe(1, "new-store", &only())
                .initial
                .unwrap()
                .reset
        );
        assert!(hub.subscribe(3, "new-store", &only()).initial.is_none());
        assert!(
            !hub.subscribe(1, "", &only()).initial.unwrap().reset,
            "no epoch given: revisions only"
        );
        for from in [1, 3] {
            let first = decoded(hub.subscribe(from, "old-store", &only()).initial.unwrap());
            assert!(
                first.reset,
                "revision {from} of another store means nothing here"
            );
            assert_eq!((first.events.len(), first.epoch.as_str()), (3, "new-store"));
        }
    }

    fn put_in(network: &str, node: &str, rev: u64) -> LeaseEvent {
        let mut e = put(node, rev);
        e.lease.as_mut().unwrap().network = network.into();
        e
    }

    fn watching(names: &[&str]) -> Networks {
        Networks::new(names.iter().map(|n| NetworkName::from_wire(n).unwrap()))
    }

    fn events_of(encoded: &Bytes) -> Vec<(String, u64)> {
        decode(encoded)
            .unwrap()
            .iter()
            .flat_map(|m| &m.events)
            .map(|e| (e.lease.as_ref().unwrap().network.clone(), e.revision))
            .collect()
    }

    #[tokio::test]
    async fn a_watcher_gets_only_its_networks_and_a_mixed_batch_is_framed_once_per_set() {
        let hub = Hub::new(vec![], vec![], 0);
        let both = watching(&["", "blue"]);
        let blue = watching(&["blue"]);
        let mut feeds = [
            hub.subscribe(0, "", &only()).feed,
            hub.subscribe(0, "", &both).feed,
            hub.subscribe(0, "", &blue).feed,
        ];
        hub.commit(vec![
            put_in("", "a", 1),
            put_in("blue", "a", 2),
            put_in("red", "a", 3),
        ]);
        hub.commit(vec![put_in("red", "b", 4)]);
        let batch = feeds[0].recv().await.unwrap();
        assert_eq!(
            events_of(&batch.for_networks(&only()).unwrap()),
            [("".into(), 1)]
        );
        assert_eq!(
            events_of(&batch.for_networks(&both).unwrap()),
            [("".into(), 1), ("blue".into(), 2)]
        );
        let again = batch.for_networks(&both).unwrap();
        assert_eq!(
            again.as_ptr(),
            feeds[1]
                .recv()
                .await
                .unwrap()
                .for_networks(&both)
                .unwrap()
                .as_ptr(),
            "framed once for every watcher of the same networks"
        );
        let all = watching(&["", "blue", "red"]);
        assert_eq!(
            batch.for_networks(&all).unwrap().as_ptr(),
            batch.encoded.as_ptr(),
            "a watcher of every network in it gets the batch itself"
        );
        let red_only = feeds[2].recv().await.unwrap();
        assert_eq!(
            events_of(&red_only.for_networks(&blue).unwrap()),
            [("blue".into(), 2)]
        );
        assert!(
            feeds[2].recv().await.unwrap().for_networks(&blue).is_none(),
            "a batch of none of its networks is not sent"
        );

        let (leases, revision) = state_after(hub.subscribe(0, "", &both));
        assert_eq!(
            (leases.len(), revision),
            (1, 4),
            "node a, in default and blue (one name here), at the table's revision"
        );
        let reset = decoded(hub.subscribe(0, "", &all).initial.unwrap());
        assert!(reset.reset);
        assert_eq!(
            reset.revision, 4,
            "a set never snapshotted before: made now"
        );
        let nets: Vec<&str> = reset
            .events
            .iter()
            .map(|e| e.lease.as_ref().unwrap().network.as_str())
            .collect();
        assert_eq!(
            nets,
            ["blue", "", "red", "red"],
            "by network name: blue, default, red"
        );
        let replay = decoded(hub.subscribe(1, "", &blue).initial.unwrap());
        assert!(!replay.reset);
        assert_eq!(replay.revision, 4, "brought to the table's revision");
        assert_eq!(replay.events.len(), 1, "blue's event only");
        assert_eq!(hub.counts().len(), 3);
        assert!(hub.lease(&NetworkName::new("red").unwrap(), "b").is_some());
        assert!(hub.lease(&NetworkName::default_network(), "b").is_none());
    }

    #[tokio::test]
    async fn a_publication_is_done_once_nearly_every_watcher_took_it() {
        let hub = Hub::new(vec![], vec![], 0);
        assert_eq!(hub.fan_out(), FanOut::Done(Duration::ZERO), "nothing yet");
        hub.commit(vec![put("a", 1)]);
        assert_eq!(
            hub.fan_out(),
            FanOut::Done(Duration::ZERO),
            "nobody to reach: done at once"
        );
        let mut feeds: Vec<_> = (0..64)
            .map(|_| hub.subscribe(1, "", &only()).feed)
            .collect();
        hub.commit(vec![put("b", 2)]);
        assert_eq!(hub.fan_out(), FanOut::Going);
        for feed in &mut feeds[..61] {
            feed.recv().await.unwrap().taken();
        }
        assert_eq!(hub.fan_out(), FanOut::Going, "61 of 64");
        feeds[61].recv().await.unwrap().taken();
        assert!(
            matches!(hub.fan_out(), FanOut::Done(took) if took > Duration::ZERO),
            "62 of 64: the two stuck ones do not hold up the pacing"
        );
        hub.commit(vec![put("c", 3)]);
        assert_eq!(hub.fan_out(), FanOut::Going, "the next one starts over");
    }

    #[test]
    fn an_unchanged_renewal_moves_the_expiry_without_a_revision() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1)]);
        let mut feed = hub.subscribe(1, "", &only()).feed;
        let before = hub.subscribe(0, "", &only()).initial.unwrap();
        let mut renewed = put("a", 1).lease.unwrap();
        renewed.expires_at_unix = 99;
        hub.renew(&[renewed]);
        assert!(feed.try_recv().is_err(), "nothing broadcast");
        assert_eq!(hub.leases().1, 1, "no new revision");
        assert_eq!(
            hub.lease(&NetworkName::default_network(), "a")
                .unwrap()
                .expires_at_unix,
            99
        );
        let after = decoded(hub.subscribe(0, "", &only()).initial.unwrap());
        assert_eq!(
            after.events[0].lease.as_ref().unwrap().expires_at_unix,
            99,
            "the snapshot is made again"
        );
        assert_ne!(
            decoded(before).events[0]
                .lease
                .as_ref()
                .unwrap()
                .expires_at_unix,
            99
        );
    }
}
