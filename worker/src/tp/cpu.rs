//! [`TpCpuBackend`]: the engine's `Backend` for a tensor-parallel CPU worker. It owns `tp` rank threads, each with
//! its own [`CpuBackend`] loaded from its shard only and its own KV store (its KV heads only). A step is copied once
//! into an owned batch and sent to every rank; each runs the same forward pass, meeting the others in the
//! all-reduces and the logits all-gather; rank 0's logits are the step's. A rank that fails aborts the group, so the
//! others' collectives return at once and the step fails on every rank with that error (never a hang: collectives
//! also time out).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrite_common::config::LlamaConfig;
use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_common::shard::ShardSpec;

use super::comm::{CpuGroup, Communicator};
use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, SeqInput};
use crate::cpu::{CpuBackend, CpuOptions};

/// How long a rank waits for the others in a collective before the step fails.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// One sequence of a step, owned (sent to every rank).
struct OwnedSeq {
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: Vec<u32>,
    logits: LogitsWanted,
}

type RankResult = (usize, Result<Option<Logits>, BackendError>);
/// A rank's start-up report: its backend info and weight bytes, or why it could not load.
type RankReady = (usize, Result<(BackendInfo, usize), ModelError>);

/// A tensor-parallel CPU model: `tp` rank threads behind one `Backend`.
pub struct TpCpuBackend {
    config: LlamaConfig,
    info: BackendInfo,
    senders: Vec<Sender<Arc<Vec<OwnedSeq>>>>,
    results: Receiver<RankResult>,
    threads: Vec<JoinHandle<()>>,
    rank_bytes: Vec<usize>,
}

impl TpCpuBackend {
    /// Loads `plan.len()` shards of `model` on as many threads (each rank's CPU pool gets `opts.threads / tp`
    /// threads, at least one) and waits until every rank is ready.
    pub fn load(model: &ModelFiles, opts: &CpuOptions, plan: Vec<ShardSpec>) -> Result<Self, ModelError> {
        let comms = CpuGroup::create(plan.len(), COLLECTIVE_TIMEOUT).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect();
        Self::load_with(model, opts, plan, comms)
    }

    /// As [`Self::load`], with the ranks' communicators given (rank `i` gets `comms[i]`; tests inject faults here).
    pub fn load_with(model: &ModelFiles, opts: &CpuOptions, plan: Vec<ShardSpec>, comms: Vec<Arc<dyn Communicator>>) -> Result<Self, ModelError> {
        let tp = plan.len();
        assert_eq!(comms.len(), tp, "one communicator per rank");
        let plan = Arc::new(plan);
        let per_rank = CpuOptions { threads: (opts.threads / tp).max(1), ..opts.clone() };
        let (ready_tx, ready_rx) = channel::<RankReady>();
        let (result_tx, results) = channel::<RankResult>();
        let mut senders = Vec::with_capacity(tp);
        let mut threads = Vec::with_capacity(tp);
        for comm in comms {
            let (tx, rx) = channel::<Arc<Vec<OwnedSeq>>>();
            senders.push(tx);
            let path = model.path.clone();
            let (model, opts, plan, ready, results) = (model.clone(), per_rank.clone(), Arc::clone(&plan), ready_tx.clone(), result_tx.clone());
            let rank = comm.rank();
            let handle = std::thread::Builder::new()
                .name(format!("ferrite-tp-rank-{rank}"))
                .spawn(move || rank_main(rank, model, opts, plan, comm, rx, ready, results))
                .map_err(|e| ModelError::InvalidConfig { path, detail: format!("spawning tensor-parallel rank {rank}: {e}") })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut info = None;
        let mut rank_bytes = vec![0; tp];
        let mut first_err = None;
        for _ in 0..tp {
            match ready_rx.recv() {
                Ok((rank, Ok((i, bytes)))) => {
                    rank_bytes[rank] = bytes;
                    info.get_or_insert(i);
                }
                Ok((_, Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        let backend = Self { config: model.config.clone(), info: info.unwrap_or(BackendInfo { name: "cpu", num_kv_blocks: 0, block_size: 1 }), senders, results, threads, rank_bytes };
        match first_err {
            Some(e) => Err(e), // dropping `backend` closes the channels and joins the threads
            None => Ok(backend),
        }
    }

    /// Bytes of weight matrices each rank holds.
    pub fn rank_weight_bytes(&self) -> &[usize] {
        &self.rank_bytes
    }
}

#[allow(clippy::too_many_arguments)]
fn rank_main(
    rank: usize,
    model: ModelFiles,
    opts: CpuOptions,
    plan: Arc<Vec<ShardSpec>>,
    comm: Arc<dyn Communicator>,
    steps: Receiver<Arc<Vec<OwnedSeq>>>,
    ready: Sender<RankReady>,
    results: Sender<RankResult>,
) {
    let mut backend = match CpuBackend::load_shard(&model, &opts, &plan, Arc::clone(&comm)) {
        Ok(b) => b,
        Err(e) => {
            comm.abort(&format!("loading failed: {e}"));
            let _ = ready.send((rank, Err(e)));
            return;
        }
    };
    drop(model);
    let _ = ready.send((rank, Ok((backend.info(), backend.weight_bytes()))));
    while let Ok(step) = steps.recv() {
        let batch = ForwardBatch {
            seqs: step.iter().map(|s| SeqInput { tokens: &s.tokens, start_pos: s.start_pos, block_table: &s.block_table, logits: s.logits }).collect(),
        };
        // A panic must not leave the other ranks waiting in a collective: it fails the step like an error.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.forward(&batch)))
            .unwrap_or_else(|_| Err(BackendError::Collective(format!("rank {rank} panicked during a step"))));
        if let Err(e) = &out {
            comm.abort(&e.to_string());
        }
        let out = out.map(|l| (rank == 0).then_some(l));
        if results.send((rank, out)).is_err() {
            return;
        }
    }
}

impl Drop for TpCpuBackend {
    fn drop(&mut self) {
        self.senders.clear(); // rank threads see their channel closed and exit
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Backend for TpCpuBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        crate::backend::validate_batch(batch, &self.config, self.info.block_size, self.info.num_kv_blocks)?;
        let step = Arc::new(
            batch
                .seqs
                .iter()
                .map(|s| OwnedSeq { tokens: s.tokens.to_vec(), start_pos: s.start_pos, block_table: s.block_table.to_vec(), logits: s.logits })
                .collect::<Vec<_>>(),
        );
        for tx in &self.senders {
            tx.send(Arc::clone(&step)).map_err(|_| BackendError::Collective("a tensor-parallel rank thread is gone".into()))?;
        }
        let (mut logits, mut err) = (None, None);
        for _ in 0..self.senders.len() {
            match self.results.recv() {
                Ok((_, Ok(Some(l)))) => logits = Some(l),
                Ok((_, Ok(None))) => {}
                // Keep the root cause: the failing rank's own error rather than the others' "aborted".
                Ok((_, Err(e))) => {
                    if err.is_none() || !matches!(e, BackendError::Collective(_)) {
                        err = Some(e);
                    }
                }
                Err(_) => return Err(BackendError::Collective("a tensor-parallel rank thread exited".into())),
            }
        }
        match (err, logits) {
            (Some(e), _) => Err(e),
            (None, Some(l)) => Ok(l),
            (None, None) => Err(BackendError::Collective("rank 0 returned no logits".into())),
        }
    }
}
