//! Pieces every loss shares: the element / accumulator traits the CPU kernels are generic over,
//! input validation with messages that name the loss, and access to contiguous CPU slices.

use crate::fastmath;
use candle_core::{bail, CpuStorage, DType, DeviceLocation, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Runs `$body` with `$t` bound to the Rust type of the float dtype `$dtype`; other dtypes are
/// an error naming `$loss`.
macro_rules! with_float_type {
    ($loss:expr, $dtype:expr, $t:ident, $body:block) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $loss),
        }
    };
}

/// `impl CustomOp3` for the backward op `$op(params)` of a sigmoid-type loss over
/// `(logits [N, C], targets as CpuTargets, upstream)`: on the CPU
/// `params.cpu_bwd_t(x, &targets, upstream, n, c)`, on CUDA (and under `cuda-emu`) the
/// calling module's launch plan `gpu::backward(backend, &params, x, targets, upstream)`.
macro_rules! targets_backward_op {
    ($op:ident, $op_name:literal, $loss:expr) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $op_name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                use candle_core::backend::BackendStorage;
                $crate::common::emulate!($op_name, |g| gpu::backward(
                    g,
                    &self.0,
                    $crate::gpu::arg(s1, l1),
                    $crate::gpu::arg(s2, l2),
                    $crate::gpu::arg(s3, l3)
                ));
                let (n, c) = $crate::common::layout_dims2($loss, l1)?;
                $crate::common::with_float_type!($loss, s1.dtype(), T, {
                    let x = $crate::common::cpu_slice::<T>($loss, s1, l1)?;
                    let tg = $crate::common::CpuTargets::<T>::new($loss, self.0.kind, s2, l2)?;
                    let up = $crate::common::cpu_slice::<T>($loss, s3, l3)?;
                    self.0.cpu_bwd_t(x, &tg, up, n, c)
                })
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CudaStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CudaStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                gpu::backward(
                    &$crate::gpu::cuda::Cuda::of(s1),
                    &self.0,
                    $crate::gpu::arg(s1, l1),
                    $crate::gpu::arg(s2, l2),
                    $crate::gpu::arg(s3, l3),
                )
            }
        }
    };
}

/// In a `cpu_fwd`: under the `cuda-emu` feature (while the emulation is active) returns the
/// result of the op's CUDA launch plan `$plan` run on the emulated backend `$g`, in both thread
/// orders (see `gpu::emu::run`); nothing in other builds.
macro_rules! emulate {
    ($op:expr, |$g:ident| $plan:expr) => {
        #[cfg(feature = "cuda-emu")]
        if $crate::gpu::emu::active() {
            return $crate::gpu::emu::run($op, |$g| $plan);
        }
    };
}

/// Whether CPU tensors run through the CPU kernels (false while the `cuda-emu` emulation is
/// active: they then take the CUDA launch code).
pub(crate) fn cpu_kernels() -> bool {
    #[cfg(feature = "cuda-emu")]
    {
        !crate::gpu::emu::active()
    }
    #[cfg(not(feature = "cuda-emu"))]
    {
        true
    }
}

#[allow(unused_imports)]
pub(crate) use {emulate, targets_backward_op, with_float_type};

/// Rows (or elements) of this many scalars form one rayon task. The chunking depends only on
/// the problem size, never on the thread count, so chunk partial sums merged in chunk order give
/// bitwise identical results for any `RAYON_NUM_THREADS`.
pub(crate) const CHUNK_ELEMS: usize = 16 * 1024;

/// Rows per rayon task for rows of `row_len` scalars.
pub(crate) fn rows_per_chunk(row_len: usize) -> usize {
    (CHUNK_ELEMS / row_len.max(1)).max(1)
}

