//! The agent's HTTP endpoint: `/healthz` (lease held and device programmed) and
//! `/metrics` (Prometheus, through prometheus-client as in the controller).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the daemon reports: health and its metrics.
pub struct Stats {
    registry: Registry,
    /// Lease held and device programmed.
    pub healthy: AtomicBool,
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
    /// Unix time the lease expires.
    pub lease_expiry: Gauge,
}

impl Default for Stats {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("twill_agent");
        let s = Stats {
            registry: Registry::default(),
            healthy: AtomicBool::new(false),
            peers: Gauge::default(),
            reconciles: Counter::default(),
            changes: Counter::default(),
            netlink_errors: Counter::default(),
            last_contact: Gauge::default(),
            lease_expiry: Gauge::default(),
        };
        registry.register("peers", "Peers programmed", s.peers.clone());
        registry.register("reconcile_runs", "Reconcile runs", s.reconciles.clone());
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
            "Unix time the lease expires",
            s.lease_expiry.clone(),
        );
        Stats { registry, ..s }
    }
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(stats);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP endpoint stopped");
    }
}

async fn healthz(State(s): State<Arc<Stats>>) -> (StatusCode, &'static str) {
    if s.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "lease not held or device not programmed yet\n",
        )
    }
}

async fn metrics(State(s): State<Arc<Stats>>) -> ([(&'static str, &'static str); 1], String) {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &s.registry);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}
