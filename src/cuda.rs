//! CUDA plumbing shared by the losses (compiled with the `cuda` feature): the PTX modules built
//! from `kernels/`, typed views of kernel inputs, launch sizes and error-flag read-back.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::sync::Arc;

/// The PTX of each `kernels/<family>.cu`, as `pub const <FAMILY>: &str`.
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Threads per block of every kernel (a multiple of 32, as `block_sum` requires).
pub(crate) const BLOCK: u32 = 256;
/// Upper bound on the number of blocks of a partial-sum kernel (the finalize kernel reads them).
pub(crate) const MAX_PARTIAL_BLOCKS: u32 = 1024;

/// A loaded kernel and the device stream it launches on.
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch builder: push the arguments in the kernel's order, then `launch`.
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Loads (once per device) kernel `name` of the PTX module `module`.
pub(crate) fn func(dev: &CudaDevice, module: &str, ptx: &str, name: &str) -> Result<Kernel> {
    let func = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    Ok(Kernel {
        func,
        stream: dev.cuda_stream(),
    })
}

/// The kernel-name suffix of a float dtype.
pub(crate) fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("unsupported dtype {d:?}"),
    })
}

/// The kernel-name suffix of a target kind (`dense`, `u32`, `i64`).
pub(crate) fn target_suffix(k: crate::common::TargetKind) -> &'static str {
    use crate::common::TargetKind;
    match k {
        TargetKind::Dense => "dense",
        TargetKind::LabelsU32 => "u32",
        TargetKind::LabelsI64 => "i64",
    }
}

/// Runs `$body` with `$v` bound to the targets' CUDA view, of the type the kernel expects for
/// the target kind (`$T` for dense targets, `u32` / `i64` labels).
macro_rules! with_targets {
    ($loss:expr, $kind:expr, $T:ty, $s:expr, $l:expr, $v:ident, $body:block) => {{
        use candle_core::cuda_backend::cudarc::driver::CudaView;
        use $crate::common::TargetKind;
        match $kind {
            TargetKind::Dense => {
                let $v: CudaView<'_, $T> = $crate::cuda::view($loss, $s, $l)?;
                $body
            }
            TargetKind::LabelsU32 => {
                let $v: CudaView<'_, u32> = $crate::cuda::view($loss, $s, $l)?;
                $body
            }
            TargetKind::LabelsI64 => {
                let $v: CudaView<'_, i64> = $crate::cuda::view($loss, $s, $l)?;
                $body
            }
        }
    }};
}
pub(crate) use with_targets;

/// The contiguous view of `T` behind a CUDA storage and its layout.
pub(crate) fn view<'a, T: DeviceRepr + CudaDType>(
    loss: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let sl = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(sl.slice(a..b)),
        None => bail!("{loss}: internal error, kernel input is not contiguous"),
    }
}

/// The CUDA slice of a small parameter tensor (e.g. row weights) held by an op.
pub(crate) fn param_slice<T: DeviceRepr + CudaDType, R>(
    loss: &str,
    t: &Tensor,
    f: impl FnOnce(&CudaSlice<T>) -> Result<R>,
) -> Result<R> {
    let (st, _) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => f(s.as_cuda_slice::<T>()?),
        _ => bail!("{loss}: a parameter tensor is not on the CUDA device"),
    }
}

/// Grid-stride launch over `n` items: at most `max_blocks` blocks of [`BLOCK`] threads.
pub(crate) fn grid(n: u64, max_blocks: u32) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as u64).clamp(1, max_blocks as u64) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elementwise launch: one thread per item (capped; kernels loop grid-stride).
pub(crate) fn grid_elems(n: u64) -> LaunchConfig {
    grid(n, 1 << 20)
}

/// Reads the `[flag, value]` error buffer the kernels raise on an invalid label and turns it into
/// an `Err` naming the loss. Synchronises with the device.
pub(crate) fn check_label_flag(
    loss: &str,
    dev: &CudaDevice,
    err: &CudaSlice<u64>,
    max_label: usize,
) -> Result<()> {
    let v = dev.clone_dtoh(err)?;
    if v.first().copied().unwrap_or(0) != 0 {
        let label = v.get(1).copied().unwrap_or(0) as i64;
        bail!("{loss}: label {label} out of range 0..={max_label} (or -1 to ignore)")
    }
    Ok(())
}

/// Maps a cudarc launch error into a candle error.
pub(crate) fn launched<T>(
    r: std::result::Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>,
) -> Result<T> {
    r.w()
}
