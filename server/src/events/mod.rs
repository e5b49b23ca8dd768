//! The committed lease table, its revision log and the fan-out to watchers (the
//! gRPC framing of what goes out is `wire`'s).
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

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use prost::Message;
use tokio::sync::broadcast;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use crate::store::Reservation;

mod wire;

use wire::Framer;
pub use wire::{decode, DecodeError};

/// Batches a watcher may fall behind before it is sent a reset snapshot instead.
const BROADCAST_CAPACITY: usize = 1024;
/// Events kept (here and in the store) for watchers that resume from a revision.
pub const HISTORY_LEN: usize = 16 * 1024;
/// Most bytes of events in one `WatchResponse`: far below the 4 MiB that gRPC
/// decoders accept by default, whatever the size of the table.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Table {
    /// The leases as watchers see them: without `holder_key`, which stays in `holders`
    /// (the controller's own business, never sent to agents).
    leases: BTreeMap<String, Lease>,
    holders: HashMap<String, Vec<u8>>,
    reservations: BTreeMap<String, Reservation>,
    /// Why some reservations cannot be honoured now, by node.
    stale: BTreeMap<String, String>,
    revision: u64,
    /// Recent events, oldest first, each encoded once (a `LeaseEvent`): a replay clones
    /// references under the lock and frames them after it.
    history: VecDeque<(u64, Bytes)>,
}

/// The lease table as committed to the store, shared by readers.
pub struct Hub {
    table: RwLock<Table>,
    tx: broadcast::Sender<WatchMessage>,
    closing: tokio::sync::watch::Sender<bool>,
    epoch: String,
    /// The encoded reset snapshot of one revision. Watchers that start together (a
    /// join storm, or a controller restart under thousands of agents) want the same
    /// snapshot; encoding the table for each of them was most of the controller's CPU
    /// in a 5,000-node storm (perf).
    snapshot: Mutex<Option<WatchMessage>>,
    /// The last replay made, by the revision it starts after: agents that resume
    /// together (a controller restart) mostly resume from the same revision.
    replay: Mutex<Option<(u64, WatchMessage)>>,
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
}

/// The start of a watch: what to send first, and the live feed after it.
pub struct Subscription {
    /// Sent before anything from `feed`: a reset snapshot or the missed events.
    pub initial: Option<WatchMessage>,
    /// Batches committed after `initial`.
    pub feed: broadcast::Receiver<WatchMessage>,
}

