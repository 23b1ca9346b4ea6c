//! The continuous-batching scheduler (vLLM v1 style): a pure state machine with no IO.
//!
//! Every sequence has `tokens` (prompt + generated) and `num_computed` (tokens whose KV is in the cache); a step
//! lets `num_computed` catch up under a token budget. `Scheduler::schedule` visits **running** sequences first
//! (decode = 1 token, an unfinished prefill = a chunk), then admits **waiting** ones (prefix-cache hits first, so
//! their cached blocks are skipped; never the whole prompt, so at least one token is computed and logits exist).
//! When blocks run out, the newest running sequence is **preempted by recompute**: its blocks are freed (full ones
//! stay in the prefix cache), `num_computed` resets to 0, and it goes to the front of the queue.
//!
//! Blocks are held by `BlockTable`s, which return them to the pool when dropped: a sequence that is removed for any
//! reason cannot leak KV blocks.
//!
//! **The scheduler owns every sequence.** Its table (`Scheduler::seqs`) is the only place a sequence lives: the
//! scheduling state above plus an opaque payload `M` that the caller attaches at `Scheduler::add` (the engine core
//! puts its sampler, request id, completion index, limits and stop rules there, `super::step::SeqMeta`). So there is
//! one exit path, `Scheduler::remove`, which hands the whole sequence back (payload and blocks) and cannot leave a
//! second copy behind. The payload is generic, so the scheduler knows nothing of sampling and its own tests need no
//! sampler.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use ferrite_common::hash::BlockHasher;

use super::block_pool::{BlockEvent, BlockId, BlockPool, PoolUsage};

/// Engine-internal id of one sequence (one of the `n` completions of a request).
pub(crate) type SeqId = u64;

/// Scheduler limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens computed per step, summed over sequences.
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Sequences allowed to wait; more are rejected (admission control).
    pub max_waiting: usize,
    /// Maximum context (prompt + generated) of one sequence.
    pub max_model_len: usize,
}

/// Why a sequence was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the worker is overloaded: {waiting} requests are already waiting (limit {limit})")]
    Overloaded { waiting: usize, limit: usize },
    #[error("the request needs {needed} KV blocks but the worker has only {capacity}")]
    TooLarge { needed: usize, capacity: usize },
    /// The prompt leaves no room in the context for a generated token (the gRPC service rejects this earlier,
    /// naming the field; the engine core refuses it for its direct callers).
    #[error("the prompt has {prompt} tokens; the context holds {max_model_len}, so nothing could be generated")]
    PromptTooLong { prompt: usize, max_model_len: usize },
    /// An empty prompt has no last token to take logits from (the service rejects it earlier too).
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// A sequence's KV blocks; dropping it returns them to the pool (tail first).
#[derive(Debug)]
pub(crate) struct BlockTable {
    pool: Rc<RefCell<BlockPool>>,
    ids: Vec<BlockId>,
}

impl BlockTable {
    fn new(pool: &Rc<RefCell<BlockPool>>) -> Self {
        Self { pool: Rc::clone(pool), ids: Vec::new() }
    }

    pub(crate) fn ids(&self) -> &[BlockId] {
        &self.ids
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.pool.borrow_mut().free(self.ids.drain(..).rev());
    }
}

/// One sequence: the scheduling state (read-only outside this module, so a caller holding `&mut Sequence` can change
/// only its payload) and the caller's payload `meta`.
#[derive(Debug)]
pub(crate) struct Sequence<M> {
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    blocks: BlockTable,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_prompt_tokens: usize,
    /// Hash of the chain before the first block (from the cache salt).
    root_hash: u64,
    /// Hashes of full blocks of `tokens`, computed lazily.
    hashes: Vec<u64>,
    /// Full blocks already registered in the pool.
    num_registered: usize,
    /// Not schedulable until this sequence has computed its prompt (n > 1 copies wait for the first, then hit its
    /// cached prompt blocks).
    wait_for: Option<SeqId>,
    admitted_once: bool,
    /// The caller's per-sequence state.
    pub(crate) meta: M,
}

