//! Kernel launches through `cuLaunchKernelEx`, so a launch can carry programmatic dependent launch (PDL, sm_90 and
//! later): the kernel may start while the previous kernel in the stream is still running, and waits for it in
//! `pdl_wait()` (`llama.cu`). Every kernel in [`super::KERNEL_SOURCE`] waits before touching earlier work's data,
//! so PDL is safe for all of them; kernels we do not own (cuBLAS, NCCL) are launched by their libraries without it
//! and keep plain stream order. In CUDA graphs the same launches become programmatic edges.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr;

use cudarc::driver::sys::{CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig, cuLaunchKernelEx};
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig};

/// One kernel launch being assembled: arguments are borrowed until [`Launch::launch`].
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    programmatic: bool,
    args: Vec<*mut c_void>,
    _borrows: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction, programmatic: bool) -> Self {
        Self { stream, func, programmatic, args: Vec::with_capacity(16), _borrows: PhantomData }
    }

    /// Appends the next kernel parameter (passed by value to the kernel; borrowed here until the launch).
    pub(crate) fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(ptr::from_ref(value).cast_mut().cast());
        self
    }

    /// Enqueues the kernel on the stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in number, order and type, and every device address
    /// among them must be valid for what the kernel does with it (the launchers in `super` state each contract).
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: an all-zero launch attribute is a valid "ignored" value; id and value are set right below.
        let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if self.programmatic { &raw mut attr } else { ptr::null_mut() },
            numAttrs: u32::from(self.programmatic),
        };
        // SAFETY: `config` and `attr` outlive the call; `args` holds one pointer per kernel parameter, each to a
        // value borrowed for 'a (the caller guarantees they match the kernel); the function belongs to the stream's
        // context, which is bound to this thread above.
        unsafe { cuLaunchKernelEx(&raw const config, self.func.cu_function(), self.args.as_mut_ptr(), ptr::null_mut()) }.result()
    }
}
