//! Batch invariance and chunked prefill on the default model (fast path): a sequence's logits are bitwise identical
//! alone, in a batch with others of different lengths, or with its prompt split into chunks.

use ferrite_common::model::ModelFiles;
use ferrite_tests::{BlockTables, default_model, generate, greedy_request, ref_cases};
use ferrite_worker::backend::{Backend, BackendError, ForwardBatch, LogitsWanted, SeqInput};
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::engine::core::{EngineConfig, EngineError, EngineOutput};
use ferrite_worker::engine::scheduler::{AdmissionError, SchedulerConfig};
use ferrite_worker::engine::step::EngineCore;

fn backend() -> CpuBackend {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    CpuBackend::load(&model, &CpuOptions { num_kv_blocks: 128, ..CpuOptions::default() }).expect("load")
}

fn seq<'a>(tokens: &'a [u32], start_pos: usize, table: &'a [u32], logits: LogitsWanted) -> SeqInput<'a> {
    SeqInput { tokens, start_pos, block_table: table, logits }
}

#[test]
fn logits_are_batch_invariant_in_prefill_and_decode() {
    let mut b = backend();
    let cases = ref_cases();
    let prompts: Vec<&[u32]> = cases.iter().take(3).map(|c| c.prompt_ids.as_slice()).collect();
    let mut alloc = BlockTables::new(128, 16);

    // Alone: prefill then one decode step each.
    let mut alone = Vec::new();
    for p in &prompts {
        let table = alloc.table(p.len() + 1);
        let pre = b.forward(&ForwardBatch { seqs: vec![seq(p, 0, &table, LogitsWanted::All)] }).unwrap();
        let next = [7u32];
        let dec = b.forward(&ForwardBatch { seqs: vec![seq(&next, p.len(), &table, LogitsWanted::Last)] }).unwrap();
        alone.push((pre.seq(0).to_vec(), dec.seq(0).to_vec()));
    }

    // Together, in one prefill batch and one decode batch, with other blocks, handed out in the reverse order.
    let tables: Vec<Vec<u32>> = prompts.iter().rev().map(|p| alloc.table(p.len() + 1)).rev().collect();
    let pre =
        b.forward(&ForwardBatch { seqs: prompts.iter().zip(&tables).map(|(p, t)| seq(p, 0, t, LogitsWanted::All)).collect() }).unwrap();
    let next = [7u32];
    let dec = b
        .forward(&ForwardBatch { seqs: prompts.iter().zip(&tables).map(|(p, t)| seq(&next, p.len(), t, LogitsWanted::Last)).collect() })
        .unwrap();
    for (i, (pre_alone, dec_alone)) in alone.iter().enumerate() {
        assert!(pre.seq(i) == pre_alone.as_slice(), "prefill logits of sequence {i} differ in a batch");
        assert!(dec.seq(i) == dec_alone.as_slice(), "decode logits of sequence {i} differ in a batch");
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let mut b = backend();
    let case = ref_cases().into_iter().find(|c| c.name == "long_context").expect("long_context case");
    let p = &case.prompt_ids;
    let table = BlockTables::new(128, 16).table(p.len());
    let one = b.forward(&ForwardBatch { seqs: vec![seq(p, 0, &table, LogitsWanted::Last)] }).unwrap();
    for chunk in [7, 16, 50] {
        let mut last = None;
        for start in (0..p.len()).step_by(chunk) {
            let end = (start + chunk).min(p.len());
            let l = b.forward(&ForwardBatch { seqs: vec![seq(&p[start..end], start, &table, LogitsWanted::Last)] }).unwrap();
            last = Some(l.seq(0).to_vec());
        }
        assert!(last.unwrap() == one.seq(0), "chunk {chunk}: logits differ from one-shot prefill");
    }
}

#[test]
fn bad_batches_get_typed_errors() {
    let mut b = backend();
    let table = [0u32, 1];
    type Case<'a> = (ForwardBatch<'a>, fn(&BackendError) -> bool);
    let cases: Vec<Case<'_>> = vec![
        (ForwardBatch { seqs: vec![seq(&[], 0, &table, LogitsWanted::Last)] }, |e| matches!(e, BackendError::EmptySequence { .. })),
        (ForwardBatch { seqs: vec![seq(&[49_152], 0, &table, LogitsWanted::Last)] }, |e| {
            matches!(e, BackendError::InvalidToken { id: 49_152, .. })
        }),
        (ForwardBatch { seqs: vec![seq(&[1; 40], 0, &table, LogitsWanted::Last)] }, |e| {
            matches!(e, BackendError::BlockTableTooShort { .. })
        }),
        (ForwardBatch { seqs: vec![seq(&[1], 0, &[999], LogitsWanted::Last)] }, |e| matches!(e, BackendError::InvalidBlock { .. })),
        (ForwardBatch { seqs: vec![seq(&[1], 8192, &table, LogitsWanted::Last)] }, |e| matches!(e, BackendError::ContextOverflow { .. })),
    ];
    for (batch, ok) in cases {
        let e = b.forward(&batch).unwrap_err();
        assert!(ok(&e), "unexpected error {e}");
    }
}

