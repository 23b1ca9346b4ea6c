//! The engine core: the serving engine's logic as a sans-IO state machine, with no channels, threads or clocks.
//!
//! [`EngineCore`] takes requests ([`EngineCore::add`]), aborts them or one of their `n` completions
//! ([`EngineCore::abort`]), and runs one batched step at a time over a backend the caller lends it
//! ([`EngineCore::step`]). Everything it has to say comes back as plain data: each step returns a [`StepOutput`]
//! whose outputs ([`Emitted`]: a request id, an [`EngineOutput`], and whether it is the request's last) the caller
//! delivers however it likes. The engine thread ([`super::core`]) delivers them to per-request channels;
//! `ferrite generate`, the benchmarks and tests drive a core in a loop on their own thread.
//!
//! **Who owns what.** Each sequence (one of a request's `n` completions) lives in exactly one place, the scheduler's
//! table: the scheduler holds its scheduling state (tokens, KV blocks, progress) and carries the core's per-sequence
//! state as its payload, `SeqMeta` (request id, completion index, sampler, token limit, stop rules). Scheduling
//! needs to see and drop whole sequences (admission, preemption, removal), so the scheduler is the natural owner;
//! the core only indexes which sequences make up a request (`requests`, id lists, no state), which abort and "is the
//! request over?" need. A sequence leaves through `EngineCore::remove_seq` only, which removes it from the
//! scheduler (its blocks return to the pool at once) and from the index.
//!
//! **A step.** Plan (the scheduler picks a budget of tokens: running sequences first, then admissions, preempting
//! when blocks run out) → choose the backend call → run it → record the computed tokens (newly full blocks enter the
//! prefix cache) → for each sequence that got logits: its next token (from the backend, or the host sampler), then
//! the stop rules. The backend call is one of three, chosen for the whole step:
//! - `forward_greedy` when every sampling sequence is plain greedy (`Sampler::is_plain_greedy`): the backend takes
//!   the argmax where the logits are (on a GPU only ids cross PCIe);
//! - `forward_sample` when none needs its logits on the host (no logprobs): the backend draws with the sequences'
//!   [`crate::backend::RowSampling`]s, the same algorithm and uniforms as the host sampler;
//! - `forward` otherwise, then the host sampler (`Sampler::sample`, which also computes logprobs).
//!
//! Constrained decoding ([`super::constraint`]): on a backend that draws on its device (`Backend::draws_on_device`:
//! CUDA) a constrained sequence's grammar mask (words, bit set = allowed) travels in its `RowSampling` (`mask`), so a
//! step that draws for one takes `forward_sample` when no sequence needs logprobs (never `forward_greedy`, which has
//! no mask: greedy rows draw there with temperature 0, the same argmax); the backend sets the disallowed logits to -inf after the adjustments (on CUDA the `apply_token_masks` kernel, on
//! the host `cpu::sample::apply_mask`), before the draw. Otherwise (logprobs, or a grammar that allows nothing, which
//! ends its sequence), and always where the host draws (CPU), the step takes `forward`, the masks are computed on a
//! helper thread while the forward pass runs, and each row is masked before the host sampler sees it. Either way
//! free neighbours get the tokens they would get alone (same algorithm and uniforms; argmax is argmax). After the
//! draw the grammar accepts the token; a complete grammar ends the sequence with `Stop`. A free sequence carries no
//! mask and pays one branch.
//!
//! A failed step fails the requests in it (nothing was written to the KV cache); a fatal backend error
//! ([`BackendError::is_fatal`]) fails every request held and the caller is expected to stop.
//!
//! Every step also hands over the prefix-cache index changes it caused ([`StepOutput::kv_events`], recorded by the
//! block pool), as data; the engine thread publishes them to routers.
//!
//! Determinism: the core draws no randomness. A request without a seed samples with seed 0 here; the engine thread
//! draws a random seed for such requests before it adds them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ferrite_common::hash::BlockHasher;
use ferrite_common::sampling::{SamplingParams, StoppingParams};

