//! The controller's Prometheus metrics and its record of connected agents.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use twill_pki::CsrFault;

use crate::identity::TokenFault;

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
    /// Bootstrap and renewal requests refused, by reason (see `Refusal`).
    certs_refused: Family<RefusalLabels, Counter>,
    /// 1 while this replica is the elected leader (etcd store), else 0.
    pub is_leader: Gauge,
    /// Leaders this replica has seen elected (itself or another).
    pub leader_changes: Counter,
    /// Seconds one etcd request took (reads, fenced writes, lease keep-alives).
    pub etcd_request_seconds: Histogram,
    /// Writes this replica forwarded to the leader.
    pub forwarded_writes: Counter,
}

/// Why a Bootstrap or Renew request got no certificate: the `reason` label of
/// `twill_node_certificates_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The bootstrap token (`token_malformed`, `token_unknown`, `token_expired`,
    /// `token_wrong_secret`).
    Token(TokenFault),
    /// The certificate signing request (`csr_malformed`, `csr_bad_signature`,
    /// `csr_weak_key`, `csr_subject`).
    Csr(CsrFault),
    /// Renewal without a node certificate (`no_node_certificate`).
    NoNodeCertificate,
    /// Renewal with a certificate that has expired since its connection opened
    /// (`certificate_expired`).
    CertificateExpired,
    /// Renewal with a revoked certificate (`revoked`).
    Revoked,
    /// The controller has no signing CA (`no_signer`).
    NoSigner,
    /// Too many failed token attempts from the caller's address (`rate_limited`).
    RateLimited,
    /// Bootstrap of a node name that is alive: it holds a live lease or an unexpired,
    /// unrevoked certificate (`name_alive`).
    NameAlive,
    /// Bootstrap of a name the token is not bound to (`token_not_for_name`).
    TokenNotForName,
    /// Bootstrap with a token whose uses are spent (`token_used_up`).
    TokenUsedUp,
    /// Renewals faster than a node may make them (`renew_rate_limited`).
    RenewRateLimited,
}

impl Refusal {
    /// Every reason, so that each is exported (at zero) before it first happens and a
    /// rate over it has a starting point.
    const ALL: [Refusal; 17] = [
        Refusal::Token(TokenFault::Malformed),
        Refusal::Token(TokenFault::Unknown),
        Refusal::Token(TokenFault::Expired),
        Refusal::Token(TokenFault::WrongSecret),
        Refusal::Csr(CsrFault::Malformed),
        Refusal::Csr(CsrFault::BadSignature),
        Refusal::Csr(CsrFault::WeakKey),
        Refusal::Csr(CsrFault::Subject),
        Refusal::NoNodeCertificate,
        Refusal::CertificateExpired,
        Refusal::Revoked,
        Refusal::NoSigner,
        Refusal::RateLimited,
        Refusal::NameAlive,
        Refusal::TokenNotForName,
        Refusal::TokenUsedUp,
        Refusal::RenewRateLimited,
    ];

    /// The label value.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Token(TokenFault::Malformed) => "token_malformed",
            Refusal::Token(TokenFault::Unknown) => "token_unknown",
            Refusal::Token(TokenFault::Expired) => "token_expired",
            Refusal::Token(TokenFault::WrongSecret) => "token_wrong_secret",
            Refusal::Csr(CsrFault::Malformed) => "csr_malformed",
            Refusal::Csr(CsrFault::BadSignature) => "csr_bad_signature",
            Refusal::Csr(CsrFault::WeakKey) => "csr_weak_key",
            Refusal::Csr(CsrFault::Subject) => "csr_subject",
            Refusal::NoNodeCertificate => "no_node_certificate",
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::Revoked => "revoked",
            Refusal::NoSigner => "no_signer",
            Refusal::RateLimited => "rate_limited",
            Refusal::NameAlive => "name_alive",
            Refusal::TokenNotForName => "token_not_for_name",
            Refusal::TokenUsedUp => "token_used_up",
            Refusal::RenewRateLimited => "renew_rate_limited",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: Refusal,
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
            certs_refused: Family::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            etcd_request_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            forwarded_writes: Counter::default(),
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
            "node_certificates_refused",
            "Bootstrap and renewal requests refused, by reason",
            m.certs_refused.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this replica is the elected writer (etcd store), else 0",
            m.is_leader.clone(),
        );
        registry.register(
            "leader_changes",
            "Leaders this replica has seen elected, itself or another (etcd store)",
            m.leader_changes.clone(),
        );
        registry.register(
            "etcd_request_seconds",
            "Time one etcd request took (etcd store)",
            m.etcd_request_seconds.clone(),
        );
        registry.register(
            "forwarded_writes",
            "Writes this replica forwarded to the leader (etcd store)",
            m.forwarded_writes.clone(),
        );
        for reason in Refusal::ALL {
            // Creating the series is the point; the guard it returns is not needed.
            drop(m.certs_refused.get_or_create(&RefusalLabels { reason }));
        }
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a Bootstrap or Renew request refused for `reason`.
    pub fn cert_refused(&self, reason: Refusal) {
        self.certs_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_exported_by_reason_from_zero() {
        let m = Metrics::default();
        let line = |reason: &str| {
            let text = m.render();
            let prefix = format!("twill_node_certificates_refused_total{{reason=\"{reason}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_string))
                .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
        };
        for reason in Refusal::ALL {
            assert_eq!(line(reason.as_str()), "0");
        }
        m.cert_refused(Refusal::Csr(CsrFault::WeakKey));
        m.cert_refused(Refusal::Csr(CsrFault::WeakKey));
        m.cert_refused(Refusal::RateLimited);
        assert_eq!(line("csr_weak_key"), "2");
        assert_eq!(line("rate_limited"), "1");
        assert_eq!(line("token_unknown"), "0");
    }
}
