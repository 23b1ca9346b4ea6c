//! Correctness against the transformers reference (`../shared/reference/`) on the default model.

use ferrite_common::model::ModelFiles;
use ferrite_tests::{default_model, ref_cases, ref_logits};
use ferrite_worker::backend::{Backend, ForwardBatch, LogitsWanted, SeqInput};
use ferrite_worker::cpu::weights::WeightPrecision;
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::generate::{GenerateParams, generate};
use ferrite_worker::kv::{BlockAllocator, SimpleBlockAllocator};

fn backend(precision: WeightPrecision) -> CpuBackend {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    CpuBackend::load(&model, &CpuOptions { precision, num_kv_blocks: 64, ..CpuOptions::default() }).expect("load")
}

fn last_logits(b: &mut CpuBackend, prompt: &[u32]) -> Vec<f32> {
    let mut alloc = SimpleBlockAllocator::new(64, 16);
    let table = alloc.ensure(0, prompt.len()).unwrap().to_vec();
    let batch = ForwardBatch {
        seqs: vec![SeqInput { tokens: prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }],
    };
    b.forward(&batch).unwrap().last(0).unwrap().to_vec()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn probe() {
    for precision in [WeightPrecision::Native] {
        let mut b = backend(precision);
        for case in ref_cases() {
            let want = ref_logits(&case.name);
            let got = last_logits(&mut b, &case.prompt_ids);
            let t = std::time::Instant::now();
            let mut alloc = SimpleBlockAllocator::new(64, 16);
            let g = generate(&mut b, &mut alloc, 1, &case.prompt_ids, &GenerateParams { max_tokens: case.greedy_ids.len(), stop_token_ids: vec![2], ..Default::default() }, |_| {}).unwrap();
            let n = g.tokens.iter().zip(&case.greedy_ids).take_while(|(a, b)| a == b).count();
            eprintln!("{precision:?} {}: rel err {:.2e} max|l| {:.1}; greedy match {}/{} ({:?})", case.name, max_err(&got, &want) / max_abs(&want), max_abs(&want), n, case.greedy_ids.len(), t.elapsed());
        }
    }
}
