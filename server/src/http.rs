//! The controller's HTTP endpoint: `/healthz` (process alive), `/readyz` (store open,
//! gRPC serving and the lease writer running; with the etcd store: connected to etcd
//! and following its watch) and `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::leases::Leases;
use crate::metrics::Metrics;

/// What the endpoint reports on.
pub struct HttpState {
    /// Set once gRPC is serving.
    pub ready: AtomicBool,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The lease writer, whose death makes the controller unready.
    pub leases: Leases,
    /// This replica (etcd store): ready while it follows etcd, leader or not.
    pub replica: Option<Arc<crate::replica::Replica>>,
}

/// The controller's routes: `/healthz`, `/readyz`, `/metrics`.
pub fn routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    if let Some(r) = &s.replica {
        return if !s.ready.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        } else if !r.is_caught_up() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not following etcd (connecting, or its watch broke): the table may be behind\n",
            )
        } else if r.is_leading() {
            (StatusCode::OK, "ready (leader)\n")
        } else {
            (StatusCode::OK, "ready (follower)\n")
        };
    }
    if !s.leases.is_running() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the lease writer stopped: no lease can be granted or renewed (see the log)\n",
        )
    } else if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> ([(&'static str, &'static str); 1], String) {
    twill_runtime::openmetrics(s.metrics.render())
}
