//! The one launch layer of the CUDA kernels: every loss describes its launches here (kernel by
//! name, grid, shared memory, one `#[repr(C)]` parameter struct from [`params`]) against the
//! [`Gpu`] trait, and a backend carries them out:
//!
//! - `cuda` (feature `cuda`): candle's `CudaDevice` and cudarc, PTX built from `kernels/`;
//! - `emu` (feature `cuda-emu`): the same `kernels/*.cu` compiled for the host with the
//!   emulation of `kernels/emu/`, run on CPU tensors, so that the tests execute every kernel
//!   and this launch code without a GPU.
//!
//! Buffer addresses travel as `u64` in the parameter structs (a device pointer, or a host
//! address under emulation): the backend only allocates, copies and launches. Inputs and
//! parameter tensors are passed with their layout's start offset, so views are read where they
//! start. Errors a kernel finds (an invalid label or target) are raised in one `[code, a, b]`
//! buffer ([`KernelError`]); scalar reductions write per-block partial sums that one finalize
//! kernel ([`finalize`]) turns into the rank-0 result.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda-emu")]
pub(crate) mod emu;
pub(crate) mod params;

use crate::dtype::Elem;
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
pub(crate) use params::KernelParams;

/// Threads per block of every kernel (a multiple of 32, as the block reductions require).
pub(crate) const BLOCK: u32 = 256;
/// Upper bound on the number of blocks of a partial-sum kernel (the finalize kernel reads them).
pub(crate) const MAX_PARTIAL_BLOCKS: u32 = 1024;
/// Upper bound on the blocks of an element-wise kernel (they loop grid-stride beyond it).
pub(crate) const MAX_ELEM_BLOCKS: u32 = 1 << 20;

/// A kernel module: one `kernels/<family>.cu`.
pub(crate) struct Module {
    /// The module name the CUDA backend loads the PTX under.
    pub name: &'static str,
    #[cfg(feature = "cuda")]
    pub ptx: &'static str,
    /// The emulation's kernel lookup and kernel list of the module.
    #[cfg(feature = "cuda-emu")]
    pub emu: (emu::Find, emu::List),
}

/// Declares the [`Module`] constants, one per `kernels/<file>.cu`, and [`MODULES`].
macro_rules! modules {
    ($($konst:ident: $file:literal, $ptx:ident, $find:ident, $list:ident;)*) => {
        $(
            pub(crate) const $konst: Module = Module {
                name: concat!("candle_detloss_", $file),
                #[cfg(feature = "cuda")]
                ptx: cuda::ptx::$ptx,
                #[cfg(feature = "cuda-emu")]
                emu: (emu::ffi::$find, emu::ffi::$list),
            };
        )*
        /// Every kernel module.
        #[allow(dead_code)]
        pub(crate) const MODULES: &[&Module] = &[$(&$konst),*];
    };
}

modules! {
    COMMON: "common", COMMON, dl_emu_find_common, dl_emu_kernel_common;
    FOCAL: "focal", FOCAL, dl_emu_find_focal, dl_emu_kernel_focal;
    QUALITY: "quality", QUALITY, dl_emu_find_quality, dl_emu_kernel_quality;
    SOFTMAX: "softmax", SOFTMAX, dl_emu_find_softmax, dl_emu_kernel_softmax;
    GHM: "ghm", GHM, dl_emu_find_ghm, dl_emu_kernel_ghm;
    REGRESSION: "regression", REGRESSION, dl_emu_find_regression, dl_emu_kernel_regression;
    IOU: "iou", IOU, dl_emu_find_iou, dl_emu_kernel_iou;
    AP_LOSS: "ap_loss", AP_LOSS, dl_emu_find_ap_loss, dl_emu_kernel_ap_loss;
    DFL: "dfl", DFL, dl_emu_find_dfl, dl_emu_kernel_dfl;
}

/// A one-dimensional launch: `grid` blocks of `block` threads, `shmem` bytes of dynamic shared
/// memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Launch {
    pub grid: u32,
    pub block: u32,
    pub shmem: u32,
}

impl Launch {
    /// Grid-stride launch over `n` items: at most `max_blocks` blocks of [`BLOCK`] threads.
    pub(crate) fn over(n: u64, max_blocks: u32) -> Self {
        let grid = n.div_ceil(BLOCK as u64).clamp(1, max_blocks as u64) as u32;
        Self {
            grid,
            block: BLOCK,
            shmem: 0,
        }
    }

    /// An element-wise launch (one thread per item up to [`MAX_ELEM_BLOCKS`] blocks).
    pub(crate) fn elems(n: u64) -> Self {
        Self::over(n, MAX_ELEM_BLOCKS)
    }

