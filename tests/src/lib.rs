//! Shared helpers for Ferrite's cross-crate tests: locating the default model (fetched through
//! `scripts/fetch-model.sh`, the only download tests may do) and the transformers reference outputs in
//! `tests/data/reference/`; fresh KV block tables for tests that drive a backend directly ([`BlockTables`]), and
//! generation on the engine core driven on the test's thread ([`generate`], [`greedy`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_worker::backend::Backend;
use ferrite_worker::engine::core::{EngineConfig, EngineOutput, EngineRequest, FinishReason};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use ferrite_worker::engine::step::EngineCore;
use serde_json::Value;

pub mod cluster;
pub mod constrained;
pub mod tiny;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A CPU worker config for tests on the default model (KV 96 MiB, context 1024, 2 threads); override fields with
/// struct update syntax.
pub fn test_worker_config() -> ferrite_worker::config::WorkerConfig {
    ferrite_worker::config::WorkerConfig {
        model: default_model(),
        model_id: None,
        kv_cache_mib: 96,
        kv_cache_dtype: Default::default(),
        max_num_batched_tokens: 256,
        decode_step_target_ms: 0,
        max_num_seqs: 16,
        max_waiting: 64,
        max_model_len: 1024,
        threads: 2,
        precision: ferrite_worker::cpu::weights::WeightPrecision::Native,
        cpu_isa: None,
        backend: Default::default(),
        cuda_device: 0,
        gpu_memory_utilization: 0.9,
        tensor_parallel_size: 1,
        enforce_eager: false,
        cuda_attention: Default::default(),
        cuda_programmatic_launch: true,
        cuda_gemm_search: true,
        kernel_cache_dir: None,
    }
}

/// Path of the default model GGUF: `$FERRITE_MODEL` if set, else whatever `scripts/fetch-model.sh` prints (it
/// downloads once and caches).
pub fn default_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("FERRITE_MODEL") {
            return PathBuf::from(p);
        }
        let out = Command::new("bash").arg(workspace_root().join("scripts/fetch-model.sh")).output().expect("run scripts/fetch-model.sh");
        assert!(out.status.success(), "fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
    .clone()
}

/// The reference folder: `$FERRITE_REFERENCE_DIR`, else `<workspace>/tests/data/reference`.
pub fn reference_dir() -> PathBuf {
    std::env::var("FERRITE_REFERENCE_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("tests/data/reference"))
}

/// `reference.json`, parsed.
pub fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        let p = reference_dir().join("reference.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).expect("reference.json parses")
    })
}

/// One reference case.
#[derive(Debug, Clone)]
pub struct RefCase {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub margins: Vec<f32>,
    pub top10: Vec<(Vec<u32>, Vec<f32>)>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("float") as f32).collect()
}

