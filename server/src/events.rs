//! The committed lease table, its revision log and the fan-out to watchers.
//!
//! The lease writer commits each durable batch here; `commit` applies it to the table,
//! appends it to a bounded history and broadcasts it, all under one write lock, so a
//! watcher that snapshots or replays under the read lock and subscribes in the same
//! critical section never misses or repeats an event.
//!
//! A batch is broadcast as its `WatchResponse` already framed as a gRPC message (the
//! 5-byte prefix, then the protobuf encoding), made once and shared by every watcher:
//! fanning out to 5,000 agents hands the same bytes to 5,000 connections, one HTTP/2
//! frame each, without cloning, encoding or copying per watcher.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use ipnet::Ipv4Net;
use prost::Message;
use tokio::sync::broadcast;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent, WatchResponse};

/// Batches a watcher may fall behind before it is sent a reset snapshot instead.
const BROADCAST_CAPACITY: usize = 1024;
/// Events kept (here and in the store) for watchers that resume from a revision.
pub const HISTORY_LEN: usize = 16 * 1024;

#[derive(Default)]
struct Table {
    leases: BTreeMap<String, Lease>,
    reservations: BTreeMap<String, Ipv4Net>,
    revision: u64,
    history: VecDeque<LeaseEvent>,
}

/// The lease table as committed to the store, shared by readers.
pub struct Hub {
    table: RwLock<Table>,
    tx: broadcast::Sender<WatchMessage>,
    closing: tokio::sync::watch::Sender<bool>,
    /// The encoded reset snapshot of one revision. Watchers that start together (a
    /// join storm, or a controller restart under thousands of agents) want the same
    /// snapshot; encoding the table for each of them was most of the controller's CPU
    /// in a 5,000-node storm (perf).
    snapshot: Mutex<Option<WatchMessage>>,
}

/// An encoded `WatchResponse`: a committed batch, the missed events of a resumed
/// watch, or a reset snapshot.
#[derive(Debug, Clone)]
pub struct WatchMessage {
    /// A reset snapshot (the full table), not missed events.
    pub reset: bool,
    /// The revision it brings the watcher to.
    pub revision: u64,
    /// The `WatchResponse` as a gRPC message (see [`decode`]).
    pub encoded: Bytes,
}

/// The start of a watch: what to send first, and the live feed after it.
pub struct Subscription {
    /// Sent before anything from `feed`: a reset snapshot or the missed events.
    pub initial: Option<WatchMessage>,
    /// Batches committed after `initial`.
    pub feed: broadcast::Receiver<WatchMessage>,
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
        let mut history = VecDeque::from(history);
        while history.len() > HISTORY_LEN {
            history.pop_front();
        }
        let table = Table {
            leases: leases
                .into_iter()
                .map(|l| (l.node_name.clone(), l))
                .collect(),
            reservations: BTreeMap::new(),
            revision,
            history,
        };
        Hub {
            table: RwLock::new(table),
            tx,
            closing: tokio::sync::watch::Sender::new(false),
            snapshot: Mutex::new(None),
        }
    }

    /// Applies durable events and fans them out. Events must carry increasing revisions.
    pub fn commit(&self, events: Vec<LeaseEvent>) {
        let Some(last) = events.last().map(|e| e.revision) else {
            return;
        };
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        for e in &events {
            let Some(lease) = &e.lease else { continue };
            if e.r#type == EventType::Delete as i32 {
                t.leases.remove(&lease.node_name);
            } else {
                t.leases.insert(lease.node_name.clone(), lease.clone());
            }
            t.history.push_back(e.clone());
        }
        while t.history.len() > HISTORY_LEN {
            t.history.pop_front();
        }
        t.revision = last;
        let encoded = grpc_message(&WatchResponse {
            reset: false,
            events,
            revision: last,
        });
        // No receivers is fine: nobody is watching yet.
        let _ = self.tx.send(WatchMessage {
            reset: false,
            revision: last,
            encoded,
        });
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

    /// Replaces the committed reservations (after they were stored).
    pub fn set_reservations(&self, reservations: BTreeMap<String, Ipv4Net>) {
        self.table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .reservations = reservations;
    }

    /// The committed reservations, by node name.
    pub fn reservations(&self) -> BTreeMap<String, Ipv4Net> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .reservations
            .clone()
    }

    /// One node's lease.
    pub fn lease(&self, node: &str) -> Option<Lease> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .leases
            .get(node)
            .cloned()
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
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
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

    /// The current leases, ordered by node name, and the revision they reflect.
    pub fn leases(&self) -> (Vec<Lease>, u64) {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        (t.leases.values().cloned().collect(), t.revision)
    }

    /// Starts a watch after `from_revision` (0: from scratch). Returns the missed
    /// events when the history still has them, else a reset snapshot.
    pub fn subscribe(&self, from_revision: u64) -> Subscription {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let feed = self.tx.subscribe();
        let oldest_kept = t.history.front().map_or(t.revision + 1, |e| e.revision);
        let initial = if from_revision == t.revision && from_revision != 0 {
            None
        } else if from_revision != 0
            && from_revision < t.revision
            && from_revision + 1 >= oldest_kept
        {
            let events: Vec<_> = t
                .history
                .iter()
                .filter(|e| e.revision > from_revision)
                .cloned()
                .collect();
            Some(WatchMessage {
                reset: false,
                revision: t.revision,
                encoded: grpc_message(&WatchResponse {
                    reset: false,
                    events,
                    revision: t.revision,
                }),
            })
        } else {
            // From scratch, compacted away, or a revision this controller never
            // issued (its store was replaced): the watcher must start over.
            Some(self.snapshot(&t))
        };
        Subscription { initial, feed }
    }

    /// A reset snapshot with a fresh feed, for a watcher that fell behind.
    pub fn resubscribe(&self) -> (WatchMessage, broadcast::Receiver<WatchMessage>) {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        (self.snapshot(&t), self.tx.subscribe())
    }

    /// The reset snapshot of `t` (read-locked, so its revision holds still), encoded
    /// once per revision.
    fn snapshot(&self, t: &Table) -> WatchMessage {
        let mut cached = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cached.as_ref().filter(|s| s.revision == t.revision) {
            return s.clone();
        }
        let s = WatchMessage {
            reset: true,
            revision: t.revision,
            encoded: encode_snapshot(t),
        };
        *cached = Some(s.clone());
        s
    }
}

