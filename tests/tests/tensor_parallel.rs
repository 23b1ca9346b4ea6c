//! Tensor parallelism on CPU (in-process rank threads): the same sharding plan the GPU path uses, proven equal to
//! TP=1.
//!
//! Tolerance: a rank computes o_proj and down over its slice of the input columns and the partial sums are added in
//! rank order, so TP=N reorders the float additions of those products (and nothing else); the logits move by f32
//! rounding, far below the gaps between greedy choices. Measured maxima are printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrite_common::model::ModelFiles;
use ferrite_common::shard::ShardSpec;
use ferrite_tests::{BlockTables, default_model, ref_cases, tiny};
use ferrite_worker::backend::{Backend, BackendError, ForwardBatch, LogitsWanted, SeqInput};
use ferrite_worker::cpu::weights::WeightPrecision;
use ferrite_worker::cpu::{CpuBackend, CpuOptions};
use ferrite_worker::tp::comm::{CommError, Communicator, CpuComm, CpuGroup};
use ferrite_worker::tp::group::TpBackend;

const BLOCKS: usize = 64;

fn opts(precision: WeightPrecision) -> CpuOptions {
    CpuOptions { precision, threads: 2, num_kv_blocks: BLOCKS, ..CpuOptions::default() }
}

fn tp_backend(model: &ModelFiles, tp: usize, precision: WeightPrecision) -> TpBackend {
    let plan = ShardSpec::plan(&model.config, tp, model.max_block_size()).expect("valid plan");
    TpBackend::cpu(model, &opts(precision), plan).expect("load shards")
}

/// Logits at every position of `tokens`, in one prefill.
fn all_logits(b: &mut dyn Backend, tokens: &[u32]) -> Vec<f32> {
    let table = BlockTables::new(BLOCKS, 16).table(tokens.len());
    let batch = ForwardBatch { seqs: vec![SeqInput { tokens, start_pos: 0, block_table: &table, logits: LogitsWanted::All }] };
    b.forward(&batch).expect("forward").data
}

/// `n` greedy tokens on the engine core.
fn greedy(b: &mut dyn Backend, prompt: &[u32], n: usize) -> Vec<u32> {
    ferrite_tests::greedy(b, prompt, n, &[])
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// TP=3 on the default model (3 query heads and 1 KV head per rank, GGUF Q4_1 blocks, the default int16-activation
/// path): the reference prompts' logits within 5e-4 of max|logit| of TP=1, and identical greedy tokens. The native
/// path adds per-block integer dot products in f32 over ~1500-wide rows, and TP=3 adds them in three partial sums:
/// we measure ~1.5e-4, the same order as that path's own distance to transformers (~1e-4, `reference.rs`).
#[test]
fn tp3_default_model_matches_tp1() {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    let mut one = CpuBackend::load(&model, &opts(WeightPrecision::Native)).expect("load");
    let mut three = tp_backend(&model, 3, WeightPrecision::Native);
    let mut worst = 0f32;
    for case in ref_cases() {
        let rel = max_rel(&all_logits(&mut three, &case.prompt_ids), &all_logits(&mut one, &case.prompt_ids));
        worst = worst.max(rel);
        assert!(rel <= 5e-4, "{}: TP=3 logits off by {rel:e} × max|logit|", case.name);
        let n = case.greedy_ids.len().min(24);
        assert_eq!(greedy(&mut three, &case.prompt_ids, n), greedy(&mut one, &case.prompt_ids, n), "{}", case.name);
    }
    eprintln!("TP=3 vs TP=1: worst logit difference {worst:e} × max|logit|");
}

/// TP=2 (KV heads split) and TP=4 (each KV head replicated on two ranks) on the generated tiny model.
/// TP=3 CPU ranks draw sampled tokens on rank 0 (the others take part in the collectives): the same tokens as the
/// host sampler on the group's logits.
#[test]
fn tp3_sampling_draws_from_the_group_logits() {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    let mut b = tp_backend(&model, 3, WeightPrecision::Native);
    ferrite_tests::assert_sampling_matches_host(&mut b, 5, BLOCKS);
}

#[test]
fn tp2_and_tp4_tiny_model_match_tp1() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_hf(dir.path(), &tiny::hf_config(false), &tiny::tensors());
    let model = ModelFiles::open(dir.path()).expect("open tiny model");
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % tiny::VOCAB as u32).collect();
    let mut one = CpuBackend::load(&model, &opts(WeightPrecision::F32)).expect("load");
    let want = all_logits(&mut one, &prompt);
    let want_tokens = greedy(&mut one, &prompt, 20);
    for tp in [2, 4] {
        let plan = ShardSpec::plan(&model.config, tp, 1).unwrap();
        if tp == 4 {
            assert_eq!(plan[0].kv_heads, plan[1].kv_heads, "TP=4 on 2 KV heads replicates them");
        }
        let mut b = tp_backend(&model, tp, WeightPrecision::F32);
        let rel = max_rel(&all_logits(&mut b, &prompt), &want);
        eprintln!("TP={tp} vs TP=1 (f32): {rel:e} × max|logit|");
        assert!(rel <= 1e-5, "TP={tp}: {rel:e}");
        assert_eq!(greedy(&mut b, &prompt, 20), want_tokens, "TP={tp}");
    }
    let err = ShardSpec::plan(&model.config, 3, 1).unwrap_err();
    assert_eq!(err.valid, vec![1, 2, 4]);
}

