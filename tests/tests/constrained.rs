//! Constrained decoding on the default model through the engine thread (CPU backend): constrained output matches
//! its grammar and ends with `stop` when the grammar is complete, free sequences batched with constrained ones get
//! exactly the tokens they get alone, and grammars llguidance rejects are errors, not panics.

use ferrite_common::model::ModelFiles;
use ferrite_common::proto::worker as pb;
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_common::text::TextAssets;
use ferrite_tests::default_model;
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::engine::constraint::{ConstraintError, Grammar, GrammarCompiler};
use ferrite_worker::engine::core::{Engine, EngineConfig, EngineHandle, EngineOutput, EngineRequest, FinishReason};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use serde_json::Value;

struct Model {
    text: TextAssets,
    compiler: GrammarCompiler,
    engine: EngineHandle,
}

fn model() -> Model {
    let files = ModelFiles::open(&default_model()).unwrap();
    let text = TextAssets::load(&files).unwrap();
    let compiler = GrammarCompiler::new(&text.tokenizer, files.config.vocab_size, &text.eos_token_ids).unwrap();
    let backend = CpuBackend::load(&files, &CpuOptions { num_kv_blocks: 256, ..CpuOptions::default() }).unwrap();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: 512, max_num_seqs: 16, max_waiting: 64, max_model_len: 2048 },
        model_fingerprint: files.fingerprint().unwrap(),
        eos_token_ids: text.eos_token_ids.clone(),
        decode_step_target: None,
    };
    let engine = Engine::spawn(Box::new(backend), cfg).unwrap();
    Model { text, compiler, engine }
}

fn schema(s: &str) -> pb::Constraint {
    pb::Constraint { kind: Some(pb::constraint::Kind::JsonSchema(s.into())) }
}

fn regex(s: &str) -> pb::Constraint {
    pb::Constraint { kind: Some(pb::constraint::Kind::Regex(s.into())) }
}

const PERSON: &str = r#"{"type":"object","properties":{
    "name":{"type":"string","maxLength":16},
    "role":{"enum":["admin","user","guest"]},
    "address":{"type":"object","properties":{"city":{"type":"string","maxLength":16},"zip":{"type":"integer","minimum":0,"maximum":99999}},
               "required":["city","zip"],"additionalProperties":false},
    "tags":{"type":"array","items":{"type":"string","maxLength":8},"maxItems":3}},
  "required":["name","role","address","tags"],"additionalProperties":false}"#;

impl Model {
    fn request(&self, id: &str, prompt: &str, max_new: u32, seed: Option<u64>, grammar: Option<Grammar>) -> EngineRequest {
        let temperature = if seed.is_some() { 0.8 } else { 0.0 };
        EngineRequest {
            request_id: id.into(),
            prompt: self.text.tokenizer.encode(prompt, false).unwrap().get_ids().to_vec(),
            sampling: SamplingParams { temperature, seed, ..SamplingParams::default() },
            stopping: StoppingParams { max_new_tokens: max_new, ..StoppingParams::default() },
            n: 1,
            cache_salt: Vec::new(),
            constraint: grammar,
        }
    }

