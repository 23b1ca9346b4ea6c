//! Shared helpers for Ferrite's cross-crate tests: locating the default model (fetched through
//! `scripts/fetch-model.sh`, the only download tests may do) and the transformers reference outputs in
//! `../shared/reference/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

pub mod tiny;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A CPU worker config for tests on the default model (KV 96 MiB, context 1024, 2 threads); override fields with
/// struct update syntax.
pub fn test_worker_config() -> ferrite_worker::server::WorkerConfig {
    ferrite_worker::server::WorkerConfig {
        model: default_model(),
        model_id: None,
        kv_cache_mib: 96,
        max_num_batched_tokens: 256,
        max_num_seqs: 16,
        max_waiting: 64,
        max_model_len: 1024,
        threads: 2,
        precision: ferrite_worker::cpu::weights::WeightPrecision::Native,
        backend: Default::default(),
        cuda_device: 0,
        gpu_memory_utilization: 0.9,
        tensor_parallel_size: 1,
        enforce_eager: false,
        cuda_attention: Default::default(),
        cuda_programmatic_launch: true,
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
        let out = Command::new("bash")
            .arg(workspace_root().join("scripts/fetch-model.sh"))
            .output()
            .expect("run scripts/fetch-model.sh");
        assert!(out.status.success(), "fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
    .clone()
}

/// The reference folder: `$FERRITE_REFERENCE_DIR`, else `<workspace>/../shared/reference`.
pub fn reference_dir() -> PathBuf {
    std::env::var("FERRITE_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("../shared/reference"))
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
    fn forward(&mut self, batch: &ferrite_worker::backend::ForwardBatch<'_>) -> Result<ferrite_worker::backend::Logits, ferrite_worker::backend::BackendError> {
        if self.steps == 0 {
            return Err(ferrite_worker::backend::BackendError::Device("injected device failure".into()));
        }
        self.steps -= 1;
        self.inner.forward(batch)
    }
}
