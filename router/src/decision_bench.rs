//! The cost of one cache-aware routing decision (issue "cluster routing": ≤ 50 µs p99 with 10k indexed blocks per
//! worker): hash the prompt's blocks, walk the KV index, score every worker. Run with
//! `cargo test --release -p ferrite-router --lib decision_cost -- --ignored --nocapture`; numbers in BENCHMARKS.md.

use std::time::Instant;

use ferrite_common::hash::BlockHasher;

use crate::kv_index::KvIndex;
use crate::policy::{self, Candidate};

#[test]
#[ignore = "a benchmark: run by hand, results in BENCHMARKS.md"]
fn decision_cost_with_ten_thousand_blocks_per_worker() {
    const WORKERS: usize = 4;
    const BLOCKS: usize = 10_000;
    const BLOCK: usize = 16;
    let hasher = BlockHasher::new(b"bench-model", BLOCK);
    let index = KvIndex::new();
    // Each worker holds 10k blocks: 100 cached conversations of 100 blocks (1,600 tokens) each.
    let mut prompts = Vec::new();
    for w in 0..WORKERS {
        index.add_worker(w);
        for c in 0..BLOCKS / 100 {
            let tokens: Vec<u32> = (0..100 * BLOCK as u32).map(|t| t.wrapping_mul(2_654_435_761) ^ (w * 1000 + c) as u32).collect();
            index.store(w, &hasher.prefix_hashes(b"", &tokens));
            prompts.push(tokens);
        }
    }
    assert_eq!(index.total_blocks(), WORKERS * BLOCKS);
    for (prompt_tokens, label) in [(2_048usize, "2k-token prompt"), (8_192, "8k-token prompt")] {
        let mut times = Vec::with_capacity(2_000);
        for i in 0..2_000 {
            // Half the prompts extend a cached conversation, half are new.
            let mut tokens = prompts[i % prompts.len()].clone();
            if i % 2 == 1 {
                tokens[0] ^= 0xdead_beef;
            }
            tokens.resize(prompt_tokens, 7);
            let start = Instant::now();
            let hashes = hasher.prefix_hashes(b"", &tokens);
            let overlap = index.overlap(&hashes);
            let cands: Vec<Candidate> = (0..WORKERS)
                .map(|w| Candidate { overlap_blocks: overlap.get(&w).copied().unwrap_or(0), inflight: w, ..Candidate::default() })
                .collect();
            let pick = policy::choose(&cands, tokens.len(), BLOCK, &policy::CostWeights::default(), 0.5);
            times.push(start.elapsed().as_secs_f64() * 1e6);
            assert!(pick.is_some());
        }
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        println!(
            "decision cost, {WORKERS} workers × {BLOCKS} blocks, {label}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
}
