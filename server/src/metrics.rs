//! The controller's Prometheus metrics and its record of connected agents.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// Leases currently held.
    pub leases: Gauge,
    /// Subnets still free (not leased, not reserved).
    pub subnets_free: Gauge,
    /// Watch streams open now.
    pub watchers: Gauge,
    /// Watch messages sent.
    pub events_sent: Counter,
    /// Watchers that fell behind and were sent a reset snapshot.
    pub watcher_resets: Counter,
    /// Seconds from a request being queued to its lease being decided.
    pub allocation_seconds: Histogram,
    /// Seconds one store flush (group commit) took.
    pub flush_seconds: Histogram,
    /// Lease writes refused because their node exceeded its rate.
    pub rate_limited: Counter,
    /// Store writes or flushes that failed.
    pub store_failures: Counter,
    /// Reservations that cannot be honoured now.
    pub reservations_stale: Gauge,
    /// Node certificates issued (at bootstrap and at rotation).
    pub certs_issued: Counter,
    /// Node certificates issued to replace a valid one (rotation).
    pub certs_renewed: Counter,
    /// Bootstrap requests refused for their token (malformed, unknown, expired, wrong).
    pub bootstrap_token_failures: Counter,
    /// Bootstrap requests refused for their certificate signing request.
    pub bootstrap_csr_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("twill");
        let m = Metrics {
            leases: Gauge::default(),
            subnets_free: Gauge::default(),
            watchers: Gauge::default(),
            events_sent: Counter::default(),
            watcher_resets: Counter::default(),
            allocation_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            rate_limited: Counter::default(),
            store_failures: Counter::default(),
            reservations_stale: Gauge::default(),
            certs_issued: Counter::default(),
            certs_renewed: Counter::default(),
            bootstrap_token_failures: Counter::default(),
            bootstrap_csr_refused: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("leases", "Leases currently held", m.leases.clone());
        registry.register(
            "subnets_free",
            "Subnets neither leased nor reserved",
            m.subnets_free.clone(),
        );
        registry.register("watchers", "Watch streams open now", m.watchers.clone());
        registry.register(
            "watch_messages_sent",
            "Watch messages sent to watchers",
            m.events_sent.clone(),
        );
        registry.register(
            "watcher_resets",
            "Watchers that fell behind and were sent a reset snapshot",
            m.watcher_resets.clone(),
        );
        registry.register(
            "allocation_seconds",
            "Time from a lease request being queued to its lease being durably stored",
            m.allocation_seconds.clone(),
        );
        registry.register(
            "store_flush_seconds",
            "Time one store flush (group commit) took",
            m.flush_seconds.clone(),
        );
        registry.register(
            "lease_requests_rate_limited",
            "Lease writes refused because their node exceeded its rate",
            m.rate_limited.clone(),
        );
        registry.register(
            "store_failures",
            "Store writes or flushes that failed (their batch was not acknowledged)",
            m.store_failures.clone(),
        );
        registry.register(
            "reservations_stale",
            "Reservations that cannot be honoured now (outside the range or leased to another node)",
            m.reservations_stale.clone(),
        );
        registry.register(
            "node_certificates_issued",
            "Node certificates issued",
            m.certs_issued.clone(),
        );
        registry.register(
            "node_certificates_renewed",
            "Node certificates issued to replace a valid one (rotation)",
            m.certs_renewed.clone(),
        );
        registry.register(
            "bootstrap_token_failures",
            "Bootstrap requests refused for their token (malformed, unknown, expired or wrong)",
            m.bootstrap_token_failures.clone(),
        );
        registry.register(
            "bootstrap_csr_refused",
            "Bootstrap requests refused for their certificate signing request",
            m.bootstrap_csr_refused.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub use twill_common::now_unix;

/// One open watch stream.
#[derive(Debug, Clone)]
pub struct WatcherInfo {
    /// Who is watching (node or admin name).
    pub name: String,
    /// When the stream opened (Unix seconds).
    pub connected_at: i64,
    /// Revision of the last message sent to it.
    pub revision: u64,
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
    /// Records a new watch stream; returns its id.
    pub fn connected(&self, name: &str, revision: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = WatcherInfo {
            name: name.to_string(),
            connected_at: now_unix(),
            revision,
        };
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, info);
        self.seen(name);
        id
    }

    /// Records the revision just sent on stream `id`.
    pub fn sent(&self, id: u64, revision: u64) {
        if let Some(w) = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            w.revision = revision;
        }
    }

    /// Forgets stream `id`.
    pub fn disconnected(&self, id: u64) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Records that `name` called now.
    pub fn seen(&self, name: &str) {
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), now_unix());
    }

    /// Open watch streams.
    pub fn watchers(&self) -> Vec<WatcherInfo> {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// When `name` last called, if ever since start-up.
    pub fn last_seen(&self, name: &str) -> Option<i64> {
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }
}
