//! The HTTP server: state, routes, and the small endpoints (models, health, metrics, version).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferrite_common::text::TextAssets;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::handlers;
use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::types::{ModelCard, ModelList};
use crate::validate::Limits;
use crate::workers::WorkerPool;

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Names accepted as `model`; the first is the one `/v1/models` lists first.
    pub model_names: Vec<String>,
    /// Requests in flight before new ones get 429.
    pub max_concurrent_requests: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

/// Router metrics (names are `ferrite_router_*`; labels are bounded).
#[derive(Clone)]
pub struct RouterMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub e2e: HistogramVec,
    /// The router's own time before the worker sees a request: parse, chat template, tokenize, validate.
    pub prepare: HistogramVec,
    /// The router's own time per streamed token: from the worker's chunk arriving to its SSE event being handed to
    /// the HTTP body (detokenize, stop-string jail, JSON, channels).
    pub token: HistogramVec,
}

impl RouterMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("ferrite_router_requests_total", "HTTP requests"), &["endpoint", "status"])?;
        let buckets = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let ttft = HistogramVec::new(HistogramOpts::new("ferrite_router_ttft_seconds", "Time to first token").buckets(buckets.clone()), &["endpoint"])?;
        let e2e = HistogramVec::new(HistogramOpts::new("ferrite_router_e2e_seconds", "Request latency").buckets(buckets), &["endpoint"])?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        let fine = vec![1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1];
        let prepare = HistogramVec::new(
            HistogramOpts::new("ferrite_router_prepare_seconds", "Router time before the worker sees a request").buckets(fine.clone()),
            &["endpoint"],
        )?;
        let token = HistogramVec::new(
            HistogramOpts::new("ferrite_router_token_seconds", "Router time per streamed token (worker chunk in, SSE event out)").buckets(fine),
            &["endpoint"],
        )?;
        registry.register(Box::new(prepare.clone()))?;
        registry.register(Box::new(token.clone()))?;
        Ok(Self { registry, requests, ttft, e2e, prepare, token })
    }
}

/// Extra Prometheus text appended to `/metrics` (the embedded worker's, in `ferrite serve`).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub text: Arc<TextAssets>,
    pub workers: WorkerPool,
    pub config: RouterConfig,
    pub limits: Limits,
    pub permits: Arc<Semaphore>,
    pub metrics: RouterMetrics,
    pub extra_metrics: Option<ExtraMetrics>,
    pub created: u64,
}

impl AppState {
    pub fn new(text: Arc<TextAssets>, workers: WorkerPool, config: RouterConfig, limits: Limits, extra_metrics: Option<ExtraMetrics>) -> Result<Self, ApiError> {
        let metrics = RouterMetrics::new().map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        Ok(Self {
            text,
            workers,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            config,
            limits,
            metrics,
            extra_metrics,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }

    /// The canonical name for `model`, or 404.
    pub fn resolve_model(&self, model: &str) -> Result<String, ApiError> {
        if self.config.model_names.iter().any(|m| m == model) {
            Ok(model.to_string())
        } else {
            Err(ApiError { param: Some("model".into()), ..ApiError::new(ErrorKind::ModelNotFound, format!("The model `{model}` does not exist.")) })
        }
    }
}

/// The axum application.
pub fn app(state: Arc<AppState>) -> axum::Router {
    let limit = state.config.max_body_bytes;
    axum::Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(models))
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

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: st
            .config
            .model_names
            .iter()
            .map(|id| ModelCard { id: id.clone(), object: "model", created: st.created, owned_by: "ferrite", max_model_len: st.limits.max_model_len as u32 })
            .collect(),
    })
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
    (StatusCode::NOT_FOUND, Json(ApiError { code: Some("not_found"), ..ApiError::new(ErrorKind::InvalidRequest, "Unknown endpoint.") }.body()))
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
