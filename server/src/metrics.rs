//! The controller's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::refusal::Refusal;

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// Leases currently held.
    pub leases: Gauge,
    /// Pod addresses the agents found leaked.
    pub ipam_leaks: Gauge,
    /// Pod addresses the agents found in conflict.
    pub ipam_conflicts: Gauge,
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
    /// Agents this replica asked to move to another (`replica::rebalance`).
    pub agents_moved: Counter,
    /// Seconds one etcd request took (reads, fenced writes, lease keep-alives).
    pub etcd_request_seconds: Histogram,
    /// Writes this replica forwarded to the leader.
    pub forwarded_writes: Counter,
    /// Leases held in each network.
    network_leases: Family<NetworkLabels, Gauge>,
    /// Subnets of each network's first family neither leased nor reserved.
    network_subnets_free: Family<NetworkLabels, Gauge>,
    /// Files of `--networks-dir` refused at the last reading.
    pub network_files_refused: Gauge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NetworkLabels {
    network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: Refusal,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("twill");
        let r = &mut Registering(&mut registry);
        let m = Metrics {
            leases: r.add("leases", "Leases currently held"),
            ipam_leaks: r.add(
                "ipam_leaks",
                "Pod addresses held for pods whose network namespace is gone, as the agents reported",
            ),
            ipam_conflicts: r.add(
                "ipam_conflicts",
                "Pod addresses a pod reports and its node's IPAM does not hold, as the agents reported",
            ),
            subnets_free: r.add("subnets_free", "Subnets neither leased nor reserved"),
            watchers: r.add("watchers", "Watch streams open now"),
            events_sent: r.add("watch_messages_sent", "Watch messages sent to watchers"),
            watcher_resets: r.add(
                "watcher_resets",
                "Watchers that fell behind and were sent a reset snapshot",
            ),
            allocation_seconds: r.with(
                "allocation_seconds",
                "Time from a lease request being queued to its lease being durably stored",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            flush_seconds: r.with(
                "store_flush_seconds",
                "Time one store flush (group commit) took",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            rate_limited: r.add(
                "lease_requests_rate_limited",
                "Lease writes refused because their node exceeded its rate",
            ),
            store_failures: r.add(
                "store_failures",
                "Store writes or flushes that failed (their batch was not acknowledged)",
            ),
            reservations_stale: r.add(
                "reservations_stale",
                "Reservations that cannot be honoured now (outside the range or leased to another node)",
            ),
            certs_issued: r.add("node_certificates_issued", "Node certificates issued"),
            certs_renewed: r.add(
                "node_certificates_renewed",
                "Node certificates issued to replace a valid one (rotation)",
            ),
            bootstrap_token_failures: r.add(
                "bootstrap_token_failures",
                "Bootstrap requests refused for their token (malformed, unknown, expired or wrong)",
            ),
            certs_refused: r.add(
                "node_certificates_refused",
                "Bootstrap and renewal requests refused, by reason",
            ),
            is_leader: r.add(
                "is_leader",
                "1 while this replica is the elected writer (etcd store), else 0",
            ),
            leader_changes: r.add(
                "leader_changes",
                "Leaders this replica has seen elected, itself or another (etcd store)",
            ),
            agents_moved: r.add(
                "agents_moved",
                "Agents this replica asked to resume their watch on another, serving more than its share (etcd store)",
            ),
            etcd_request_seconds: r.with(
                "etcd_request_seconds",
                "Time one etcd request took (etcd store)",
                Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            ),
            forwarded_writes: r.add(
                "forwarded_writes",
                "Writes this replica forwarded to the leader (etcd store)",
            ),
            network_leases: r.add("network_leases", "Leases held in each network"),
            network_subnets_free: r.add(
                "network_subnets_free",
                "Subnets of each network (its first family) neither leased nor reserved",
            ),
            network_files_refused: r.add(
                "network_files_refused",
                "Files of --networks-dir refused at the last reading (the log says why)",
            ),
            registry: Registry::default(),
        };
        for reason in Refusal::ALL {
            // Creating the series is the point; the guard it returns is not needed.
            drop(m.certs_refused.get_or_create(&RefusalLabels { reason }));
        }
        Metrics { registry, ..m }
    }
}

/// Registers each metric as it is made, so that its name and help sit beside its field.
struct Registering<'a>(&'a mut Registry);

impl Registering<'_> {
    fn with<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    fn add<M: Metric + Clone + Default>(&mut self, name: &str, help: &str) -> M {
        self.with(name, help, M::default())
    }
}

impl Metrics {
    /// Counts a Bootstrap or Renew request refused for `reason`.
    pub fn cert_refused(&self, reason: Refusal) {
        self.certs_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Sets `network`'s lease and free-subnet gauges.
    pub fn set_network(&self, network: &str, leases: i64, free: i64) {
        let labels = NetworkLabels {
            network: network.to_string(),
        };
        self.network_leases.get_or_create(&labels).set(leases);
        self.network_subnets_free.get_or_create(&labels).set(free);
    }

    /// Drops the gauges of a network no longer served.
    pub fn forget_network(&self, network: &str) {
        let labels = NetworkLabels {
            network: network.to_string(),
        };
        self.network_leases.remove(&labels);
        self.network_subnets_free.remove(&labels);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use twill_pki::CsrFault;

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
