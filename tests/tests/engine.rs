//! Engine properties on the default model: the chunk size never changes outputs, preemption under memory pressure
//! never changes outputs, every block comes back, and a fatal backend error stops the engine without losing a
//! request.

use std::sync::atomic::Ordering;

use ferrite_common::model::ModelFiles;
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use ferrite_tests::{FailAfter, default_model, ref_cases};
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::engine::core::{Engine, EngineConfig, EngineError, EngineHandle, EngineOutput, EngineRequest, FinishReason};
use ferrite_worker::engine::scheduler::SchedulerConfig;
use ferrite_worker::instant::InstantBackend;

fn engine(budget: usize, kv_blocks: usize) -> EngineHandle {
    let files = ModelFiles::open(&default_model()).unwrap();
    let backend = CpuBackend::load(&files, &CpuOptions { num_kv_blocks: kv_blocks, ..CpuOptions::default() }).unwrap();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: budget, max_num_seqs: 16, max_waiting: 64, max_model_len: 2048 },
        model_fingerprint: files.fingerprint().unwrap(),
        eos_token_ids: vec![2],
        decode_step_target: None,
    };
    Engine::spawn(Box::new(backend), cfg).unwrap()
}

fn request(id: &str, prompt: &[u32], max_new: u32) -> EngineRequest {
    EngineRequest {
        request_id: id.into(),
        prompt: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        stopping: StoppingParams { max_new_tokens: max_new, ignore_eos: true, ..StoppingParams::default() },
        n: 1,
        cache_salt: Vec::new(),
        constraint: None,
    }
}

/// Submits all requests at once and returns each one's tokens.
fn run_all(e: &EngineHandle, reqs: Vec<EngineRequest>) -> Vec<Vec<u32>> {
    let rxs: Vec<_> = reqs.into_iter().map(|r| e.submit(r)).collect();
    rxs.into_iter()
        .map(|mut rx| {
            let mut toks = Vec::new();
            while let Some(out) = rx.blocking_recv() {
                match out {
                    EngineOutput::Tokens { tokens, .. } => toks.extend(tokens),
                    EngineOutput::Finished { reason, .. } => {
                        assert_eq!(reason, FinishReason::Length);
                        break;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            toks
        })
        .collect()
}

fn wait_free(e: &EngineHandle) {
    for _ in 0..400 {
        if e.stats.kv_blocks_used.load(Ordering::Relaxed) == 0 && e.stats.running.load(Ordering::Relaxed) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("blocks still in use: {}", e.stats.kv_blocks_used.load(Ordering::Relaxed));
}

#[test]
fn chunk_size_does_not_change_outputs() {
    let case = ref_cases().into_iter().find(|c| c.name == "long_context").unwrap();
    let mut outs = Vec::new();
    for budget in [7, 16, 61, 512] {
        let e = engine(budget, 64);
        outs.push(run_all(&e, vec![request("x", &case.prompt_ids, 6)]).remove(0));
        wait_free(&e);
    }
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "{outs:?}");
}

#[test]
fn preemption_under_memory_pressure_does_not_change_outputs() {
    let cases = ref_cases();
    let prompts: Vec<Vec<u32>> = cases.iter().filter(|c| c.prompt_ids.len() < 80).take(6).map(|c| c.prompt_ids.clone()).collect();
    let reqs = |tag: &str| prompts.iter().enumerate().map(|(i, p)| request(&format!("{tag}{i}"), p, 40)).collect::<Vec<_>>();
    let roomy = engine(256, 256);
    let alone: Vec<Vec<u32>> = reqs("a").into_iter().map(|r| run_all(&roomy, vec![r]).remove(0)).collect();
    // 20 blocks of 16 tokens cannot hold six sequences of ~45-80 tokens at once: the scheduler must preempt.
    let tight = engine(256, 21);
    let together = run_all(&tight, reqs("t"));
    assert!(tight.stats.preemptions.load(Ordering::Relaxed) > 0, "expected preemptions");
    assert_eq!(together, alone);
    wait_free(&tight);
}

/// A fatal backend error (a failed device or tensor-parallel group) fails every request, the ones in the step and
/// the ones still waiting, stops the engine (its handle's `failed()` resolves: the worker exits non-zero) and
/// refuses later requests. Nothing hangs.
#[test]
fn a_fatal_backend_error_fails_every_request_and_stops_the_engine() {
    let files = ModelFiles::open(&default_model()).unwrap();
    let backend = FailAfter::new(InstantBackend::new(files.config.clone(), 64, 16), 3);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: 64, max_num_seqs: 2, max_waiting: 64, max_model_len: 2048 },
        model_fingerprint: files.fingerprint().unwrap(),
        eos_token_ids: vec![2],
        decode_step_target: None,
    };
    let e = Engine::spawn(Box::new(backend), cfg).unwrap();
    // Two run at a time: when the fourth step fails, two requests are running and two are waiting.
    let rxs: Vec<_> = (0..4).map(|i| e.submit(request(&format!("r{i}"), &[1, 2, 3], 50))).collect();
    for (i, mut rx) in rxs.into_iter().enumerate() {
        loop {
            match rx.blocking_recv() {
                Some(EngineOutput::Tokens { .. }) => {}
                Some(EngineOutput::Failed(m)) => {
                    assert!(m.contains("injected device failure"), "request {i}: {m}");
                    break;
                }
                other => panic!("request {i}: expected a failure, got {other:?}"),
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let why = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), e.failed()).await }).expect("failed() resolves");
    assert!(why.contains("injected device failure"), "{why}");
    assert_eq!(e.stats.running.load(Ordering::Relaxed), 0);
    let mut late = e.submit(request("late", &[1, 2, 3], 5));
    let answer = late.blocking_recv();
    assert!(matches!(answer, None | Some(EngineOutput::Rejected(EngineError::ShutDown))), "{answer:?}");
}

/// A seeded sampled request gives the same tokens whether the backend draws them (`forward_sample`, no logprobs)
/// or the engine does on the host (logprobs asked): one algorithm, one uniform per draw.
#[test]
fn backend_sampling_and_host_sampling_draw_the_same_tokens() {
    let e = engine(256, 64);
    let prompt = &ref_cases()[1].prompt_ids;
    let sampled = |id: &str, logprobs: bool| EngineRequest {
        request_id: id.into(),
        prompt: prompt.clone(),
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            top_k: 50,
            repetition_penalty: 1.1,
            presence_penalty: 0.3,
            seed: Some(1234),
            ..SamplingParams::default()
        },
        stopping: StoppingParams {
            max_new_tokens: 12,
            ignore_eos: true,
            logprobs,
            top_logprobs: u32::from(logprobs),
            ..StoppingParams::default()
        },
        n: 2,
        cache_salt: Vec::new(),
        constraint: None,
    };
    let collect = |req: EngineRequest| {
        let mut rx = e.submit(req);
        let mut toks = vec![Vec::new(), Vec::new()];
        let mut done = 0;
        while done < 2 {
            match rx.blocking_recv().expect("engine answers") {
                EngineOutput::Tokens { index, tokens, .. } => toks[index as usize].extend(tokens),
                EngineOutput::Finished { .. } => done += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        toks
    };
    let on_backend = collect(sampled("a", false));
    let on_host = collect(sampled("b", true));
    assert_eq!(on_backend, on_host);
    assert_ne!(on_backend[0], on_backend[1], "the two completions differ");
    wait_free(&e);
}
