//! One weight-access API over both formats: [`ModelFiles`] opens a GGUF file or an HF directory and hands out
//! [`WeightView`]s by [`LlamaTensor`] role, checked against the [`LlamaConfig`]. The forward pass never sees file
//! formats or tensor names. Opened plainly, tensor bytes are read on demand; the worker opens models over its memory
//! map ([`ModelFiles::open_with`]) so they are borrowed instead (see [`crate::source`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::config::{GenerationConfig, LlamaConfig};
use crate::dtype::GgmlType;
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::hf::HfWeights;
use crate::source::FileMapper;

/// The role of a weight tensor in a Llama model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlamaTensor {
    TokenEmbedding,
    OutputNorm,
    /// Only present when embeddings are not tied.
    LmHead,
    AttnNorm(usize),
    Wq(usize),
    Wk(usize),
    Wv(usize),
    Wo(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl LlamaTensor {
    /// The tensor's name in GGUF files (llama.cpp naming).
    pub fn gguf_name(self) -> String {
        use LlamaTensor::*;
        match self {
            TokenEmbedding => "token_embd.weight".into(),
            OutputNorm => "output_norm.weight".into(),
            LmHead => "output.weight".into(),
            AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Wq(l) => format!("blk.{l}.attn_q.weight"),
            Wk(l) => format!("blk.{l}.attn_k.weight"),
            Wv(l) => format!("blk.{l}.attn_v.weight"),
            Wo(l) => format!("blk.{l}.attn_output.weight"),
            FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Up(l) => format!("blk.{l}.ffn_up.weight"),
            Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }

    /// The tensor's name in Hugging Face `LlamaForCausalLM` checkpoints.
    pub fn hf_name(self) -> String {
        use LlamaTensor::*;
        match self {
            TokenEmbedding => "model.embed_tokens.weight".into(),
            OutputNorm => "model.norm.weight".into(),
            LmHead => "lm_head.weight".into(),
            AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Wq(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            Wk(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            Wv(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            Wo(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
        }
    }

    /// Row-major shape the config implies (`[out, in]` for matrices).
    pub fn expected_shape(self, c: &LlamaConfig) -> Vec<usize> {
        use LlamaTensor::*;
        let (h, hd) = (c.hidden_size, c.head_dim);
        match self {
            TokenEmbedding | LmHead => vec![c.vocab_size, h],
            OutputNorm | AttnNorm(_) | FfnNorm(_) => vec![h],
            Wq(_) => vec![c.num_heads * hd, h],
            Wk(_) | Wv(_) => vec![c.num_kv_heads * hd, h],
            Wo(_) => vec![h, c.num_heads * hd],
            Gate(_) | Up(_) => vec![c.intermediate_size, h],
            Down(_) => vec![h, c.intermediate_size],
        }
    }

    /// Every tensor role of a model with this config, in load order.
    pub fn all(c: &LlamaConfig) -> Vec<LlamaTensor> {
        use LlamaTensor::*;
        let mut v = vec![TokenEmbedding, OutputNorm];
        if !c.tie_word_embeddings {
            v.push(LmHead);
        }
        for l in 0..c.num_layers {
            v.extend([AttnNorm(l), Wq(l), Wk(l), Wv(l), Wo(l), FfnNorm(l), Gate(l), Up(l), Down(l)]);
        }
        v
    }
}

/// A tensor: raw bytes in the file's dtype (borrowed from a mapping, or read), row-major shape.
#[derive(Debug, Clone)]
pub struct WeightView<'a> {
    pub name: String,
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

/// What [`ModelFiles`] knows of a tensor without its bytes.
struct TensorMeta {
    name: String,
    dtype: GgmlType,
    shape: Vec<usize>,
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum WeightStore {
    Gguf(GgufFile),
    Hf(HfWeights),
}

/// Which on-disk format a model path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HfDirectory,
}

/// An opened model: config and weights. (Tokenizer and chat template live in [`crate::tokenizer`] and
/// [`crate::chat`]; [`ModelFiles::gguf`] gives access to GGUF metadata for them.)
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: LlamaConfig,
    pub generation: GenerationConfig,
    pub store: WeightStore,
}

impl ModelFiles {
    /// Opens a `.gguf` file or a Hugging Face directory: config, tokenizer metadata and the tensor index (every
    /// tensor checked for presence, shape and dtype); tensor bytes are read when asked for.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        Self::open_with(path, None)
    }

    /// As [`ModelFiles::open`], with tensor bytes borrowed from what `mapper` gives (the worker's memory map).
    pub fn open_with(path: &Path, mapper: Option<&FileMapper>) -> Result<Self, ModelError> {
        if path.is_dir() {
            Self::open_hf(path, mapper)
        } else {
            let g = GgufFile::open_with(path, mapper)?;
            let config = LlamaConfig::from_gguf(&g)?;
            let generation = GenerationConfig { eos_token_ids: config.eos_token_ids.clone(), ..Default::default() };
            let m = Self { path: path.into(), format: ModelFormat::Gguf, config, generation, store: WeightStore::Gguf(g) };
            m.check_all()?;
            Ok(m)
        }
    }

    fn open_hf(dir: &Path, mapper: Option<&FileMapper>) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let json = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| ModelError::io(&gen_path, e))?;
            GenerationConfig::from_json(&gen_path, &text)?
        } else {
            GenerationConfig::default()
        };
        let config = LlamaConfig::from_hf_json(&cfg_path, &json, Some(&generation))?;
        let weights = HfWeights::open(dir, mapper)?;
        let m = Self { path: dir.into(), format: ModelFormat::HfDirectory, config, generation, store: WeightStore::Hf(weights) };
        m.check_all()?;
        Ok(m)
    }

    /// A 128-bit identity of the weights: xxh3-128 over the config and, per tensor, its role, dtype, shape and the
    /// first and last 4 KiB of its bytes. Seeds the prefix-cache hash, so two workers serving the same weights share
    /// block hashes (in any format they were loaded from it stays stable for the same files).
    pub fn fingerprint(&self) -> Result<[u8; 16], ModelError> {
        let mut buf = Vec::new();
        buf.extend_from_slice(format!("{:?}", self.config).as_bytes());
        for role in LlamaTensor::all(&self.config) {
            let Ok(m) = self.tensor_meta(role) else { continue };
            buf.extend_from_slice(format!("{role:?}|{}|{:?}|", m.dtype, m.shape).as_bytes());
            let len = self.tensor_len(role)?;
            let n = len.min(4096);
            buf.extend_from_slice(&self.tensor_range(role, 0, n)?);
            buf.extend_from_slice(&self.tensor_range(role, len - n, n)?);
        }
        Ok(xxhash_rust::xxh3::xxh3_128(&buf).to_le_bytes())
    }

    /// A tensor's size in bytes.
    fn tensor_len(&self, role: LlamaTensor) -> Result<usize, ModelError> {
        Ok(match &self.store {
            WeightStore::Gguf(g) => g.tensor_info(&role.gguf_name()).map(|i| i.n_bytes as usize),
            WeightStore::Hf(w) => w.tensor_info(&role.hf_name()).map(|i| w.tensor_len(i)),
        }
        .unwrap_or(0))
    }

    /// `len` bytes of a tensor from `offset` within it.
    fn tensor_range(&self, role: LlamaTensor, offset: usize, len: usize) -> Result<Cow<'_, [u8]>, ModelError> {
        match &self.store {
            WeightStore::Gguf(g) => match g.tensor_info(&role.gguf_name()) {
                Some(i) => g.tensor_range(i, offset as u64, len),
                None => Ok(Cow::Borrowed(&[])),
            },
            WeightStore::Hf(w) => match w.tensor_info(&role.hf_name()) {
                Some(i) => w.tensor_range(i, offset, len),
                None => Ok(Cow::Borrowed(&[])),
            },
        }
    }

    /// The GGUF file, when the model is one (tokenizer and chat template metadata live there).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.store {
            WeightStore::Gguf(g) => Some(g),
            WeightStore::Hf(_) => None,
        }
    }

    /// Validates every tensor's presence, shape and dtype up front, so loading fails fast with a precise error.
    fn check_all(&self) -> Result<(), ModelError> {
        for t in LlamaTensor::all(&self.config) {
            self.tensor_meta(t)?;
        }
        Ok(())
    }

    /// The largest quantization block of the matrices (1 for float checkpoints): tensor-parallel splits of input
    /// columns must be multiples of it.
    pub fn max_block_size(&self) -> usize {
        LlamaTensor::all(&self.config).into_iter().filter_map(|t| self.tensor_meta(t).ok()).map(|w| w.dtype.block_size()).max().unwrap_or(1)
    }

    /// The tensor for `role`, checked against the config's shape.
    pub fn weight(&self, role: LlamaTensor) -> Result<WeightView<'_>, ModelError> {
        let m = self.tensor_meta(role)?;
        let data = match &self.store {
            WeightStore::Gguf(g) => g.tensor_bytes(g.tensor_info(&m.name).expect("checked by tensor_meta"))?,
            WeightStore::Hf(w) => w.tensor_bytes(w.tensor_info(&m.name).expect("checked by tensor_meta"))?,
        };
        Ok(WeightView { name: m.name, dtype: m.dtype, shape: m.shape, data })
    }

    /// A tensor's name, file, dtype and shape, checked against the config and the dtypes the backends support.
    fn tensor_meta(&self, role: LlamaTensor) -> Result<TensorMeta, ModelError> {
        let expected = role.expected_shape(&self.config);
        let (name, path, dtype, shape) = match &self.store {
            WeightStore::Gguf(g) => {
                let name = role.gguf_name();
                let info = g.tensor_info(&name).ok_or_else(|| ModelError::MissingTensor { path: g.path().into(), name: name.clone() })?;
                (name, g.path(), info.dtype, info.shape())
            }
            WeightStore::Hf(w) => {
                let name = role.hf_name();
                let info =
                    w.tensor_info(&name).ok_or_else(|| ModelError::MissingTensor { path: w.primary_path().into(), name: name.clone() })?;
                (name, w.tensor_path(info), info.dtype, info.shape.clone())
            }
        };
        if shape != expected {
            return Err(ModelError::WrongShape { path: path.into(), name, actual: shape, expected });
        }
        let is_norm = matches!(role, LlamaTensor::OutputNorm | LlamaTensor::AttnNorm(_) | LlamaTensor::FfnNorm(_));
        let supported = match dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => true,
            GgmlType::Q8K | GgmlType::Q8_1 => false,
            _ => !is_norm,
        };
        if !supported {
            return Err(ModelError::dtype(path, &name, dtype));
        }
        Ok(TensorMeta { name, dtype, shape })
    }
}
