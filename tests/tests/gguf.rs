//! The GGUF path on generated and damaged files: a tiny random Llama written as GGUF (Q/K rows permuted the way
//! llama.cpp's converter does) must give the same logits as the same weights in an HF directory, and damaged copies of
//! the default model must fail with typed errors, never a panic.

use std::path::Path;

use ferrite_common::dtype::GgmlType;
use ferrite_common::error::ModelError;
use ferrite_common::gguf::writer::{Meta, TensorIn, to_bytes};
use ferrite_common::model::ModelFiles;
use ferrite_tests::{BlockTables, default_model, tiny};
use ferrite_worker::backend::{Backend, ForwardBatch, LogitsWanted, SeqInput};
use ferrite_worker::cpu::{CpuBackend, CpuOptions};

const H: usize = tiny::HIDDEN;
const HD: usize = tiny::HEAD_DIM;

/// llama.cpp `convert_hf_to_gguf.py` `permute`: HF row `h·d + i·d/2 + j` → GGUF row `h·d + 2j + i`.
fn permute(w: &[f32], heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..HD / 2 {
                let (src, dst) = ((h * HD + i * HD / 2 + j) * H, (h * HD + 2 * j + i) * H);
                out[dst..dst + H].copy_from_slice(&w[src..src + H]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, name) = rest.split_once('.').unwrap();
    let g = match name {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{l}.{g}.weight")
}

fn gguf_bytes(arch: &str, drop: Option<&str>) -> Vec<u8> {
    let ts = tiny::tensors();
    let data: Vec<(String, Vec<u64>, Vec<u8>)> = ts
        .iter()
        .filter(|(n, _, _)| Some(gguf_name(n).as_str()) != drop)
        .map(|(n, shape, v)| {
            let v = if n.ends_with("q_proj.weight") {
                permute(v, tiny::HEADS)
            } else if n.ends_with("k_proj.weight") {
                permute(v, tiny::KV_HEADS)
            } else {
                v.clone()
            };
            let dims = shape.iter().rev().map(|&d| d as u64).collect();
            (gguf_name(n), dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let tensors: Vec<TensorIn<'_>> = data.iter().map(|(n, d, b)| TensorIn { name: n, dims: d, dtype: GgmlType::F32, data: b }).collect();
    to_bytes(
        &[
            ("general.architecture", Meta::Str(arch)),
            ("llama.context_length", Meta::U32(256)),
            ("llama.embedding_length", Meta::U32(H as u32)),
            ("llama.block_count", Meta::U32(tiny::LAYERS as u32)),
            ("llama.feed_forward_length", Meta::U32(tiny::FFN as u32)),
            ("llama.attention.head_count", Meta::U32(tiny::HEADS as u32)),
            ("llama.attention.head_count_kv", Meta::U32(tiny::KV_HEADS as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
            ("llama.rope.freq_base", Meta::F32(10000.0)),
            ("llama.vocab_size", Meta::U32(tiny::VOCAB as u32)),
        ],
        &tensors,
    )
}

fn logits(model: &Path) -> Vec<f32> {
    let m = ModelFiles::open(model).unwrap();
    let mut b = CpuBackend::load(&m, &CpuOptions { num_kv_blocks: 4, ..CpuOptions::default() }).unwrap();
    let prompt = [5u32, 77, 3, 120, 9, 9, 41, 0, 2, 64, 31, 100];
    let table = BlockTables::new(4, 16).table(prompt.len());
    let batch = ForwardBatch { seqs: vec![SeqInput { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::All }] };
    b.forward(&batch).unwrap().data
}

#[test]
fn permuted_gguf_and_hf_layouts_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, gguf_bytes("llama", None)).unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    tiny::write_hf(&hf, &tiny::hf_config(false), &tiny::tensors());
    let (a, b) = (logits(&gguf), logits(&hf));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.1 && err <= 1e-5 * scale, "interleaved (GGUF) vs half (HF) RoPE: error {err}, scale {scale}");
}

#[test]
fn bad_gguf_files_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, gguf_bytes("gpt2", None)).unwrap();
    assert!(matches!(ModelFiles::open(&p), Err(ModelError::UnsupportedArchitecture { .. })));
    std::fs::write(&p, gguf_bytes("llama", Some("blk.1.ffn_up.weight"))).unwrap();
    let e = ModelFiles::open(&p).unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }) && e.to_string().contains("blk.1.ffn_up.weight"), "{e}");

    // Damaged copies of the real model: cut in the header, in the tensor index, in the data; bad magic.
    let real = std::fs::read(default_model()).unwrap();
    for cut in [10, 1000, 2_000_000, real.len() - 1] {
        std::fs::write(&p, &real[..cut]).unwrap();
        let e = ModelFiles::open(&p).unwrap_err();
        assert!(matches!(e, ModelError::Truncated { .. }), "cut at {cut}: {e}");
        assert!(e.to_string().contains("x.gguf"), "{e}");
    }
    let mut bad = real[..4096].to_vec();
    bad[..4].copy_from_slice(b"GGML");
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(ModelFiles::open(&p), Err(ModelError::BadMagic { .. })));
    let e = ModelFiles::open(&dir.path().join("missing.gguf")).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }) && e.to_string().contains("missing.gguf"), "{e}");
}