/// Bytes before the protobuf encoding in a gRPC message: a compressed flag (0) and the
/// length (big-endian u32).
const GRPC_PREFIX: usize = 5;

fn grpc_prefix(len: usize, buf: &mut Vec<u8>) {
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
}

/// `msg` as one gRPC message on the wire.
fn grpc_message(msg: &WatchResponse) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(GRPC_PREFIX + len);
    grpc_prefix(len, &mut buf);
    msg.encode_raw(&mut buf);
    buf.into()
}

/// A message as the hub makes them: the `WatchResponse` after the gRPC prefix.
pub fn decode(msg: &[u8]) -> Result<WatchResponse, prost::DecodeError> {
    WatchResponse::decode(msg.get(GRPC_PREFIX..).unwrap_or_default())
}

/// `WatchResponse { reset: true, events: a PUT per lease, revision }` as a gRPC
/// message, encoded from the table without cloning a lease.
fn encode_snapshot(t: &Table) -> Bytes {
    use prost::encoding::{
        bool as pbool, encode_key, encode_varint, encoded_len_varint, int32, key_len, message,
        uint64, WireType,
    };
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
    let total: usize = t
        .leases
        .values()
        .map(|l| {
            let n = event_len(l);
            key_len(2) + encoded_len_varint(n as u64) + n
        })
        .sum();
    let len = pbool::encoded_len(1, &true)
        + total
        + if t.revision != 0 {
            uint64::encoded_len(3, &t.revision)
        } else {
            0
        };
    let mut buf = Vec::with_capacity(GRPC_PREFIX + len);
    grpc_prefix(len, &mut buf);
    pbool::encode(1, &true, &mut buf);
    for l in t.leases.values() {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(event_len(l) as u64, &mut buf);
        int32::encode(1, &PUT, &mut buf);
        message::encode(2, l, &mut buf);
        if l.revision != 0 {
            uint64::encode(3, &l.revision, &mut buf);
        }
    }
    if t.revision != 0 {
        uint64::encode(3, &t.revision, &mut buf);
    }
    debug_assert_eq!(buf.len(), GRPC_PREFIX + len);
    buf.into()
}

#[cfg(test)]
mod tests {
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

    fn decoded(i: WatchMessage) -> WatchResponse {
        let msg = decode(&i.encoded).unwrap();
        assert_eq!((msg.reset, msg.revision), (i.reset, i.revision));
        msg
    }

    #[test]
    fn resume_gets_exactly_the_missed_events() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        hub.commit(vec![put("c", 3)]);
        let sub = hub.subscribe(1);
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
            hub.subscribe(3).initial.is_none(),
            "up to date: nothing to replay"
        );
    }

    #[test]
    fn scratch_or_unknown_revision_gets_a_reset() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        for from in [0, 99] {
            let initial = decoded(hub.subscribe(from).initial.unwrap());
            assert!(initial.reset);
            assert_eq!(initial.events.len(), 2);
            assert_eq!(initial.revision, 2);
        }
    }

    #[test]
    fn revision_before_history_after_restart_gets_a_reset() {
        let hub = Hub::new(vec![put("a", 5).lease.unwrap()], vec![], 5);
        assert!(hub.subscribe(3).initial.unwrap().reset, "no history: reset");
        assert!(hub.subscribe(5).initial.is_none());
        let hub = Hub::new(
            vec![put("a", 5).lease.unwrap()],
            vec![put("b", 4), put("a", 5)],
            5,
        );
        let replay = decoded(hub.subscribe(3).initial.unwrap());
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
        };
        let hub = Hub::new(vec![full("a", 0)], vec![], 0);
        hub.commit(vec![LeaseEvent {
            r#type: EventType::Put as i32,
            revision: 300,
            lease: Some(full("b", 300)),
        }]);
        let first = hub.subscribe(0).initial.unwrap();
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
        };
        assert_eq!(first.encoded, grpc_message(&want), "byte for byte");
        assert_eq!(
            first.encoded[..GRPC_PREFIX],
            [0, 0, 0, 0, (first.encoded.len() - GRPC_PREFIX) as u8],
            "uncompressed, its length"
        );
        let again = hub.subscribe(0).initial.unwrap();
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
        let mut sub = hub.subscribe(0);
        hub.commit(vec![put("a", 1)]);
        let got = decode(&sub.feed.recv().await.unwrap().encoded).unwrap();
        assert_eq!(got.revision, 1);
        assert_eq!(hub.leases().0.len(), 1);
    }
}
