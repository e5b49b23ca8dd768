//! The agent's HTTP endpoint: `/healthz` (lease held and device programmed) and
//! `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

/// Counters the daemon updates and the endpoint reports.
#[derive(Default)]
pub struct Stats {
    /// Lease held and device programmed.
    pub healthy: AtomicBool,
    /// Peers currently programmed.
    pub peers: AtomicU64,
    /// Reconcile runs.
    pub reconciles: AtomicU64,
    /// Entries added or removed by reconciles after the first one (repairs and changes).
    pub changes: AtomicU64,
    /// Kernel operations that failed.
    pub netlink_errors: AtomicU64,
    /// Unix time of the last successful controller call or message.
    pub last_contact: AtomicI64,
    /// Unix time the lease expires.
    pub lease_expiry: AtomicI64,
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

async fn metrics(State(s): State<Arc<Stats>>) -> String {
    let g = |name: &str, help: &str, kind: &str, v: i128| {
        format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
    };
    [
        g(
            "twill_agent_peers",
            "Peers programmed.",
            "gauge",
            s.peers.load(Ordering::Relaxed).into(),
        ),
        g(
            "twill_agent_reconcile_runs_total",
            "Reconcile runs.",
            "counter",
            s.reconciles.load(Ordering::Relaxed).into(),
        ),
        g(
            "twill_agent_changes_total",
            "Kernel entries added or removed after start-up.",
            "counter",
            s.changes.load(Ordering::Relaxed).into(),
        ),
        g(
            "twill_agent_netlink_errors_total",
            "Kernel operations that failed.",
            "counter",
            s.netlink_errors.load(Ordering::Relaxed).into(),
        ),
        g(
            "twill_agent_last_contact_seconds",
            "Unix time of the last answer from the controller.",
            "gauge",
            s.last_contact.load(Ordering::Relaxed).into(),
        ),
        g(
            "twill_agent_lease_expiry_seconds",
            "Unix time the lease expires.",
            "gauge",
            s.lease_expiry.load(Ordering::Relaxed).into(),
        ),
    ]
    .concat()
}