/// The accumulator type of the CPU kernels: `f32` (for f32, f16, bf16 inputs) or `f64`.
/// (Each loss uses the subset of the math it needs.)
#[allow(dead_code)]
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn log1p(self) -> Self;
    /// `e^{-|x|}` (in `[0, 1]`).
    fn exp_neg_abs(self) -> Self;
    /// `ln(1 + e)` for `e ∈ [0, 1]` (cheaper than `log1p` on that range).
    fn log1p_unit(self) -> Self;
    fn abs(self) -> Self;
    /// `max(self, 0)`, NaN-propagating is not required (callers add a NaN-carrying term).
    fn relu(self) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        fastmath::exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        fastmath::ln_f32(self)
    }
    #[inline(always)]
    fn log1p(self) -> Self {
        fastmath::log1p_f32(self)
    }
    #[inline(always)]
    fn exp_neg_abs(self) -> Self {
        fastmath::exp_neg_abs(self)
    }
    #[inline(always)]
    fn log1p_unit(self) -> Self {
        fastmath::log1p_unit(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn relu(self) -> Self {
        if self > 0.0 {
            self
        } else {
            0.0
        }
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn log1p(self) -> Self {
        f64::ln_1p(self)
    }
    #[inline(always)]
    fn exp_neg_abs(self) -> Self {
        f64::exp(-f64::abs(self))
    }
    #[inline(always)]
    fn log1p_unit(self) -> Self {
        f64::ln_1p(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn relu(self) -> Self {
        if self > 0.0 {
            self
        } else {
            0.0
        }
    }
}

/// A floating-point element type of an input tensor, with the type it is computed in.
pub(crate) trait Elem: WithDType + Copy + Send + Sync + ZeroIsValid {
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $acc:ty, $to:expr, $from:expr) => {
        impl Elem for $t {
            type A = $acc;
            #[inline(always)]
            fn to_acc(self) -> $acc {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(a: $acc) -> Self {
                $from(a)
            }
        }
    };
}
impl_elem!(f32, f32, |x| x, |a| a);
impl_elem!(f64, f64, |x| x, |a| a);
impl_elem!(f16, f32, f16::to_f32, f16::from_f32);
impl_elem!(bf16, f32, bf16::to_f32, bf16::from_f32);

/// The dtype the kernels accumulate in for inputs of `dtype` (f64 stays f64, the rest use f32).
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// An integer label type: `u32` (no ignore value) or `i64` (`-1` = ignore).
pub(crate) trait Label: Copy + Send + Sync {
    fn get(self) -> i64;
}
impl Label for u32 {
    #[inline(always)]
    fn get(self) -> i64 {
        self as i64
    }
}
impl Label for i64 {
    #[inline(always)]
    fn get(self) -> i64 {
        self
    }
}

/// Decoded integer label of one row, for losses whose label `c == num_classes` is background.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowLabel {
    /// `-1`: the row contributes nothing and gets a zero gradient.
    Ignored,
    /// `0..C` a class, `C` background (every column negative).
    Class(usize),
}

/// Decodes `label` against `max_label` (inclusive): `-1` is ignored, anything else outside
/// `0..=max_label` is an error naming the loss.
#[inline(always)]
pub(crate) fn decode_label(loss: &str, label: i64, max_label: usize) -> Result<RowLabel> {
    if label == -1 {
        Ok(RowLabel::Ignored)
    } else if label >= 0 && (label as u64) <= max_label as u64 {
        Ok(RowLabel::Class(label as usize))
    } else {
        bail!("{loss}: label {label} out of range 0..={max_label} (or -1 to ignore)")
    }
}

/// The contiguous slice of `T` behind a CPU storage and its layout.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    loss: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{loss}: internal error, kernel input is not contiguous"),
    }
}

/// `(rows, cols)` of a kernel input's layout, which must be of rank 2.
pub(crate) fn layout_dims2(loss: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, c] => Ok((*n, *c)),
        d => bail!("{loss}: logits must have shape [N, C], got {d:?}"),
    }
}

/// The targets of one row, as the CPU kernels see them.
pub(crate) enum RowTarget<'a, T> {
    Dense(&'a [T]),
    Label(RowLabel),
}

