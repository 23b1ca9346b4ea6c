//! `LlamaConfig`: the one model description both weight formats produce.
//!
//! Built from GGUF metadata (`llama.*` keys) or from a Hugging Face `config.json` (`LlamaForCausalLM`), then validated
//! once. The forward pass reads only this struct, never format-specific keys.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// How Q/K rows pair up for rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs `(2i, 2i+1)`. GGUF Llama files store Q/K rows permuted by llama.cpp's converter so that
    /// this is the right pairing (llama.cpp `rope`, candle `rope_i`).
    Interleaved,
    /// Rotate `(i, i + d/2)` ("rotate_half"): Hugging Face's layout.
    Half,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 `rope_scaling: {rope_type: "llama3", ...}`.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// Per-frequency divisors, as llama.cpp stores Llama 3.1 scaling in the `rope_freqs.weight` tensor.
    FreqFactors(Vec<f32>),
}

/// Architecture hyper-parameters of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_style: RopeStyle,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Checks the relations the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let err = |d: String| Err(ModelError::config(path, d));
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return err(format!(
                "hidden_size ({}), num_hidden_layers ({}), vocab_size ({}) and intermediate_size ({}) must be > 0",
                self.hidden_size, self.num_layers, self.vocab_size, self.intermediate_size
            ));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return err(format!("head_dim ({}) must be even and > 0", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return err(format!("rms_norm_eps ({}) must be a positive number", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return err(format!("rope_theta ({}) must be a positive number", self.rope_theta));
        }
        if self.max_position_embeddings == 0 {
            return err("max_position_embeddings must be > 0".into());
        }
        if let Some(RopeScaling::FreqFactors(f)) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return err(format!("rope_freqs has {} factors, expected head_dim/2 = {}", f.len(), self.head_dim / 2));
        }
        if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
            &self.rope_scaling
            && !(*factor > 0.0 && *low_freq_factor > 0.0 && high_freq_factor > low_freq_factor && *original_max_position_embeddings > 0)
        {
            return err("rope_scaling (llama3) needs factor > 0 and high_freq_factor > low_freq_factor > 0".into());
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), with scaling applied.
    ///
    /// Llama 3 scaling follows transformers' `_compute_llama3_parameters`: wavelengths longer than
    /// `original_max / low_freq_factor` are divided by `factor`, shorter than `original_max / high_freq_factor` are
    /// kept, and the band between is interpolated smoothly.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = f64::from(self.rope_theta);
        let inv: Vec<f64> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64)).collect();
        let out: Vec<f64> = match &self.rope_scaling {
            None => inv,
            Some(RopeScaling::FreqFactors(f)) => inv.iter().zip(f).map(|(x, &s)| x / f64::from(s)).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let (factor, lo, hi) = (f64::from(*factor), f64::from(*low_freq_factor), f64::from(*high_freq_factor));
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        out.into_iter().map(|x| x as f32).collect()
    }

    /// Reads the config from GGUF `llama.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = g.path();
        let arch = g.require("general.architecture")?.as_str().unwrap_or_default().to_string();
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture { path: path.into(), arch });
        }
        let uint = |key: &str| -> Result<usize, ModelError> {
            g.require(key)?.as_u64().map(|v| v as usize).ok_or_else(|| ModelError::malformed(path, format!("`{key}` is not an integer")))
        };
        let float = |key: &str| -> Result<Option<f32>, ModelError> {
            g.get(key)
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| ModelError::malformed(path, format!("`{key}` is not a number"))))
                .transpose()
        };
        let hidden_size = uint("llama.embedding_length")?;
        let num_heads = uint("llama.attention.head_count")?;
        let num_kv_heads =
            if g.get("llama.attention.head_count_kv").is_some() { uint("llama.attention.head_count_kv")? } else { num_heads };
        let head_dim = if g.get("llama.attention.key_length").is_some() {
            uint("llama.attention.key_length")?
        } else {
            hidden_size.checked_div(num_heads).unwrap_or(0)
        };
        let vocab_size = match g.get("llama.vocab_size") {
            Some(_) => uint("llama.vocab_size")?,
            None => g.require("tokenizer.ggml.tokens")?.as_array().map(<[_]>::len).unwrap_or(0),
        };
        let tied = g.tensor_info("output.weight").is_none();
        let rope_scaling = match g.tensor_info("rope_freqs.weight") {
            Some(t) if t.dtype == crate::dtype::GgmlType::F32 => Some(RopeScaling::FreqFactors(
                g.tensor_bytes(t)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            )),
            Some(t) => return Err(ModelError::dtype(path, &t.name, t.dtype)),
            None => None,
        };
        let bos = g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
        let eos = g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
        let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
        if let Some(eot) = g.get("tokenizer.ggml.eot_token_id").and_then(|v| v.as_u64())
            && !eos_token_ids.contains(&(eot as u32))
        {
            eos_token_ids.push(eot as u32);
        }
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: uint("llama.feed_forward_length")?,
            num_layers: uint("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: uint("llama.context_length")?,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: float("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Interleaved,
            tie_word_embeddings: tied,
            bos_token_id: bos,
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (and merges eos ids from `generation_config.json` when given).
    pub fn from_hf_json(path: &Path, json: &str, generation: Option<&GenerationConfig>) -> Result<Self, ModelError> {
        let c: HfConfig = serde_json::from_str(json).map_err(|e| ModelError::config(path, e.to_string()))?;
        let arch_ok = c.architectures.as_ref().is_none_or(|a| a.iter().any(|a| a == "LlamaForCausalLM"))
            && c.model_type.as_deref().is_none_or(|m| m == "llama");
        if !arch_ok {
            let arch = c.architectures.as_ref().and_then(|a| a.first().cloned()).or(c.model_type.clone()).unwrap_or_default();
            return Err(ModelError::UnsupportedArchitecture { path: path.into(), arch });
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c.head_dim.unwrap_or(c.hidden_size.checked_div(c.num_attention_heads).unwrap_or(0));
        let rope_scaling = match c.rope_scaling {
            None => None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                match kind.as_str() {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: s.factor.unwrap_or(8.0),
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
                    }),
                    "default" => None,
                    other => return Err(ModelError::config(path, format!("unsupported rope_scaling type `{other}` (supported: llama3)"))),
                }
            }
        };
        let mut eos_token_ids = c.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default();
        if let Some(g) = generation {
            for id in &g.eos_token_ids {
                if !eos_token_ids.contains(id) {
                    eos_token_ids.push(*id);
                }
            }
        }
        let cfg = LlamaConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Half,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            bos_token_id: c.bos_token_id,
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

