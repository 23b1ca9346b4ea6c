//! The engine core driven directly, on this thread, over deterministic fake backends: [`InstantBackend`] (next token =
//! last + 1) for the stop and length rules, and [`ContextBackend`] (next token = a hash of every token in the KV
//! cache, read through the block table) wherever a wrong block table, a lost block or a bad prefix hit must show.

use std::collections::{BTreeMap, HashSet};

use ferrite_common::config::{LlamaConfig, RopeStyle};

use super::*;
use crate::backend::validate_batch;
use crate::instant::InstantBackend;

const VOCAB: usize = 64;
const BS: usize = 4;

fn llama(max_pos: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 8,
        vocab_size: VOCAB,
        max_position_embeddings: max_pos,
        rms_norm_eps: 1e-5,
        rope_theta: 1e4,
        rope_scaling: None,
        rope_style: RopeStyle::Half,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// A backend whose next token depends on every token in the sequence's KV cache, read back through its block table,
/// so recomputation after preemption, prefix-cache hits and shared blocks must all be right for the output to stay
/// the same. The logits are spread out (not one-hot), so sampling draws from many tokens.
struct ContextBackend {
    config: LlamaConfig,
    num_blocks: usize,
    kv: Vec<u32>,
}

impl ContextBackend {
    fn new(num_blocks: usize) -> Self {
        Self { config: llama(4096), num_blocks, kv: vec![u32::MAX; num_blocks * BS] }
    }
}

impl Backend for ContextBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "context", num_kv_blocks: self.num_blocks, block_size: BS }
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        validate_batch(batch, &self.config, BS, self.num_blocks)?;
        let slot = |table: &[u32], pos: usize| table[pos / BS] as usize * BS + pos % BS;
        for s in &batch.seqs {
            for (i, &t) in s.tokens.iter().enumerate() {
                self.kv[slot(s.block_table, s.start_pos + i)] = t;
            }
        }
        let mut logits = Logits { vocab: VOCAB, ..Logits::default() };
        for s in &batch.seqs {
            let end = s.start_pos + s.tokens.len();
            let rows = match s.logits {
                LogitsWanted::None => end..end,
                LogitsWanted::Last => end - 1..end,
                LogitsWanted::All => s.start_pos..end,
            };
            let first = logits.data.len() / VOCAB;
            for q in rows {
                let h = (0..=q).fold(17u64, |h, p| h.wrapping_mul(31).wrapping_add(u64::from(self.kv[slot(s.block_table, p)]) + 1));
                logits.data.extend((0..VOCAB as u64).map(|j| ((h ^ j.wrapping_mul(0x9E37_79B9)) % 97) as f32 / 8.0));
            }
            logits.ranges.push(first..logits.data.len() / VOCAB);
        }
        Ok(logits)
    }
}

/// Counts the backend calls a core makes.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Calls {
    forward: usize,
    greedy: usize,
    sample: usize,
}

struct Recording<B> {
    inner: B,
    calls: Calls,
}

impl<B: Backend> Backend for Recording<B> {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        self.calls.forward += 1;
        self.inner.forward(batch)
    }
    fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        self.calls.greedy += 1;
        self.inner.forward_greedy(batch)
    }
    fn forward_sample(&mut self, batch: &ForwardBatch<'_>, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        self.calls.sample += 1;
        self.inner.forward_sample(batch, rows)
    }
}

/// Fails every step with `error`.
struct Failing(InstantBackend, BackendError);

impl Backend for Failing {
    fn config(&self) -> &LlamaConfig {
        self.0.config()
    }
    fn info(&self) -> BackendInfo {
        self.0.info()
    }
    fn forward(&mut self, _: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        Err(self.1.clone())
    }
}

struct Limits {
    budget: usize,
    max_seqs: usize,
    max_waiting: usize,
    max_model_len: usize,
    eos: Vec<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { budget: 64, max_seqs: 8, max_waiting: 16, max_model_len: 1000, eos: vec![] }
    }
}