/// Typed CPU view of the targets next to `[N, C]` logits.
pub(crate) enum CpuTargets<'a, T> {
    Dense(&'a [T]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl<'a, T: Elem> CpuTargets<'a, T> {
    pub(crate) fn new(loss: &str, kind: TargetKind, s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        Ok(match kind {
            TargetKind::Dense => Self::Dense(cpu_slice(loss, s, l)?),
            TargetKind::LabelsU32 => Self::U32(cpu_slice(loss, s, l)?),
            TargetKind::LabelsI64 => Self::I64(cpu_slice(loss, s, l)?),
        })
    }

    /// Row `i` (dense values, or its decoded label against `c` = background).
    #[inline(always)]
    pub(crate) fn row(&self, loss: &str, i: usize, c: usize) -> Result<RowTarget<'a, T>> {
        Ok(match self {
            Self::Dense(d) => RowTarget::Dense(&d[i * c..(i + 1) * c]),
            Self::U32(v) => RowTarget::Label(decode_label(loss, v[i].get(), c)?),
            Self::I64(v) => RowTarget::Label(decode_label(loss, v[i].get(), c)?),
        })
    }

    /// Number of non-ignored rows.
    pub(crate) fn valid_rows(&self, loss: &str, n: usize, c: usize) -> Result<usize> {
        match self {
            Self::Dense(_) => Ok(n),
            Self::U32(_) | Self::I64(_) => {
                let mut k = 0;
                for i in 0..n {
                    if let RowTarget::Label(RowLabel::Class(_)) = self.row(loss, i, c)? {
                        k += 1;
                    }
                }
                Ok(k)
            }
        }
    }
}

/// Checks that `t` is a float tensor of rank 2 and returns `(rows, cols)`.
pub(crate) fn check_float_2d(loss: &str, what: &str, t: &Tensor) -> Result<(usize, usize)> {
    check_float(loss, what, t)?;
    match t.dims() {
        [n, c] => Ok((*n, *c)),
        d => bail!("{loss}: {what} must have shape [N, C], got {d:?}"),
    }
}

/// Checks that `t` has one of the float dtypes the kernels support.
pub(crate) fn check_float(loss: &str, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        d => bail!("{loss}: {what} must be f32, f64, f16 or bf16, got {d:?}"),
    }
}

/// Checks that `t` lives on a device the crate has kernels for (the CPU, or CUDA under the
/// `cuda` feature). Called first by every public `forward*`, so a `Device::Metal` tensor gets an
/// error naming the loss instead of candle's generic "no metal implementation" from deep inside
/// the op.
pub(crate) fn check_supported_device(loss: &str, t: &Tensor) -> Result<()> {
    check_supported_location(loss, t.device().location())
}

/// The decision behind [`check_supported_device`], on a [`DeviceLocation`] (which, unlike a
/// `Device::Metal`, can be constructed on any platform, so the Metal branch is unit-tested).
pub(crate) fn check_supported_location(loss: &str, location: DeviceLocation) -> Result<()> {
    match location {
        DeviceLocation::Cpu | DeviceLocation::Cuda { .. } => Ok(()),
        DeviceLocation::Metal { .. } => {
            bail!("{loss}: Metal devices are not supported (use Device::Cpu or Device::Cuda)")
        }
    }
}

/// Checks that the class weights `w` have the logits' dtype or f32 (the dtype
/// [`crate::class_balanced_weights`] returns); either way the kernels read them in the
/// accumulation dtype (f32 for f32/f16/bf16 logits, f64 for f64 logits), so f32 weights keep
/// their f32 value with half-precision logits.
pub(crate) fn check_class_weights_dtype(loss: &str, logits: DType, w: DType) -> Result<()> {
    if w != logits && w != DType::F32 {
        bail!("{loss}: class_weights dtype {w:?} must be the logits dtype {logits:?} or F32")
    }
    Ok(())
}

/// Checks that `b` lives on the same device as `a`.
pub(crate) fn check_same_device(loss: &str, what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if !a.device().same_device(b.device()) {
        bail!(
            "{loss}: {what} is on {:?} but the logits are on {:?}",
            b.device().location(),
            a.device().location()
        )
    }
    Ok(())
}

