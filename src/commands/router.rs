//! `ferrite router`: the OpenAI-compatible front end for separately running workers.

use std::sync::Arc;
use std::time::Duration;

use ferrite_common::model::ModelFiles;
use ferrite_common::text::TextAssets;
use ferrite_router::Limits;
use ferrite_router::{AppState, serve_http};
use ferrite_router::{PoolConfig, WorkerPool};

use super::resolve_model;
use super::serve::{HttpArgs, RoutingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    http: HttpArgs,
    /// Worker gRPC addresses, e.g. `http://10.0.0.5:50051` (repeatable or comma-separated).
    #[arg(long = "worker", env = "FERRITE_WORKERS", value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// The model the workers serve (a .gguf or HF directory): the router needs its tokenizer and chat template.
    #[arg(long, env = "FERRITE_MODEL")]
    model: Option<std::path::PathBuf>,
    /// Context limit for request validation (0 = the model's); the workers may enforce a lower one.
    #[arg(long, env = "FERRITE_MAX_MODEL_LEN", default_value_t = 0)]
    max_model_len: usize,
    #[command(flatten)]
    routing: RoutingArgs,
}

/// The router listens at once: it takes the model id and limits from the model files it was given, answers 503 (and
/// `/v1/health/ready` 503) until a worker is reachable, and checks the first worker that answers for agreement.
pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let files = ModelFiles::open(&path)?;
        let text = Arc::new(TextAssets::load(&files)?);
        let (vocab, fingerprint) = (files.config.vocab_size, files.fingerprint()?);
        // Workers that serve another model than `--model` are refused (logged, kept out of routing).
        let cfg = PoolConfig { model_fingerprint: Some(fingerprint.to_vec()), ..a.routing.pool_config() };
        let pool = WorkerPool::with_config(&a.workers, cfg)?;
        pool.start_kv_subscriptions();
        tracing::info!(routing = %a.routing.routing, migration_limit = a.routing.migration_limit, workers = pool.len(), "routing policy");
        let c = &files.config;
        let max_model_len = match a.max_model_len {
            0 => c.max_position_embeddings,
            m => m.min(c.max_position_embeddings),
        };
        let limits = Limits { max_model_len, vocab_size: c.vocab_size };
        let model_id = files.path.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string());
        let check = pool.clone();
        tokio::spawn(async move {
            // Not fatal either way: a worker that comes up later is picked up by readiness and routing.
            match check.info(Duration::from_secs(24 * 3600)).await {
                Ok(info) if info.vocab_size as usize != vocab || info.model_fingerprint.as_slice() != fingerprint.as_slice() => {
                    tracing::error!(
                        worker_model = %info.model_id,
                        "the worker serves a different model than the router's --model (vocabulary or weights differ)"
                    )
                }
                Ok(info) if (info.max_model_len as usize) < max_model_len => tracing::warn!(
                    worker_max_model_len = info.max_model_len,
                    router_max_model_len = max_model_len,
                    "the worker's context limit is lower: longer requests get its error (pass --max-model-len to the router)"
                ),
                Ok(info) => tracing::info!(worker_model = %info.model_id, "a worker answered"),
                Err(e) => tracing::warn!("{e}"),
            }
        });
        let state = AppState::new(text, pool, a.http.config(&model_id)?, limits, None)?;
        serve_http(Arc::new(state), a.http.addr(), a.http.tls()).await?;
        anyhow::Ok(())
    })
}