fn core(backend: &dyn Backend, l: Limits) -> EngineCore {
    let scheduler = SchedulerConfig {
        max_num_batched_tokens: l.budget,
        max_num_seqs: l.max_seqs,
        max_waiting: l.max_waiting,
        max_model_len: l.max_model_len,
    };
    EngineCore::new(EngineConfig { scheduler, model_fingerprint: [7; 16], eos_token_ids: l.eos, decode_step_target: None }, &backend.info())
}

fn instant(blocks: usize) -> InstantBackend {
    InstantBackend::new(llama(4096), blocks, BS)
}

fn greedy(id: &str, prompt: &[u32], max_new: u32) -> EngineRequest {
    EngineRequest {
        request_id: id.into(),
        prompt: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        stopping: StoppingParams { max_new_tokens: max_new, ..StoppingParams::default() },
        n: 1,
        cache_salt: Vec::new(),
        constraint: None,
    }
}

fn sampled(id: &str, prompt: &[u32], max_new: u32, seed: u64) -> EngineRequest {
    let mut r = greedy(id, prompt, max_new);
    r.sampling = SamplingParams { temperature: 0.9, repetition_penalty: 1.2, seed: Some(seed), ..SamplingParams::default() };
    r
}

fn prompt(len: usize, base: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (base + 5 * i) % VOCAB as u32).collect()
}

/// A finished completion: (reason, matched stop, completion tokens, cached prompt tokens).
type End = (FinishReason, Option<u32>, u32, u32);

/// Everything the core emitted, by (request, completion).
#[derive(Debug, Default)]
struct Seen {
    tokens: BTreeMap<(String, u32), Vec<u32>>,
    ends: BTreeMap<(String, u32), End>,
    failed: BTreeMap<String, String>,
    over: HashSet<String>,
}

impl Seen {
    fn absorb(&mut self, outputs: Vec<Emitted>) {
        for e in outputs {
            let id = e.request_id.to_string();
            assert!(!self.over.contains(&id), "output after the last one of {id}: {:?}", e.output);
            match e.output {
                EngineOutput::Tokens { index, tokens, .. } => self.tokens.entry((id.clone(), index)).or_default().extend(tokens),
                EngineOutput::Finished { index, reason, matched_stop, completion_tokens, cached_tokens, .. } => {
                    self.ends.insert((id.clone(), index), (reason, matched_stop, completion_tokens, cached_tokens));
                }
                EngineOutput::Failed(m) => {
                    assert!(e.last, "a failure ends the request");
                    self.failed.insert(id.clone(), m);
                }
                EngineOutput::Rejected(r) => panic!("the core never emits rejections: {r}"),
            }
            if e.last {
                self.over.insert(id);
            }
        }
    }

    fn tokens(&self, id: &str, index: u32) -> Vec<u32> {
        self.tokens.get(&(id.to_string(), index)).cloned().unwrap_or_default()
    }

    fn end(&self, id: &str, index: u32) -> End {
        self.ends[&(id.to_string(), index)]
    }
}

/// Steps until the core is idle, checking the pool's bookkeeping after every step.
fn drive(core: &mut EngineCore, backend: &mut dyn Backend, seen: &mut Seen) {
    for _ in 0..10_000 {
        if core.is_idle() {
            assert_eq!(core.stats().kv.in_use, 0, "an idle core holds no block");
            return;
        }
        let out = core.step(backend);
        assert!(out.num_tokens > 0 || out.fatal.is_some(), "a busy core with no outside events always makes progress");
        core.sched.check_invariants();
        seen.absorb(out.outputs);
    }
    panic!("the core did not finish");
}

fn run(core: &mut EngineCore, backend: &mut dyn Backend, reqs: Vec<EngineRequest>) -> Seen {
    for r in reqs {
        core.add(r).expect("accepted");
    }
    let mut seen = Seen::default();
    drive(core, backend, &mut seen);
    seen
}

