//! The router's shared state: configuration, metrics, the worker pool and the model's text assets, handed to every
//! HTTP handler.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferrite_common::text::TextAssets;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::Semaphore;

use crate::auth::AuthConfig;
use crate::error::RouterError;
use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::tools::ToolCallParser;
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
    /// API keys callers must present (`None`: open).
    pub auth: Option<Arc<AuthConfig>>,
    /// How tool calls are written and parsed (`auto`: from the chat template).
    pub tool_call_parser: ToolCallParser,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            model_names: Vec::new(),
            max_concurrent_requests: 256,
            max_body_bytes: 4 << 20,
            auth: None,
            tool_call_parser: ToolCallParser::Auto,
        }
    }
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
    /// Time between a choice's consecutive worker chunks (inter-token latency as the router receives it).
    pub itl: Histogram,
    /// Completions by finish reason.
    pub finished: IntCounterVec,
    pub prompt_tokens: IntCounter,
    /// Prompt tokens the worker served from its prefix cache.
    pub cached_prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
}

impl RouterMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("ferrite_router_requests_total", "HTTP requests"), &["endpoint", "status"])?;
        let buckets = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let ttft = HistogramVec::new(
            HistogramOpts::new("ferrite_router_ttft_seconds", "Time to first token").buckets(buckets.clone()),
            &["endpoint"],
        )?;
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
            HistogramOpts::new("ferrite_router_token_seconds", "Router time per streamed token (worker chunk in, SSE event out)")
                .buckets(fine),
            &["endpoint"],
        )?;
        registry.register(Box::new(prepare.clone()))?;
        registry.register(Box::new(token.clone()))?;
        let itl = Histogram::with_opts(
            HistogramOpts::new("ferrite_router_itl_seconds", "Inter-token latency: time between a choice's consecutive worker chunks")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]),
        )?;
        let finished = IntCounterVec::new(Opts::new("ferrite_router_finished_total", "Completions by finish reason"), &["finish_reason"])?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let prompt_tokens = counter("ferrite_router_prompt_tokens_total", "Prompt tokens of finished requests")?;
        let cached_prompt_tokens =
            counter("ferrite_router_cached_prompt_tokens_total", "Prompt tokens served from a worker's prefix cache")?;
        let generated_tokens = counter("ferrite_router_generated_tokens_total", "Tokens generated")?;
        registry.register(Box::new(itl.clone()))?;
        registry.register(Box::new(finished.clone()))?;
        Ok(Self { registry, requests, ttft, e2e, prepare, token, itl, finished, prompt_tokens, cached_prompt_tokens, generated_tokens })
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
    pub fn new(
        text: Arc<TextAssets>,
        workers: WorkerPool,
        config: RouterConfig,
        limits: Limits,
        extra_metrics: Option<ExtraMetrics>,
    ) -> Result<Self, RouterError> {
        let metrics = RouterMetrics::new()?;
        workers.metrics().register(&metrics.registry)?;
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
            Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(ErrorKind::ModelNotFound, format!("The model `{model}` does not exist."))
            })
        }
    }
}
