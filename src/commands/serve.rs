//! `ferrite serve`: the one-command local stack — the OpenAI-compatible router and an embedded worker (CPU, or CUDA
//! with `--backend cuda`) in one process (the worker listens on a loopback port; the router talks to it over gRPC
//! like to any worker).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferrite_common::model::ModelFiles;
use ferrite_common::text::TextAssets;
use ferrite_router::{ApiKeys, AppState, AuthConfig, RouterConfig, TlsFiles, serve_http};
use ferrite_router::{CostWeights, KvEventsMode, MAX_MIGRATION_LIMIT, PoolConfig, Routing, WorkerPool};
use ferrite_router::{Limits, ToolCallParser};
use ferrite_worker::metrics::WorkerMetrics;
use ferrite_worker::server::Worker;

use super::{EngineArgs, ModelArgs, resolve_model};

/// A secret from the command line or environment: `Debug` never shows it.
#[derive(Clone)]
pub struct Redacted(String);

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// HTTP front-end options shared by `serve` and `router`.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address to listen on (use 0.0.0.0 to accept remote clients).
    #[arg(long, env = "FERRITE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, env = "FERRITE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Extra names clients may use as `model` (repeatable), e.g. `meta/llama-3.1-8b-instruct`.
    #[arg(long = "served-model-name", env = "FERRITE_SERVED_MODEL_NAMES", value_delimiter = ',')]
    pub served_model_names: Vec<String>,
    /// Requests in flight before new ones get HTTP 429.
    #[arg(long, env = "FERRITE_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes (HTTP 413 above).
    #[arg(long, env = "FERRITE_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// File of API keys, one per line: requests must send `Authorization: Bearer <key>` (health stays open).
    #[arg(long, env = "FERRITE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// An accepted API key (repeatable, or comma-separated in the variable). Prefer the file or the variable: a key
    /// on the command line shows in the process list. All keys from all sources are accepted.
    #[arg(long = "api-key", env = "FERRITE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<Redacted>,
    /// `/metrics` needs an API key too (by default it stays open for Prometheus).
    #[arg(long, env = "FERRITE_PROTECT_METRICS")]
    pub protect_metrics: bool,
    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`).
    #[arg(long, env = "FERRITE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "FERRITE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How tool calls are rendered and parsed: `auto` (from the chat template), `hermes`
    /// (`<tool_call>{"name", "arguments"}</tool_call>`) or `llama3_json` (`{"name", "parameters"}`).
    #[arg(long, env = "FERRITE_TOOL_CALL_PARSER", default_value = "auto")]
    pub tool_call_parser: ToolCallParser,
}

impl HttpArgs {
    /// The router's configuration; reads API keys from `--api-key-file` and `FERRITE_API_KEYS`.
    pub fn config(&self, model_id: &str) -> anyhow::Result<RouterConfig> {
        let mut names = vec![model_id.to_string()];
        names.extend(self.served_model_names.iter().filter(|n| n.as_str() != model_id).cloned());
        Ok(RouterConfig {
            model_names: names,
            max_concurrent_requests: self.max_concurrent_requests.max(1),
            max_body_bytes: self.max_body_bytes,
            auth: self.auth()?,
            tool_call_parser: self.tool_call_parser,
        })
    }

    /// API keys from the file and `--api-key`, or `None` when neither is given.
    fn auth(&self) -> anyhow::Result<Option<Arc<AuthConfig>>> {
        let mut lines = Vec::new();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
            lines.extend(text.lines().map(str::to_string));
        }
        lines.extend(self.api_keys.iter().map(|k| k.0.clone()));
        if lines.is_empty() && self.api_key_file.is_none() {
            anyhow::ensure!(!self.protect_metrics, "--protect-metrics needs API keys (--api-key-file, --api-key or FERRITE_API_KEYS)");
            return Ok(None);
        }
        let keys = ApiKeys::new(lines.iter().map(String::as_str))?;
        tracing::info!(keys = ?keys, protect_metrics = self.protect_metrics, "API keys required");
        Ok(Some(Arc::new(AuthConfig { keys: Arc::new(keys), protect_metrics: self.protect_metrics })))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The HTTPS certificate and key, when given.
    pub fn tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles { cert: self.tls_cert.clone()?, key: self.tls_key.clone()? })
    }
}

/// Routing and failover options shared by `serve` and `router`.
#[derive(clap::Args, Debug, Clone)]
pub struct RoutingArgs {
    /// How to pick a worker: `cache-aware` (prefix-cache overlap from the workers' KV events against their load),
    /// `least-load` (fewest requests in flight) or `round-robin`.
    #[arg(long, env = "FERRITE_ROUTING", default_value = "cache-aware")]
    pub routing: Routing,
    /// How many times a stream whose worker fails after its first token moves to another worker (prompt + the tokens
    /// so far, the client sees one stream); 0 ends such a stream with an error event.
    #[arg(long, env = "FERRITE_MIGRATION_LIMIT", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_MIGRATION_LIMIT)))]
    pub migration_limit: u32,
    /// Where cache-aware routing learns which prefix blocks each worker holds: `on` = the workers' KV events
    /// (exact; a worker without them is tracked approximately), `off` = approximately for every worker (the blocks
    /// of the prompts this router sent it, for `--approx-kv-ttl`).
    #[arg(long, env = "FERRITE_KV_EVENTS", default_value = "on")]
    pub kv_events: KvEventsMode,
    /// Seconds approximate tracking assumes a worker keeps a routed prompt's blocks (1..=3600).
    #[arg(long, env = "FERRITE_APPROX_KV_TTL", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub approx_kv_ttl: u64,
    /// Cache-aware cost: how much a block of prefill (queued, or the prompt's uncached part) weighs against a KV
    /// block held by running requests (Dynamo's overlap score weight). Above 1 favours prefix hits over balance.
    #[arg(long, env = "FERRITE_ROUTING_PREFILL_WEIGHT", default_value_t = 2.0)]
    pub routing_prefill_weight: f64,
    /// Cache-aware selection temperature: 0 picks the lowest cost; above 0 draws a worker with probability
    /// ∝ exp(−normalized cost / T), spreading near-ties (0..=10).
    #[arg(long, env = "FERRITE_ROUTING_TEMPERATURE", default_value_t = 0.0)]
    pub routing_temperature: f64,
}

impl RoutingArgs {
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            routing: self.routing,
            migration_limit: self.migration_limit,
            kv_events: self.kv_events,
            approx_ttl: Duration::from_secs(self.approx_kv_ttl),
            weights: CostWeights { prefill: self.routing_prefill_weight, temperature: self.routing_temperature, ..CostWeights::default() },
            ..PoolConfig::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Routing (as `ferrite router`); with the one embedded worker the policy changes nothing and a stream has no
    /// other worker to migrate to.
    #[command(flatten)]
    routing: RoutingArgs,
    /// Embedded CPU workers behind the router (each its own engine and KV cache, sharing the cores): a one-command
    /// demo of routing across workers.
    #[arg(long, env = "FERRITE_SERVE_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    workers: u16,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.model.clone())?;
    let n = usize::from(a.workers);
    let mut cfg = a.engine.worker_config(path.clone(), None, a.http.max_concurrent_requests.max(1) * 16, &a.model);
    if n > 1 {
        // The cores are shared out: each embedded worker gets its slice (at least one thread).
        let cores = match cfg.threads {
            0 => std::thread::available_parallelism().map_or(1, |c| c.get()),
            t => t,
        };
        cfg.threads = (cores / n).max(1);
    }
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut workers = tokio::task::JoinSet::new();
        let (mut addrs, mut first) = (Vec::with_capacity(n), None);
        for i in 0..n {
            let cfg = cfg.clone();
            let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await??;
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(format!("http://{}", grpc.local_addr()?));
            if i == 0 {
                first = Some((worker.info.clone(), Arc::new(WorkerMetrics::new(&worker.engine)?)));
            }
            workers.spawn(worker.serve(grpc, std::future::pending()));
        }
        let Some((info, metrics)) = first else { anyhow::bail!("--workers must be at least 1") };
        let files = ModelFiles::open(&path)?;
        let text = Arc::new(TextAssets::load(&files)?);
        let pool = WorkerPool::with_config(&addrs, a.routing.pool_config())?;
        pool.info(Duration::from_secs(30)).await.context("embedded worker")?;
        pool.start_kv_subscriptions();
        tracing::info!(routing = %a.routing.routing, workers = n, threads_each = cfg.threads, "routing policy over the embedded workers");
        let limits = Limits { max_model_len: info.max_model_len as usize, vocab_size: info.vocab_size as usize };
        // One worker's metrics join the router's (with several, their series would collide: the router's own
        // per-worker metrics tell them apart).
        let extra: Option<ferrite_router::ExtraMetrics> =
            (n == 1).then(|| Arc::new(move || metrics.render()) as ferrite_router::ExtraMetrics);
        let state = AppState::new(text, pool, a.http.config(&info.model_id)?, limits, extra)?;
        // A worker that stops (its engine failed for good) takes the process down with a non-zero exit, so the
        // orchestrator restarts it instead of leaving an HTTP front that answers 503 forever.
        tokio::select! {
            r = serve_http(Arc::new(state), a.http.addr(), a.http.tls()) => r?,
            Some(r) = workers.join_next() => match r {
                Ok(Ok(())) => anyhow::bail!("an embedded worker stopped"),
                Ok(Err(e)) => return Err(anyhow::Error::new(e).context("an embedded worker stopped")),
                Err(e) => anyhow::bail!("an embedded worker panicked: {e}"),
            },
        }
        anyhow::Ok(())
    })
}