/// What a new watcher is sent first, decided under the lock.
enum Start {
    UpToDate,
    Replay(Vec<(u64, Bytes)>, u64),
    Reset(WatchMessage),
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
                if let Some(l) = e.lease.as_mut() {
                    l.holder_key.clear();
                }
                (e.revision, Bytes::from(e.encode_to_vec()))
            })
            .collect();
        let mut holders = HashMap::new();
        let leases = leases
            .into_iter()
            .map(|mut l| {
                hold(&mut holders, &mut l);
                (l.node_name.clone(), l)
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
            snapshot: Mutex::new(None),
            replay: Mutex::new(None),
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
        for mut e in events {
            let deleted = e.r#type == EventType::Delete as i32;
            if let Some(lease) = e.lease.as_mut() {
                if deleted {
                    lease.holder_key.clear();
                    t.holders.remove(&lease.node_name);
                } else {
                    hold(&mut t.holders, lease);
                }
            }
            let encoded = Bytes::from(e.encode_to_vec());
            framer.push(e.revision, &encoded);
            t.history.push_back((e.revision, encoded));
            let Some(lease) = e.lease else { continue };
            if deleted {
                t.leases.remove(&lease.node_name);
            } else {
                t.leases.insert(lease.node_name.clone(), lease);
            }
        }
        while t.history.len() > HISTORY_LEN {
            t.history.pop_front();
        }
        t.revision = last;
        // No receivers is fine: nobody is watching yet.
        let _ = self.tx.send(WatchMessage {
            reset: false,
            revision: last,
            encoded: framer.finish(),
        });
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
            if let Some(l) = t.leases.get_mut(&r.node_name) {
                l.expires_at_unix = r.expires_at_unix;
                if r.holder_key.is_empty() {
                    t.holders.remove(&r.node_name);
                } else {
                    t.holders.insert(r.node_name.clone(), r.holder_key.clone());
                }
            }
        }
        // Same revision, other content: the cached snapshot is out of date.
        *self.snapshot.lock() = None;
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
        reservations: BTreeMap<String, Reservation>,
        stale: BTreeMap<String, String>,
    ) {
        let mut t = self.table.write();
        t.reservations = reservations;
        t.stale = stale;
    }

    /// The committed reservations, by node name.
    pub fn reservations(&self) -> BTreeMap<String, Reservation> {
        self.table.read().reservations.clone()
    }

    /// Why reservations cannot be honoured now, by node name.
    pub fn stale_reservations(&self) -> BTreeMap<String, String> {
        self.table.read().stale.clone()
    }

    /// One node's lease.
    pub fn lease(&self, node: &str) -> Option<Lease> {
        self.table.read().leases.get(node).cloned()
    }

    /// Whether `node` holds a lease that has not expired at `now` and that a key holds
    /// (one whose certificates were revoked is held by none until its next grant).
    pub fn held(&self, node: &str, now: i64) -> bool {
        let t = self.table.read();
        t.holders.contains_key(node) && t.leases.get(node).is_some_and(|l| l.expires_at_unix > now)
    }

    /// Up to `limit` leases (0: no limit) with node names after `after`, that `keep`
    /// accepts, ordered by node name; and whether more remain.
    pub fn page(
        &self,
        after: &str,
        limit: usize,
        keep: impl Fn(&Lease) -> bool,
    ) -> (Vec<Lease>, bool, u64) {
        use std::ops::Bound::{Excluded, Unbounded};
        let t = self.table.read();
        let start = if after.is_empty() {
            Unbounded
        } else {
            Excluded(after.to_string())
        };
        let mut matching = t
            .leases
            .range((start, Unbounded))
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
                if let Some(h) = t.holders.get(&l.node_name) {
                    l.holder_key.clone_from(h);
                }
                l
            })
            .collect();
        (leases, t.revision)
    }

    /// Starts a watch after `from_revision` (0: from scratch) of store `epoch` (empty:
    /// not checked). Returns the missed events when the history still has them, else a
    /// reset snapshot. A replay is framed after the lock is released, so a resuming
    /// watcher never holds up the writer's next commit.
    pub fn subscribe(&self, from_revision: u64, epoch: &str) -> Subscription {
        let (start, feed) = {
            let t = self.table.read();
            let feed = self.tx.subscribe();
            let same_store = epoch.is_empty() || epoch == self.epoch;
            let oldest_kept = t.history.front().map_or(t.revision + 1, |e| e.0);
            let start = if !same_store || from_revision == 0 || from_revision > t.revision {
                // From scratch, or a revision of another store or one this store never
                // issued (it was replaced): the watcher must start over.
                Start::Reset(self.snapshot(&t))
            } else if from_revision == t.revision {
                Start::UpToDate
            } else if from_revision + 1 >= oldest_kept {
                let first = t.history.partition_point(|e| e.0 <= from_revision);
                Start::Replay(t.history.range(first..).cloned().collect(), t.revision)
            } else {
                // Compacted away.
                Start::Reset(self.snapshot(&t))
            };
            (start, feed)
        };
        let initial = match start {
            Start::UpToDate => None,
            Start::Reset(snapshot) => Some(snapshot),
            Start::Replay(events, revision) => Some(self.replay(from_revision, &events, revision)),
        };
        Subscription { initial, feed }
    }

    /// The missed events after `from` up to `revision`, framed once per (from,
    /// revision).
    fn replay(&self, from: u64, events: &[(u64, Bytes)], revision: u64) -> WatchMessage {
        let mut cached = self.replay.lock();
        if let Some((_, m)) = cached
            .as_ref()
            .filter(|(f, m)| *f == from && m.revision == revision)
        {
            return m.clone();
        }
        let size = events.iter().map(|(_, e)| e.len() + 4).sum::<usize>() + 64;
        let mut framer = Framer::new(false, revision, &self.epoch, size);
        for (rev, e) in events {
            framer.push(*rev, e);
        }
        let m = WatchMessage {
            reset: false,
            revision,
            encoded: framer.finish(),
        };
        *cached = Some((from, m.clone()));
        m
    }

    /// A reset snapshot with a fresh feed, for a watcher that fell behind.
    pub fn resubscribe(&self) -> (WatchMessage, broadcast::Receiver<WatchMessage>) {
        let t = self.table.read();
        (self.snapshot(&t), self.tx.subscribe())
    }

    /// The reset snapshot of `t` (read-locked, so its revision holds still), encoded
    /// once per revision.
    fn snapshot(&self, t: &Table) -> WatchMessage {
        let mut cached = self.snapshot.lock();
        if let Some(s) = cached.as_ref().filter(|s| s.revision == t.revision) {
            return s.clone();
        }
        let s = WatchMessage {
            reset: true,
            revision: t.revision,
            encoded: encode_snapshot(t, &self.epoch),
        };
        *cached = Some(s.clone());
        s
    }
}