/// Checks that a non-negative hyper-parameter is finite and >= 0.
pub(crate) fn check_non_negative(loss: &str, name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{loss}: {name} must be finite and >= 0, got {v}")
    }
    Ok(())
}

/// Builds the per-label row-weight vector of length `c + 1` in the accumulator dtype of
/// `logits`: `w[0..c]` the class weights (1 when absent), `w[c]` the background row weight
/// (the `c+1`-th given weight, else 1). The weights come in the logits' dtype or f32.
pub(crate) fn row_weights(
    loss: &str,
    logits: &Tensor,
    c: usize,
    class_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let acc = acc_dtype(logits.dtype());
    let dev = logits.device();
    let Some(w) = class_weights else {
        return Tensor::ones(c + 1, acc, dev);
    };
    check_same_device(loss, "class_weights", logits, w)?;
    check_class_weights_dtype(loss, logits.dtype(), w.dtype())?;
    let len = match w.dims() {
        [len] => *len,
        d => bail!("{loss}: class_weights must have shape [C] or [C+1] (C = {c}), got {d:?}"),
    };
    let w = w.to_dtype(acc)?;
    if len == c {
        Tensor::cat(&[&w, &Tensor::ones(1, acc, dev)?], 0)
    } else if len == c + 1 {
        w.contiguous()
    } else {
        bail!(
            "{loss}: class_weights has length {len}, expected C = {c} or C+1 = {}",
            c + 1
        )
    }
}

/// The kind of targets passed next to `[N, C]` logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    /// Float targets with the logits' shape and dtype.
    Dense,
    /// `u32` labels `[N]`.
    LabelsU32,
    /// `i64` labels `[N]` (`-1` = ignored).
    LabelsI64,
}

/// Classifies and validates `targets` against logits of shape `[n, c]`.
pub(crate) fn target_kind(
    loss: &str,
    logits: &Tensor,
    targets: &Tensor,
    n: usize,
    c: usize,
) -> Result<TargetKind> {
    check_same_device(loss, "targets", logits, targets)?;
    match targets.dtype() {
        DType::U32 | DType::I64 => {
            if targets.dims() != [n] {
                bail!(
                    "{loss}: integer labels must have shape [N] = [{n}] next to logits [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Ok(if targets.dtype() == DType::U32 {
                TargetKind::LabelsU32
            } else {
                TargetKind::LabelsI64
            })
        }
        d if d == logits.dtype() => {
            if targets.dims() != [n, c] {
                bail!(
                    "{loss}: dense targets must have the logits' shape [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Ok(TargetKind::Dense)
        }
        d => bail!(
            "{loss}: targets must be u32/i64 labels [N] or {:?} dense targets [N, C], got dtype {d:?}",
            logits.dtype()
        ),
    }
}

/// Lanes of the vectorisable sums: enough for AVX-512 f32, a multiple of SSE/AVX widths.
pub(crate) const LANES: usize = 16;

/// `Σ v[j]` in a fixed order that LLVM can vectorise: `LANES` independent partial sums (lane
/// `l` takes the elements `j ≡ l mod LANES`), combined in lane order, then the tail. The order
/// depends only on `v.len()`, so the result is deterministic.
#[inline(always)]
pub(crate) fn lane_sum<A: Acc>(v: &[A]) -> A {
    let mut acc = [A::ZERO; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += *x;
        }
    }
    let tail = chunks.remainder().iter().fold(A::ZERO, |s, x| s + *x);
    acc.iter().fold(A::ZERO, |s, a| s + *a) + tail
}

/// `max(init, max_j v[j])` with `LANES` independent lane maxima (vectorisable); NaN elements
/// are never selected.
#[inline(always)]
pub(crate) fn lane_max<A: Acc>(v: &[A], init: A) -> A {
    let mut acc = [init; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    let pick = |a: A, x: &A| if *x > a { *x } else { a };
    let tail = chunks.remainder().iter().fold(init, pick);
    acc.iter().fold(tail, pick)
}

/// Sums chunk partials in chunk order (the fixed order that makes reductions deterministic).
pub(crate) fn ordered_sum(parts: &[f64]) -> f64 {
    parts.iter().fold(0.0, |a, b| a + b)
}

/// A vector of `len` zeros for a large kernel output. The allocation is zeroed by the allocator
/// (for large sizes fresh pages from the OS, so no fill pass) and, on Linux, advised as huge
/// pages before anything touches it, so the kernel writing it takes one page fault per 2 MiB
/// instead of one per 4 KiB (measured here: 64 MB allocated and written by 2 threads in
/// 5.7 ms instead of 28 ms).
pub(crate) fn zeroed_vec<T: ZeroIsValid>(len: usize) -> Result<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(len)
        .map_err(|_| candle_core::Error::Msg(format!("buffer of {len} elements is too large")))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        bail!("out of memory allocating {} bytes", layout.size())
    }
    advise_huge(p, layout.size());
    // SAFETY: `p` is non-null and comes from the global allocator with exactly this layout, as
    // `Vec::from_raw_parts` requires; the all-zero bit pattern is a valid value of every
    // `ZeroIsValid` type, so the `len` elements are initialised.
    Ok(unsafe { Vec::from_raw_parts(p.cast::<T>(), len, len) })
}

