//! A worker's HTTP side port: Prometheus `/metrics` and the probes a kubelet calls (the worker library renders the
//! metrics text and judges liveness; only the binary speaks HTTP).
//!
//! - `/health/live`: 200 while the engine is alive (not stopped on a fatal error, and a busy engine finished a step
//!   within `STUCK_STEP_MS`), else 503: the kubelet restarts a hung worker.
//! - `/health/ready`: 200 once the model is loaded and the gRPC port serves and, with `--register-with`, while the
//!   cluster holds the worker's registration (not before it registered, nor once it deregistered to drain); and
//!   only while the engine is alive.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use ferrite_worker::engine::core::EngineHandle;
use ferrite_worker::metrics::WorkerMetrics;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the probes read.
#[derive(Clone)]
struct Probes {
    engine: EngineHandle,
    ready: watch::Receiver<bool>,
}

impl Probes {
    fn live(&self) -> (StatusCode, axum::Json<serde_json::Value>) {
        let (live, age) = self.engine.liveness();
        let status = if live { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, axum::Json(json!({"live": live, "last_step_age_ms": age, "fatal_error": self.engine.fatal_error()})))
    }

    fn ready(&self) -> (StatusCode, axum::Json<serde_json::Value>) {
        let (live, _) = self.engine.liveness();
        let ready = live && *self.ready.borrow();
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, axum::Json(json!({"ready": ready})))
    }
}

/// Binds `addr` and serves `/metrics`, `/health/live` and `/health/ready` in the background (`ready`: the worker
/// serves and takes requests); returns the bound address.
pub async fn spawn(engine: &EngineHandle, addr: SocketAddr, ready: watch::Receiver<bool>) -> anyhow::Result<SocketAddr> {
    let metrics = Arc::new(WorkerMetrics::new(engine)?);
    let probes = Probes { engine: engine.clone(), ready };
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (live, ready) = (probes.clone(), probes);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&metrics);
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()).into_response() }
            }),
        )
        .route("/health/live", get(move || std::future::ready(live.live())))
        .route("/health/ready", get(move || std::future::ready(ready.ready())));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "worker HTTP server stopped");
        }
    });
    Ok(bound)
}