use super::block_pool::BlockPool;
pub use super::block_pool::{BlockEvent, PoolUsage};
use super::constraint::{Constraint, Grammar, TokenMask};
use super::sampler::{Sampler, TokenLogprob};
use super::scheduler::{AdmissionError, Scheduled, Scheduler, SchedulerConfig, SeqId, Sequence};
use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, RowSampling, SeqInput};

/// A validated generation request (token ids in).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// Completions; they share the prompt's cached blocks.
    pub n: u32,
    pub cache_salt: Vec<u8>,
    /// The grammar every completion must match (compiled off the engine thread); `None`: free text.
    pub constraint: Option<Grammar>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

/// What the engine streams back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOutput {
    Tokens {
        index: u32,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
        cached_prompt_tokens: u32,
    },
    Finished {
        index: u32,
        reason: FinishReason,
        matched_stop: Option<u32>,
        prompt_tokens: u32,
        completion_tokens: u32,
        cached_tokens: u32,
    },
    /// The request was not run (nothing was generated).
    Rejected(EngineError),
    /// The step failed after the request started; the request is over.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("request id `{0}` is already running")]
    DuplicateId(String),
    #[error("the engine has shut down")]
    ShutDown,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub model_fingerprint: [u8; 16],
    pub eos_token_ids: Vec<u32>,
    /// While any stream decodes, the step time to aim for: the engine thread measures steps and limits their prompt
    /// tokens so a step takes about this long ([`EngineCore::set_decode_step_tokens`]). `None`: every step may take
    /// the full token budget. Only the thread shell ([`super::core`]) reads it; the core has no clock.
    pub decode_step_target: Option<std::time::Duration>,
}

/// One output of the core, for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub request_id: Arc<str>,
    pub output: EngineOutput,
    /// The request is over after this output (its last completion finished, it was aborted, or it failed): the core
    /// no longer knows it, and the caller may drop whatever it keeps for it.
    pub last: bool,
}

/// What a step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Every output since the previous step (a step also hands over what aborts emitted in between), in order.
    pub outputs: Vec<Emitted>,
    /// Tokens the step computed; 0 when nothing could be scheduled (the core is idle, or waits for a change).
    pub num_tokens: usize,
    /// A fatal backend error: every request has been failed, the core holds nothing, and the caller should stop.
    pub fatal: Option<BackendError>,
    /// Prefix-cache index changes since the previous step, in order (the engine thread publishes them as
    /// `KvEvents`; callers without a router may drop them).
    pub kv_events: Vec<BlockEvent>,
    /// Requests whose first sequence this step admitted (their time in the queue ended), each once.
    pub admitted: Vec<Arc<str>>,
}

/// Counters and gauges of a core, as plain numbers (the engine thread copies them into its atomic stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub running: usize,
    pub waiting: usize,
    /// Tokens waiting sequences still have to prefill.
    pub waiting_prefill_tokens: usize,
    pub kv: PoolUsage,
    /// Prefix-cache lookups and hits, in blocks.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Prompt tokens served from the prefix cache, counted when a sequence finishes (or one completion is aborted).
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    /// Abort calls that found their request (or completion).
    pub aborts: u64,
    /// Steps that ran a forward pass (failed ones included).
    pub steps: u64,
    /// Tokens computed by the last step that ran a forward pass.
    pub batch_tokens: u64,
    pub generated_tokens: u64,
}

/// The core's own counters (see [`CoreStats`]).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    prefix_hit_tokens: u64,
    aborts: u64,
    steps: u64,
    batch_tokens: u64,
    generated_tokens: u64,
}

/// When a sequence stops besides its token limit (the request's `StoppingParams`, without the parts the sampler
/// owns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StopRules {
    min_tokens: usize,
    ignore_eos: bool,
    stop_token_ids: Vec<u32>,
}

