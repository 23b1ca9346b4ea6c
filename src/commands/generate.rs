//! `ferrite generate`: one prompt in, generated text out (stdout only; logs go to stderr). The request runs on the
//! engine core (`EngineCore`), stepped on this thread: the whole prompt in one step, then one token per step, greedy
//! or seeded sampling, stopping on the model's eos ids or the token limit.

use std::io::Write;

use anyhow::{Context, bail};
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_common::text::TextAssets;
use ferrite_worker::backend::{Backend, DEFAULT_BLOCK_SIZE};
use ferrite_worker::cpu::CpuBackend;
use ferrite_worker::engine::core::{EngineConfig, EngineOutput, EngineRequest, FinishReason};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use ferrite_worker::engine::step::EngineCore;
use ferrite_worker::model::open_model;

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
    let prompt_text =
        if a.chat { text.render_user_prompt(&a.prompt)?.context("--chat: the model has no chat template")? } else { a.prompt.clone() };
    let enc = text.tokenizer.encode(prompt_text.as_str(), true).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
    let prompt = enc.get_ids().to_vec();
    if prompt.is_empty() {
        bail!("the prompt tokenizes to no tokens");
    }
    let max_ctx = files.config.max_position_embeddings;
    if prompt.len() + a.max_tokens > max_ctx {
        bail!("prompt ({} tokens) + --max-tokens ({}) exceeds the model context ({max_ctx})", prompt.len(), a.max_tokens);
    }
    // Block 0 of the KV cache is reserved (the engine never hands it out).
    let blocks = 1 + (prompt.len() + a.max_tokens).div_ceil(DEFAULT_BLOCK_SIZE);
    let opts = a.model.cpu_options(blocks)?;
    let mut backend = CpuBackend::load(&files, &opts)?;
    tracing::info!(model = %path.display(), prompt_tokens = prompt.len(), load_ms = started.elapsed().as_millis() as u64, "loaded");
    let scheduler = SchedulerConfig { max_num_batched_tokens: prompt.len(), max_num_seqs: 1, max_waiting: 1, max_model_len: max_ctx };
    let cfg = EngineConfig {
        scheduler,
        model_fingerprint: files.fingerprint()?,
        eos_token_ids: text.eos_token_ids.clone(),
        decode_step_target: None,
    };
    let mut core = EngineCore::new(cfg, &backend.info());
    let mut stdout = std::io::stdout().lock();
    let mut stream = text.tokenizer.decode_stream(true);
    let mut write_err = None;
    let (mut generated, mut finish) = (0usize, FinishReason::Length);
    let t0 = std::time::Instant::now();
    // `max_new_tokens: 0` would mean "up to the context": no tokens asked, none generated.
    if a.max_tokens > 0 {
        core.add(EngineRequest {
            request_id: "generate".into(),
            prompt,
            sampling: SamplingParams { temperature: a.temperature, seed: Some(a.seed), ..SamplingParams::default() },
            stopping: StoppingParams { max_new_tokens: a.max_tokens.try_into()?, ..StoppingParams::default() },
            n: 1,
            cache_salt: Vec::new(),
            constraint: None,
        })?;
    }
    while !core.is_idle() {
        let out = core.step(&mut backend);
        for e in out.outputs {
            match e.output {
                EngineOutput::Tokens { tokens, .. } => {
                    for tok in tokens {
                        generated += 1;
                        if let Ok(Some(piece)) = stream.step(tok)
                            && let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush())
                        {
                            write_err.get_or_insert(e);
                        }
                    }
                }
                EngineOutput::Finished { reason, .. } => finish = reason,
                EngineOutput::Failed(why) => bail!("generation failed: {why}"),
                EngineOutput::Rejected(e) => bail!("the request was refused: {e}"),
            }
        }
        if let Some(e) = out.fatal {
            bail!("the backend failed: {e}");
        }
        if out.num_tokens == 0 {
            bail!("the engine could not schedule the request");
        }
    }
    writeln!(stdout)?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(tokens = generated, finish = ?finish, tok_per_s = format!("{:.1}", generated as f64 / secs), "done");
    Ok(())
}