#[test]
fn admission_accepts_and_rejects_with_the_right_error() {
    // 8 usable blocks of 4 tokens (32 tokens); the context (64) is larger than the pool.
    let b = instant(9);
    let mut c = core(&b, Limits { max_waiting: 3, max_model_len: 64, ..Limits::default() });
    let admission = |e: AdmissionError| Err(EngineError::Admission(e));
    c.add(greedy("a", &prompt(28, 0), 4)).expect("28 + 4 tokens fill the pool exactly");
    assert!(c.has_request("a"));
    assert_eq!((c.stats().waiting, c.stats().running), (1, 0));
    // Prompt + limit need more blocks than the pool has: it could never run.
    assert_eq!(c.add(greedy("big", &prompt(30, 0), 4)), admission(AdmissionError::TooLarge { needed: 9, capacity: 8 }));
    // A prompt that fills the context leaves nothing to generate; an empty one has no last token.
    assert_eq!(c.add(greedy("ctx", &prompt(64, 0), 1)), admission(AdmissionError::PromptTooLong { prompt: 64, max_model_len: 64 }));
    assert_eq!(c.add(greedy("empty", &[], 1)), admission(AdmissionError::EmptyPrompt));
    // The id of a request still held is refused.
    assert_eq!(c.add(greedy("a", &[1], 1)), Err(EngineError::DuplicateId("a".into())));
    // Three may wait: with one place left, a request of n = 2 is refused whole (its first copy is taken back).
    c.add(greedy("b", &[1], 1)).unwrap();
    let mut two = greedy("c", &[1], 1);
    two.n = 2;
    assert_eq!(c.add(two), admission(AdmissionError::Overloaded { waiting: 3, limit: 3 }));
    assert!(!c.has_request("c"));
    assert_eq!(c.stats().waiting, 2);
    c.add(greedy("d", &[1], 1)).unwrap();
    assert_eq!(c.add(greedy("e", &[1], 1)), admission(AdmissionError::Overloaded { waiting: 3, limit: 3 }));
    // Rejections held nothing: what was accepted runs to the end and every block comes back.
    let mut b = b;
    let mut seen = Seen::default();
    drive(&mut c, &mut b, &mut seen);
    assert_eq!(seen.over, HashSet::from(["a", "b", "d"].map(String::from)));
}

#[test]
fn preemption_by_recompute_finishes_with_the_tokens_of_an_unpreempted_run() {
    let reqs = || -> Vec<EngineRequest> {
        let mut v: Vec<EngineRequest> = (0..4).map(|i| greedy(&format!("g{i}"), &prompt(6, 3 * i), 10)).collect();
        v.push(sampled("s", &prompt(7, 40), 10, 99));
        v
    };
    // Alone, in a roomy pool: nothing is ever preempted.
    let mut alone = BTreeMap::new();
    for r in reqs() {
        let mut b = ContextBackend::new(64);
        let mut c = core(&b, Limits::default());
        let id = r.request_id.clone();
        let seen = run(&mut c, &mut b, vec![r]);
        assert_eq!(c.stats().preemptions, 0);
        alone.insert(id.clone(), seen.tokens(&id, 0));
    }
    // Together in 8 blocks of 4 tokens: five sequences growing to 16-17 tokens (4-5 blocks each) cannot all fit.
    let mut b = ContextBackend::new(9);
    let mut c = core(&b, Limits::default());
    let seen = run(&mut c, &mut b, reqs());
    assert!(c.stats().preemptions > 0, "the pool is too small for all five: some must be preempted");
    for (id, tokens) in &alone {
        assert_eq!(tokens.len(), 10);
        assert_eq!(&seen.tokens(id, 0), tokens, "{id}: preemption changed the output");
        assert_eq!(seen.end(id, 0).0, FinishReason::Length);
    }
}