/// Each rank holds about 1/tp of the sharded weights (matrices, lm_head included).
#[test]
fn each_rank_holds_its_share_of_the_weights() {
    let model = ModelFiles::open(&default_model()).expect("open default model");
    let whole = CpuBackend::load(&model, &opts(WeightPrecision::Native)).expect("load").weight_bytes();
    let b = tp_backend(&model, 3, WeightPrecision::Native);
    let ranks = b.rank_weight_bytes();
    eprintln!("TP=1: {whole} bytes of matrices; TP=3 ranks: {ranks:?}");
    for &r in ranks {
        let share = r as f64 / (whole as f64 / 3.0);
        assert!((0.98..=1.02).contains(&share), "a rank holds {share:.3} of its 1/3 share");
    }
}

/// A communicator that fails rank 1's `fail_at`-th all-reduce (a rank dying mid-step), or with `hang` never returns
/// from it (a rank stuck in a device call that ignores aborts).
struct Faulty {
    inner: CpuComm,
    calls: AtomicUsize,
    fail_at: usize,
    hang: bool,
}

impl Communicator for Faulty {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.rank() == 1 && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            if self.hang {
                loop {
                    std::thread::park(); // never unparked
                }
            }
            self.inner.abort("injected failure");
            return Err(CommError::Aborted("injected failure".into()));
        }
        self.inner.all_reduce_sum(buf)
    }
    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), CommError> {
        self.inner.all_gather(local, out)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}

/// A TP=2 group on the tiny model whose rank 1 fails (or, with `hang`, sticks) in its third all-reduce; in-process
/// collectives wait a minute, the group's step timeout is `timeout`. Returns the model's directory (keep it alive).
fn faulty_tp2(hang: bool, timeout: Duration) -> (tempfile::TempDir, TpBackend) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_hf(dir.path(), &tiny::hf_config(false), &tiny::tensors());
    let model = ModelFiles::open(dir.path()).expect("open tiny model");
    let plan = ShardSpec::plan(&model.config, 2, 1).unwrap();
    let comms: Vec<Arc<dyn Communicator>> = CpuGroup::create(2, Duration::from_secs(60))
        .into_iter()
        .map(|c| Arc::new(Faulty { inner: c, calls: AtomicUsize::new(0), fail_at: 3, hang }) as Arc<dyn Communicator>)
        .collect();
    let b = TpBackend::cpu_with(&model, &opts(WeightPrecision::F32), plan, comms, timeout).expect("load");
    (dir, b)
}

