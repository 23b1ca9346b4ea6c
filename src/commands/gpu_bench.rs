//! `ferrite gpu-bench` (feature `cuda`): decode and prefill speed of the CUDA backend next to this GPU's measured
//! ceilings (device-to-device copy bandwidth, bf16 GEMM rate), all in one run.
//!
//! Without `--model` it builds a Llama-3.1-8B-shaped model (32 layers, hidden 4096, 32/8 heads, ffn 14336, vocab
//! 128256) with random bf16 weights generated on the device, and fills the KV cache with random values, so nothing
//! is timed on zeros. Decode at batch B: B sequences with `--ctx` cached tokens each run one-token steps (argmax on the
//! device), timed with the host clock around each synchronized step (what a serving step costs); the roofline is every
//! weight byte plus the KV bytes read, over the measured copy bandwidth. Prefill: one `--prefill-tokens` prompt from
//! an empty cache; its FLOPs (matrices + causal attention) over the measured 8192³ GEMM rate.

use std::time::Instant;

use anyhow::{Context, bail};
use ferrite_common::config::{LlamaConfig, RopeStyle};
use ferrite_common::shard::ShardSpec;
use ferrite_worker::backend::{
    Adjust, Backend, DEFAULT_BLOCK_SIZE, ForwardBatch, LogitsWanted, RowSampling, SampleParams, SeqInput, sample_uniform,
};
use ferrite_worker::cuda::nccl::NcclGroup;
use ferrite_worker::cuda::{CudaBackend, CudaOptions, RankSpec};
use ferrite_worker::model::open_model;
use ferrite_worker::tp::comm::Communicator;
use ferrite_worker::tp::group::COLLECTIVE_TIMEOUT;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model to load (GGUF or HF directory). Default: a Llama-3.1-8B-shaped model with random weights.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Cached context per sequence for the decode measurement.
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batch: Vec<usize>,
    /// Timed decode steps per batch size (median reported).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 1024)]
    prefill_tokens: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Run the all-reduces through NCCL (world size 1) and measure an all-reduce of 8 KiB to 2 MiB.
    #[arg(long)]
    nccl: bool,
}

