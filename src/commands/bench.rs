//! `ferrite bench`: prefill and batched-decode throughput on CPU, next to this machine's measured memory bandwidth
//! (decode at batch 1 streams every weight once per token, so `bandwidth / weight bytes` is its roofline). Prefill and
//! decode are timed as engine-core steps (`EngineCore::step` on this thread: the same batches the backend sees when
//! serving, without the engine thread); `--engine` adds concurrent streams through the engine thread.

use std::time::Instant;

use anyhow::{Context, bail};
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_worker::backend::{Backend, DEFAULT_BLOCK_SIZE};
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::engine::core::{Engine, EngineConfig, EngineOutput, EngineRequest};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use ferrite_worker::engine::step::{EngineCore, StepOutput};
use ferrite_worker::model::open_model;
use rayon::prelude::*;

use super::{ModelArgs, resolve_model};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Batch sizes for the decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also measure through the serving engine (continuous batching, prefix cache).
    #[arg(long)]
    engine: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sustained read bandwidth in GB/s: all threads sum a 512 MiB buffer, median of several passes.
fn memory_bandwidth_gbs(pool: &rayon::ThreadPool) -> f64 {
    let n = 512 << 20 >> 3;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut runs = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let s: u64 = pool.install(|| buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).sum());
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        runs.push((n * 8) as f64 / secs / 1e9);
    }
    median(runs)
}

/// A greedy request for `max_new` tokens that never stops early.
fn request(id: String, prompt: Vec<u32>, max_new: u32) -> EngineRequest {
    EngineRequest {
        request_id: id,
        prompt,
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        stopping: StoppingParams { max_new_tokens: max_new, ignore_eos: true, ..StoppingParams::default() },
        n: 1,
        cache_salt: Vec::new(),
        constraint: None,
    }
}

/// One engine-core step that must compute `tokens` tokens.
fn step(core: &mut EngineCore, backend: &mut dyn Backend, tokens: usize) -> anyhow::Result<StepOutput> {
    let out = core.step(backend);
    if let Some(e) = &out.fatal {
        bail!("the backend failed: {e}");
    }
    if let Some(e) = out.outputs.iter().find(|e| matches!(e.output, EngineOutput::Failed(_))) {
        bail!("the step failed: {:?}", e.output);
    }
    if out.num_tokens != tokens {
        bail!("the step computed {} tokens, {tokens} expected", out.num_tokens);
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.repeat == 0 || a.decode_steps == 0 || a.prompt_tokens == 0 || a.batch.contains(&0) {
        bail!("--repeat, --decode-steps, --prompt-tokens and --batch sizes must be > 0");
    }
    let path = resolve_model(a.model.model.clone())?;
    let files = open_model(&path)?;
    let vocab = files.config.vocab_size as u32;
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let decode_prompt = 16;
    // Every sequence of a decode run holds its prompt, the token of its prefill and one per decode step; the prefill
    // run holds its prompt and one token. Block 0 is reserved.
    let per_seq = (decode_prompt + a.decode_steps + 1).div_ceil(DEFAULT_BLOCK_SIZE);
    let blocks = 1 + (a.prompt_tokens + 1).div_ceil(DEFAULT_BLOCK_SIZE).max(per_seq * max_batch);
    let opts = a.model.cpu_options(blocks)?;
    let mut backend = CpuBackend::load(&files, &opts)?;
    let threads = if a.model.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { a.model.threads };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let bw = memory_bandwidth_gbs(&pool);
    let weight_mb = backend.weight_bytes() as f64 / 1e6;
    let roofline = bw * 1e3 / weight_mb;
    println!("model: {}", path.display());
    println!("threads: {threads}, precision: {:?}, CPU instruction set: {}", a.model.precision, opts.isa);
    println!("memory bandwidth (read): {bw:.1} GB/s; weights streamed per decode step: {weight_mb:.1} MB");
    println!("batch-1 decode roofline (bandwidth / weight bytes): {roofline:.0} tok/s");

    // A fresh core (an empty prefix cache) per run: one step prefills every waiting prompt.
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: a.prompt_tokens.max(decode_prompt * max_batch),
            max_num_seqs: max_batch,
            max_waiting: max_batch,
            max_model_len: files.config.max_position_embeddings,
        },
        model_fingerprint: files.fingerprint()?,
        eos_token_ids: Vec::new(),
        decode_step_target: None,
    };
    let info = backend.info();
    let new_core = || EngineCore::new(cfg.clone(), &info);

    // Deterministic pseudo-random prompt tokens.
    let tok = |i: usize| ((i as u64 * 2_654_435_761) % u64::from(vocab.min(40_000))) as u32 + 100;

    // Prefill: one step computing the whole prompt (and its first token).
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(tok).collect();
    let mut runs = Vec::new();
    for r in 0..a.repeat {
        let mut core = new_core();
        core.add(request(format!("prefill{r}"), prompt.clone(), 1)).context("prefill request")?;
        let t = Instant::now();
        step(&mut core, &mut backend, prompt.len())?;
        runs.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    println!("prefill ({} tokens): {:.0} tok/s", a.prompt_tokens, median(runs));

    // Decode at each batch size: every sequence has a 16-token prompt (prefilled in one untimed step), then
    // `decode_steps` batched steps of one token per sequence.
    for &b in &a.batch {
        let mut runs = Vec::new();
        for _ in 0..a.repeat {
            let mut core = new_core();
            for s in 0..b {
                let p: Vec<u32> = (0..decode_prompt).map(|i| tok(i + 31 * s)).collect();
                core.add(request(format!("decode{s}"), p, a.decode_steps as u32 + 1)).context("decode request")?;
            }
            step(&mut core, &mut backend, b * decode_prompt)?;
            let t = Instant::now();
            for _ in 0..a.decode_steps {
                step(&mut core, &mut backend, b)?;
            }
            runs.push((b * a.decode_steps) as f64 / t.elapsed().as_secs_f64());
            if !core.is_idle() {
                bail!("the decode run did not end after {} steps", a.decode_steps);
            }
        }
        let tps = median(runs);
        if b == 1 {
            println!("decode batch {b}: {tps:.1} tok/s ({:.0}% of roofline)", 100.0 * tps / roofline);
        } else {
            println!("decode batch {b}: {tps:.1} tok/s");
        }
    }
    if a.engine {
        drop(backend);
        engine_bench(&files, &a)?;
    }
    Ok(())
}