/// A rank failing in the middle of a step fails the step on every rank with a clear error, promptly.
#[test]
fn a_failing_rank_fails_the_step_without_deadlock() {
    let (_dir, mut b) = faulty_tp2(false, Duration::from_secs(60));
    let t = Instant::now();
    let prompt: Vec<u32> = (1..20).collect();
    let table = BlockTables::new(BLOCKS, 16).table(prompt.len());
    let batch = ForwardBatch { seqs: vec![SeqInput { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }] };
    let err = b.forward(&batch).expect_err("the step must fail");
    assert!(matches!(&err, BackendError::Collective(m) if m.contains("injected failure")), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "failure took {:?} to surface", t.elapsed());
    // The group stays failed: later steps fail too (the worker must be restarted), they do not hang.
    assert!(b.forward(&batch).is_err());
}

/// A rank stuck for good (not even in a collective that could time out) cannot hang the worker: the step fails
/// once the group's timeout has passed, the group is aborted (the other ranks' collectives return), later steps fail
/// at once, and dropping the backend does not wait for the stuck thread.
#[test]
fn a_stuck_rank_times_out_the_step_and_fails_the_group() {
    // The in-process collectives would wait a minute; the group's step timeout is 2 s.
    let (_dir, mut b) = faulty_tp2(true, Duration::from_secs(2));
    let prompt: Vec<u32> = (1..20).collect();
    let table = BlockTables::new(BLOCKS, 16).table(prompt.len());
    let batch = ForwardBatch { seqs: vec![SeqInput { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }] };
    let t = Instant::now();
    let err = b.forward(&batch).expect_err("the step must fail");
    assert!(matches!(&err, BackendError::Collective(m) if m.contains("stuck")), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "failure took {:?} to surface", t.elapsed());
    let t = Instant::now();
    let again = b.forward_greedy(&batch).expect_err("the group stays failed");
    assert!(matches!(&again, BackendError::Collective(m) if m.contains("restart")), "{again}");
    drop(b);
    assert!(t.elapsed() < Duration::from_secs(2), "a failed group must not wait for its stuck rank");
}

/// Impossible settings are refused at start-up with a typed error that says what works.
#[test]
fn bad_tensor_parallel_settings_are_refused_at_start_up() {
    use ferrite_worker::config::{WorkerConfig, WorkerError};
    use ferrite_worker::server::Worker;
    let err = |cfg: WorkerConfig| match Worker::load(&cfg) {
        Err(WorkerError::Config(m)) => m,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error"),
    };
    let base = ferrite_tests::test_worker_config();
    let m = err(WorkerConfig { tensor_parallel_size: 2, ..base.clone() });
    assert!(m.contains("9 query heads do not split into 2") && m.contains("[1, 3]"), "{m}");
    let m = err(WorkerConfig { tensor_parallel_size: 0, ..base.clone() });
    assert!(m.contains("--tensor-parallel-size"), "{m}");
    let m = err(WorkerConfig { gpu_memory_utilization: 1.5, ..base });
    assert!(m.contains("--gpu-memory-utilization"), "{m}");
}

/// GPU ranks on a machine without enough GPUs (no driver here; one GPU on our GPU hosts; 3 ranks of the default model
/// need three) are refused at start-up with a typed error that says why, without a panic or a hang.
#[cfg(feature = "cuda")]
#[test]
fn gpu_ranks_without_enough_gpus_are_refused_at_start_up() {
    use ferrite_worker::config::{BackendKind, WorkerConfig, WorkerError};
    use ferrite_worker::server::Worker;
    let cfg = WorkerConfig { backend: BackendKind::Cuda, tensor_parallel_size: 3, ..ferrite_tests::test_worker_config() };
    let t = Instant::now();
    match Worker::load(&cfg) {
        Err(WorkerError::Model(e)) => {
            let m = e.to_string();
            assert!(m.contains("driver") || m.contains("are visible"), "{m}");
        }
        Err(e) => panic!("expected a model/config error, got {e}"),
        Ok(_) => eprintln!("this machine has three GPUs: nothing to refuse"),
    }
    assert!(t.elapsed() < Duration::from_secs(60));
}
