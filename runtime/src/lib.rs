//! What the controller and the agent share around their work: the HTTP endpoint that
//! serves their health checks and Prometheus metrics (each binary brings its own
//! routes), and the shutdown signal. Kept out of `twill-common`, which does no I/O
//! beyond the files it owns.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tracing::info;

/// The content type of a Prometheus (OpenMetrics) scrape.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The endpoint's address could not be bound; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --metrics-addr {addr}: {cause}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why the kernel refused it (in the message, so not also a source).
    pub cause: std::io::Error,
}

/// Binds the health and metrics endpoint (`--metrics-addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| BindError { addr, cause })
}

/// Serves `routes` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, routes: Router) {
    if let Err(e) = axum::serve(listener, routes).await {
        tracing::error!(error = %e, "HTTP endpoint stopped");
    }
}

/// A metrics response: the OpenMetrics content type and `body`.
pub fn openmetrics(body: String) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", OPENMETRICS)], body)
}

/// Resolves on SIGTERM or an interrupt (Ctrl-C), saying which in the log. Where no
/// SIGTERM handler can be installed it waits for the interrupt alone.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("interrupt received"),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM; stopping on an interrupt only");
            let _ = tokio::signal::ctrl_c().await;
            info!("interrupt received");
        }
    }
}