/// Sampling defaults and stop ids from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
}

impl GenerationConfig {
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Raw {
            eos_token_id: Option<OneOrMany>,
            temperature: Option<f32>,
            top_p: Option<f32>,
            top_k: Option<u32>,
        }
        let r: Raw = serde_json::from_str(json).map_err(|e| ModelError::config(path, format!("generation_config.json: {e}")))?;
        Ok(Self {
            eos_token_ids: r.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
      "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]
    }"#;

    #[test]
    fn parses_llama31_config() {
        let generation =
            GenerationConfig::from_json(Path::new("g.json"), r#"{"eos_token_id": [128001, 128009], "temperature": 0.6}"#).unwrap();
        let c = LlamaConfig::from_hf_json(Path::new("config.json"), LLAMA31, Some(&generation)).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.gqa_group()), (32, 8, 128, 4));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.rope_style, RopeStyle::Half);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(generation.temperature, Some(0.6));
    }

    #[test]
    fn llama3_inv_freq_matches_transformers() {
        let c = LlamaConfig::from_hf_json(Path::new("config.json"), LLAMA31, None).unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        // High frequencies are untouched, low ones divided by 8, the band between interpolated
        // (values from transformers' _compute_llama3_parameters for this config).
        assert_eq!(f[0], 1.0);
        let unscaled = |i: usize| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
        assert!((f64::from(f[10]) - unscaled(10)).abs() / unscaled(10) < 1e-6);
        assert!((f64::from(f[63]) - unscaled(63) / 8.0).abs() / (unscaled(63) / 8.0) < 1e-6);
        let mid = 32; // wavelen between 2048 and 8192
        let wl = 2.0 * std::f64::consts::PI / unscaled(mid);
        assert!(wl > 2048.0 && wl < 8192.0, "{wl}");
        let smooth = (8192.0 / wl - 1.0) / 3.0;
        let want = (1.0 - smooth) * unscaled(mid) / 8.0 + smooth * unscaled(mid);
        assert!((f64::from(f[mid]) - want).abs() / want < 1e-6);
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = LLAMA31.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5");
        let e = LlamaConfig::from_hf_json(Path::new("config.json"), &bad, None).unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let bad = LLAMA31.replace("LlamaForCausalLM", "MistralForCausalLM");
        assert!(matches!(LlamaConfig::from_hf_json(Path::new("config.json"), &bad, None), Err(ModelError::UnsupportedArchitecture { .. })));
        let bad = LLAMA31.replace("\"llama3\"", "\"yarn\"");
        let e = LlamaConfig::from_hf_json(Path::new("config.json"), &bad, None).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = LlamaConfig::from_hf_json(Path::new("config.json"), "{", None).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