impl<M> Sequence<M> {
    /// Prompt followed by generated tokens.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub(crate) fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub(crate) fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The physical KV blocks, in position order.
    pub(crate) fn block_ids(&self) -> &[BlockId] {
        self.blocks.ids()
    }

    /// Prompt tokens served from the prefix cache at first admission.
    pub(crate) fn cached_prompt_tokens(&self) -> usize {
        self.cached_prompt_tokens
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub(crate) id: SeqId,
    /// Position of the first new token (= tokens already in the cache).
    pub(crate) start: usize,
    pub(crate) num_tokens: usize,
    /// True when this step computes the sequence's last known token, so its logits give the next one.
    pub(crate) sample: bool,
}

/// The scheduler, and the owner of every sequence (with its payload `M`).
#[derive(Debug)]
pub(crate) struct Scheduler<M> {
    cfg: SchedulerConfig,
    pool: Rc<RefCell<BlockPool>>,
    hasher: BlockHasher,
    seqs: HashMap<SeqId, Sequence<M>>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// Sequences preempted so far.
    preemptions: u64,
    /// Sequences admitted for the first time since [`Scheduler::take_admitted`] (their queueing ended).
    admitted: Vec<SeqId>,
    /// Tokens per step while any sequence decodes ([`Scheduler::set_decode_step_tokens`]); `None`: the full budget.
    decode_step_tokens: Option<usize>,
}

/// Prompt tokens a step may always compute, whatever [`Scheduler::set_decode_step_tokens`] says: prefills progress
/// even when decoding alone fills the target.
pub(crate) const MIN_PREFILL_CHUNK: usize = 16;

impl<M> Scheduler<M> {
    pub(crate) fn new(cfg: SchedulerConfig, pool: BlockPool, hasher: BlockHasher) -> Self {
        debug_assert_eq!(pool.block_size(), hasher.block_size());
        Self {
            cfg,
            pool: Rc::new(RefCell::new(pool)),
            hasher,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            admitted: Vec::new(),
            decode_step_tokens: None,
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.hasher.block_size()
    }

    pub(crate) fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new sequence carrying `meta`. `max_len` bounds prompt + generation (used to reject what can never
    /// fit).
    pub(crate) fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_len: usize,
        cache_salt: &[u8],
        wait_for: Option<SeqId>,
        meta: M,
    ) -> Result<(), AdmissionError> {
        if prompt.is_empty() {
            return Err(AdmissionError::EmptyPrompt);
        }
        if prompt.len() >= self.cfg.max_model_len {
            return Err(AdmissionError::PromptTooLong { prompt: prompt.len(), max_model_len: self.cfg.max_model_len });
        }
        let needed = max_len.min(self.cfg.max_model_len).div_ceil(self.block_size());
        let capacity = self.pool.borrow().capacity();
        if needed > capacity {
            return Err(AdmissionError::TooLarge { needed, capacity });
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(AdmissionError::Overloaded { waiting: self.waiting.len(), limit: self.cfg.max_waiting });
        }
        let seq = Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            blocks: BlockTable::new(&self.pool),
            cached_prompt_tokens: 0,
            root_hash: self.hasher.root(cache_salt),
            hashes: Vec::new(),
            num_registered: 0,
            wait_for,
            admitted_once: false,
            meta,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(())
    }

    pub(crate) fn get(&self, id: SeqId) -> Option<&Sequence<M>> {
        self.seqs.get(&id)
    }

    /// The sequence, mutable only in its payload (its scheduling fields are private to this module).
    pub(crate) fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence<M>> {
        self.seqs.get_mut(&id)
    }

    /// Appends a sampled token to a sequence.
    pub(crate) fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a sequence (finished, aborted or failed) and hands it back; its blocks go back to the pool when the
    /// returned sequence is dropped (at once, unless the caller keeps it).
    pub(crate) fn remove(&mut self, id: SeqId) -> Option<Sequence<M>> {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        let seq = self.seqs.remove(&id);
        // Copies waiting on this one may go now.
        for s in self.seqs.values_mut() {
            if s.wait_for == Some(id) {
                s.wait_for = None;
            }
        }
        seq
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens that waiting sequences still have to compute before they can sample (their prefill backlog).
    pub(crate) fn waiting_prefill_tokens(&self) -> usize {
        self.waiting.iter().filter_map(|id| self.seqs.get(id)).map(|s| s.tokens.len().saturating_sub(s.num_computed)).sum()
    }

    /// Sequences admitted for the first time since the last call (a preempted sequence re-admitted is not).
    pub(crate) fn take_admitted(&mut self) -> Vec<SeqId> {
        std::mem::take(&mut self.admitted)
    }

    /// The pool's prefix-cache index changes since the last call (see `BlockPool::take_events`).
    pub(crate) fn take_block_events(&mut self) -> Vec<BlockEvent> {
        self.pool.borrow_mut().take_events()
    }

    /// Every hash in the pool's prefix-cache index (tests).
    #[cfg(test)]
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        self.pool.borrow().cached_hashes()
    }

    pub(crate) fn usage(&self) -> PoolUsage {
        self.pool.borrow().usage()
    }

    /// Sequences preempted so far.
    pub(crate) fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Prefix-cache (queries, hits) in blocks.
    pub(crate) fn prefix_stats(&self) -> (u64, u64) {
        let p = self.pool.borrow();
        (p.queries, p.hits)
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        self.pool.borrow().check_invariants();
        let held: usize = self.seqs.values().map(|s| s.blocks.ids.len()).sum();
        assert!(held >= self.usage().in_use, "every in-use block is held by a sequence");
    }

    /// Makes sure `seq` has blocks for `num_tokens` tokens.
    fn grow(&mut self, id: SeqId, num_tokens: usize) -> bool {
        let bs = self.block_size();
        let seq = self.seqs.get_mut(&id).expect("scheduled sequence exists");
        let need = num_tokens.div_ceil(bs).saturating_sub(seq.blocks.ids.len());
        if need == 0 {
            return true;
        }
        match self.pool.borrow_mut().allocate(need) {
            Ok(ids) => {
                seq.blocks.ids.extend(ids);
                true
            }
            Err(_) => false,
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        let seq = self.seqs.get_mut(&id).expect("running sequence exists");
        seq.blocks = BlockTable::new(&self.pool); // drops (frees) the old table; full blocks stay cached
        seq.num_computed = 0;
        seq.num_registered = 0;
        self.waiting.push_front(id);
        self.preemptions += 1;
    }

    /// Walks the sequence's full-block hashes from the start and takes every cached block until the first miss,
    /// leaving at least one token to compute.
    fn take_prefix_hits(&mut self, id: SeqId) {
        let bs = self.block_size();
        let hasher = self.hasher;
        let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
        ensure_hashes(&hasher, seq);
        // Never the whole sequence: the last token must be computed to produce logits.
        let max_blocks = (seq.tokens.len() - 1) / bs;
        let mut pool = self.pool.borrow_mut();
        for j in 0..max_blocks {
            let tokens = &seq.tokens[j * bs..(j + 1) * bs];
            match pool.lookup_and_touch(seq.hashes[j], tokens) {
                Some(b) => seq.blocks.ids.push(b),
                None => break,
            }
        }
        seq.num_computed = seq.blocks.ids.len() * bs;
        seq.num_registered = seq.blocks.ids.len();
        if !seq.admitted_once {
            seq.cached_prompt_tokens = seq.num_computed.min(seq.prompt_len);
        }
    }

    /// Limits the steps that run decoding sequences to about `tokens` tokens (decode rows plus prompt chunks; at
    /// least [`MIN_PREFILL_CHUNK`] prompt tokens), so a long prompt arriving mid-stream is prefilled over several
    /// steps instead of stalling every stream for one long step. `None`: every step may take the full
    /// `max_num_batched_tokens`. The engine's shell sets it from measured step times (no clock in here).
    pub(crate) fn set_decode_step_tokens(&mut self, tokens: Option<usize>) {
        self.decode_step_tokens = tokens;
    }

    /// Plans the next step.
    pub(crate) fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.cfg.max_num_batched_tokens;
        // Prompt tokens this step may compute: bounded while any running sequence decodes (one token to compute).
        let decoding = || self.running.iter().filter(|id| self.seqs[id].tokens.len() - self.seqs[id].num_computed == 1).count();
        let mut prompt_budget = match self.decode_step_tokens.map(|target| (target, decoding())) {
            Some((target, decoding)) if decoding > 0 => target.saturating_sub(decoding).max(MIN_PREFILL_CHUNK),
            _ => usize::MAX,
        };
        let mut plan = Vec::new();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (start, len) = {
                let s = &self.seqs[&id];
                (s.num_computed, s.tokens.len())
            };
            let n = (len - start).min(budget);
            // A prefill chunk (more than the one token a decode computes) also draws on the prompt budget.
            let n = if n > 1 { n.min(prompt_budget) } else { n };
            if n == 0 {
                i += 1;
                continue;
            }
            if !self.grow(id, start + n) {
                // Out of blocks: preempt the newest running sequence (possibly this one) and retry.
                let victim = *self.running.last().expect("non-empty");
                self.preempt(victim);
                preempted = true;
                // If the victim was this sequence, `i` now points at the next one.
                continue;
            }
            plan.push(Scheduled { id, start, num_tokens: n, sample: start + n == len });
            budget -= n;
            if n > 1 {
                prompt_budget -= n;
            }
            i += 1;
        }

        if !preempted {
            let mut k = 0;
            while k < self.waiting.len() && budget > 0 && prompt_budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let id = self.waiting[k];
                if self.seqs[&id].wait_for.is_some_and(|p| self.seqs.get(&p).is_some_and(|p| p.num_computed < p.prompt_len)) {
                    k += 1;
                    continue;
                }
                if self.seqs[&id].blocks.ids.is_empty() {
                    self.take_prefix_hits(id);
                }
                let (start, len) = {
                    let s = &self.seqs[&id];
                    (s.num_computed, s.tokens.len())
                };
                let n = (len - start).min(budget).min(prompt_budget);
                if !self.grow(id, start + n) {
                    // Give the hits back and stop admitting this step.
                    let s = self.seqs.get_mut(&id).expect("exists");
                    s.blocks = BlockTable::new(&self.pool);
                    s.num_computed = 0;
                    s.num_registered = 0;
                    break;
                }
                self.waiting.remove(k);
                let s = self.seqs.get_mut(&id).expect("exists");
                if !s.admitted_once {
                    self.admitted.push(id);
                }
                s.admitted_once = true;
                self.running.push(id);
                plan.push(Scheduled { id, start, num_tokens: n, sample: start + n == len });
                budget -= n;
                prompt_budget -= n;
            }
        }
        plan
    }

