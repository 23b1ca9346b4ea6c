use super::*;

fn sched(budget: usize, max_seqs: usize, blocks: usize) -> Scheduler<()> {
    let cfg = SchedulerConfig { max_num_batched_tokens: budget, max_num_seqs: max_seqs, max_waiting: 4, max_model_len: 1000 };
    Scheduler::new(cfg, BlockPool::new(blocks + 1, 4), BlockHasher::new(b"test", 4))
}

fn prompt(n: usize, base: u32) -> Vec<u32> {
    (0..n as u32).map(|i| base + i).collect()
}

/// Runs a planned step as the engine would: completes it and appends a token to sampled sequences.
fn run(s: &mut Scheduler<()>) -> Vec<Scheduled> {
    let plan = s.schedule();
    s.complete(&plan);
    for p in &plan {
        if p.sample {
            s.append_token(p.id, 7);
        }
    }
    s.check_invariants();
    plan
}

#[test]
fn chunked_prefill_then_decode() {
    let mut s = sched(8, 4, 32);
    s.add(1, prompt(20, 100), 40, b"", None, ()).unwrap();
    let steps: Vec<(usize, usize, bool)> = (0..5).map(|_| run(&mut s)).map(|p| (p[0].start, p[0].num_tokens, p[0].sample)).collect();
    assert_eq!(steps, vec![(0, 8, false), (8, 8, false), (16, 4, true), (20, 1, true), (21, 1, true)]);
}

#[test]
fn running_first_then_waiting_with_leftover_budget() {
    let mut s = sched(8, 4, 32);
    s.add(1, prompt(3, 100), 20, b"", None, ()).unwrap();
    run(&mut s); // prefill of 1
    s.add(2, prompt(20, 200), 40, b"", None, ()).unwrap();
    let plan = run(&mut s);
    assert_eq!(plan[0], Scheduled { id: 1, start: 3, num_tokens: 1, sample: true });
    assert_eq!(plan[1], Scheduled { id: 2, start: 0, num_tokens: 7, sample: false });
}

#[test]
fn decode_step_tokens_chunk_prompts_only_while_a_stream_decodes() {
    let mut s = sched(256, 4, 64);
    s.set_decode_step_tokens(Some(MIN_PREFILL_CHUNK + 10));
    // Nothing decodes: a prompt takes the full budget at once.
    s.add(1, prompt(100, 100), 120, b"", None, ()).unwrap();
    assert_eq!(run(&mut s)[0].num_tokens, 100);
    // Sequence 1 now decodes: a new prompt gets the target less the decode row, a step at a time.
    s.add(2, prompt(60, 300), 80, b"", None, ()).unwrap();
    let plan = run(&mut s);
    assert_eq!(plan[0], Scheduled { id: 1, start: 100, num_tokens: 1, sample: true });
    assert_eq!((plan[1].id, plan[1].num_tokens), (2, MIN_PREFILL_CHUNK + 9));
    // A running prefill is chunked the same way, and never below the minimum chunk.
    s.set_decode_step_tokens(Some(2));
    let plan = run(&mut s);
    assert_eq!((plan[1].id, plan[1].start, plan[1].num_tokens), (2, MIN_PREFILL_CHUNK + 9, MIN_PREFILL_CHUNK));
    // Off again: the rest of the prompt in one step.
    s.set_decode_step_tokens(None);
    let plan = run(&mut s);
    assert_eq!((plan[1].id, plan[1].num_tokens, plan[1].sample), (2, 60 - 2 * MIN_PREFILL_CHUNK - 9, true));
}