/// The core's state of one sequence, carried by the scheduler's `Sequence` (so it lives and dies with it).
pub(crate) struct SeqMeta {
    request_id: Arc<str>,
    /// Completion index among the request's `n`.
    index: u32,
    sampler: Sampler,
    max_new_tokens: usize,
    stop: StopRules,
    /// The grammar's state for this sequence (constrained decoding); `None` costs free sequences nothing.
    constraint: Option<Constraint>,
}

/// Decides whether a sequence that just got `token` (now `generated` tokens, `len` in all) stops: a stop or eos id
/// once `min_tokens` are generated, else its token limit or the context.
fn stop_reason(
    meta: &SeqMeta,
    eos: &[u32],
    token: u32,
    generated: usize,
    len: usize,
    max_model_len: usize,
) -> Option<(FinishReason, Option<u32>)> {
    let stop = &meta.stop;
    if generated >= stop.min_tokens && ((!stop.ignore_eos && eos.contains(&token)) || stop.stop_token_ids.contains(&token)) {
        Some((FinishReason::Stop, Some(token)))
    } else if generated >= meta.max_new_tokens || len >= max_model_len {
        Some((FinishReason::Length, None))
    } else {
        None
    }
}

/// The backend call of a step.
enum Call {
    Greedy,
    Sample(Vec<RowSampling>),
    Logits,
}

/// What the backend returned: token ids (greedy or drawn on the backend), or logits for the host sampler.
/// Each constrained sequence's mask for this step's draw (or why there is none).
type Masks = HashMap<SeqId, Result<TokenMask, String>>;

enum Returned {
    Ids(Vec<u32>),
    Logits(Logits),
}

/// See the module docs.
pub struct EngineCore {
    sched: Scheduler<SeqMeta>,
    /// Request id → its live sequences (an index: the sequences themselves live in `sched`).
    requests: HashMap<Arc<str>, Vec<SeqId>>,
    eos_token_ids: Vec<u32>,
    next_seq: SeqId,
    counters: Counters,
    /// Outputs not yet handed to the caller.
    outbox: Vec<Emitted>,
    /// A logit row the host sampler may modify.
    scratch: Vec<f32>,
    /// Requests with an admitted sequence (so an `n > 1` request's queueing ends once, with its first sequence).
    admitted: HashSet<Arc<str>>,
    /// Of those, the ones not yet handed over in a [`StepOutput`].
    newly_admitted: Vec<Arc<str>>,
}

impl EngineCore {
    /// A core whose KV pool matches the backend's (`info.num_kv_blocks` blocks of `info.block_size` tokens).
    pub fn new(cfg: EngineConfig, info: &BackendInfo) -> Self {
        let pool = BlockPool::new(info.num_kv_blocks, info.block_size);
        let hasher = BlockHasher::new(&cfg.model_fingerprint, info.block_size);
        Self {
            sched: Scheduler::new(cfg.scheduler, pool, hasher),
            requests: HashMap::new(),
            eos_token_ids: cfg.eos_token_ids,
            next_seq: 1,
            counters: Counters::default(),
            outbox: Vec::new(),
            scratch: Vec::new(),
            admitted: HashSet::new(),
            newly_admitted: Vec::new(),
        }
    }

