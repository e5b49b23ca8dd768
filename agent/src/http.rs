//! The agent's HTTP endpoint: `/healthz` (a live lease in every joined network, and
//! the controller heard from within the renew margin), `/livez` (the main loop is turning: for a liveness
//! probe, which must not restart agents because the controller is away) and
//! `/metrics` (Prometheus, through prometheus-client as in the controller).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What `/healthz` and `/livez` judge by.
pub struct Health {
    /// Unix time the controller stopped answering (a call failed or the watch broke),
    /// 0 while it answers.
    contact_lost_at: AtomicI64,
    /// How long contact may be lost before the agent reports unhealthy: its renew
    /// margin (after that, the lease cannot be renewed in time).
    pub contact_margin_secs: AtomicI64,
    /// Unix time the main loop last turned, and how long it may stand still (three
    /// reconcile intervals, at least a minute) before `/livez` fails.
    pub loop_turned: AtomicI64,
    pub loop_grace_secs: AtomicI64,
    /// When each joined network's lease expires (also the `lease_expiry_seconds`
    /// metric, labelled by network).
    pub lease_expiry: LeaseExpiry,
}

/// The `network` label of the per-network metrics.
type NetworkLabel = Vec<(&'static str, String)>;

/// Unix time each joined network's lease expires, 0 while it holds none.
#[derive(Default)]
pub struct LeaseExpiry {
    by_network: Mutex<BTreeMap<String, i64>>,
    gauge: Family<NetworkLabel, Gauge>,
}

impl LeaseExpiry {
    /// `network`'s lease expires at `at` (0: it holds none); a network set here is
    /// joined until [`LeaseExpiry::remove`].
    pub fn set(&self, network: &str, at: i64) {
        self.networks().insert(network.to_string(), at);
        self.gauge.get_or_create(&label(network)).set(at);
    }

    /// `network` was left: neither health nor metrics speak of it any more.
    pub fn remove(&self, network: &str) {
        self.networks().remove(network);
        self.gauge.remove(&label(network));
    }

    fn networks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, i64>> {
        // The map is whole after every operation: a panic elsewhere cannot tear it.
        self.by_network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn label(network: &str) -> NetworkLabel {
    vec![("network", network.to_string())]
}

impl Default for Health {
    fn default() -> Self {
        Health {
            contact_lost_at: AtomicI64::new(0),
            contact_margin_secs: AtomicI64::new(i64::MAX),
            loop_turned: AtomicI64::new(twill_common::now_unix()),
            loop_grace_secs: AtomicI64::new(60),
            lease_expiry: LeaseExpiry::default(),
        }
    }
}

/// What the daemon reports: its health and its metrics.
pub struct Stats {
    registry: Registry,
    /// What the health endpoints judge by.
    pub health: Health,
    /// Leases of other nodes not programmed because they collide or break the rules.
    pub peers_refused: Gauge,
    /// Peers admitted but given no kernel entry (host-gw: not on this node's L2 subnet).
    pub peers_unreachable: Gauge,
    /// Peers currently programmed.
    pub peers: Gauge,
    /// Reconcile runs.
    pub reconciles: Counter,
    /// Entries added or removed by reconciles after the first one (repairs and changes).
    pub changes: Counter,
    /// Kernel operations that failed.
    pub netlink_errors: Counter,
    /// Unix time of the last successful controller call or message.
    pub last_contact: Gauge,
    /// Unix time the node certificate in use expires (0: not known).
    pub cert_expiry: Gauge,
    /// Node certificates replaced by rotation, and rotation attempts that failed.
    pub cert_rotations: Counter,
    pub cert_rotation_failures: Counter,
    /// Watch messages that replaced the whole peer set (the first one, and any after
    /// the controller could no longer resume from the agent's revision).
    pub watch_resets: Counter,
    /// Pod addresses the IPAM holds in each network's subnet, by family.
    pub pod_ips_used: Family<PodIpLabels, Gauge>,
    /// Pod addresses the IPAM can hand out in each network's subnet, by family.
    pub pod_ips_total: Family<PodIpLabels, Gauge>,
    /// Pod attachments reported by twill-cni and live.
    pub pod_attachments: Gauge,
    /// Addresses held for attachments whose network namespace is gone.
    pub pod_ips_leaked: Gauge,
    /// Attachments whose address the IPAM does not hold.
    pub pod_ips_conflicts: Gauge,
}

/// Labels of the pod address gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct PodIpLabels {
    /// The Twill network.
    pub network: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
}

impl Default for Stats {
    fn default() -> Self {
        let mut root = Registry::default();
        let s = Stats {
            registry: Registry::default(),
            health: Health::default(),
            peers_refused: Gauge::default(),
            peers_unreachable: Gauge::default(),
            peers: Gauge::default(),
            reconciles: Counter::default(),
            changes: Counter::default(),
            netlink_errors: Counter::default(),
            last_contact: Gauge::default(),
            cert_expiry: Gauge::default(),
            cert_rotations: Counter::default(),
            cert_rotation_failures: Counter::default(),
            watch_resets: Counter::default(),
            pod_ips_used: Family::default(),
            pod_ips_total: Family::default(),
            pod_attachments: Gauge::default(),
            pod_ips_leaked: Gauge::default(),
            pod_ips_conflicts: Gauge::default(),
        };
        // REFERENCE 2.11 names the pod address gauges without the agent's prefix.
        root.register(
            "twill_pod_ips_used",
            "Pod addresses the IPAM holds in the network's subnet on this node",
            s.pod_ips_used.clone(),
        );
        root.register(
            "twill_pod_ips_total",
            "Pod addresses the IPAM can hand out in the network's subnet on this node",
            s.pod_ips_total.clone(),
        );
        let registry = root.sub_registry_with_prefix("twill_agent");
        registry.register(
            "pod_attachments",
            "Pod attachments reported by twill-cni and live",
            s.pod_attachments.clone(),
        );
        registry.register(
            "pod_ips_leaked",
            "Pod addresses held for attachments whose network namespace is gone",
            s.pod_ips_leaked.clone(),
        );
        registry.register(
            "pod_ips_conflicts",
            "Pod attachments whose address the IPAM does not hold",
            s.pod_ips_conflicts.clone(),
        );
        registry.register("peers", "Peers programmed", s.peers.clone());
        registry.register("reconcile_runs", "Reconcile runs", s.reconciles.clone());
        registry.register(
            "peers_refused",
            "Peer leases not programmed because they collide with another peer or break the field rules",
            s.peers_refused.clone(),
        );
        registry.register(
            "peers_unreachable",
            "Peers given no route because they cannot be reached directly (host-gw: not on this node's L2 subnet)",
            s.peers_unreachable.clone(),
        );
        registry.register(
            "changes",
            "Kernel entries added or removed after start-up",
            s.changes.clone(),
        );
        registry.register(
            "netlink_errors",
            "Kernel operations that failed",
            s.netlink_errors.clone(),
        );
        registry.register(
            "last_contact_seconds",
            "Unix time of the last answer from the controller",
            s.last_contact.clone(),
        );
        registry.register(
            "lease_expiry_seconds",
            "Unix time the network's lease expires (0: none held)",
            s.health.lease_expiry.gauge.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Unix time the node certificate in use expires",
            s.cert_expiry.clone(),
        );
        registry.register(
            "cert_rotations",
            "Node certificates replaced before expiry (IdentityService.Renew)",
            s.cert_rotations.clone(),
        );
        registry.register(
            "cert_rotation_failures",
            "Certificate rotation attempts that failed (retried with backoff)",
            s.cert_rotation_failures.clone(),
        );
        registry.register(
            "watch_resets",
            "Watch messages that replaced the whole peer set",
            s.watch_resets.clone(),
        );
        Stats {
            registry: root,
            ..s
        }
    }
}

impl Stats {
    /// The controller answered.
    pub fn contact(&self, now: i64) {
        self.last_contact.set(now);
        self.health.contact_lost_at.store(0, Ordering::Relaxed);
    }

    /// The controller did not answer (from `now` on, unless it had already stopped).
    pub fn no_contact(&self, now: i64) {
        let _ = self.health.contact_lost_at.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl Health {
    /// Why the agent's loop counts as stuck at `now`, if it does (`/livez`).
    pub fn stalled(&self, now: i64) -> Option<String> {
        let idle = now - self.loop_turned.load(Ordering::Relaxed);
        (idle > self.loop_grace_secs.load(Ordering::Relaxed))
            .then(|| format!("the agent's main loop has not turned for {idle}s"))
    }

    /// Why the agent is unhealthy at `now`, if it is (`/healthz`): the first joined
    /// network whose lease is missing or expired is named.
    pub fn unhealthy(&self, now: i64) -> Option<String> {
        let expiries = self.lease_expiry.networks().clone();
        if expiries.is_empty() {
            return Some("no lease held (no network joined yet)".into());
        }
        for (network, expiry) in expiries {
            if expiry == 0 {
                return Some(format!(
                    "network {network}: no lease held (not acquired yet, or revoked)"
                ));
            }
            if expiry <= now {
                return Some(format!(
                    "network {network}: the lease expired {}s ago and could not be renewed",
                    now - expiry
                ));
            }
        }
        let lost = self.contact_lost_at.load(Ordering::Relaxed);
        let margin = self.contact_margin_secs.load(Ordering::Relaxed);
        if lost != 0 && now - lost > margin {
            return Some(format!(
                "no answer from the controller for {}s, longer than the renew margin ({margin}s)",
                now - lost
            ));
        }
        None
    }
}

/// The agent's routes: `/healthz`, `/livez`, `/metrics`.
pub fn routes(stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .with_state(stats)
}

async fn healthz(State(s): State<Arc<Stats>>) -> (StatusCode, String) {
    verdict(s.health.unhealthy(twill_common::now_unix()))
}

async fn livez(State(s): State<Arc<Stats>>) -> (StatusCode, String) {
    verdict(s.health.stalled(twill_common::now_unix()))
}

/// `ok`, or what is wrong as a 503.
fn verdict(wrong: Option<String>) -> (StatusCode, String) {
    match wrong {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(s): State<Arc<Stats>>) -> ([(&'static str, &'static str); 1], String) {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &s.registry);
    twill_runtime::openmetrics(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_lease_and_the_controller_contact() {
        let s = Stats::default();
        let h = &s.health;
        assert!(h.unhealthy(100).unwrap().contains("no lease"));
        h.lease_expiry.set("default", 1_000);
        h.contact_margin_secs.store(60, Ordering::Relaxed);
        s.contact(100);
        assert_eq!(h.unhealthy(100), None);
        s.no_contact(200);
        s.no_contact(250);
        assert_eq!(h.unhealthy(260), None, "within the renew margin");
        let why = h.unhealthy(261).unwrap();
        assert!(
            why.contains("no answer from the controller for 61s"),
            "{why}"
        );
        s.contact(270);
        assert_eq!(h.unhealthy(270), None);
        assert!(h.unhealthy(1_000).unwrap().contains("expired"));
    }

    #[test]
    fn liveness_follows_the_loop_not_the_controller() {
        let h = Health::default();
        h.loop_turned.store(100, Ordering::Relaxed);
        h.loop_grace_secs.store(60, Ordering::Relaxed);
        assert_eq!(h.stalled(160), None);
        let why = h.stalled(161).unwrap();
        assert!(why.contains("not turned for 61s"), "{why}");
        assert!(h.unhealthy(161).is_some(), "no lease: unhealthy, yet alive");
        h.loop_turned.store(161, Ordering::Relaxed);
        assert_eq!(h.stalled(161), None);
    }

    #[test]
    fn health_names_the_network_whose_lease_is_in_trouble_and_metrics_carry_it() {
        let s = Stats::default();
        let h = &s.health;
        h.lease_expiry.set("default", 1_000);
        h.lease_expiry.set("blue", 0);
        let why = h.unhealthy(100).unwrap();
        assert!(
            why.contains("network blue") && why.contains("no lease"),
            "{why}"
        );
        h.lease_expiry.set("blue", 500);
        assert_eq!(h.unhealthy(100), None);
        let why = h.unhealthy(600).unwrap();
        assert!(
            why.contains("network blue") && why.contains("expired"),
            "{why}"
        );
        let mut out = String::new();
        encode(&mut out, &s.registry).unwrap();
        assert!(
            out.contains(r#"twill_agent_lease_expiry_seconds{network="blue"} 500"#),
            "{out}"
        );
        h.lease_expiry.remove("blue");
        assert_eq!(h.unhealthy(600), None, "a network left is no longer judged");
        let mut out = String::new();
        encode(&mut out, &s.registry).unwrap();
        assert!(!out.contains(r#"network="blue""#), "{out}");
    }
}
