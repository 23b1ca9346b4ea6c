//! `ferrite export-hf`: writes a Hugging Face `LlamaForCausalLM` directory from a GGUF model.
//!
//! Weights are dequantized to f32 (or rounded to bf16) and Q/K rows are un-permuted from llama.cpp's interleaved-RoPE
//! layout back to Hugging Face's half-rotation layout, so transformers (and Ferrite's HF loader) can run the result.
//! Output: `model.safetensors`, `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use ferrite_common::config::{LlamaConfig, RopeScaling};
use ferrite_common::error::ModelError;
use ferrite_common::model::{LlamaTensor, ModelFiles};
use ferrite_common::tokenizer::special_tokens_from_gguf;
use ferrite_kernels::cpu::quant::dequantize_row;
use safetensors::Dtype;
use serde_json::json;
use tokenizers::Tokenizer;

/// Element type of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}: export-hf reads GGUF files only")]
    NotGguf(PathBuf),
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Write { path: PathBuf, detail: String },
}

/// Reorders Q or K rows from GGUF's interleaved layout to HF's: GGUF row `h·d + 2j + i` becomes HF row
/// `h·d + i·d/2 + j` (the inverse of `permute` in llama.cpp's `convert_hf_to_gguf.py`).
pub fn unpermute_qk_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for j in 0..half {
            for i in 0..2 {
                let src = (h * head_dim + 2 * j + i) * cols;
                let dst = (h * head_dim + i * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn encode(values: &[f32], dtype: ExportDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        ExportDtype::F32 => (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ExportDtype::Bf16 => (Dtype::BF16, values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()),
    }
}

fn config_json(c: &LlamaConfig, dtype: ExportDtype, path: &Path) -> Result<serde_json::Value, ExportError> {
    let rope_scaling = match &c.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
        }),
        Some(RopeScaling::FreqFactors(_)) => {
            return Err(ExportError::Unsupported {
                path: path.into(),
                detail: "rope_freqs.weight scaling has no config.json equivalent".into(),
            });
        }
    };
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": match dtype { ExportDtype::F32 => "float32", ExportDtype::Bf16 => "bfloat16" },
    }))
}

/// Writes the HF directory for the GGUF model `files` into `out` (created if missing).
pub fn export_hf(files: &ModelFiles, tokenizer: &Tokenizer, out: &Path, dtype: ExportDtype) -> Result<(), ExportError> {
    let g = files.gguf().ok_or_else(|| ExportError::NotGguf(files.path.clone()))?;
    let c = &files.config;
    std::fs::create_dir_all(out).map_err(|e| ExportError::Io { path: out.into(), source: e })?;
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    for role in LlamaTensor::all(c) {
        let w = files.weight(role)?;
        let n: usize = w.shape.iter().product();
        let mut values = vec![0f32; n];
        dequantize_row(w.dtype, &w.data, &mut values).map_err(|_| ModelError::UnsupportedDtype {
            path: files.path.clone(),
            name: w.name.clone(),
            dtype: w.dtype.to_string(),
        })?;
        let cols = *w.shape.last().unwrap_or(&1);
        let values = match role {
            LlamaTensor::Wq(_) => unpermute_qk_rows(&values, c.num_heads, c.head_dim, cols),
            LlamaTensor::Wk(_) => unpermute_qk_rows(&values, c.num_kv_heads, c.head_dim, cols),
            _ => values,
        };
        let (st_dtype, data) = encode(&values, dtype);
        tensors.push((role.hf_name(), OwnedTensor { dtype: st_dtype, shape: w.shape.clone(), data }));
    }
    let st_path = out.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &st_path)
        .map_err(|e| ExportError::Write { path: st_path.clone(), detail: e.to_string() })?;

    let write_json = |name: &str, v: &serde_json::Value| -> Result<(), ExportError> {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| ExportError::Write { path: p.clone(), detail: e.to_string() })?;
        std::fs::write(&p, text).map_err(|e| ExportError::Io { path: p, source: e })
    };
    write_json("config.json", &config_json(c, dtype, &files.path)?)?;
    write_json("generation_config.json", &json!({ "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids }))?;

    let tok_path = out.join("tokenizer.json");
    tokenizer.save(&tok_path, false).map_err(|e| ExportError::Write { path: tok_path.clone(), detail: e.to_string() })?;
    let special = special_tokens_from_gguf(g);
    let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(special.bos),
        "eos_token": name(special.eos),
        "add_bos_token": special.add_bos,
        "model_max_length": c.max_position_embeddings,
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        tc["chat_template"] = json!(t);
    }
    write_json("tokenizer_config.json", &tc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(...)
        let (heads, d, cols) = (2, 8, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..d / 2 {
                    for c in 0..cols {
                        gguf[((h * d) + j * 2 + i) * cols + c] = hf[((h * d) + i * d / 2 + j) * cols + c];
                    }
                }
            }
        }
        assert_eq!(unpermute_qk_rows(&gguf, heads, d, cols), hf);
    }
}