    /// Queues a request's `n` sequences, or none of them.
    pub fn add(&mut self, req: EngineRequest) -> Result<(), EngineError> {
        if self.requests.contains_key(req.request_id.as_str()) {
            return Err(EngineError::DuplicateId(req.request_id));
        }
        let max_len = self.sched.config().max_model_len;
        let max_new_tokens = match req.stopping.max_new_tokens {
            0 => max_len.saturating_sub(req.prompt.len()),
            m => m as usize,
        };
        let seed = req.sampling.seed.unwrap_or(0);
        let request_id: Arc<str> = req.request_id.into();
        let stop = StopRules {
            min_tokens: req.stopping.min_tokens as usize,
            ignore_eos: req.stopping.ignore_eos,
            stop_token_ids: req.stopping.stop_token_ids.clone(),
        };
        let n = req.n.max(1);
        let mut ids = Vec::with_capacity(n as usize);
        for index in 0..n {
            let id = self.next_seq;
            self.next_seq += 1;
            // Copies wait for the first to compute the prompt, then take its blocks from the prefix cache.
            let wait_for = ids.first().copied();
            let sampler = Sampler::new(req.sampling.clone(), &req.stopping, &self.eos_token_ids, &req.prompt, seed, index);
            let constraint = req.constraint.as_ref().map(Grammar::start);
            let meta = SeqMeta { request_id: Arc::clone(&request_id), index, sampler, max_new_tokens, stop: stop.clone(), constraint };
            let max_seq_len = req.prompt.len() + max_new_tokens;
            if let Err(e) = self.sched.add(id, req.prompt.clone(), max_seq_len, &req.cache_salt, wait_for, meta) {
                for id in ids {
                    self.sched.remove(id);
                }
                return Err(e.into());
            }
            ids.push(id);
        }
        self.requests.insert(request_id, ids);
        Ok(())
    }

    /// Ends a request (`index` None) or one completion of it with `Abort` (a request ends with its last completion).
    /// Returns whether it was running or waiting. The `Finished` outputs come with the next step's.
    pub fn abort(&mut self, request_id: &str, index: Option<u32>) -> bool {
        let Some(ids) = self.requests.get(request_id) else { return false };
        match index {
            None => {
                for id in ids.clone() {
                    if let Some((seq, last)) = self.remove_seq(id) {
                        self.emit_finished(&seq, FinishReason::Abort, None, last);
                    }
                }
            }
            Some(index) => {
                let found = ids.iter().copied().find(|&id| self.sched.get(id).is_some_and(|s| s.meta.index == index));
                let Some(id) = found else { return false };
                self.finish(id, FinishReason::Abort, None);
            }
        }
        self.counters.aborts += 1;
        true
    }

