//! Tensor-parallel CPU ranks: a [`TpBackend`] whose rank threads each run a [`CpuBackend`] loaded from its shard
//! only, meeting in an in-process [`CpuGroup`] (bitwise-identical sums on every rank).

use std::sync::Arc;
use std::time::Duration;

use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_common::shard::ShardSpec;

use super::comm::{Communicator, CpuGroup};
use super::group::{COLLECTIVE_TIMEOUT, CPU_STEP_TIMEOUT, GroupAbort, Rank, RankFactory, TpBackend};
use crate::cpu::{CpuBackend, CpuOptions};

impl TpBackend {
    /// Loads `plan.len()` CPU shards of `model` on as many threads (each rank's CPU pool gets `opts.threads / tp`
    /// threads, at least one) and waits until every rank is ready.
    pub fn cpu(model: &ModelFiles, opts: &CpuOptions, plan: Vec<ShardSpec>) -> Result<Self, ModelError> {
        let comms = CpuGroup::create(plan.len(), COLLECTIVE_TIMEOUT).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect();
        Self::cpu_with(model, opts, plan, comms, CPU_STEP_TIMEOUT)
    }

    /// As [`Self::cpu`], with the ranks' communicators given (rank `i` gets `comms[i]`; tests inject faults here)
    /// and the time after which a step that has not finished fails the group.
    pub fn cpu_with(
        model: &ModelFiles,
        opts: &CpuOptions,
        plan: Vec<ShardSpec>,
        comms: Vec<Arc<dyn Communicator>>,
        step_timeout: Duration,
    ) -> Result<Self, ModelError> {
        let tp = plan.len();
        assert_eq!(comms.len(), tp, "one communicator per rank");
        let per_rank = CpuOptions { threads: (opts.threads / tp).max(1), ..opts.clone() };
        let plan = Arc::new(plan);
        let comms = Arc::new(comms);
        let abort: GroupAbort = {
            let comms = Arc::clone(&comms);
            // Aborting one rank of an in-process group fails the group; tell each anyway (injected wrappers).
            Arc::new(move |why: &str| comms.iter().for_each(|c| c.abort(why)))
        };
        let model_files = model.clone();
        let factory: RankFactory = Arc::new(move |rank| {
            let backend = CpuBackend::load_shard(&model_files, &per_rank, &plan, Arc::clone(&comms[rank]))?;
            Ok(Rank { weight_bytes: backend.weight_bytes(), backend: Box::new(backend), samples_on_device: false })
        });
        Self::start(model.config.clone(), tp, factory, abort, step_timeout)
    }
}