/// Aggregate decode throughput with 1, 8 and 32 concurrent requests through the engine, and time to first token of a
/// 400-token prompt cold versus with its prefix cached.
fn engine_bench(files: &ferrite_common::model::ModelFiles, a: &Args) -> anyhow::Result<()> {
    let blocks = 1024;
    let backend = CpuBackend::load(
        files,
        &CpuOptions {
            precision: a.model.precision.into(),
            threads: a.model.threads,
            num_kv_blocks: blocks,
            block_size: DEFAULT_BLOCK_SIZE,
            isa: a.model.isa()?,
            kv_dtype: a.model.kv_cache_dtype.into(),
        },
    )?;
    let engine = Engine::spawn(
        Box::new(backend),
        EngineConfig {
            scheduler: SchedulerConfig { max_num_batched_tokens: 256, max_num_seqs: 64, max_waiting: 1024, max_model_len: 2048 },
            model_fingerprint: files.fingerprint()?,
            eos_token_ids: Vec::new(),
            decode_step_target: None,
        },
    )?;
    let vocab = files.config.vocab_size as u64;
    let tok = |i: u64| ((i * 2_654_435_761) % vocab.min(40_000)) as u32 + 100;
    let mut single = 0.0;
    for &streams in &a.batch {
        let mut runs = Vec::new();
        for r in 0..a.repeat {
            let t = Instant::now();
            let rxs: Vec<_> = (0..streams)
                .map(|s| {
                    let prompt = (0..16).map(|i| tok((r * 1000 + s * 31 + i) as u64)).collect();
                    engine.submit(request(format!("b{streams}-{r}-{s}"), prompt, a.decode_steps as u32))
                })
                .collect();
            let mut tokens = 0usize;
            for mut rx in rxs {
                while let Some(out) = rx.blocking_recv() {
                    match out {
                        EngineOutput::Tokens { tokens: t, .. } => tokens += t.len(),
                        EngineOutput::Finished { .. } => break,
                        other => anyhow::bail!("engine: {other:?}"),
                    }
                }
            }
            runs.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
        let tps = median(runs);
        if streams == 1 {
            single = tps;
        }
        let ratio = if single > 0.0 { format!(" ({:.2}x one stream)", tps / single) } else { String::new() };
        println!("engine: {streams} concurrent streams: {tps:.1} tok/s aggregate{ratio}");
    }
    // Time to first token, 400-token shared prefix: cold, then warm (a different 8-token suffix).
    let ttft = |id: String, prompt: Vec<u32>| -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut rx = engine.submit(request(id, prompt, 1));
        match rx.blocking_recv() {
            Some(EngineOutput::Tokens { .. }) => Ok(t.elapsed().as_secs_f64()),
            other => anyhow::bail!("engine: {other:?}"),
        }
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for r in 0..a.repeat as u64 {
        let prefix: Vec<u32> = (0..400).map(|i| tok(50_000 + r * 1000 + i)).collect();
        let with = |suffix: u64| prefix.iter().copied().chain((0..8).map(|i| tok(suffix + i))).collect::<Vec<u32>>();
        cold.push(ttft(format!("cold{r}"), with(1))?);
        warm.push(ttft(format!("warm{r}"), with(2))?);
    }
    let (cold, warm) = (median(cold), median(warm));
    println!(
        "engine: time to first token, 408-token prompt: cold {:.1} ms, 400-token prefix cached {:.1} ms ({:.1}x faster)",
        cold * 1e3,
        warm * 1e3,
        cold / warm
    );
    Ok(())
}
