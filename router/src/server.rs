//! The HTTP server: routes, and the small endpoints (models, health, metrics, version).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Encoder, TextEncoder};
use serde_json::json;

use crate::handlers;
use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::types::{ModelCard, ModelList};
use crate::state::AppState;

/// The axum application.
pub fn app(state: Arc<AppState>) -> axum::Router {
    let limit = state.config.max_body_bytes;
    axum::Router::new()
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
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
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

/// Binds `addr` and serves the router until Ctrl-C.
pub async fn serve_http(state: Arc<AppState>, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, models = ?state.config.model_names, "router listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
