//! Constrained draws on the backend (`forward_sample` with grammar masks) against the host path (`forward`, the mask
//! on host logits, the host sampler), for any backend: [`assert_constrained_draws_match_host`].

use ferrite_common::config::LlamaConfig;
use ferrite_common::model::ModelFiles;
use ferrite_common::proto::worker as pb;
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_common::text::TextAssets;
use ferrite_worker::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, RowSampling};
use ferrite_worker::engine::constraint::GrammarCompiler;
use ferrite_worker::engine::core::{EngineConfig, EngineOutput, EngineRequest, FinishReason};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use ferrite_worker::engine::step::EngineCore;

/// Counts the backend calls of the steps it runs.
struct Recording<'a> {
    inner: &'a mut dyn Backend,
    forward: usize,
    sample: usize,
}

impl Backend for Recording<'_> {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    /// Always the device path (masks in the rows), whatever the backend: on the CPU that is `forward_sample`'s host
    /// twin (`cpu::sample::apply_mask`), which the engine otherwise never takes for constrained rows.
    fn draws_on_device(&self) -> bool {
        true
    }
    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        self.forward += 1;
        self.inner.forward(batch)
    }
    fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        self.inner.forward_greedy(batch)
    }
    fn forward_sample(&mut self, batch: &ForwardBatch<'_>, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        self.sample += 1;
        self.inner.forward_sample(batch, rows)
    }
}

/// The outputs of one run: per request, its tokens and finish reason; and the `forward`/`forward_sample` calls.
type Run = (Vec<(Vec<u32>, FinishReason)>, usize, usize);

/// Runs the same batch of constrained (a regex, sampled; a JSON schema, sampled; `{"type":"object"}` as
/// `json_object` compiles it, greedy) and free (greedy, sampled) requests twice on one `backend` (the default model):
/// without logprobs, so every drawing step takes `forward_sample` with the grammar masks in its rows, and with
/// logprobs, so every step takes `forward` and the host masks and draws. Asserts the same tokens (the same
/// algorithm and uniforms on the same logits: the runs use distinct cache salts, so their steps have the same
/// shapes), that each run took the path it names, and that the regex output is one the regex allows.
pub fn assert_constrained_draws_match_host(backend: &mut dyn Backend) {
    let files = ModelFiles::open(&crate::default_model()).expect("open the default model");
    let text = TextAssets::load(&files).expect("text assets");
    let compiler = GrammarCompiler::new(&text.tokenizer, files.config.vocab_size, &text.eos_token_ids).expect("grammar compiler");
    let grammar = |kind: pb::constraint::Kind| compiler.compile(&pb::Constraint { kind: Some(kind) }).expect("grammar compiles");
    let schema = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer","minimum":0,"maximum":150}},"required":["name","age"],"additionalProperties":false}"#;
    let cases = [
        ("Is the sky blue? Answer:", Some(11), Some(grammar(pb::constraint::Kind::Regex("(yes|no)!".into())))),
        ("A person in JSON:", Some(3), Some(grammar(pb::constraint::Kind::JsonSchema(schema.into())))),
        ("A JSON object:", None, Some(grammar(pb::constraint::Kind::JsonSchema(r#"{"type":"object"}"#.into())))),
        ("Once upon a time", None, None),
        ("The capital of France is", Some(7), None),
    ];
    let run = |backend: &mut dyn Backend, logprobs: bool| -> Run {
        let mut rec = Recording { inner: backend, forward: 0, sample: 0 };
        let scheduler = SchedulerConfig { max_num_batched_tokens: 512, max_num_seqs: 8, max_waiting: 8, max_model_len: 1024 };
        let cfg =
            EngineConfig { scheduler, model_fingerprint: [0; 16], eos_token_ids: text.eos_token_ids.clone(), decode_step_target: None };
        let mut core = EngineCore::new(cfg, &rec.info());
        for (i, (prompt, seed, g)) in cases.iter().enumerate() {
            let req = EngineRequest {
                request_id: i.to_string(),
                prompt: text.tokenizer.encode(*prompt, false).expect("encode").get_ids().to_vec(),
                sampling: SamplingParams { temperature: if seed.is_some() { 0.8 } else { 0.0 }, seed: *seed, ..SamplingParams::default() },
                stopping: StoppingParams { max_new_tokens: 48, logprobs, ..StoppingParams::default() },
                n: 1,
                cache_salt: vec![u8::from(logprobs)],
                constraint: g.clone(),
            };
            core.add(req).expect("admitted");
        }
        let mut out: Vec<(Vec<u32>, Option<FinishReason>)> = vec![(Vec::new(), None); cases.len()];
        while !core.is_idle() {
            let step = core.step(&mut rec);
            assert!(step.fatal.is_none(), "{:?}", step.fatal);
            for e in step.outputs {
                let i: usize = e.request_id.parse().expect("request id");
                match e.output {
                    EngineOutput::Tokens { tokens, .. } => out[i].0.extend(tokens),
                    EngineOutput::Finished { reason, .. } => out[i].1 = Some(reason),
                    other => panic!("request {i}: {other:?}"),
                }
            }
        }
        let out = out.into_iter().map(|(t, r)| (t, r.expect("finished"))).collect();
        (out, rec.forward, rec.sample)
    };
    let (on_backend, forward, sample) = run(backend, false);
    assert!(sample > 0 && forward == 0, "without logprobs: {forward} forward, {sample} forward_sample calls");
    let (on_host, forward, sample) = run(backend, true);
    assert!(forward > 0 && sample == 0, "with logprobs: {forward} forward, {sample} forward_sample calls");
    for (i, ((a, ra), (b, rb))) in on_backend.iter().zip(&on_host).enumerate() {
        assert_eq!(
            a,
            b,
            "request {i} ({:?}): backend draws {:?}, host draws {:?}",
            cases[i].0,
            text.tokenizer.decode(a, true),
            text.tokenizer.decode(b, true)
        );
        assert_eq!(ra, rb, "request {i}");
    }
    let yes_no = text.tokenizer.decode(&on_backend[0].0, true).expect("decode");
    assert!(yes_no == "yes!" || yes_no == "no!", "{yes_no:?}");
    assert_eq!(on_backend[0].1, FinishReason::Stop);
}
