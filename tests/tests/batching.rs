//! Batch invariance and chunked prefill on the default model (fast path): a sequence's logits are bitwise identical
//! alone, in a batch with others of different lengths, or with its prompt split into chunks.

use ferrite_common::model::ModelFiles;
use ferrite_tests::{default_model, ref_cases};
use ferrite_worker::backend::{Backend, BackendError, ForwardBatch, LogitsWanted, SeqInput};
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::kv::{BlockAllocator, SimpleBlockAllocator};

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
    let mut alloc = SimpleBlockAllocator::new(128, 16);

    // Alone: prefill then one decode step each.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let table = alloc.ensure(i as u64, p.len() + 1).unwrap().to_vec();
        let pre = b.forward(&ForwardBatch { seqs: vec![seq(p, 0, &table, LogitsWanted::All)] }).unwrap();
        let next = [7u32];
        let dec = b.forward(&ForwardBatch { seqs: vec![seq(&next, p.len(), &table, LogitsWanted::Last)] }).unwrap();
        alone.push((pre.seq(0).to_vec(), dec.seq(0).to_vec()));
        alloc.free(i as u64);
    }

    // Together, in one prefill batch and one decode batch, with tables in a different order of blocks.
    let tables: Vec<Vec<u32>> =
        (0..prompts.len()).rev().map(|i| alloc.ensure(i as u64, prompts[i].len() + 1).unwrap().to_vec()).rev().collect();
    let pre = b
        .forward(&ForwardBatch {
            seqs: prompts.iter().zip(&tables).map(|(p, t)| seq(p, 0, t, LogitsWanted::All)).collect(),
        })
        .unwrap();
    let next = [7u32];
    let dec = b
        .forward(&ForwardBatch {
            seqs: prompts.iter().zip(&tables).map(|(p, t)| seq(&next, p.len(), t, LogitsWanted::Last)).collect(),
        })
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
    let mut alloc = SimpleBlockAllocator::new(128, 16);
    let table = alloc.ensure(0, p.len()).unwrap().to_vec();
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
        (ForwardBatch { seqs: vec![seq(&[49_152], 0, &table, LogitsWanted::Last)] }, |e| matches!(e, BackendError::InvalidToken { id: 49_152, .. })),
        (ForwardBatch { seqs: vec![seq(&[1; 40], 0, &table, LogitsWanted::Last)] }, |e| matches!(e, BackendError::BlockTableTooShort { .. })),
        (ForwardBatch { seqs: vec![seq(&[1], 0, &[999], LogitsWanted::Last)] }, |e| matches!(e, BackendError::InvalidBlock { .. })),
        (ForwardBatch { seqs: vec![seq(&[1], 8192, &table, LogitsWanted::Last)] }, |e| matches!(e, BackendError::ContextOverflow { .. })),
    ];
    for (batch, ok) in cases {
        let e = b.forward(&batch).unwrap_err();
        assert!(ok(&e), "unexpected error {e}");
    }
}

#[test]
fn generate_with_chunked_prefill_gives_the_same_tokens() {
    use ferrite_worker::generate::{GenerateParams, generate};
    let mut b = backend();
    let case = ref_cases().into_iter().find(|c| c.name == "chat_limerick").expect("case");
    let run = |b: &mut CpuBackend, chunk: usize| {
        let mut alloc = SimpleBlockAllocator::new(128, 16);
        let params = GenerateParams { max_tokens: 12, prefill_chunk: chunk, ..Default::default() };
        let out = generate(b, &mut alloc, 0, &case.prompt_ids, &params, |_| {}).unwrap();
        assert_eq!(alloc.num_free(), 128, "generate frees its blocks");
        out.tokens
    };
    let one = run(&mut b, 0);
    assert_eq!(run(&mut b, 5), one);
    assert_eq!(run(&mut b, 16), one);
}

#[test]
fn generate_errors_are_typed_and_free_blocks() {
    use ferrite_worker::generate::{GenerateError, GenerateParams, generate};
    let mut b = backend();
    let mut alloc = SimpleBlockAllocator::new(8, 16);
    let params = GenerateParams { max_tokens: 4, ..Default::default() };
    let e = generate(&mut b, &mut alloc, 0, &[1, 2, 60_000], &params, |_| {}).unwrap_err();
    assert!(matches!(e, GenerateError::Backend(BackendError::InvalidToken { id: 60_000, .. })), "{e}");
    assert_eq!(generate(&mut b, &mut alloc, 0, &[], &params, |_| {}).unwrap_err(), GenerateError::EmptyPrompt);
    let hot = GenerateParams { temperature: f32::NAN, ..params.clone() };
    assert!(matches!(generate(&mut b, &mut alloc, 0, &[1], &hot, |_| {}), Err(GenerateError::BadTemperature(_))));
    // More tokens than the allocator holds: a typed KV error, not a panic.
    let long = GenerateParams { max_tokens: 200, ..params };
    let e = generate(&mut b, &mut alloc, 0, &[1; 100], &long, |_| {}).unwrap_err();
    assert!(matches!(e, GenerateError::Kv(_)), "{e}");
    assert_eq!(alloc.num_free(), 8, "every error path frees the sequence's blocks");
}