    /// Submits all at once (one batch) and returns each one's tokens and finish reason.
    fn run(&self, reqs: Vec<EngineRequest>) -> Vec<(Vec<u32>, FinishReason)> {
        let rxs: Vec<_> = reqs.into_iter().map(|r| self.engine.submit(r)).collect();
        rxs.into_iter()
            .map(|mut rx| {
                let mut toks = Vec::new();
                loop {
                    match rx.blocking_recv() {
                        Some(EngineOutput::Tokens { tokens, .. }) => toks.extend(tokens),
                        Some(EngineOutput::Finished { reason, .. }) => return (toks, reason),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
            .collect()
    }

    fn decode(&self, toks: &[u32]) -> String {
        self.text.tokenizer.decode(toks, true).unwrap()
    }
}

fn check_person(v: &Value) {
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["address", "name", "role", "tags"], "{v}");
    assert!(["admin", "user", "guest"].contains(&o["role"].as_str().unwrap()), "{v}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 16, "{v}");
    let zip = o["address"]["zip"].as_i64().unwrap_or_else(|| panic!("zip: {v}"));
    assert!((0..=99999).contains(&zip), "{v}");
    assert!(o["address"]["city"].is_string() && o["address"].as_object().unwrap().len() == 2, "{v}");
    assert!(o["tags"].as_array().unwrap().iter().all(Value::is_string), "{v}");
}

#[test]
fn constrained_and_free_sequences_share_a_batch() {
    let m = model();
    let person = m.compiler.compile(&schema(PERSON)).unwrap();
    let yes_no = m.compiler.compile(&regex("(yes|no)!")).unwrap();
    let free = |m: &Model, tag: &str| {
        vec![
            m.request(&format!("free-greedy-{tag}"), "Once upon a time", 24, None, None),
            m.request(&format!("free-sampled-{tag}"), "The capital of France is", 24, Some(7), None),
        ]
    };
    let alone = m.run(free(&m, "alone"));
    let mut reqs = free(&m, "batched");
    reqs.push(m.request("person-greedy", "A person record in JSON:", 120, None, Some(person.clone())));
    reqs.push(m.request("person-sampled", "A person record in JSON:", 120, Some(3), Some(person.clone())));
    reqs.push(m.request("yes-no", "Is the sky blue? Answer:", 8, Some(11), Some(yes_no)));
    let out = m.run(reqs);
    // The free sequences' tokens do not depend on their constrained neighbours.
    assert_eq!(out[..2], alone[..], "free sequences changed next to constrained ones");
    for (toks, reason) in &out[2..4] {
        let text = m.decode(toks);
        assert_eq!(*reason, FinishReason::Stop, "{text:?}");
        check_person(&serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")));
    }
    let (toks, reason) = &out[4];
    let text = m.decode(toks);
    assert!(text == "yes!" || text == "no!", "{text:?}");
    assert_eq!(*reason, FinishReason::Stop);
}

/// On the CPU backend, constrained rows drawn by `forward_sample` (the grammar mask in `RowSampling`, applied by
/// `cpu::sample::apply_mask`) get exactly the tokens the host path (`forward`, `Constraint::next_mask`, the host sampler)
/// draws, and free neighbours are unchanged.
#[test]
fn constrained_rows_draw_the_same_tokens_on_the_backend_as_on_the_host() {
    let files = ModelFiles::open(&default_model()).unwrap();
    let mut backend = CpuBackend::load(&files, &CpuOptions { num_kv_blocks: 256, ..CpuOptions::default() }).unwrap();
    ferrite_tests::constrained::assert_constrained_draws_match_host(&mut backend);
}

#[test]
fn n_completions_each_follow_the_grammar() {
    let m = model();
    let digits = m.compiler.compile(&regex("[0-9]{3}")).unwrap();
    let mut r = m.request("digits", "Three digits:", 10, Some(5), Some(digits));
    r.n = 3;
    let mut rx = m.engine.submit(r);
    let mut texts = vec![Vec::new(); 3];
    let mut finished = 0;
    while finished < 3 {
        match rx.blocking_recv() {
            Some(EngineOutput::Tokens { index, tokens, .. }) => texts[index as usize].extend(tokens),
            Some(EngineOutput::Finished { reason, .. }) => {
                assert_eq!(reason, FinishReason::Stop);
                finished += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for t in &texts {
        let s = m.decode(t);
        assert!(s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()), "{s:?}");
        // The grammar's completion ends the sequence: no eos token is drawn after the third digit.
        assert_eq!(t.len(), 3, "{t:?}");
    }
}

#[test]
fn a_grammar_at_max_tokens_ends_with_length() {
    let m = model();
    let long = m.compiler.compile(&regex("a{50}")).unwrap();
    let out = m.run(vec![m.request("long", "Letters:", 5, None, Some(long))]);
    assert_eq!(out[0].1, FinishReason::Length);
    assert_eq!(out[0].0.len(), 5);
    assert!(m.decode(&out[0].0).bytes().all(|b| b == b'a'));
}

#[test]
fn rejected_grammars_are_errors() {
    let files = ModelFiles::open(&default_model()).unwrap();
    let text = TextAssets::load(&files).unwrap();
    let compiler = GrammarCompiler::new(&text.tokenizer, files.config.vocab_size, &text.eos_token_ids).unwrap();
    for bad in [
        schema(r#"{"type":"object","properties":{"a":{"type":"nosuchtype"}}}"#),
        schema(r#"{"type":"integer","minimum":5,"maximum":1}"#),
        schema("not json"),
        regex("(unclosed"),
        pb::Constraint { kind: Some(pb::constraint::Kind::Lark("start: undefined_rule".into())) },
    ] {
        match compiler.compile(&bad) {
            Err(ConstraintError::Grammar(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("{bad:?}: {e:?}"),
            Ok(_) => panic!("{bad:?} compiled"),
        }
    }
    assert!(matches!(compiler.compile(&pb::Constraint { kind: None }), Err(ConstraintError::Empty)));
}
