//! The controller's record of connected agents: open watch streams, and when each node
//! last called (the admin API's `status` and `agents` read it); and the agents asked to
//! move to another replica (`replica::rebalance`), whose watch then ends.

use parking_lot::Mutex;
use rand::seq::IteratorRandom;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use twill_common::now_unix;

/// One open watch stream.
#[derive(Debug, Clone)]
pub struct WatcherInfo {
    /// Who is watching (node or admin name).
    pub name: String,
    /// When the stream opened (Unix seconds).
    pub connected_at: i64,
    /// Revision of the last message sent to it.
    pub revision: u64,
    /// When the client certificate the stream was opened with expires (Unix seconds).
    pub cert_not_after: i64,
    /// An agent's (a node certificate's), not an admin's.
    pub node: bool,
}

/// The agents the controller knows to be alive: open watch streams, and when each
/// node last called.
#[derive(Default)]
pub struct Agents {
    next_id: AtomicU64,
    watchers: Mutex<HashMap<u64, WatcherInfo>>,
    last_seen: Mutex<HashMap<String, i64>>,
    /// Streams asked to move to another replica, and a count bumped at each ask.
    moves: Mutex<HashSet<u64>>,
    asked: tokio::sync::watch::Sender<u64>,
}

impl Agents {
    /// Records a new watch stream of an agent (`node`) or an admin, opened with a
    /// certificate valid until `cert_not_after` (Unix seconds); returns its id.
    pub fn connected(&self, name: &str, revision: u64, cert_not_after: i64, node: bool) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = WatcherInfo {
            name: name.to_string(),
            connected_at: now_unix(),
            revision,
            cert_not_after,
            node,
        };
        self.watchers.lock().insert(id, info);
        self.seen(name);
        id
    }

    /// Records the revision just sent on stream `id`.
    pub fn sent(&self, id: u64, revision: u64) {
        if let Some(w) = self.watchers.lock().get_mut(&id) {
            w.revision = revision;
        }
    }

    /// Forgets stream `id`.
    pub fn disconnected(&self, id: u64) {
        self.watchers.lock().remove(&id);
        self.moves.lock().remove(&id);
    }

    /// Open watch streams of agents.
    pub fn node_watchers(&self) -> usize {
        self.watchers.lock().values().filter(|w| w.node).count()
    }

    /// Asks `count` agents' streams, picked at random among those not asked yet, to
    /// move to another replica; how many were asked.
    pub fn ask_to_move(&self, count: usize) -> usize {
        let mut moves = self.moves.lock();
        let picked: Vec<u64> = self
            .watchers
            .lock()
            .iter()
            .filter(|(id, w)| w.node && !moves.contains(id))
            .map(|(id, _)| *id)
            .choose_multiple(&mut rand::rng(), count);
        moves.extend(&picked);
        drop(moves);
        if !picked.is_empty() {
            self.asked.send_modify(|n| *n += 1);
        }
        picked.len()
    }

    /// Resolves once stream `id` is asked to move.
    pub async fn move_asked(&self, id: u64) {
        let mut asked = self.asked.subscribe();
        loop {
            if self.moves.lock().remove(&id) {
                return;
            }
            if asked.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Records that `name` called now.
    pub fn seen(&self, name: &str) {
        self.last_seen.lock().insert(name.to_string(), now_unix());
    }

    /// Open watch streams.
    pub fn watchers(&self) -> Vec<WatcherInfo> {
        self.watchers.lock().values().cloned().collect()
    }

    /// When `name` last called, if ever since start-up.
    pub fn last_seen(&self, name: &str) -> Option<i64> {
        self.last_seen.lock().get(name).copied()
    }
}
