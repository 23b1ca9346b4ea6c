//! The HTTP server: routes, and the small endpoints (models, health, metrics, version).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Encoder, TextEncoder};
use serde_json::json;

use crate::error::RouterError;
use crate::handlers;
use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::types::{ModelCard, ModelList};
use crate::state::AppState;

/// The axum application.
pub fn app(state: Arc<AppState>) -> axum::Router {
    let limit = state.config.max_body_bytes;
    let auth = state.config.auth.clone();
    let router = axum::Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/health/live", get(live))
        .route("/v1/health/ready", get(ready))
        .route("/health", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/version", get(version))
        .route("/v1/metadata", get(metadata))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit));
    let router = match auth {
        Some(auth) => router.layer(axum::middleware::from_fn_with_state(auth, crate::auth::require_key)),
        None => router,
    };
    router.with_state(state)
}

fn card(st: &AppState, id: &str) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        object: "model",
        created: st.created,
        owned_by: "ferrite",
        max_model_len: st.limits.max_model_len as u32,
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: st.config.model_names.iter().map(|id| card(&st, id)).collect() })
}

/// `GET /v1/models/{model}` (`client.models.retrieve`): the card, or 404 `model_not_found`.
async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.resolve_model(&id) {
        Ok(id) => Json(card(&st, &id)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"object": "health.response", "message": "Service is live."}))
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.workers.any_ready().await {
        Json(json!({"object": "health.response", "message": "Service is ready."})).into_response()
    } else {
        ApiError::new(ErrorKind::Unavailable, "no worker is ready").into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.workers.update_gauges();
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&st.metrics.registry.gather(), &mut buf);
    let mut text = String::from_utf8(buf).unwrap_or_default();
    if let Some(extra) = &st.extra_metrics {
        text.push_str(&extra());
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({"release": env!("CARGO_PKG_VERSION"), "api": "v1"}))
}

async fn metadata(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "modelInfo": st.config.model_names.iter().map(|m| json!({"shortName": m, "modelUrl": ""})).collect::<Vec<_>>(),
        "maxModelLen": st.limits.max_model_len,
        "workers": st.workers.len(),
    }))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ApiError { code: Some("not_found"), ..ApiError::new(ErrorKind::InvalidRequest, "Unknown endpoint.") }.body()),
    )
        .into_response()
}

/// A PEM certificate chain and private key for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Binds `addr` and serves the router (HTTPS with `tls`) until Ctrl-C or SIGTERM, then finishes the requests in
/// flight (up to 30 s for HTTPS; plain HTTP waits for them all).
pub async fn serve_http(state: Arc<AppState>, addr: std::net::SocketAddr, tls: Option<TlsFiles>) -> Result<(), RouterError> {
    serve_http_with(state, addr, tls, axum::Router::new()).await
}

/// [`serve_http`] with more routes (the control plane's `/v1/cluster`).
pub async fn serve_http_with(
    state: Arc<AppState>,
    addr: std::net::SocketAddr,
    tls: Option<TlsFiles>,
    extra: axum::Router,
) -> Result<(), RouterError> {
    let app = app(Arc::clone(&state)).merge(extra);
    let Some(tls) = tls else {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| RouterError::Bind { addr, source: e })?;
        let bound = listener.local_addr().map_err(|e| RouterError::Bind { addr, source: e })?;
        tracing::info!(addr = %bound, models = ?state.config.model_names, "router listening (http)");
        return axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.map_err(RouterError::Serve);
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
        .await
        .map_err(|e| RouterError::Tls(format!("{} / {}: {e}", tls.cert.display(), tls.key.display())))?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(30)));
    });
    tracing::info!(addr = %addr, models = ?state.config.model_names, "router listening (https)");
    axum_server::bind_rustls(addr, config).handle(handle).serve(app.into_make_service()).await.map_err(RouterError::Serve)
}

/// Ctrl-C or SIGTERM (what Kubernetes sends first).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