    /// Records that a planned step ran: advances `num_computed` and registers blocks that became full.
    pub(crate) fn complete(&mut self, plan: &[Scheduled]) {
        let bs = self.block_size();
        let hasher = self.hasher;
        for s in plan {
            let Some(seq) = self.seqs.get_mut(&s.id) else { continue };
            seq.num_computed = s.start + s.num_tokens;
            let full = seq.num_computed / bs;
            if full > seq.num_registered {
                ensure_hashes(&hasher, seq);
                let mut pool = self.pool.borrow_mut();
                for j in seq.num_registered..full {
                    pool.register(seq.blocks.ids[j], seq.hashes[j], &seq.tokens[j * bs..(j + 1) * bs]);
                }
                seq.num_registered = full;
            }
        }
    }
}

/// Extends `seq.hashes` to cover every full block of its tokens.
fn ensure_hashes<M>(hasher: &BlockHasher, seq: &mut Sequence<M>) {
    let bs = hasher.block_size();
    let full = seq.tokens.len() / bs;
    while seq.hashes.len() < full {
        let j = seq.hashes.len();
        let parent = if j == 0 { seq.root_hash } else { seq.hashes[j - 1] };
        let h = hasher.block(parent, &seq.tokens[j * bs..(j + 1) * bs]);
        seq.hashes.push(h);
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