/// Takes a lease's holder key out into `holders` (or forgets the node's there when it
/// has none): what the table keeps and watchers are sent carries none.
fn hold(holders: &mut HashMap<String, Vec<u8>>, l: &mut Lease) {
    let key = std::mem::take(&mut l.holder_key);
    if key.is_empty() {
        holders.remove(&l.node_name);
    } else {
        holders.insert(l.node_name.clone(), key);
    }
}

/// The reset snapshot of `t`: a PUT per lease, encoded from the table without cloning
/// a lease, in parts of bounded size.
fn encode_snapshot(t: &Table, epoch: &str) -> Bytes {
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
    let lens: Vec<usize> = t.leases.values().map(event_len).collect();
    let capacity = lens.iter().map(|n| n + 4).sum::<usize>() + 64;
    let mut framer = Framer::new(true, t.revision, epoch, capacity);
    for (l, len) in t.leases.values().zip(lens) {
        framer.push_with(l.revision, len, |out| {
            int32::encode(1, &PUT, out);
            message::encode(2, l, out);
            if l.revision != 0 {
                uint64::encode(3, &l.revision, out);
            }
        });
    }
    framer.finish()
}

#[cfg(test)]
mod tests {
    use twill_proto::WatchResponse;

    use super::wire::GRPC_PREFIX;
    use super::*;

    fn put(node: &str, rev: u64) -> LeaseEvent {
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
        let sub = hub.subscribe(1, "");
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
            hub.subscribe(3, "").initial.is_none(),
            "up to date: nothing to replay"
        );
    }

    #[test]
    fn scratch_or_unknown_revision_gets_a_reset() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        for from in [0, 99] {
            let initial = decoded(hub.subscribe(from, "").initial.unwrap());
            assert!(initial.reset);
            assert_eq!(initial.events.len(), 2);
            assert_eq!(initial.revision, 2);
        }
    }

    #[test]
    fn revision_before_history_after_restart_gets_a_reset() {
        let hub = Hub::new(vec![put("a", 5).lease.unwrap()], vec![], 5);
        assert!(
            hub.subscribe(3, "").initial.unwrap().reset,
            "no history: reset"
        );
        assert!(hub.subscribe(5, "").initial.is_none());
        let hub = Hub::new(
            vec![put("a", 5).lease.unwrap()],
            vec![put("b", 4), put("a", 5)],
            5,
        );
        let replay = decoded(hub.subscribe(3, "").initial.unwrap());
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
        let first = hub.subscribe(0, "").initial.unwrap();
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
        let again = hub.subscribe(0, "").initial.unwrap();
        assert_eq!(
            again.encoded.as_ptr(),
            first.encoded.as_ptr(),
            "same revision: the same bytes, shared"
        );
        hub.commit(vec![put("c", 301)]);
        let (after, _) = hub.resubscribe();
        assert_eq!((after.revision, decoded(after).events.len()), (301, 3));
    }

    #[tokio::test]
    async fn live_events_follow_the_subscription() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut sub = hub.subscribe(0, "");
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
        let initial = hub.subscribe(0, "").initial.unwrap();
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
        let mut feed = hub.subscribe(0, "").feed;
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
        check(&hub.subscribe(5, "").initial.unwrap().encoded, 5);
    }

    #[test]
    fn a_resume_from_another_store_gets_a_reset() {
        let hub = Hub::new(vec![], vec![], 0).with_epoch("new-store");
        hub.commit(vec![put("a", 1), put("b", 2), put("c", 3)]);
        assert!(!hub.subscribe(1, "new-store").initial.unwrap().reset);
        assert!(hub.subscribe(3, "new-store").initial.is_none());
        assert!(
            !hub.subscribe(1, "").initial.unwrap().reset,
            "no epoch given: revisions only"
        );
        for from in [1, 3] {
            let first = decoded(hub.subscribe(from, "old-store").initial.unwrap());
            assert!(
                first.reset,
                "revision {from} of another store means nothing here"
            );
            assert_eq!((first.events.len(), first.epoch.as_str()), (3, "new-store"));
        }
    }

    #[test]
    fn an_unchanged_renewal_moves_the_expiry_without_a_revision() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1)]);
        let mut feed = hub.subscribe(1, "").feed;
        let before = hub.subscribe(0, "").initial.unwrap();
        let mut renewed = put("a", 1).lease.unwrap();
        renewed.expires_at_unix = 99;
        hub.renew(&[renewed]);
        assert!(feed.try_recv().is_err(), "nothing broadcast");
        assert_eq!(hub.leases().1, 1, "no new revision");
        assert_eq!(hub.lease("a").unwrap().expires_at_unix, 99);
        let after = decoded(hub.subscribe(0, "").initial.unwrap());
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