/// Generation on the engine core prefills the prompt in chunks of the step budget; the tokens do not depend on it,
/// and the request's blocks all come back.
#[test]
fn generate_with_chunked_prefill_gives_the_same_tokens() {
    let mut b = backend();
    let case = ref_cases().into_iter().find(|c| c.name == "chat_limerick").expect("case");
    let mut run = |chunk: usize| {
        let out = generate(&mut b, greedy_request(&case.prompt_ids, 12, &[]), chunk).expect("generate");
        assert_eq!(out.blocks_in_use, 0, "the request's blocks come back");
        out.tokens
    };
    let one = run(usize::MAX);
    assert_eq!(one.len(), 12);
    assert_eq!(run(5), one);
    assert_eq!(run(16), one);
}

/// On the engine core, a request the backend rejects fails with the backend's typed error as its message and its
/// blocks come back; one that can never fit the KV cache, or has no prompt, is refused before it runs.
#[test]
fn generation_errors_are_reported_and_free_blocks() {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    let mut b = CpuBackend::load(&model, &CpuOptions { num_kv_blocks: 8, ..CpuOptions::default() }).expect("load");
    let scheduler = SchedulerConfig { max_num_batched_tokens: 256, max_num_seqs: 4, max_waiting: 4, max_model_len: 2048 };
    let mut core = EngineCore::new(
        EngineConfig { scheduler, model_fingerprint: [0; 16], eos_token_ids: vec![2], decode_step_target: None },
        &b.info(),
    );
    let refused = |e: AdmissionError| Err(EngineError::Admission(e));
    assert_eq!(core.add(greedy_request(&[], 4, &[])), refused(AdmissionError::EmptyPrompt));
    // 7 usable blocks of 16 tokens (block 0 is reserved) cannot hold 100 + 200 tokens.
    assert_eq!(core.add(greedy_request(&[1; 100], 200, &[])), refused(AdmissionError::TooLarge { needed: 19, capacity: 7 }));
    core.add(greedy_request(&[1, 2, 60_000], 4, &[])).expect("accepted: the backend checks token ids");
    let out = core.step(&mut b);
    let failed = EngineOutput::Failed(BackendError::InvalidToken { seq: 0, id: 60_000, vocab: 49_152 }.to_string());
    assert!(matches!(&out.outputs[..], [e] if e.output == failed && e.last), "{:?}", out.outputs);
    assert!(out.fatal.is_none() && core.is_idle());
    assert_eq!(core.stats().kv.in_use, 0, "the failed request's blocks came back");
    // A request that needs every usable block runs.
    let out = generate(&mut b, greedy_request(&[1; 100], 12, &[]), usize::MAX).expect("fits");
    assert_eq!((out.tokens.len(), out.blocks_in_use), (12, 0));
}