/// Llama-3.1-8B's shape.
pub fn llama_8b_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128256,
        max_position_embeddings: 131072,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_scaling: None,
        rope_style: RopeStyle::Half,
        tie_word_embeddings: false,
        bos_token_id: Some(128000),
        eos_token_ids: vec![128001, 128009],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.steps == 0 || a.ctx == 0 || a.prefill_tokens == 0 {
        bail!("--batch sizes, --steps, --ctx and --prefill-tokens must be > 0");
    }
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let per_seq = (a.ctx + 1).div_ceil(DEFAULT_BLOCK_SIZE);
    let blocks = 1 + (max_batch * per_seq).max(a.prefill_tokens.div_ceil(DEFAULT_BLOCK_SIZE));
    let opts = CudaOptions { max_kv_blocks: Some(blocks), max_batch_tokens: a.prefill_tokens.max(max_batch), ..CudaOptions::default() };
    let t0 = Instant::now();
    // With --nccl: a tensor-parallel rank of world size 1 (every all-reduce and the greedy gather through NCCL).
    let files = a.model.as_ref().map(|p| open_model(p).with_context(|| format!("opening {}", p.display()))).transpose()?;
    let config = files.as_ref().map_or_else(llama_8b_config, |f| f.config.clone());
    let plan = ShardSpec::plan(&config, 1, 1)?;
    let rank = || -> anyhow::Result<Option<RankSpec<'_>>> {
        Ok(if a.nccl { Some(RankSpec { plan: &plan, group: NcclGroup::new(1, COLLECTIVE_TIMEOUT)?, rank: 0 }) } else { None })
    };
    let (mut backend, label) = match &files {
        Some(files) => {
            let b = match rank()? {
                Some(r) => CudaBackend::load_rank(files, &opts, r)?,
                None => CudaBackend::load(files, &opts)?,
            };
            (b, files.path.display().to_string())
        }
        None => (CudaBackend::random(&config, &opts, 1234, rank()?)?, "llama-3.1-8b shape, random bf16 weights".into()),
    };
    backend.randomize_kv(99)?;
    let c = backend.config().clone();
    println!("device: {}  model: {label}  (ready in {:.1} s)", backend.device_name(), t0.elapsed().as_secs_f64());

    let copy_gbs = backend.measure_copy_bandwidth()?;
    let gemm_tflops = backend.measure_gemm_rate(8192, 8192, 8192)?;
    let gemm_prefill_tflops = backend.measure_gemm_rate(a.prefill_tokens, c.hidden_size, c.intermediate_size)?;
    println!(
        "ceilings: copy {copy_gbs:.0} GB/s (read + write), bf16 GEMM 8192³ {gemm_tflops:.0} TFLOP/s, prefill-shape GEMM {gemm_prefill_tflops:.0} TFLOP/s"
    );

    let mut allreduce = Vec::new();
    if let Some(comm) = backend.nccl() {
        print!("NCCL all-reduce (world {}), µs:", comm.world());
        for kib in [8usize, 32, 128, 512, 2048] {
            let us = backend.time_all_reduce_us(kib * 1024)?.unwrap_or(f64::NAN);
            print!(" {kib} KiB {us:.1}");
            allreduce.push(json!({"bytes": kib * 1024, "us": us}));
        }
        println!();
    }
    let weight_bytes = backend.weight_bytes() as f64;
    let kv_width = c.num_kv_heads * c.head_dim;
    let mut rng_tok = 1u32;
    let mut next_tok = || {
        rng_tok = rng_tok.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        rng_tok % c.vocab_size as u32
    };
    let mut decode = Vec::new();
    println!("decode CUDA graphs captured for batches {:?}", backend.graph_buckets());
    println!("decode linear layers (start-up tuning): per (in, out) and row count, the kernel and its speed-up over cuBLAS");
    for choice in backend.linear_table() {
        let picks: Vec<String> = choice.picks.iter().map(|p| format!("{}: {:?} {:.2}x", p.rows, p.kernel, p.cublas_ms / p.ms)).collect();
        println!("  ({}, {}): {}", choice.inp, choice.out, picks.join(", "));
    }
    println!("programmatic dependent launch: {}", if backend.programmatic_launch() { "on" } else { "off" });
    match backend.attention_tc_from() {
        Some(rows) => println!("paged attention on tensor cores from {rows} rows (start-up tuning)"),
        None => println!("paged attention on CUDA cores at every batch size (start-up tuning)"),
    }
    println!(
        "prefill attention: {} (start-up tuning)",
        if backend.prefill_on_tensor_cores() { "flash-style on tensor cores" } else { "dense through cuBLAS" }
    );
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>10} {:>7} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "batch",
        "ctx",
        "ms/step",
        "tok/s",
        "roof ms",
        "frac",
        "eager ms",
        "linear ms",
        "lin frac",
        "attn ms",
        "attn frac",
        "other ms",
        "rest ms",
        "sampled ms",
        "masked ms"
    );
    for &b in &a.batch {
        let (tables, toks) = decode_inputs(b, a.ctx, blocks, &mut next_tok)?;
        let batch = decode_batch(&tables, &toks, a.ctx);
        let ms = step_ms(&mut backend, &batch, 3, a.steps)?;
        // The same step without graphs (launch overhead made visible).
        backend.set_graphs_enabled(false);
        let eager_ms = step_ms(&mut backend, &batch, 1, a.steps.min(10))?;
        backend.set_graphs_enabled(true);
        // The same step sampled on the device instead of argmax: temperature 1, top-p 0.9 (the slowest filter), and
        // a repetition penalty over 64 tokens per row.
        let rows: Vec<RowSampling> = (0..b)
            .map(|s| RowSampling {
                params: SampleParams { temperature: 1.0, top_k: 0, top_p: 0.9, min_p: 0.0 },
                repetition: 1.1,
                adjust: (0..64u32).map(|i| Adjust { id: i * 97 + s as u32, bias: 0.0, repeat: true, sub: 0.0, mask: false }).collect(),
                u: sample_uniform(s as u64, 0),
                mask: None,
            })
            .collect();
        // A failure here is reported, not fatal: the rest of the benchmark still runs.
        let mut time_sampling = |rows: &[RowSampling], what: &str| -> anyhow::Result<f64> {
            Ok(match backend.forward_sample(&batch, rows) {
                Ok(_) => {
                    let mut sampled = Vec::new();
                    for _ in 0..a.steps.min(20) {
                        let t = Instant::now();
                        backend.forward_sample(&batch, rows)?;
                        sampled.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    median(sampled)
                }
                Err(e) => {
                    eprintln!("{what} failed at batch {b}: {e}");
                    f64::NAN
                }
            })
        };
        let sampled_ms = time_sampling(&rows, "device sampling")?;
        // The same draws under a grammar's token mask on every row (half the vocabulary allowed, a different half
        // per row): the mask upload and the mask kernel, what a structured-output request adds to a step.
        let words = c.vocab_size.div_ceil(32);
        let masked: Vec<RowSampling> = rows
            .iter()
            .enumerate()
            .map(|(s, r)| RowSampling {
                mask: Some((0..words).map(|w| 0x5555_5555u32.rotate_left(((w + s) % 2) as u32)).collect()),
                ..r.clone()
            })
            .collect();
        let masked_ms = time_sampling(&masked, "masked device sampling")?;
        // Just the step's linear layers, against the weights-only roofline.
        let linear_ms = backend.time_decode_linears(b)?;
        let linear_roof = weight_bytes / (copy_gbs * 1e9) * 1e3;
        let kv_bytes = (b * c.num_layers * 2 * kv_width * (a.ctx + 1) * 2) as f64;
        let roof_ms = (weight_bytes + kv_bytes) / (copy_gbs * 1e9) * 1e3;
        // Just the step's attention (every layer, the kernel the tuner picked), against the KV-bytes roofline.
        let attn_ms = backend.time_decode_attention(b, a.ctx + 1)?.unwrap_or(f64::NAN);
        let attn_roof = kv_bytes / (copy_gbs * 1e9) * 1e3;
        // The remaining kernels alone, and what is left of the step: the boundaries between kernels of different
        // kinds plus the host's share (metadata upload, launch, ids back; the step is timed on the host clock).
        let other_ms = backend.time_decode_other_kernels(b)?;
        let rest_ms = ms - linear_ms - attn_ms - other_ms;
        println!(
            "{b:>6} {:>6} {ms:>10.3} {:>10.0} {roof_ms:>10.3} {:>7.3} {eager_ms:>10.3} {linear_ms:>10.3} {:>9.3} {attn_ms:>9.3} {:>10.3} {other_ms:>9.3} {rest_ms:>9.3} {sampled_ms:>10.3} {masked_ms:>10.3}",
            a.ctx,
            b as f64 / ms * 1e3,
            roof_ms / ms,
            linear_roof / linear_ms,
            attn_roof / attn_ms
        );
        decode.push(json!({"batch": b, "ctx": a.ctx, "ms_per_step": ms, "tokens_per_s": b as f64 / ms * 1e3,
            "roofline_ms": roof_ms, "fraction_of_roofline": roof_ms / ms, "eager_ms_per_step": eager_ms,
            "linear_ms": linear_ms, "linear_fraction_of_weight_roofline": linear_roof / linear_ms,
            "attention_ms": attn_ms, "attention_fraction_of_kv_roofline": attn_roof / attn_ms,
            "other_kernels_ms": other_ms, "rest_ms": rest_ms,
            "sampled_top_p_ms_per_step": sampled_ms, "sampled_masked_ms_per_step": masked_ms}));
    }

    // The same graph decode steps without programmatic dependent launch (when it is on): what PDL gains.
    let mut without_pdl = Vec::new();
    if backend.programmatic_launch() {
        backend.set_programmatic_launch(false)?;
        for &b in &a.batch {
            let (tables, toks) = decode_inputs(b, a.ctx, blocks, &mut next_tok)?;
            let batch = decode_batch(&tables, &toks, a.ctx);
            without_pdl.push(json!({"batch": b, "ms_per_step": step_ms(&mut backend, &batch, 3, a.steps)?}));
        }
        backend.set_programmatic_launch(true)?;
        println!("decode ms/step without programmatic dependent launch: {}", serde_json::to_string(&without_pdl)?);
    } else {
        println!("programmatic dependent launch is off (needs sm_90)");
    }

    let table = block_tables(1, a.prefill_tokens, blocks)?.remove(0);
    let prompt: Vec<u32> = (0..a.prefill_tokens).map(|_| next_tok()).collect();
    let batch = ForwardBatch { seqs: vec![SeqInput { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }] };
    backend.forward_greedy(&batch)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        backend.forward_greedy(&batch)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let prefill_ms = median(times);
    let t = a.prefill_tokens as f64;
    let (h, hd) = (c.hidden_size as f64, c.head_dim as f64);
    let layer_params =
        h * (c.num_heads + 2 * c.num_kv_heads) as f64 * hd + (c.num_heads as f64 * hd) * h + 3.0 * h * c.intermediate_size as f64;
    let flops = 2.0 * layer_params * c.num_layers as f64 * t
        + 2.0 * h * c.vocab_size as f64
        + 4.0 * c.num_layers as f64 * c.num_heads as f64 * hd * t * t / 2.0;
    let tflops = flops / (prefill_ms * 1e-3) / 1e12;
    println!(
        "prefill {} tokens: {prefill_ms:.2} ms, {tflops:.0} TFLOP/s = {:.2} of the 8192³ GEMM rate",
        a.prefill_tokens,
        tflops / gemm_tflops
    );

    if let Some(path) = &a.json_out {
        let out = json!({
            "device": backend.device_name(), "model": label, "weight_bytes": weight_bytes,
            "copy_gbps": copy_gbs, "gemm_tflops_8192": gemm_tflops, "gemm_tflops_prefill_shape": gemm_prefill_tflops,
            "decode": decode, "decode_without_pdl": without_pdl, "nccl_all_reduce": allreduce,
            "prefill": {"tokens": a.prefill_tokens, "ms": prefill_ms, "tflops": tflops, "fraction_of_gemm": tflops / gemm_tflops},
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// Median milliseconds of a greedy step over `batch` (`steps` timed after `warmup` untimed), host clock around each
/// synchronized step.
fn step_ms(backend: &mut CudaBackend, batch: &ForwardBatch<'_>, warmup: usize, steps: usize) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        backend.forward_greedy(batch)?;
    }
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        backend.forward_greedy(batch)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Per sequence of a decode step: its block table and its next token.
type DecodeInputs = (Vec<Vec<u32>>, Vec<[u32; 1]>);

/// Block tables (fresh blocks per sequence, `ctx + 1` positions) and one next token each for a decode step of `b`
/// sequences.
fn decode_inputs(b: usize, ctx: usize, blocks: usize, next_tok: &mut dyn FnMut() -> u32) -> anyhow::Result<DecodeInputs> {
    Ok((block_tables(b, ctx + 1, blocks)?, (0..b).map(|_| [next_tok()]).collect()))
}

/// `seqs` block tables of `tokens` positions each, on consecutive blocks from 1 (block 0 stays reserved).
fn block_tables(seqs: usize, tokens: usize, blocks: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let per = tokens.div_ceil(DEFAULT_BLOCK_SIZE);
    if 1 + seqs * per > blocks {
        bail!("{seqs} sequences of {tokens} tokens need {} KV blocks; the cache holds {blocks}", 1 + seqs * per);
    }
    Ok((0..seqs).map(|s| (0..per).map(|b| (1 + s * per + b) as u32).collect()).collect())
}

/// The decode step over [`decode_inputs`]: each sequence adds its token at position `ctx`.
fn decode_batch<'a>(tables: &'a [Vec<u32>], toks: &'a [[u32; 1]], ctx: usize) -> ForwardBatch<'a> {
    ForwardBatch {
        seqs: toks
            .iter()
            .zip(tables)
            .map(|(t, table)| SeqInput { tokens: t, start_pos: ctx, block_table: table, logits: LogitsWanted::Last })
            .collect(),
    }
}
