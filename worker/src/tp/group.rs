//! [`TpBackend`]: the engine's `Backend` for a tensor-parallel worker, whatever the ranks run on. It owns `tp` rank
//! threads; each builds its own rank backend (a CPU or CUDA model loaded from its shard only, with a KV cache for
//! its KV heads only) through a [`RankFactory`] *on that thread* (a GPU rank binds its device there), then runs
//! steps. A step is copied once into an owned batch and sent to every rank; each runs the same forward pass, meeting
//! the others in the collectives; rank 0's output is the step's.
//!
//! Failure is group-wide and final: a rank whose step fails aborts the group (the others' collectives return at
//! once), a step that does not finish within the group's step timeout aborts it too, and from then on every step fails
//! at once with [`BackendError::Collective`]: the engine treats that as fatal and the worker exits non-zero so it
//! is restarted, never hangs. Rank threads that are stuck in a device call are left to the process exit instead of
//! being joined.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrite_common::config::LlamaConfig;
use ferrite_common::error::ModelError;

use crate::backend::{Backend, BackendError, BackendInfo, ForwardBatch, Logits, LogitsWanted, RowSampling, SeqInput};

/// How long a rank waits for the others in a collective before the step fails.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the engine side waits for a whole CPU step (a last resort against a rank stuck outside any collective:
/// the ranks' own collective timeouts catch the rest; a large prefill chunk of a big model on CPU takes minutes).
pub const CPU_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A loaded rank: its backend (which answers `config()` with the whole model's config) and the bytes of weight
/// matrices it holds.
pub struct Rank {
    pub backend: Box<dyn Backend>,
    pub weight_bytes: usize,
    /// Whether the rank samples on its device from whole logit rows it assembles (CUDA): then every rank runs
    /// `forward_sample` and draws the same ids. Otherwise (CPU) rank 0 samples and the others run `forward`, which
    /// takes part in the same collectives.
    pub samples_on_device: bool,
}

/// Builds rank `r`'s backend on the rank's own thread.
pub type RankFactory = Arc<dyn Fn(usize) -> Result<Rank, ModelError> + Send + Sync>;
/// Fails the whole group (every rank's pending and later collectives return an error).
pub type GroupAbort = Arc<dyn Fn(&str) + Send + Sync>;

/// One sequence of a step, owned (sent to every rank).
struct OwnedSeq {
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: Vec<u32>,
    logits: LogitsWanted,
}

struct Step {
    seqs: Vec<OwnedSeq>,
    mode: Mode,
}

/// What a step returns.
enum Mode {
    /// Logits (`Backend::forward`).
    Logits,
    /// Greedy ids (`Backend::forward_greedy`).
    Greedy,
    /// Sampled ids (`Backend::forward_sample`).
    Sample(Vec<RowSampling>),
}

enum RankOut {
    Logits(Logits),
    Ids(Vec<u32>),
}

type RankResult = (usize, Result<Option<RankOut>, BackendError>);
/// A rank's start-up report: its backend info and weight bytes, or why it could not load.
type RankReady = (usize, Result<(BackendInfo, usize), ModelError>);

/// A tensor-parallel model: `tp` rank threads behind one `Backend`.
pub struct TpBackend {
    config: LlamaConfig,
    info: BackendInfo,
    senders: Vec<Sender<Arc<Step>>>,
    results: Receiver<RankResult>,
    threads: Vec<JoinHandle<()>>,
    rank_bytes: Vec<usize>,
    abort: GroupAbort,
    step_timeout: Duration,
    /// Set once a step failed: the group is gone and every later step fails with this.
    failed: Option<String>,
}

impl TpBackend {
    /// Starts `tp` rank threads, builds each rank with `factory` on its thread and waits until every rank is ready
    /// (or the first one fails: then the group is aborted and its error returned). `config` is the whole model's; a
    /// step that has not finished after `step_timeout` fails the group.
    pub fn start(
        config: LlamaConfig,
        tp: usize,
        factory: RankFactory,
        abort: GroupAbort,
        step_timeout: Duration,
    ) -> Result<Self, ModelError> {
        let (ready_tx, ready_rx) = channel::<RankReady>();
        let (result_tx, results) = channel::<RankResult>();
        let mut senders = Vec::with_capacity(tp);
        let mut threads = Vec::with_capacity(tp);
        for rank in 0..tp {
            let (tx, rx) = channel::<Arc<Step>>();
            senders.push(tx);
            let (factory, abort, ready, results) = (Arc::clone(&factory), Arc::clone(&abort), ready_tx.clone(), result_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("ferrite-tp-rank-{rank}"))
                .spawn(move || rank_main(rank, factory, abort, rx, ready, results))
                .map_err(|e| ModelError::InvalidConfig {
                    path: Default::default(),
                    detail: format!("spawning tensor-parallel rank {rank}: {e}"),
                })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut backend = Self {
            config,
            info: BackendInfo { name: "tp", num_kv_blocks: 0, block_size: 1 },
            senders,
            results,
            threads,
            rank_bytes: vec![0; tp],
            abort,
            step_timeout,
            failed: None,
        };
        let mut infos: Vec<BackendInfo> = Vec::with_capacity(tp);
        for _ in 0..tp {
            match ready_rx.recv() {
                Ok((rank, Ok((i, bytes)))) => {
                    backend.rank_bytes[rank] = bytes;
                    infos.push(i);
                }
                Ok((rank, Err(e))) => {
                    // The others may be blocked joining the group (NCCL init): fail it and do not wait for them.
                    backend.fail(&format!("rank {rank} failed to load: {e}"));
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        // Every rank must be able to hold what the engine allocates: the smallest KV cache bounds the group.
        let Some(first) = infos.first().cloned() else {
            backend.fail("no rank started");
            return Err(ModelError::InvalidConfig { path: Default::default(), detail: "no tensor-parallel rank started".into() });
        };
        backend.info = BackendInfo { num_kv_blocks: infos.iter().map(|i| i.num_kv_blocks).min().unwrap_or(0), ..first };
        Ok(backend)
    }

    /// Bytes of weight matrices each rank holds.
    pub fn rank_weight_bytes(&self) -> &[usize] {
        &self.rank_bytes
    }

    /// Marks the group failed and aborts its collectives.
    fn fail(&mut self, why: &str) {
        if self.failed.is_none() {
            self.failed = Some(why.to_string());
            (self.abort)(why);
        }
    }

    fn run(&mut self, batch: &ForwardBatch<'_>, mode: Mode) -> Result<RankOut, BackendError> {
        crate::backend::validate_batch(batch, &self.config, self.info.block_size, self.info.num_kv_blocks)?;
        if let Some(why) = &self.failed {
            return Err(BackendError::Collective(format!("the tensor-parallel group failed earlier ({why}); restart the worker")));
        }
        let seqs = batch
            .seqs
            .iter()
            .map(|s| OwnedSeq { tokens: s.tokens.to_vec(), start_pos: s.start_pos, block_table: s.block_table.to_vec(), logits: s.logits })
            .collect();
        let step = Arc::new(Step { seqs, mode });
        for tx in &self.senders {
            if tx.send(Arc::clone(&step)).is_err() {
                self.fail("a rank thread is gone");
                return Err(BackendError::Collective("a tensor-parallel rank thread is gone".into()));
            }
        }
        let (mut out, mut err) = (None, None);
        for _ in 0..self.senders.len() {
            match self.results.recv_timeout(self.step_timeout) {
                Ok((_, Ok(Some(o)))) => out = Some(o),
                Ok((_, Ok(None))) => {}
                // Keep the root cause: the failing rank's own error rather than the others' "aborted".
                Ok((rank, Err(e))) => {
                    if err.is_none() || !matches!(e, BackendError::Collective(_)) {
                        err = Some(e.clone());
                    }
                    // A rank that failed may have left the others waiting in a collective: release them.
                    self.fail(&format!("rank {rank}: {e}"));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let why = format!("a step took longer than {:?}: a rank is stuck", self.step_timeout);
                    self.fail(&why);
                    return Err(BackendError::Collective(why));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail("a rank thread exited");
                    return Err(BackendError::Collective("a tensor-parallel rank thread exited".into()));
                }
            }
        }
        match (err, out) {
            (Some(e), _) => Err(e),
            (None, Some(o)) => Ok(o),
            (None, None) => Err(BackendError::Collective("rank 0 returned no output".into())),
        }
    }
}

fn rank_main(
    rank: usize,
    factory: RankFactory,
    abort: GroupAbort,
    steps: Receiver<Arc<Step>>,
    ready: Sender<RankReady>,
    results: Sender<RankResult>,
) {
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory(rank))).unwrap_or_else(|_| {
        Err(ModelError::InvalidConfig { path: Default::default(), detail: format!("tensor-parallel rank {rank} panicked while loading") })
    });
    let Rank { mut backend, weight_bytes, samples_on_device } = match built {
        Ok(r) => r,
        Err(e) => {
            abort(&format!("rank {rank} failed to load: {e}"));
            let _ = ready.send((rank, Err(e)));
            return;
        }
    };
    drop(factory);
    let _ = ready.send((rank, Ok((backend.info(), weight_bytes))));
    while let Ok(step) = steps.recv() {
        let batch = ForwardBatch {
            seqs: step
                .seqs
                .iter()
                .map(|s| SeqInput { tokens: &s.tokens, start_pos: s.start_pos, block_table: &s.block_table, logits: s.logits })
                .collect(),
        };
        // A panic must not leave the other ranks waiting in a collective: it fails the step like an error.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &step.mode {
            Mode::Logits => backend.forward(&batch).map(RankOut::Logits),
            Mode::Greedy => backend.forward_greedy(&batch).map(RankOut::Ids),
            Mode::Sample(rows) if rank == 0 || samples_on_device => backend.forward_sample(&batch, rows).map(RankOut::Ids),
            Mode::Sample(_) => backend.forward(&batch).map(RankOut::Logits),
        }))
        .unwrap_or_else(|_| Err(BackendError::Collective(format!("rank {rank} panicked during a step"))));
        if let Err(e) = &out {
            abort(&format!("rank {rank}: {e}"));
        }
        let out = out.map(|o| (rank == 0).then_some(o));
        if results.send((rank, out)).is_err() {
            return;
        }
    }
}

