//! `/metrics` over HTTP for a worker process (the worker library renders the text; only the binary speaks HTTP).

use std::net::SocketAddr;
use std::sync::Arc;

use ferrite_worker::engine::core::EngineHandle;
use ferrite_worker::metrics::WorkerMetrics;
use tokio::net::TcpListener;

/// Binds `addr` and serves the worker's Prometheus metrics on `/metrics` in the background; returns the bound address.
pub async fn spawn(engine: &EngineHandle, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let metrics = Arc::new(WorkerMetrics::new(engine)?);
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = Arc::clone(&metrics);
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
