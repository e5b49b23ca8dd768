//! The controller's record of connected agents: open watch streams, and when each node
//! last called (the admin API's `status` and `agents` read it).

use parking_lot::Mutex;
use std::collections::HashMap;
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
}

/// The agents the controller knows to be alive: open watch streams, and when each
/// node last called.
#[derive(Default)]
pub struct Agents {
    next_id: AtomicU64,
    watchers: Mutex<HashMap<u64, WatcherInfo>>,
    last_seen: Mutex<HashMap<String, i64>>,
}

impl Agents {
    /// Records a new watch stream, opened with a certificate valid until
    /// `cert_not_after` (Unix seconds); returns its id.
    pub fn connected(&self, name: &str, revision: u64, cert_not_after: i64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = WatcherInfo {
            name: name.to_string(),
            connected_at: now_unix(),
            revision,
            cert_not_after,
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