    /// Plans and runs one step on `backend`, then returns every output since the last hand-over.
    pub fn step(&mut self, backend: &mut dyn Backend) -> StepOutput {
        let plan = self.sched.schedule();
        for id in self.sched.take_admitted() {
            if let Some(seq) = self.sched.get(id)
                && self.admitted.insert(Arc::clone(&seq.meta.request_id))
            {
                self.newly_admitted.push(Arc::clone(&seq.meta.request_id));
            }
        }
        if plan.is_empty() {
            return self.hand_over(0, None);
        }
        let num_tokens = plan.iter().map(|p| p.num_tokens).sum();
        let call = self.choose_call(&plan, backend.draws_on_device());
        let (result, mut masks) = self.forward_with_masks(backend, &plan, call);
        self.counters.steps += 1;
        self.counters.batch_tokens = num_tokens as u64;
        match result {
            Ok(returned) => {
                self.sched.complete(&plan);
                self.take_tokens(&plan, &returned, &mut masks);
                self.hand_over(num_tokens, None)
            }
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                self.fail_requests(plan.iter().map(|p| p.id), &e);
                if !e.is_fatal() {
                    return self.hand_over(num_tokens, None);
                }
                let all: Vec<SeqId> = self.requests.values().flatten().copied().collect();
                self.fail_requests(all.into_iter(), &e);
                self.hand_over(num_tokens, Some(e))
            }
        }
    }

    /// Outputs produced outside a step (by [`EngineCore::abort`]) and not handed over yet; the next step hands them
    /// over otherwise.
    pub(crate) fn take_outputs(&mut self) -> Vec<Emitted> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether the core holds no sequence.
    /// Limits steps that run decoding sequences to about `tokens` tokens (see `Scheduler::set_decode_step_tokens`).
    pub fn set_decode_step_tokens(&mut self, tokens: Option<usize>) {
        self.sched.set_decode_step_tokens(tokens);
    }

    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }

    /// Every hash in the prefix-cache index now (tests: what the published events must add up to).
    #[cfg(test)]
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        self.sched.cached_hashes()
    }

    /// Whether a request is still running or waiting.
    #[cfg(test)]
    pub(crate) fn has_request(&self, request_id: &str) -> bool {
        self.requests.contains_key(request_id)
    }

    pub fn stats(&self) -> CoreStats {
        let (prefix_queries, prefix_hits) = self.sched.prefix_stats();
        let c = self.counters;
        CoreStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            waiting_prefill_tokens: self.sched.waiting_prefill_tokens(),
            kv: self.sched.usage(),
            prefix_queries,
            prefix_hits,
            prefix_hit_tokens: c.prefix_hit_tokens,
            preemptions: self.sched.preemptions(),
            aborts: c.aborts,
            steps: c.steps,
            batch_tokens: c.batch_tokens,
            generated_tokens: c.generated_tokens,
        }
    }

    fn hand_over(&mut self, num_tokens: usize, fatal: Option<BackendError>) -> StepOutput {
        let admitted = std::mem::take(&mut self.newly_admitted);
        StepOutput { outputs: self.take_outputs(), num_tokens, fatal, kv_events: self.sched.take_block_events(), admitted }
    }

    /// The backend call for the whole step (see the module docs; with no sequence sampling, greedy).
    fn choose_call(&mut self, plan: &[Scheduled], draws_on_device: bool) -> Call {
        let sampled = || plan.iter().filter(|p| p.sample).map(|p| self.sched.get(p.id).expect("planned sequence exists"));
        // A grammar's mask travels with its row's sampling parameters to a backend that draws on its device, so a
        // constrained step never takes the argmax-only call (which has no mask). Where the host draws anyway, the
        // masks are computed while the forward pass runs (`forward_with_masks`) and applied to the host logits.
        let constrained = sampled().any(|s| s.meta.constraint.is_some());
        if constrained && !draws_on_device {
            return Call::Logits;
        }
        if !constrained && sampled().all(|s| s.meta.sampler.is_plain_greedy(s.num_generated())) {
            return Call::Greedy;
        }
        if sampled().any(|s| s.meta.sampler.needs_logits()) {
            return Call::Logits;
        }
        // The masks first: a grammar that allows nothing (or fails) sends the step to the host path, which ends its
        // sequence, before any row consumes its draw.
        let mut masks = Vec::new();
        if constrained {
            for p in plan.iter().filter(|p| p.sample) {
                let s = self.sched.get_mut(p.id).expect("planned sequence exists");
                masks.push(match s.meta.constraint.as_mut().map(|c| c.next_mask().map(TokenMask::into_words)) {
                    None => None,
                    Some(Ok(words)) => Some(words),
                    Some(Err(_)) => return Call::Logits,
                });
            }
        }
        let mut masks = masks.into_iter();
        // Preparing a row consumes the sequence's draw, as sampling on the host would.
        let rows = plan
            .iter()
            .filter(|p| p.sample)
            .map(|p| {
                let s = self.sched.get_mut(p.id).expect("planned sequence exists");
                let generated = s.num_generated();
                let mut row = s.meta.sampler.prepare(generated);
                row.mask = masks.next().flatten();
                row
            })
            .collect();
        Call::Sample(rows)
    }

    /// Runs the step's backend call and, meanwhile on a helper thread, the grammar masks of its constrained sampling
    /// sequences (their matchers are lent to the thread and put back after): a mask never adds its time to the step's,
    /// where a core is free for it.
    fn forward_with_masks(&mut self, backend: &mut dyn Backend, plan: &[Scheduled], call: Call) -> (Result<Returned, BackendError>, Masks) {
        let mut lent: Vec<(SeqId, Constraint)> = Vec::new();
        // Only the host path applies masks after the forward pass (`Call::Sample` carries them in its rows).
        for p in plan.iter().filter(|p| p.sample && matches!(call, Call::Logits)) {
            if let Some(c) = self.sched.get_mut(p.id).and_then(|s| s.meta.constraint.take()) {
                lent.push((p.id, c));
            }
        }
        if lent.is_empty() {
            return (self.forward(backend, plan, call), Masks::new());
        }
        let ids: Vec<SeqId> = lent.iter().map(|(id, _)| *id).collect();
        let (result, computed) = std::thread::scope(|scope| {
            let masks = std::thread::Builder::new().name("ferrite-grammar".into()).spawn_scoped(scope, move || {
                lent.into_iter()
                    .map(|(id, mut c)| {
                        let m = c.next_mask();
                        (id, c, m)
                    })
                    .collect::<Vec<_>>()
            });
            let result = self.forward(backend, plan, call);
            (result, masks.map_err(|e| e.to_string()).and_then(|h| h.join().map_err(|_| "the grammar thread panicked".to_string())))
        });
        let mut masks = Masks::new();
        match computed {
            Ok(done) => {
                for (id, c, m) in done {
                    if let Some(s) = self.sched.get_mut(id) {
                        s.meta.constraint = Some(c);
                    }
                    masks.insert(id, m);
                }
            }
            // The matchers are lost with the thread: those sequences end (`take_tokens` sees the error).
            Err(why) => masks.extend(ids.into_iter().map(|id| (id, Err(why.clone())))),
        }
        (result, masks)
    }

    fn forward(&self, backend: &mut dyn Backend, plan: &[Scheduled], call: Call) -> Result<Returned, BackendError> {
        let batch = ForwardBatch {
            seqs: plan
                .iter()
                .map(|p| {
                    let s = self.sched.get(p.id).expect("planned sequence exists");
                    SeqInput {
                        tokens: &s.tokens()[p.start..p.start + p.num_tokens],
                        start_pos: p.start,
                        block_table: s.block_ids(),
                        logits: if p.sample { LogitsWanted::Last } else { LogitsWanted::None },
                    }
                })
                .collect(),
        };
        match call {
            Call::Greedy => backend.forward_greedy(&batch).map(Returned::Ids),
            Call::Sample(rows) => backend.forward_sample(&batch, &rows).map(Returned::Ids),
            Call::Logits => backend.forward(&batch).map(Returned::Logits),
        }
    }

    /// Takes each sampling sequence's next token from what the backend returned, streams it and applies the stop
    /// rules.
    fn take_tokens(&mut self, plan: &[Scheduled], returned: &Returned, masks: &mut Masks) {
        let mut ids = match returned {
            Returned::Ids(ids) => ids.iter().copied(),
            Returned::Logits(_) => [].iter().copied(),
        };
        for (i, p) in plan.iter().enumerate() {
            if !p.sample {
                continue;
            }
            let seq = self.sched.get_mut(p.id).expect("planned sequence exists");
            let generated = seq.num_generated();
            let (token, logprob) = match returned {
                Returned::Ids(_) => {
                    let Some(token) = ids.next() else { continue };
                    (token, None)
                }
                Returned::Logits(logits) => {
                    let Some(row) = logits.last(i) else { continue };
                    self.scratch.clear();
                    self.scratch.extend_from_slice(row);
                    let mask = match masks.remove(&p.id) {
                        Some(m) => Some(m),
                        None => seq.meta.constraint.as_mut().map(Constraint::next_mask),
                    };
                    if let Some(Err(why)) = mask.as_ref().map(|m| m.as_ref().map(|m| m.apply(&mut self.scratch))) {
                        // Nothing valid can follow: end the output here rather than draw outside the grammar.
                        tracing::warn!(request_id = %seq.meta.request_id, error = %why, "constrained sequence ends: no token fits its grammar");
                        self.finish(p.id, FinishReason::Stop, None);
                        continue;
                    }
                    seq.meta.sampler.sample(&mut self.scratch, generated)
                }
            };
            let grammar_done = match seq.meta.constraint.as_mut() {
                None => false,
                Some(c) => match c.accept(token) {
                    Ok(()) => c.is_complete(),
                    Err(why) => {
                        tracing::warn!(request_id = %seq.meta.request_id, error = %why, "constrained sequence ends: its grammar refused a token");
                        true
                    }
                },
            };
            seq.meta.sampler.record(token);
            self.sched.append_token(p.id, token);
            self.counters.generated_tokens += 1;
            let seq = self.sched.get(p.id).expect("planned sequence exists");
            let output = EngineOutput::Tokens {
                index: seq.meta.index,
                tokens: vec![token],
                logprobs: logprob.into_iter().collect(),
                cached_prompt_tokens: seq.cached_prompt_tokens() as u32,
            };
            self.outbox.push(Emitted { request_id: Arc::clone(&seq.meta.request_id), output, last: false });
            let max_model_len = self.sched.config().max_model_len;
            let stop = stop_reason(&seq.meta, &self.eos_token_ids, token, seq.num_generated(), seq.tokens().len(), max_model_len);
            // A complete grammar ends the output with `stop`, even at `max_tokens` or before eos.
            let stop = match stop {
                Some((FinishReason::Stop, m)) => Some((FinishReason::Stop, m)),
                _ if grammar_done => Some((FinishReason::Stop, None)),
                other => other,
            };
            if let Some((reason, matched_stop)) = stop {
                self.finish(p.id, reason, matched_stop);
            }
        }
    }

    /// Ends a sequence with `reason` (its request ends with its last sequence).
    fn finish(&mut self, id: SeqId, reason: FinishReason, matched_stop: Option<u32>) {
        let Some((seq, last)) = self.remove_seq(id) else { return };
        self.counters.prefix_hit_tokens += seq.cached_prompt_tokens() as u64;
        self.emit_finished(&seq, reason, matched_stop, last);
    }

    fn emit_finished(&mut self, seq: &Sequence<SeqMeta>, reason: FinishReason, matched_stop: Option<u32>, last: bool) {
        let output = EngineOutput::Finished {
            index: seq.meta.index,
            reason,
            matched_stop,
            prompt_tokens: seq.prompt_len() as u32,
            completion_tokens: seq.num_generated() as u32,
            cached_tokens: seq.cached_prompt_tokens() as u32,
        };
        self.outbox.push(Emitted { request_id: Arc::clone(&seq.meta.request_id), output, last });
    }

    /// Ends every request that has a sequence in `seqs` with `Failed` (all of its sequences go).
    fn fail_requests(&mut self, seqs: impl Iterator<Item = SeqId>, e: &BackendError) {
        let requests: Vec<Arc<str>> = seqs.filter_map(|id| self.sched.get(id)).map(|s| Arc::clone(&s.meta.request_id)).collect();
        for request_id in requests {
            let Some(ids) = self.requests.get(&request_id) else { continue }; // already failed
            for id in ids.clone() {
                self.remove_seq(id);
            }
            self.outbox.push(Emitted { request_id, output: EngineOutput::Failed(e.to_string()), last: true });
        }
    }

    /// The one way a sequence leaves: out of the scheduler (the returned sequence holds its blocks; dropping it frees
    /// them) and out of its request's index. Also says whether that was the request's last sequence (the request is
    /// then forgotten).
    fn remove_seq(&mut self, id: SeqId) -> Option<(Sequence<SeqMeta>, bool)> {
        let seq = self.sched.remove(id)?;
        let request_id = &seq.meta.request_id;
        let ids = self.requests.get_mut(request_id).expect("a sequence's request is indexed");
        ids.retain(|&s| s != id);
        let last = ids.is_empty();
        if last {
            self.requests.remove(request_id);
            self.admitted.remove(request_id);
        }
        Some((seq, last))
    }
}

#[cfg(test)]
#[path = "step_tests.rs"]
mod tests;