#[test]
fn abort_ends_a_request_or_one_completion_and_returns_their_blocks() {
    let mut b = instant(33);
    let mut c = core(&b, Limits::default());
    let mut req = greedy("r", &prompt(9, 1), 20);
    req.n = 2;
    c.add(req).unwrap();
    let mut seen = Seen::default();
    for _ in 0..3 {
        seen.absorb(c.step(&mut b).outputs);
    }
    // Completion 0 is sequence 1 and the copy is sequence 2; they share the two full prompt blocks.
    let (first, copy) = (c.sched.get(1).unwrap().block_ids().to_vec(), c.sched.get(2).unwrap().block_ids().to_vec());
    let private = copy.iter().filter(|b| !first.contains(b)).count();
    assert!(private >= 1 && private < copy.len(), "shared and private blocks: {first:?} {copy:?}");
    let used = c.stats().kv.in_use;
    assert_eq!(used, first.len() + private);

    // One completion: it ends with `Abort`, the request goes on, its private blocks are free at once.
    assert!(!c.abort("r", Some(5)), "no such completion");
    assert!(c.abort("r", Some(1)));
    let out = c.take_outputs();
    assert!(
        matches!(&out[..], [Emitted { output: EngineOutput::Finished { index: 1, reason: FinishReason::Abort, .. }, last: false, .. }]),
        "{out:?}"
    );
    seen.absorb(out);
    assert_eq!(c.stats().kv.in_use, used - private);
    assert!(c.has_request("r"));
    assert!(!c.abort("r", Some(1)), "already ended");
    seen.absorb(c.step(&mut b).outputs);
    assert_eq!(seen.tokens("r", 0).len(), 4, "completion 0 goes on");

    // The whole request: its last completion ends, the request is over, every block is free.
    assert!(c.abort("r", None));
    let out = c.take_outputs();
    assert!(
        matches!(
            &out[..],
            [Emitted {
                output: EngineOutput::Finished { index: 0, reason: FinishReason::Abort, completion_tokens: 4, .. },
                last: true,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(!c.has_request("r") && c.is_idle());
    assert_eq!(c.stats().kv.in_use, 0);
    assert!(!c.abort("r", None));

    // A request still waiting is aborted too (nothing generated); the next step hands its output over.
    c.add(greedy("w", &[1, 2], 5)).unwrap();
    assert!(c.abort("w", None));
    let out = c.step(&mut b).outputs;
    assert!(
        matches!(
            &out[..],
            [Emitted {
                output: EngineOutput::Finished { index: 0, reason: FinishReason::Abort, completion_tokens: 0, .. },
                last: true,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!((c.stats().waiting, c.stats().aborts), (0, 3));
    assert!(c.step(&mut b).outputs.is_empty());
}

/// A request with stop rules on a backend whose next token is last + 1: prompt `[10]` gives 11, 12, 13, …
fn stops(eos: &[u32], stopping: StoppingParams) -> (Vec<u32>, End) {
    let mut b = instant(33);
    let mut c = core(&b, Limits { eos: eos.to_vec(), ..Limits::default() });
    let mut r = greedy("x", &[10], 0);
    r.stopping = stopping;
    let seen = run(&mut c, &mut b, vec![r]);
    (seen.tokens("x", 0), seen.end("x", 0))
}

#[test]
fn stop_rules_eos_stop_ids_min_tokens_and_ignore_eos() {
    let limit = |max_new_tokens| StoppingParams { max_new_tokens, ..StoppingParams::default() };
    // The model's eos stops (and is streamed).
    assert_eq!(stops(&[13], limit(20)), (vec![11, 12, 13], (FinishReason::Stop, Some(13), 3, 0)));
    // A request's stop id stops before eos.
    let stop_at = |ids: Vec<u32>, s: StoppingParams| StoppingParams { stop_token_ids: ids, ..s };
    assert_eq!(stops(&[13], stop_at(vec![12], limit(20))), (vec![11, 12], (FinishReason::Stop, Some(12), 2, 0)));
    // ignore_eos: eos is an ordinary token, stop ids still stop.
    let ignore = |s: StoppingParams| StoppingParams { ignore_eos: true, ..s };
    assert_eq!(stops(&[13], ignore(limit(5))), (vec![11, 12, 13, 14, 15], (FinishReason::Length, None, 5, 0)));
    assert_eq!(stops(&[13], ignore(stop_at(vec![14], limit(20)))), (vec![11, 12, 13, 14], (FinishReason::Stop, Some(14), 4, 0)));
    // min_tokens: eos (11) would come first; it is suppressed (masked) for the first 3 tokens, so the argmax of
    // what is left (id 0) comes instead, and the sequence stops on eos only when it comes round again.
    let (tokens, end) = stops(&[11], StoppingParams { min_tokens: 3, ..limit(20) });
    assert_eq!(tokens, (0..=11).collect::<Vec<u32>>());
    assert_eq!(end, (FinishReason::Stop, Some(11), 12, 0));
}

#[test]
fn length_stops_at_max_new_tokens_and_at_the_context() {
    let run_one = |max_model_len: usize, max_new: u32| {
        let mut b = instant(33);
        let mut c = core(&b, Limits { max_model_len, ..Limits::default() });
        let seen = run(&mut c, &mut b, vec![greedy("x", &[10, 11, 12, 13, 14], max_new)]);
        (seen.tokens("x", 0), seen.end("x", 0))
    };
    assert_eq!(run_one(1000, 4), (vec![15, 16, 17, 18], (FinishReason::Length, None, 4, 0)));
    // A context of 8 holds 3 tokens after a 5-token prompt, whatever the limit (0 = up to the context).
    assert_eq!(run_one(8, 10), (vec![15, 16, 17], (FinishReason::Length, None, 3, 0)));
    assert_eq!(run_one(8, 0), (vec![15, 16, 17], (FinishReason::Length, None, 3, 0)));
}

#[test]
fn the_backend_call_follows_what_the_sequences_need() {
    let calls = |reqs: Vec<EngineRequest>| {
        let mut b = Recording { inner: ContextBackend::new(64), calls: Calls::default() };
        let mut c = core(&b, Limits::default());
        let seen = run(&mut c, &mut b, reqs);
        (b.calls, seen)
    };
    let with_logprobs = |mut r: EngineRequest| {
        r.stopping.logprobs = true;
        r
    };
    // Plain greedy: the backend takes the argmax.
    assert_eq!(calls(vec![greedy("g", &[1, 2, 3], 5)]).0, Calls { greedy: 5, ..Calls::default() });
    // Sampling without logprobs: the backend draws.
    let (on_backend, a) = calls(vec![sampled("s", &[1, 2, 3], 5, 7)]);
    assert_eq!(on_backend, Calls { sample: 5, ..Calls::default() });
    // Logprobs need the logits on the host; the same seed draws the same tokens there.
    let (on_host, b) = calls(vec![with_logprobs(sampled("s", &[1, 2, 3], 5, 7))]);
    assert_eq!(on_host, Calls { forward: 5, ..Calls::default() });
    assert_eq!(a.tokens("s", 0), b.tokens("s", 0));
    // The most demanding sequence of a step decides: greedy next to logprobs runs `forward`.
    assert_eq!(
        calls(vec![greedy("g", &[1, 2, 3], 3), with_logprobs(greedy("l", &[4, 5, 6], 3))]).0,
        Calls { forward: 3, ..Calls::default() }
    );
    // min_tokens masks the stop ids, so those first steps are sampled (with the masks), then greedy again.
    let mut r = greedy("m", &[1, 2, 3], 5);
    r.stopping.min_tokens = 2;
    assert_eq!(calls(vec![r]).0, Calls { sample: 2, greedy: 3, ..Calls::default() });
}

#[test]
fn n_completions_share_the_prompt_blocks_of_the_first() {
    let mut b = ContextBackend::new(33);
    let mut c = core(&b, Limits::default());
    let mut req = greedy("r", &prompt(10, 3), 6);
    req.n = 3;
    c.add(req).unwrap();
    let mut seen = Seen::default();
    seen.absorb(c.step(&mut b).outputs);
    // Step 1: only the first computes the prompt; the copies wait for it.
    assert!(c.sched.get(2).unwrap().block_ids().is_empty() && c.sched.get(3).unwrap().block_ids().is_empty());
    seen.absorb(c.step(&mut b).outputs);
    // Step 2: the copies take the first's two full prompt blocks from the prefix cache.
    let first = c.sched.get(1).unwrap().block_ids()[..2].to_vec();
    for copy in [2, 3] {
        assert_eq!(c.sched.get(copy).unwrap().block_ids()[..2], first[..], "copy {copy}");
    }
    drive(&mut c, &mut b, &mut seen);
    for index in 0..3 {
        assert_eq!(seen.tokens("r", index), seen.tokens("r", 0), "greedy completions agree");
        let cached = if index == 0 { 0 } else { 8 };
        assert_eq!(seen.end("r", index), (FinishReason::Length, None, 6, cached), "completion {index}");
    }
}

#[test]
fn prefix_cache_hits_skip_blocks_and_change_no_token() {
    let mut b = ContextBackend::new(33);
    let mut c = core(&b, Limits::default());
    let p = prompt(13, 9);
    let first = run(&mut c, &mut b, vec![greedy("a", &p, 5)]);
    let again = run(&mut c, &mut b, vec![greedy("b", &p, 5)]);
    assert_eq!(again.end("b", 0).3, 12, "three full prompt blocks come from the cache");
    assert_eq!(again.tokens("b", 0), first.tokens("a", 0));
    let mut salted = greedy("c", &p, 5);
    salted.cache_salt = b"other tenant".to_vec();
    let salted = run(&mut c, &mut b, vec![salted]);
    assert_eq!(salted.end("c", 0).3, 0, "another salt shares nothing");
    assert_eq!(salted.tokens("c", 0), first.tokens("a", 0));
}

#[test]
fn a_failed_step_fails_its_requests_and_a_fatal_one_fails_all() {
    // Token 64 is out of the vocabulary: the step holding it is rejected; the request waiting behind it runs.
    let mut b = instant(33);
    let mut c = core(&b, Limits { max_seqs: 1, ..Limits::default() });
    let seen = run(&mut c, &mut b, vec![greedy("bad", &[1, 64], 3), greedy("good", &[1, 2], 3)]);
    assert!(seen.failed["bad"].contains("out of range"), "{seen:?}");
    assert_eq!(seen.end("good", 0), (FinishReason::Length, None, 3, 0));

    // A fatal error fails the step's request and the waiting ones, and leaves the core empty.
    let mut b = Failing(instant(33), BackendError::Device("gone".into()));
    let mut c = core(&b, Limits { max_seqs: 1, ..Limits::default() });
    for id in ["x", "y", "z"] {
        c.add(greedy(id, &[1, 2], 3)).unwrap();
    }
    let out = c.step(&mut b);
    assert_eq!(out.fatal, Some(BackendError::Device("gone".into())));
    let mut seen = Seen::default();
    seen.absorb(out.outputs);
    assert_eq!(seen.failed.keys().map(String::as_str).collect::<Vec<_>>(), ["x", "y", "z"]);
    assert!(c.is_idle());
    assert_eq!(c.stats().kv.in_use, 0);
}

/// Steps until idle, collecting the prefix-cache index changes every step hands over.
fn drive_events(core: &mut EngineCore, backend: &mut dyn Backend) -> Vec<BlockEvent> {
    let mut events = Vec::new();
    for _ in 0..10_000 {
        if core.is_idle() {
            return events;
        }
        events.extend(core.step(backend).kv_events);
    }
    panic!("the core did not finish");
}

#[test]
fn a_prompts_full_blocks_are_published_as_their_chained_hashes() {
    let mut b = instant(8); // 7 usable blocks
    let mut c = core(&b, Limits::default());
    let p = prompt(10, 3); // two full blocks and a partial one
    let mut r = greedy("a", &p, 1);
    r.cache_salt = b"tenant".to_vec();
    c.add(r).unwrap();
    let events = drive_events(&mut c, &mut b);
    let hasher = BlockHasher::new(&[7; 16], BS);
    let want: Vec<BlockEvent> = hasher.prefix_hashes(b"tenant", &p).into_iter().map(BlockEvent::Stored).collect();
    assert_eq!(want.len(), 2);
    assert_eq!(events, want, "the prompt's full blocks, salted, in order; the partial block is not published");

    // The same prompt again is a prefix hit: nothing new enters the index.
    c.add(greedy("b", &p, 1)).unwrap();
    c.add({
        let mut r = greedy("b2", &p, 1);
        r.cache_salt = b"tenant".to_vec();
        r
    })
    .unwrap();
    let events = drive_events(&mut c, &mut b);
    let unsalted: Vec<BlockEvent> = hasher.prefix_hashes(b"", &p).into_iter().map(BlockEvent::Stored).collect();
    assert_eq!(events, unsalted, "only the unsalted copy is new");
}

#[test]
fn evictions_are_published_and_the_events_add_up_to_the_index() {
    let mut b = instant(5); // 4 usable blocks: each 12-token prompt takes 3 (+1 to decode), so every new one evicts
    let mut c = core(&b, Limits::default());
    let mut mirror = std::collections::BTreeSet::new();
    let mut removed = 0;
    for i in 0..6 {
        c.add(greedy(&format!("r{i}"), &prompt(12, 7 * i + 1), 2)).unwrap();
        for e in drive_events(&mut c, &mut b) {
            match e {
                BlockEvent::Stored(h) => assert!(mirror.insert(h), "stored twice: {h}"),
                BlockEvent::Removed(h) => {
                    assert!(mirror.remove(&h), "removed but never stored: {h}");
                    removed += 1;
                }
            }
        }
        let mut cached = c.cached_hashes();
        cached.sort_unstable();
        assert_eq!(cached, mirror.iter().copied().collect::<Vec<_>>(), "after request {i}");
    }
    assert!(removed >= 6, "a full pool evicts, and says so ({removed} removals)");
}

#[test]
fn waiting_prefill_tokens_count_the_prompts_not_yet_admitted() {
    let mut b = instant(32);
    let mut c = core(&b, Limits { max_seqs: 1, ..Limits::default() });
    c.add(greedy("a", &prompt(10, 1), 3)).unwrap();
    c.add(greedy("b", &prompt(7, 2), 3)).unwrap();
    assert_eq!(c.stats().waiting_prefill_tokens, 17);
    c.step(&mut b); // admits "a" only (one running sequence at most)
    assert_eq!((c.stats().waiting, c.stats().waiting_prefill_tokens), (1, 7));
}

#[test]
fn each_request_is_reported_admitted_once_when_its_first_sequence_runs() {
    let mut b = instant(64);
    let mut c = core(&b, Limits { max_seqs: 1, ..Limits::default() });
    let mut two = greedy("two", &prompt(6, 1), 1);
    two.n = 2;
    c.add(two).unwrap();
    c.add(greedy("later", &prompt(5, 2), 1)).unwrap();
    // One slot: "two"'s first copy runs; "later" waits.
    let first = c.step(&mut b);
    assert_eq!(first.admitted, vec![Arc::<str>::from("two")]);
    // Its second copy runs next (not reported: the request's queueing ended with its first), then "later".
    let mut admitted: Vec<Arc<str>> = Vec::new();
    for _ in 0..5 {
        admitted.extend(c.step(&mut b).admitted);
    }
    assert_eq!(admitted, vec![Arc::<str>::from("later")]);
    assert!(c.is_idle());
}

#[test]
fn a_preempted_request_is_not_reported_admitted_again() {
    let reqs: Vec<EngineRequest> = (0..5).map(|i| greedy(&format!("g{i}"), &prompt(6, 3 * i), 10)).collect();
    let mut b = ContextBackend::new(9);
    let mut c = core(&b, Limits::default());
    for r in reqs {
        c.add(r).unwrap();
    }
    let mut admitted: Vec<Arc<str>> = Vec::new();
    for _ in 0..200 {
        if c.is_idle() {
            break;
        }
        admitted.extend(c.step(&mut b).admitted);
    }
    assert!(c.is_idle() && c.stats().preemptions > 0, "the pool is too small for all five: some are preempted");
    admitted.sort();
    let want: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("g{i}").as_str())).collect();
    assert_eq!(admitted, want, "each once, re-admissions after preemption not counted");
}
