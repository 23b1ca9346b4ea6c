//! Tensor-parallel GPU ranks (feature `cuda`): a [`TpBackend`] whose rank threads each own one GPU (device
//! `opts.device + rank`): its context and stream, its NCCL communicator (joined from the group's unique id, shared
//! in process, followed by a barrier) and a [`CudaBackend`] holding only its shard.
//!
//! Verified on hardware so far: world size 1 (one GPU; NCCL cannot put two ranks on one device). Sizes above 1 run
//! the same code with one thread and one device per rank, and the CPU ranks prove the sharding and collectives.

use std::sync::Arc;
use std::time::Duration;

use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_common::shard::ShardSpec;

use super::group::{COLLECTIVE_TIMEOUT, GroupAbort, Rank, RankFactory, TpBackend};
use crate::backend::Backend;
use crate::cuda::nccl::NcclGroup;
use crate::cuda::{CudaBackend, CudaOptions, RankSpec};

impl TpBackend {
    /// Loads `plan.len()` GPU shards of `model`, rank `r` on device `opts.device + r`, every rank's all-reduces and
    /// gathers through NCCL (also at world size 1).
    pub fn cuda(model: &ModelFiles, opts: &CudaOptions, plan: Vec<ShardSpec>) -> Result<Self, ModelError> {
        Self::cuda_with_timeout(model, opts, plan, COLLECTIVE_TIMEOUT)
    }

    /// As [`Self::cuda`] with a given collective timeout.
    pub fn cuda_with_timeout(model: &ModelFiles, opts: &CudaOptions, plan: Vec<ShardSpec>, timeout: Duration) -> Result<Self, ModelError> {
        let tp = plan.len();
        let config_err = |detail: String| ModelError::InvalidConfig { path: model.path.clone(), detail };
        // Every rank needs its own GPU: refuse at once rather than leave the others waiting in the NCCL init.
        let devices = ferrite_kernels::cuda::device_count().map_err(|e| config_err(e.to_string()))?;
        if opts.device + tp > devices {
            return Err(config_err(format!(
                "tensor parallel size {tp} from CUDA device {} needs devices {}..={}, but {devices} are visible",
                opts.device,
                opts.device,
                opts.device + tp - 1
            )));
        }
        let group = NcclGroup::new(tp, timeout)
            .map_err(|e| ModelError::InvalidConfig { path: model.path.clone(), detail: format!("NCCL: {e}") })?;
        let abort: GroupAbort = {
            let group = Arc::clone(&group);
            Arc::new(move |why: &str| group.abort(why))
        };
        let (model_files, opts, plan) = (model.clone(), opts.clone(), Arc::new(plan));
        let factory: RankFactory = Arc::new(move |rank| {
            let opts = CudaOptions { device: opts.device + rank, ..opts.clone() };
            let spec = RankSpec { plan: &plan, group: Arc::clone(&group), rank };
            let backend = CudaBackend::load_rank(&model_files, &opts, spec)?;
            tracing::info!(
                rank,
                device = opts.device,
                gpu = backend.device_name(),
                kv_blocks = backend.info().num_kv_blocks,
                "tensor-parallel rank ready"
            );
            Ok(Rank { weight_bytes: backend.weight_bytes(), backend: Box::new(backend), samples_on_device: true })
        });
        // GPU ranks poll each wait against `timeout` themselves; the engine side only catches a rank stuck in a call.
        Self::start(model.config.clone(), tp, factory, abort, 2 * timeout)
    }
}