/// Types whose all-zero bit pattern is a valid value (+0.0 for the floats), as
/// [`zeroed_vec`] requires.
///
/// # Safety
///
/// Implement only for types where every all-zero byte pattern is a valid value.
pub(crate) unsafe trait ZeroIsValid: Copy {}
// SAFETY: all-zero bits are +0.0 (floats) or 0 (integers).
unsafe impl ZeroIsValid for f32 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for f64 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for f16 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for bf16 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for u32 {}

/// `MADV_HUGEPAGE` on the whole 4 KiB pages inside `[p, p + bytes)` (advice only: errors are
/// ignored, and other targets do nothing).
#[allow(unused_variables)]
fn advise_huge(p: *mut u8, bytes: usize) {
    // Buffers from 4 MiB on: on a VM a first-touch page fault costs microseconds per 4 KiB
    // page, which for a 64 MB gradient outweighs computing it.
    #[cfg(target_os = "linux")]
    if bytes >= 4 << 20 {
        let start = (p as usize).next_multiple_of(4096);
        let end = (p as usize + bytes) & !4095;
        if end > start {
            // SAFETY: the range lies inside one live allocation; MADV_HUGEPAGE changes no
            // contents and no permissions.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// Runs `f` in a function compiled for AVX2 when the CPU has it, else as is. `f` must be
/// `#[inline(always)]` code down to its loops for the wider vectors to be used. The results are
/// bitwise the same either way: only `+ - * /`, compares and selects, which AVX2 computes as
/// SSE2 does (FMA is not enabled, and Rust never contracts `a * b + c`).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// A gradient computed by a forward pass, kept for the backward: when a loss with a scalar
/// reduction is evaluated on a tensor that tracks gradients, one pass over the logits gives
/// the loss and `∂loss/∂logits` (already divided by the reduction's normaliser); the backward
/// then only multiplies by the upstream scalar (no pass at all when it is 1, as for
/// `loss.backward()`).
#[derive(Default)]
pub(crate) struct SavedGrad(std::sync::Mutex<Option<(CpuStorage, candle_core::Shape)>>);

impl SavedGrad {
    pub(crate) fn put(&self, storage: CpuStorage, shape: candle_core::Shape) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some((storage, shape));
        }
    }

    /// The saved gradient times the scalar upstream gradient `up`, or `None` when nothing was
    /// saved (CUDA, or a second backward through the same graph, which then recomputes).
    pub(crate) fn take(&self, loss: &str, up: &Tensor) -> Result<Option<Tensor>> {
        let Some((mut storage, shape)) = self.0.lock().ok().and_then(|mut g| g.take()) else {
            return Ok(None);
        };
        if !up.device().is_cpu() || up.elem_count() != 1 {
            return Ok(None);
        }
        let u = up.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        if u != 1.0 {
            scale_storage(loss, &mut storage, u)?;
        }
        Ok(Some(Tensor::from_storage(
            candle_core::Storage::Cpu(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )))
    }
}

/// The `bwd` of every loss's forward op: the gradient the forward saved (times the upstream
/// gradient) when there is one, else the loss's backward op `bwd` applied to
/// `(x, targets, upstream)`. The targets are constants of the loss: they get no gradient.
pub(crate) fn saved_or_backward(
    loss: &str,
    saved: Option<&SavedGrad>,
    x: &Tensor,
    targets: &Tensor,
    grad_res: &Tensor,
    bwd: &impl candle_core::CustomOp3,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if let Some(g) = match saved {
        Some(saved) => saved.take(loss, grad_res)?,
        None => None,
    } {
        return Ok((Some(g), None));
    }
    let up = grad_res.contiguous()?;
    Ok((Some(x.apply_op3_no_bwd(targets, &up, bwd)?), None))
}

/// `v *= u` in parallel, computed in the accumulator type (how a gradient computed for an
/// upstream gradient of 1 is scaled, whichever pass computed it).
pub(crate) fn scale_in_place<T: Elem>(v: &mut [T], u: f64) {
    let u = T::A::from_f64(u);
    v.par_chunks_mut(CHUNK_ELEMS).for_each(|c| {
        vectorized(
            #[inline(always)]
            || {
                for x in c.iter_mut() {
                    *x = T::from_acc(x.to_acc() * u);
                }
            },
        )
    });
}

/// The CPU backward ops compute the gradient for an upstream gradient of 1; a scalar upstream
/// `up[0] ≠ 1` then scales it here, exactly as a gradient saved by the forward is scaled.
pub(crate) fn apply_scalar_upstream<T: Elem>(g: &mut [T], scalar_up: bool, up: &[T]) {
    if let (true, Some(u)) = (scalar_up, up.first()) {
        let u = u.to_acc().to_f64();
        if u != 1.0 {
            scale_in_place(g, u);
        }
    }
}

/// `s *= u` for a float storage.
fn scale_storage(loss: &str, s: &mut CpuStorage, u: f64) -> Result<()> {
    use scale_in_place as scale;
    match s {
        CpuStorage::F32(v) => scale(v, u),
        CpuStorage::F64(v) => scale(v, u),
        CpuStorage::F16(v) => scale(v, u),
        CpuStorage::BF16(v) => scale(v, u),
        s => bail!(
            "{loss}: unsupported gradient dtype {:?}",
            candle_core::backend::BackendStorage::dtype(&*s)
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metal_location_is_an_error_naming_the_loss() {
        let loc = DeviceLocation::Metal { gpu_id: 0 };
        let err = check_supported_location("SigmoidFocalLoss", loc).unwrap_err();
        // (candle appends a backtrace to the message when RUST_BACKTRACE is set.)
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "SigmoidFocalLoss: Metal devices are not supported (use Device::Cpu or Device::Cuda)"
            ),
            "{msg}"
        );
        assert!(check_supported_location("X", DeviceLocation::Cpu).is_ok());
        assert!(check_supported_location("X", DeviceLocation::Cuda { gpu_id: 1 }).is_ok());
    }

    #[test]
    fn cpu_tensor_passes_the_device_check() -> Result<()> {
        let t = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu)?;
        check_supported_device("X", &t)
    }

    #[test]
    fn class_weights_in_the_logits_dtype_or_f32() {
        for d in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            assert!(check_class_weights_dtype("X", d, d).is_ok());
            assert!(check_class_weights_dtype("X", d, DType::F32).is_ok());
        }
        let err = check_class_weights_dtype("X", DType::F16, DType::F64).unwrap_err();
        assert!(
            err.to_string().starts_with("X: class_weights dtype F64"),
            "{err}"
        );
        assert!(check_class_weights_dtype("X", DType::F32, DType::BF16).is_err());
    }
}