    /// A partial-sum launch (at most [`MAX_PARTIAL_BLOCKS`] blocks, one partial each).
    pub(crate) fn partials(n: u64) -> Self {
        Self::over(n, MAX_PARTIAL_BLOCKS)
    }

    /// One block (the finalize kernels).
    pub(crate) fn single() -> Self {
        Self::over(1, 1)
    }

    pub(crate) fn with_shmem(self, bytes: usize) -> Self {
        Self {
            shmem: bytes as u32,
            ..self
        }
    }
}

/// Element types a backend stores in a candle tensor (the float dtypes and the label types).
#[cfg(feature = "cuda")]
pub(crate) trait DevElem:
    candle_core::WithDType
    + candle_core::cuda_backend::CudaDType
    + candle_core::cuda_backend::cudarc::driver::DeviceRepr
    + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
}
#[cfg(feature = "cuda")]
impl<T> DevElem for T where
    T: candle_core::WithDType
        + candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
}
/// Element types a backend stores in a candle tensor (the float dtypes and the label types).
#[cfg(not(feature = "cuda"))]
pub(crate) trait DevElem: candle_core::WithDType {}
#[cfg(not(feature = "cuda"))]
impl<T: candle_core::WithDType> DevElem for T {}

/// A backend of the launch layer.
pub(crate) trait Gpu {
    /// The storage of candle tensors this backend computes on.
    type Storage;
    /// Device memory of 64-bit words (scratch: partial sums, counters, error flags, uploads).
    type Words;
    /// Device memory of `T` that becomes a tensor (a kernel output).
    type Out<T: DevElem>;

    /// The dtype of a tensor storage.
    fn dtype(&self, s: &Self::Storage) -> DType;
    /// Address of the first element of a contiguous kernel input.
    fn input<T: DevElem>(&self, loss: &str, s: &Self::Storage, l: &Layout) -> Result<u64>;
    /// Address of the first element of a small contiguous parameter tensor held by an op
    /// (class weights, bin weights): where a view starts, not where its storage starts.
    fn tensor<T: DevElem>(&self, loss: &str, t: &Tensor) -> Result<u64>;
    /// `len` zeroed words.
    fn words(&self, len: usize) -> Result<Self::Words>;
    /// A copy of host words.
    fn upload(&self, v: &[u64]) -> Result<Self::Words>;
    /// The words back on the host (synchronises).
    fn download(&self, w: &Self::Words) -> Result<Vec<u64>>;
    fn words_addr(&self, w: &Self::Words) -> u64;
    /// An output of `len` elements the kernels overwrite completely (its initial contents are
    /// unspecified: NaN under emulation, so an element left unwritten shows).
    fn output<T: DevElem>(&self, len: usize) -> Result<Self::Out<T>>;
    /// An output of `len` zeros (for kernels that accumulate into it).
    fn zeros<T: DevElem>(&self, len: usize) -> Result<Self::Out<T>>;
    fn out_addr<T: DevElem>(&self, o: &Self::Out<T>) -> u64;
    /// The output as a tensor storage.
    fn storage<T: DevElem>(&self, o: Self::Out<T>) -> Self::Storage;
    /// A storage holding the host values `v`.
    fn storage_from<T: DevElem>(&self, v: Vec<T>) -> Result<Self::Storage>;
    /// Launches kernel `name` of `module` with the parameter struct `p`.
    fn launch<P: KernelParams>(
        &self,
        module: &Module,
        name: &str,
        cfg: Launch,
        p: &P,
    ) -> Result<()>;
}

/// Uploads `f64` values as words (one word when empty: no zero-size allocation).
pub(crate) fn upload_f64<G: Gpu>(g: &G, v: &[f64]) -> Result<G::Words> {
    if v.is_empty() {
        return g.words(1);
    }
    g.upload(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
}

/// The kernel-name suffix of a float dtype.
pub(crate) fn dtype_suffix(loss: &str, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("{loss}: unsupported dtype {d:?}"),
    })
}

/// The kernel-name suffix of a target kind (`dense`, `u32`, `i64`).
pub(crate) fn target_suffix(k: crate::targets::TargetKind) -> &'static str {
    use crate::targets::TargetKind;
    match k {
        TargetKind::Dense => "dense",
        TargetKind::DenseI64 => "densei64",
        TargetKind::LabelsU32 => "u32",
        TargetKind::LabelsI64 => "i64",
    }
}

