//! `ferrite generate`: one prompt in, generated text out (stdout only; logs go to stderr).

use std::io::Write;

use anyhow::{Context, bail};
use ferrite_worker::model::open_model;
use ferrite_common::text::TextAssets;
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::generate::{GenerateParams, generate};
use ferrite_worker::kv::{DEFAULT_BLOCK_SIZE, SimpleBlockAllocator};

use super::{ModelArgs, resolve_model};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0, got {}", a.temperature);
    }
    let path = resolve_model(a.model.model.clone())?;
    let started = std::time::Instant::now();
    let files = open_model(&path)?;
    let text = TextAssets::load(&files)?;
    let prompt_text = if a.chat {
        text.render_user_prompt(&a.prompt)?.context("--chat: the model has no chat template")?
    } else {
        a.prompt.clone()
    };
    let enc = text.tokenizer.encode(prompt_text.as_str(), true).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
    let prompt = enc.get_ids().to_vec();
    if prompt.is_empty() {
        bail!("the prompt tokenizes to no tokens");
    }
    let max_ctx = files.config.max_position_embeddings;
    if prompt.len() + a.max_tokens > max_ctx {
        bail!("prompt ({} tokens) + --max-tokens ({}) exceeds the model context ({max_ctx})", prompt.len(), a.max_tokens);
    }
    let blocks = (prompt.len() + a.max_tokens).div_ceil(DEFAULT_BLOCK_SIZE);
    let opts = CpuOptions {
        precision: a.model.precision.into(),
        threads: a.model.threads,
        num_kv_blocks: blocks,
        block_size: DEFAULT_BLOCK_SIZE,
    };
    let mut backend = CpuBackend::load(&files, &opts)?;
    tracing::info!(model = %path.display(), prompt_tokens = prompt.len(), load_ms = started.elapsed().as_millis() as u64, "loaded");
    let mut alloc = SimpleBlockAllocator::new(blocks, DEFAULT_BLOCK_SIZE);
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        stop_token_ids: text.eos_token_ids.clone(),
        prefill_chunk: 0,
    };
    let mut stdout = std::io::stdout().lock();
    let mut stream = text.tokenizer.decode_stream(true);
    let mut write_err = None;
    let t0 = std::time::Instant::now();
    let out = generate(&mut backend, &mut alloc, 0, &prompt, &params, |tok| {
        if let Ok(Some(piece)) = stream.step(tok)
            && let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush())
        {
            write_err.get_or_insert(e);
        }
    })?;
    writeln!(stdout)?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        tokens = out.tokens.len(),
        finish = ?out.finish,
        tok_per_s = format!("{:.1}", out.tokens.len() as f64 / secs),
        "done"
    );
    Ok(())
}
