//! The CUDA backend (feature `cuda`): candle's `CudaDevice` (cudarc) with the PTX that
//! `build.rs` compiles from `kernels/*.cu`.

use super::{DevElem, Gpu, KernelParams, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

/// The PTX of each `kernels/<family>.cu`, as `pub const <FAMILY>: &str`.
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The CUDA backend on one device.
pub(crate) struct Cuda(pub CudaDevice);

impl Cuda {
    /// The backend of the device a storage lives on.
    pub(crate) fn of(s: &CudaStorage) -> Self {
        Self(s.device().clone())
    }

    /// The device address of a slice's element `offset`.
    fn ptr<T>(&self, s: &CudaSlice<T>, offset: usize) -> u64 {
        let stream = self.0.cuda_stream();
        // Every launch goes to this device's one stream, in order, so nothing waits on the
        // event the guard records.
        let (p, _guard) = s.device_ptr(&stream);
        p + (offset * std::mem::size_of::<T>()) as u64
    }
}

impl Gpu for Cuda {
    type Storage = CudaStorage;
    type Words = CudaSlice<u64>;
    type Out<T: DevElem> = CudaSlice<T>;

    fn dtype(&self, s: &CudaStorage) -> DType {
        s.dtype()
    }

    fn input<T: DevElem>(&self, loss: &str, s: &CudaStorage, l: &Layout) -> Result<u64> {
        let sl = s.as_cuda_slice::<T>()?;
        match l.contiguous_offsets() {
            Some((a, _)) => Ok(self.ptr(sl, a)),
            None => bail!("{loss}: internal error, kernel input is not contiguous"),
        }
    }

    fn tensor<T: DevElem>(&self, loss: &str, t: &Tensor) -> Result<u64> {
        let (st, l) = t.storage_and_layout();
        match &*st {
            // The address stays valid after the guard: the op holds the tensor.
            Storage::Cuda(s) => self.input::<T>(loss, s, l),
            _ => bail!("{loss}: a parameter tensor is not on the CUDA device"),
        }
    }

    fn words(&self, len: usize) -> Result<CudaSlice<u64>> {
        self.0.alloc_zeros::<u64>(len.max(1))
    }

    fn upload(&self, v: &[u64]) -> Result<CudaSlice<u64>> {
        if v.is_empty() {
            return self.words(1);
        }
        self.0.clone_htod(v)
    }

    fn download(&self, w: &CudaSlice<u64>) -> Result<Vec<u64>> {
        self.0.clone_dtoh(w)
    }

    fn words_addr(&self, w: &CudaSlice<u64>) -> u64 {
        self.ptr(w, 0)
    }

    fn output<T: DevElem>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the kernels write every element before anything reads the output.
        unsafe { self.0.alloc::<T>(len) }
    }

    fn zeros<T: DevElem>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.0.alloc_zeros::<T>(len)
    }

    fn out_addr<T: DevElem>(&self, o: &CudaSlice<T>) -> u64 {
        self.ptr(o, 0)
    }

    fn storage<T: DevElem>(&self, o: CudaSlice<T>) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(o, self.0.clone())
    }

    fn storage_from<T: DevElem>(&self, v: Vec<T>) -> Result<CudaStorage> {
        Ok(self.storage(self.0.clone_htod(&v)?))
    }

    fn launch<P: KernelParams>(
        &self,
        module: &Module,
        name: &str,
        cfg: Launch,
        p: &P,
    ) -> Result<()> {
        let f = self
            .0
            .get_or_load_custom_func(name, module.name, module.ptx)?;
        let mut b = f.builder();
        b.arg(p);
        let lc = LaunchConfig {
            grid_dim: (cfg.grid, 1, 1),
            block_dim: (cfg.block, 1, 1),
            shared_mem_bytes: cfg.shmem,
        };
        // SAFETY: `name` takes exactly one parameter struct of `P`'s layout (params.cuh); its
        // addresses point to device buffers the caller keeps alive until the stream has run
        // the kernel (they are freed on the same stream, after it).
        unsafe { b.launch(lc) }.w()?;
        Ok(())
    }
}