/// Address of the targets: dense targets in the logits' type `T`, or `u32` / `i64` labels.
pub(crate) fn targets_addr<G: Gpu, T: DevElem>(
    g: &G,
    loss: &str,
    kind: crate::targets::TargetKind,
    s: &G::Storage,
    l: &Layout,
) -> Result<u64> {
    use crate::targets::TargetKind;
    match kind {
        TargetKind::Dense => g.input::<T>(loss, s, l),
        TargetKind::LabelsU32 => g.input::<u32>(loss, s, l),
        TargetKind::DenseI64 | TargetKind::LabelsI64 => g.input::<i64>(loss, s, l),
    }
}

/// Error codes of the `[code, a, b]` buffer (`kernels/common.cuh`).
pub(crate) const ERR_LABEL: u64 = 1;
pub(crate) const ERR_TARGET: u64 = 2;
pub(crate) const ERR_POSITIVE: u64 = 3;

/// An error a kernel raised: `code`, and two words whose meaning depends on it (a label value;
/// a flat index and a value's f64 bits).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelError {
    pub code: u64,
    pub a: u64,
    pub b: u64,
}

impl KernelError {
    /// The label error message of every loss (`max_label` inclusive).
    pub(crate) fn label(&self, loss: &str, max_label: usize) -> String {
        format!(
            "{loss}: label {} out of range 0..={max_label} (or -1 to ignore)",
            self.a as i64
        )
    }

    /// The value carried in `b`.
    pub(crate) fn value(&self) -> f64 {
        f64::from_bits(self.b)
    }
}

/// The error buffer of a launch sequence.
pub(crate) struct ErrorFlag<G: Gpu>(G::Words);

impl<G: Gpu> ErrorFlag<G> {
    pub(crate) fn new(g: &G) -> Result<Self> {
        Ok(Self(g.words(3)?))
    }

    pub(crate) fn addr(&self, g: &G) -> u64 {
        g.words_addr(&self.0)
    }

    /// Reads the flag back (synchronises) and turns a raised error into an `Err` with the
    /// message `msg` gives for it.
    pub(crate) fn check(&self, g: &G, msg: impl FnOnce(KernelError) -> String) -> Result<()> {
        let v = g.download(&self.0)?;
        match v.as_slice() {
            [0, ..] => Ok(()),
            [code, a, b, ..] => bail!(
                "{}",
                msg(KernelError {
                    code: *code,
                    a: *a,
                    b: *b
                })
            ),
            _ => bail!("internal error: short error buffer"),
        }
    }

    /// [`Self::check`] for kernels whose only error is an invalid label.
    pub(crate) fn check_labels(&self, g: &G, loss: &str, max_label: usize) -> Result<()> {
        self.check(g, |e| e.label(loss, max_label))
    }
}

/// The per-block partial sums of a scalar reduction (`psum`, and `pden` for a denominator
/// computed on the device), for a partial-sum launch over `n` items.
pub(crate) struct Partials<G: Gpu> {
    pub cfg: Launch,
    pub psum: G::Words,
    pub pden: G::Words,
}

impl<G: Gpu> Partials<G> {
    pub(crate) fn new(g: &G, n: u64) -> Result<Self> {
        let cfg = Launch::partials(n);
        Ok(Self {
            cfg,
            psum: g.words(cfg.grid as usize)?,
            pden: g.words(cfg.grid as usize)?,
        })
    }
}

/// How the finalize kernel scales the summed partials: `out = scale · Σ psum`, divided by
/// `Σ pden · den_mult` when `use_den` (0 when that is 0).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scale {
    pub scale: f64,
    pub use_den: bool,
    pub den_mult: f64,
}

impl Scale {
    /// A factor known on the host (Sum: 1, AvgFactor(f): 1/f, Mean of a known count).
    pub(crate) fn host(scale: f64) -> Self {
        Self {
            scale,
            use_den: false,
            den_mult: 1.0,
        }
    }

    /// Mean over a denominator summed on the device (times `den_mult`).
    pub(crate) fn device(den_mult: f64) -> Self {
        Self {
            scale: 1.0,
            use_den: true,
            den_mult,
        }
    }
}

/// The one finalize step of every scalar reduction: the rank-0 result of dtype `T` from the
/// partials, and the factor it applied into `scale_out` when given (the backward of a Mean
/// whose denominator lives on the device reads it).
pub(crate) fn finalize<G: Gpu, T: DevElem>(
    g: &G,
    loss: &str,
    parts: &Partials<G>,
    scale: Scale,
    scale_out: Option<&G::Words>,
) -> Result<G::Out<T>> {
    let out = g.output::<T>(1)?;
    let p = params::FinalizeParams {
        psum: g.words_addr(&parts.psum),
        pden: g.words_addr(&parts.pden),
        out: g.out_addr(&out),
        scale_out: scale_out.map_or(0, |w| g.words_addr(w)),
        nparts: parts.cfg.grid as u64,
        scale: scale.scale,
        den_mult: scale.den_mult,
        use_den: scale.use_den as i32,
    };
    let name = format!("finalize_{}", dtype_suffix(loss, T::DTYPE)?);
    g.launch(&COMMON, &name, Launch::single(), &p)?;
    Ok(out)
}