impl Drop for TpBackend {
    fn drop(&mut self) {
        self.senders.clear(); // rank threads see their channel closed and exit
        if self.failed.is_some() {
            // A rank may be stuck in a device call that only the process exit ends: do not wait for it.
            self.threads.clear();
            return;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Backend for TpBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    /// Rank 0 draws: on its device when its ranks are GPU ones.
    fn draws_on_device(&self) -> bool {
        self.info.name == "cuda"
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits, BackendError> {
        match self.run(batch, Mode::Logits)? {
            RankOut::Logits(l) => Ok(l),
            RankOut::Ids(_) => Err(BackendError::Collective("rank 0 returned ids for a logits step".into())),
        }
    }

    fn forward_greedy(&mut self, batch: &ForwardBatch<'_>) -> Result<Vec<u32>, BackendError> {
        match self.run(batch, Mode::Greedy)? {
            RankOut::Ids(ids) => Ok(ids),
            RankOut::Logits(_) => Err(BackendError::Collective("rank 0 returned logits for a greedy step".into())),
        }
    }

    /// Rank 0 draws the ids (on its device or on the host, as its backend does); see [`Rank::samples_on_device`].
    fn forward_sample(&mut self, batch: &ForwardBatch<'_>, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        match self.run(batch, Mode::Sample(rows.to_vec()))? {
            RankOut::Ids(ids) => Ok(ids),
            RankOut::Logits(_) => Err(BackendError::Collective("rank 0 returned logits for a sampled step".into())),
        }
    }
}
