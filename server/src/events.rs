//! The committed lease table, its revision log and the fan-out to watchers.
//!
//! The lease writer commits each durable batch here; `commit` applies it to the table,
//! appends it to a bounded history and broadcasts it, all under one write lock, so a
//! watcher that snapshots or replays under the read lock and subscribes in the same
//! critical section never misses or repeats an event.
//!
//! A batch is broadcast as the protobuf encoding of its `WatchResponse`, made once
//! and shared by every watcher: fanning out to 5,000 agents copies bytes, it does not
//! clone and encode leases 5,000 times. Encoded batches also merge by concatenation
//! (repeated `events` append, the last `revision` wins).

use std::collections::{BTreeMap, VecDeque};
use std::sync::RwLock;

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
    tx: broadcast::Sender<Bytes>,
    closing: tokio::sync::watch::Sender<bool>,
}

/// The start of a watch: what to send first, and the live feed after it.
pub struct Subscription {
    /// Sent before anything from `feed`: a reset snapshot or the missed events.
    pub initial: Option<WatchResponse>,
    /// Batches committed after `initial`.
    pub feed: broadcast::Receiver<Bytes>,
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
        let encoded = WatchResponse {
            reset: false,
            events,
            revision: last,
        }
        .encode_to_vec();
        // No receivers is fine: nobody is watching yet.
        let _ = self.tx.send(Bytes::from(encoded));
    }

    /// Ends every watch stream (at shutdown: a stream never ends on its own, and a
    /// graceful server shutdown waits for every open call).
    pub fn close(&self) {
        self.closing.send_replace(true);
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

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revision
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
            Some(WatchResponse {
                reset: false,
                events,
                revision: t.revision,
            })
        } else {
            // From scratch, compacted away, or a revision this controller never
            // issued (its store was replaced): the watcher must start over.
            Some(snapshot(&t))
        };
        Subscription { initial, feed }
    }

    /// A reset snapshot with a fresh feed, for a watcher that fell behind.
    pub fn resubscribe(&self) -> (WatchResponse, broadcast::Receiver<Bytes>) {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        (snapshot(&t), self.tx.subscribe())
    }
}

fn snapshot(t: &Table) -> WatchResponse {
    WatchResponse {
        reset: true,
        events: t
            .leases
            .values()
            .map(|l| LeaseEvent {
                r#type: EventType::Put as i32,
                revision: l.revision,
                lease: Some(l.clone()),
            })
            .collect(),
        revision: t.revision,
    }
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

    #[test]
    fn resume_gets_exactly_the_missed_events() {
        let hub = Hub::new(vec![], vec![], 0);
        hub.commit(vec![put("a", 1), put("b", 2)]);
        hub.commit(vec![put("c", 3)]);
        let sub = hub.subscribe(1);
        let initial = sub.initial.unwrap();
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
            let initial = hub.subscribe(from).initial.unwrap();
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
        let replay = hub.subscribe(3).initial.unwrap();
        assert!(!replay.reset, "history survived the restart");
        assert_eq!(replay.events.len(), 2);
    }

    #[tokio::test]
    async fn live_events_follow_the_subscription() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut sub = hub.subscribe(0);
        hub.commit(vec![put("a", 1)]);
        let got = WatchResponse::decode(sub.feed.recv().await.unwrap()).unwrap();
        assert_eq!(got.revision, 1);
        assert_eq!(hub.leases().0.len(), 1);
    }
}