#[test]
fn max_num_seqs_limits_admission() {
    let mut s = sched(64, 2, 32);
    for id in 1..=3 {
        s.add(id, prompt(4, 10 * id as u32), 8, b"", None, ()).unwrap();
    }
    assert_eq!(run(&mut s).len(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    s.remove(1);
    let plan = run(&mut s);
    assert!(plan.iter().any(|p| p.id == 3 && p.start == 0));
}

#[test]
fn preemption_recomputes_newest_and_frees_its_blocks() {
    // 6 blocks of 4 tokens; two sequences of 8-token prompts grow until they no longer fit.
    let mut s = sched(64, 4, 6);
    s.add(1, prompt(8, 100), 24, b"", None, ()).unwrap();
    s.add(2, prompt(8, 200), 24, b"", None, ()).unwrap();
    run(&mut s);
    assert_eq!(s.usage().in_use, 4);
    let mut saw_preemption = false;
    for _ in 0..12 {
        let plan = run(&mut s);
        if s.preemptions() > 0 && !saw_preemption {
            saw_preemption = true;
            // The newest sequence (2) was preempted: it waits with nothing computed; 1 kept running.
            assert!(plan.iter().all(|p| p.id == 1), "{plan:?}");
            let seq2 = s.get(2).unwrap();
            assert_eq!((seq2.num_computed, seq2.blocks.ids().len()), (0, 0));
            assert_eq!(s.num_waiting(), 1);
        }
        if s.get(1).is_some_and(|q| q.num_generated() >= 10) {
            s.remove(1);
        }
    }
    assert!(saw_preemption);
    // Sequence 2 resumed and recomputed prompt + its earlier output, reusing its cached full blocks.
    let seq2 = s.get(2).unwrap();
    assert!(seq2.num_computed > 8 && seq2.num_generated() > 0);
    s.remove(2);
    assert_eq!(s.usage().in_use, 0);
    s.check_invariants();
}

#[test]
fn prefix_cache_hits_skip_cached_blocks_but_never_the_whole_prompt() {
    let mut s = sched(64, 4, 32);
    s.add(1, prompt(16, 100), 20, b"", None, ()).unwrap();
    run(&mut s);
    s.remove(1);
    assert_eq!(s.usage().cached_free, 4);
    // Same 16-token prompt: 4 full cached blocks, but the last token must be computed → 3 blocks hit.
    s.add(2, prompt(16, 100), 20, b"", None, ()).unwrap();
    let plan = run(&mut s);
    assert_eq!(plan[0], Scheduled { id: 2, start: 12, num_tokens: 4, sample: true });
    assert_eq!(s.get(2).unwrap().cached_prompt_tokens, 12);
    // A different salt shares nothing.
    s.add(3, prompt(16, 100), 20, b"tenant", None, ()).unwrap();
    let plan = run(&mut s);
    assert!(plan.iter().any(|p| p.id == 3 && p.start == 0));
    // A longer prompt with the same head hits all 4 blocks.
    s.add(4, prompt(18, 100), 20, b"", None, ()).unwrap();
    let plan = run(&mut s);
    assert!(plan.iter().any(|p| p.id == 4 && p.start == 16 && p.num_tokens == 2));
}

#[test]
fn admission_control() {
    let mut s = sched(8, 1, 8);
    assert_eq!(s.add(9, prompt(4, 0), 100, b"", None, ()), Err(AdmissionError::TooLarge { needed: 25, capacity: 8 }));
    for id in 0..4 {
        s.add(id, prompt(4, 0), 8, b"", None, ()).unwrap();
    }
    assert_eq!(s.add(5, prompt(4, 0), 8, b"", None, ()), Err(AdmissionError::Overloaded { waiting: 4, limit: 4 }));
    assert_eq!(s.add(6, Vec::new(), 8, b"", None, ()), Err(AdmissionError::EmptyPrompt));
    assert_eq!(s.add(7, prompt(1000, 0), 1001, b"", None, ()), Err(AdmissionError::PromptTooLong { prompt: 1000, max_model_len: 1000 }));
}

#[test]
fn copies_wait_for_the_first_and_share_its_prompt_blocks() {
    let mut s = sched(64, 4, 32);
    s.add(1, prompt(10, 100), 20, b"", None, ()).unwrap();
    s.add(2, prompt(10, 100), 20, b"", Some(1), ()).unwrap();
    let plan = run(&mut s);
    assert_eq!(plan.len(), 1, "the copy waits while the first computes the prompt");
    let plan = run(&mut s);
    let copy = plan.iter().find(|p| p.id == 2).expect("copy scheduled");
    assert_eq!(copy.start, 8, "the copy reuses the two full prompt blocks");
    let (a, b) = (s.get(1).unwrap().blocks.ids()[..2].to_vec(), s.get(2).unwrap().blocks.ids()[..2].to_vec());
    assert_eq!(a, b);
}

#[test]
fn dropping_everything_frees_everything() {
    let mut s = sched(16, 4, 16);
    for id in 0..4 {
        s.add(id, prompt(9, 50 * id as u32), 16, b"", None, ()).unwrap();
    }
    for _ in 0..5 {
        run(&mut s);
    }
    assert!(s.usage().in_use > 0);
    drop(s); // BlockTables hold Rc clones of the pool; nothing to assert beyond "no panic" here
    let mut s = sched(16, 4, 16);
    for id in 0..4 {
        s.add(id, prompt(9, 50 * id as u32), 16, b"", None, ()).unwrap();
    }
    run(&mut s);
    for id in 0..4 {
        s.remove(id);
    }
    assert_eq!(s.usage().in_use, 0);
}