/// A float element type of the kernels whose accumulator type is also a device element type
/// (f32, f64, f16, bf16).
pub(crate) trait DevFloat: Elem<A: DevElem> + DevElem {}
impl<T: Elem<A: DevElem> + DevElem> DevFloat for T {}

/// A kernel input on backend `G`.
pub(crate) type In<'a, G> = Arg<'a, <G as Gpu>::Storage>;
/// What a launch plan returns: the output storage on backend `G` and its shape.
pub(crate) type Out<G> = Result<(<G as Gpu>::Storage, Shape)>;

/// The inputs of a forward launch plan: the float input `x`, the second input `t`, and the
/// weight `w` of a `forward_weighted` call (its address: [`crate::weight::addr`]).
pub(crate) struct FwdIn<'a, G: Gpu> {
    pub x: In<'a, G>,
    pub t: In<'a, G>,
    pub w: Option<&'a crate::weight::Weight>,
}

/// The inputs of a backward launch plan: the float input `x`, the second input `t` (targets,
/// labels, target boxes) and the upstream gradient `up`.
pub(crate) struct BwdIn<'a, G: Gpu> {
    pub x: In<'a, G>,
    pub t: In<'a, G>,
    pub up: In<'a, G>,
    pub w: Option<&'a crate::weight::Weight>,
}

/// A kernel input: a storage of the backend and its layout.
pub(crate) struct Arg<'a, S> {
    pub s: &'a S,
    pub l: &'a Layout,
}

/// `Arg { s, l }`.
pub(crate) fn arg<'a, S>(s: &'a S, l: &'a Layout) -> Arg<'a, S> {
    Arg { s, l }
}

/// The forward parameter structs that take an output (`out`, Reduction::None) or per-block
/// partial sums (`psum`, `pden`).
pub(crate) trait ForwardParams: KernelParams {
    fn set_out(&mut self, out: u64);
    fn set_partials(&mut self, psum: u64, pden: u64);
}

/// The forward of a loss whose kernels loop grid-stride over `items`:
/// `{prefix}_fwd_none_{suffix}` writes one loss per item into an output of `none_shape`, or
/// `{prefix}_fwd_partial_{suffix}` writes per-block partial sums that [`finalize`] scales as
/// `scale` says.
pub(crate) struct ForwardPlan<'a> {
    pub module: &'a Module,
    pub prefix: &'a str,
    pub suffix: &'a str,
    pub items: u64,
    pub none_shape: Shape,
    /// `None` for `Reduction::None`.
    pub scale: Option<Scale>,
}

impl ForwardPlan<'_> {
    /// Launches the plan with the parameters `p` (their `out` / `psum` / `pden` filled here).
    pub(crate) fn run<G: Gpu, T: DevElem, P: ForwardParams>(
        &self,
        g: &G,
        loss: &str,
        mut p: P,
    ) -> Result<(G::Storage, Shape)> {
        let Some(scale) = self.scale else {
            let out = g.output::<T>(self.none_shape.elem_count())?;
            p.set_out(g.out_addr(&out));
            if self.items > 0 {
                let name = format!("{}_fwd_none_{}", self.prefix, self.suffix);
                g.launch(self.module, &name, Launch::elems(self.items), &p)?;
            }
            return Ok((g.storage(out), self.none_shape.clone()));
        };
        let parts = Partials::new(g, self.items)?;
        p.set_partials(g.words_addr(&parts.psum), g.words_addr(&parts.pden));
        if self.items > 0 {
            let name = format!("{}_fwd_partial_{}", self.prefix, self.suffix);
            g.launch(self.module, &name, parts.cfg, &p)?;
        }
        let out = finalize::<G, T>(g, loss, &parts, scale, None)?;
        Ok((g.storage(out), Shape::from(())))
    }
}

/// Checks that an upstream gradient has one element (scalar reductions) or `n`.
pub(crate) fn check_upstream(loss: &str, up: &Layout, scalar: bool, n: usize) -> Result<()> {
    let want = if scalar { 1 } else { n };
    let got = up.shape().elem_count();
    if got != want {
        bail!("{loss}: upstream gradient has {got} elements, expected {want}")
    }
    Ok(())
}