/// All generation cases of `reference.json`, sorted by name.
pub fn ref_cases() -> Vec<RefCase> {
    let cases = reference()["cases"].as_object().expect("cases object");
    let mut out: Vec<RefCase> = cases
        .iter()
        .map(|(name, c)| RefCase {
            name: name.clone(),
            prompt_ids: ids(&c["prompt_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            margins: floats(&c["top1_margin_per_step"]),
            top10: c["top10_per_step"]
                .as_array()
                .map(|steps| steps.iter().map(|s| (ids(&s["ids"]), floats(&s["logits"]))).collect())
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The full last-position logits of a case (`logits_<name>.f32`).
pub fn ref_logits(name: &str) -> Vec<f32> {
    let p = reference_dir().join(format!("logits_{name}.f32"));
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A backend that runs `steps` steps of `inner`, then fails every step like a lost device (fatal-error tests).
pub struct FailAfter<B> {
    inner: B,
    steps: usize,
}

impl<B> FailAfter<B> {
    pub fn new(inner: B, steps: usize) -> Self {
        Self { inner, steps }
    }
}

impl<B: ferrite_worker::backend::Backend> ferrite_worker::backend::Backend for FailAfter<B> {
    fn config(&self) -> &ferrite_common::config::LlamaConfig {
        self.inner.config()
    }
    fn info(&self) -> ferrite_worker::backend::BackendInfo {
        self.inner.info()
    }
    fn forward(
        &mut self,
        batch: &ferrite_worker::backend::ForwardBatch<'_>,
    ) -> Result<ferrite_worker::backend::Logits, ferrite_worker::backend::BackendError> {
        if self.steps == 0 {
            return Err(ferrite_worker::backend::BackendError::Device("injected device failure".into()));
        }
        self.steps -= 1;
        self.inner.forward(batch)
    }
}

/// Hands out fresh KV block tables to tests that call a backend directly: blocks in ascending order from block 1
/// (block 0 stays reserved, as in the engine's pool), never reused. A fixture, not an allocator: serving and
/// generation manage blocks in the engine core.
#[derive(Debug)]
pub struct BlockTables {
    next: usize,
    num_blocks: usize,
    block_size: usize,
}

impl BlockTables {
    /// Tables over a backend with `num_blocks` KV blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self { next: 1, num_blocks, block_size }
    }

    /// A table of fresh blocks for `tokens` tokens; panics when the backend's blocks run out.
    pub fn table(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(self.block_size);
        assert!(self.next + n <= self.num_blocks, "out of KV blocks: {n} more needed, {} left", self.num_blocks - self.next);
        self.next += n;
        (self.next - n..self.next).map(|b| b as u32).collect()
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// KV blocks still in use once the request ended (0 unless a block leaked).
    pub blocks_in_use: usize,
}

/// Runs one request (its first completion) to the end on an [`EngineCore`] over `backend`, stepping on this thread
/// with `max_num_batched_tokens` tokens per step (a smaller budget prefills the prompt in chunks). The core's KV pool
/// is the backend's; its context is the model's. A rejected or failed request is an `Err` with the reason.
pub fn generate(backend: &mut dyn Backend, request: EngineRequest, max_num_batched_tokens: usize) -> Result<Generated, String> {
    let scheduler = SchedulerConfig {
        max_num_batched_tokens,
        max_num_seqs: 1,
        max_waiting: 1,
        max_model_len: backend.config().max_position_embeddings,
    };
    let cfg = EngineConfig { scheduler, model_fingerprint: [0; 16], eos_token_ids: Vec::new(), decode_step_target: None };
    let mut core = EngineCore::new(cfg, &backend.info());
    core.add(request).map_err(|e| e.to_string())?;
    let (mut tokens, mut finish) = (Vec::new(), None);
    while !core.is_idle() {
        let out = core.step(backend);
        assert!(out.num_tokens > 0 || out.fatal.is_some(), "the engine core made no progress");
        for e in out.outputs {
            match e.output {
                EngineOutput::Tokens { index: 0, tokens: t, .. } => tokens.extend(t),
                EngineOutput::Finished { index: 0, reason, .. } => finish = Some(reason),
                EngineOutput::Failed(m) => return Err(m),
                EngineOutput::Rejected(e) => return Err(e.to_string()),
                _ => {}
            }
        }
    }
    let finish = finish.expect("a request that ends has finished");
    Ok(Generated { tokens, finish, blocks_in_use: core.stats().kv.in_use })
}

/// A greedy request for up to `max_tokens` (> 0) tokens after `prompt` that stops after any of `stop_ids` (included).
pub fn greedy_request(prompt: &[u32], max_tokens: usize, stop_ids: &[u32]) -> EngineRequest {
    assert!(max_tokens > 0, "0 would mean: up to the context");
    EngineRequest {
        request_id: "test".into(),
        prompt: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        stopping: StoppingParams { max_new_tokens: max_tokens as u32, stop_token_ids: stop_ids.to_vec(), ..StoppingParams::default() },
        n: 1,
        cache_salt: Vec::new(),
        constraint: None,
    }
}

/// Greedy tokens after `prompt` (see [`greedy_request`]), the prompt prefilled in one step.
pub fn greedy(backend: &mut dyn Backend, prompt: &[u32], max_tokens: usize, stop_ids: &[u32]) -> Vec<u32> {
    generate(backend, greedy_request(prompt, max_tokens, stop_ids), usize::MAX).expect("greedy generation").tokens
}

/// Checks `forward_sample` against the host sampler on the same logits: prefills the first four reference prompts
/// (all but their last token, so nothing else), then for five steps draws each one's next token with four different
/// parameter sets (temperature only; top-k + top-p; min-p + penalties; greedy with a frequency penalty and a logit
/// bias) seeded from `seed`, and compares with `RowSampling::sample_host` on `forward`'s logits for the same rows.
/// Step 0 is a prefill of each prompt, later steps one-token decode steps of all four (graphs where the backend has
/// them). `blocks` is the backend's KV capacity.
pub fn assert_sampling_matches_host(b: &mut dyn ferrite_worker::backend::Backend, seed: u64, blocks: usize) {
    use ferrite_worker::backend::{ForwardBatch, LogitsWanted, SeqInput};
    use ferrite_worker::engine::sampler::Sampler;
    let cases = ref_cases();
    let prompts: Vec<&[u32]> = cases.iter().take(4).map(|c| c.prompt_ids.as_slice()).collect();
    let mut alloc = BlockTables::new(blocks, ferrite_worker::backend::DEFAULT_BLOCK_SIZE);
    let tables: Vec<Vec<u32>> = prompts.iter().map(|p| alloc.table(p.len())).collect();
    let params = [
        SamplingParams { temperature: 1.0, ..SamplingParams::default() },
        SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, ..SamplingParams::default() },
        SamplingParams { temperature: 1.3, min_p: 0.05, repetition_penalty: 1.2, presence_penalty: 0.5, ..SamplingParams::default() },
        SamplingParams { temperature: 0.0, frequency_penalty: 1.0, logit_bias: vec![(42, 3.0)], ..SamplingParams::default() },
    ];
    for step in 0..5u64 {
        let batch = ForwardBatch {
            seqs: prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| {
                    let start = if step == 0 { 0 } else { p.len() - 1 };
                    SeqInput { tokens: &p[start..], start_pos: start, block_table: t, logits: LogitsWanted::Last }
                })
                .collect(),
        };
        let rows: Vec<_> = params
            .iter()
            .zip(&prompts)
            .enumerate()
            .map(|(i, (sp, p))| {
                let mut s = Sampler::new(sp.clone(), &StoppingParams::default(), &[2], p, seed + step, i as u32);
                s.record(p[0]);
                s.prepare(1)
            })
            .collect();
        let drawn = b.forward_sample(&batch, &rows).expect("forward_sample");
        let logits = b.forward(&batch).expect("logits");
        let mut scratch = Default::default();
        let on_host: Vec<u32> = (0..rows.len()).map(|i| rows[i].sample_host(&mut logits.last(i).unwrap().to_vec(), &mut scratch)).collect();
        assert_eq!(drawn, on_host, "step {step}, seed {seed}");
    }
}

/// Serves a worker's Prometheus metrics on `/metrics` at an ephemeral loopback port (what `ferrite worker
/// --metrics-listen` does), for tests that scrape them over HTTP.
pub async fn serve_worker_metrics(engine: &ferrite_worker::engine::core::EngineHandle) -> std::net::SocketAddr {
    let metrics = std::sync::Arc::new(ferrite_worker::metrics::WorkerMetrics::new(engine).expect("metrics registry"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let addr = listener.local_addr().expect("metrics address");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = std::sync::Arc::clone(&metrics);
            async move { m.render() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}
