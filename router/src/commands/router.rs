//! `ferrite router`: the OpenAI-compatible front end for separately running workers.

use std::sync::Arc;
use std::time::Duration;

use ferrite_common::model::ModelFiles;
use ferrite_common::text::TextAssets;
use ferrite_router::server::{AppState, serve_http};
use ferrite_router::validate::Limits;
use ferrite_router::workers::WorkerPool;

use super::resolve_model;
use super::serve::HttpArgs;

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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let files = ModelFiles::open(&path)?;
        let text = Arc::new(TextAssets::load(&files)?);
        let pool = WorkerPool::new(&a.workers).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let info = pool.info(Duration::from_secs(60)).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let limits = Limits { max_model_len: info.max_model_len as usize, vocab_size: info.vocab_size as usize };
        let state = AppState::new(text, pool, a.http.config(&info.model_id), limits, None).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        serve_http(Arc::new(state), a.http.addr()).await?;
        anyhow::Ok(())
    })
}
