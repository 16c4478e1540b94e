//! The CPU execution pieces every kernel uses: the deterministic chunking ([`CHUNK_ELEMS`],
//! [`rows_per_chunk`]: chunk partials merged in chunk order, so results do not depend on the
//! thread count), the chunked rayon loops ([`map_chunks`], [`sum_chunks`]), vectorisable
//! fixed-order lane sums ([`lane_sum`], [`lane_max`]), zeroed huge-page output buffers
//! ([`zeroed_vec`]), the AVX-512 / AVX2 dispatch ([`vectorized`]) and the scaling by a scalar upstream
//! gradient ([`scale_in_place`], [`apply_scalar_upstream`]).

use crate::dtype::{Acc, Elem, ZeroIsValid};
use crate::op::{CpuOut, SavedGrad};
use candle_core::{bail, Result, Shape};
use rayon::prelude::*;

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

/// Rows (or elements) of this many scalars form one rayon task. The chunking depends only on
/// the problem size, never on the thread count, so chunk partial sums merged in chunk order give
/// bitwise identical results for any `RAYON_NUM_THREADS`.
pub(crate) const CHUNK_ELEMS: usize = 16 * 1024;

/// Rows per rayon task for rows of `row_len` scalars.
pub(crate) fn rows_per_chunk(row_len: usize) -> usize {
    (CHUNK_ELEMS / row_len.max(1)).max(1)
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

/// The widest vector instruction set the element loops are compiled for, chosen once: the best
/// the CPU has (AVX-512F, AVX2, or the baseline SSE2), capped by the environment variable
/// `CANDLE_DETLOSS_SIMD` (`avx512`, `avx2` or `baseline`; for benchmarks and for the test that
/// the three builds give the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    Baseline,
    Avx2,
    Avx512,
}

/// The [`Simd`] level of this process.
pub(crate) fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let best = if std::arch::is_x86_feature_detected!("avx512f") {
            Simd::Avx512
        } else if std::arch::is_x86_feature_detected!("avx2") {
            Simd::Avx2
        } else {
            Simd::Baseline
        };
        #[cfg(not(target_arch = "x86_64"))]
        let best = Simd::Baseline;
        let cap = match std::env::var("CANDLE_DETLOSS_SIMD").as_deref() {
            Ok("baseline") => Simd::Baseline,
            Ok("avx2") => Simd::Avx2,
            _ => Simd::Avx512,
        };
        best.min(cap)
    })
}

/// Runs `f` in a function compiled for AVX-512F or AVX2 when the CPU has it ([`simd`]), else
/// as is. `f` must be `#[inline(always)]` code down to its loops for the wider vectors to be
/// used. The results are bitwise the same either way: only `+ - * /`, compares and selects,
/// which AVX-512 and AVX2 compute as SSE2 does (Rust never contracts `a * b + c` into an FMA,
/// and the kernels call no `mul_add`); `tests/simd_builds.rs` checks it.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match simd() {
            // SAFETY: `simd` found AVX-512F on this CPU.
            Simd::Avx512 => return unsafe { avx512(f) },
            // SAFETY: `simd` found AVX2 on this CPU.
            Simd::Avx2 => return unsafe { avx2(f) },
            Simd::Baseline => {}
        }
    }
    f()
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

/// `f(ci, chunk)` on the `chunk_len`-element chunks of `out` in parallel, each under
/// [`vectorized`]; the results in chunk order (the first error wins). `f` should be an
/// `#[inline(always)]` closure so that its loops are compiled for AVX2.
#[inline(always)]
pub(crate) fn map_chunks<T: Send, R: Send>(
    out: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let res: Vec<Result<R>> = out
        .par_chunks_mut(chunk_len.max(1))
        .enumerate()
        .map(|(ci, o)| {
            vectorized(
                #[inline(always)]
                || f(ci, o),
            )
        })
        .collect();
    res.into_iter().collect()
}

/// A scalar loss over `n` rows of `k` elements in chunks of `rpc` rows: `chunk(ci, g)` returns
/// chunk `ci`'s loss sum and, with `saved` (the fused training step), writes its rows of the
/// gradient into `g` (`None` without). The sums are merged in chunk order and times `scale`;
/// the gradient `[n, k]` goes to `saved`.
#[inline(always)]
pub(crate) fn scalar_rows<T: Elem + ZeroIsValid>(
    (n, k, rpc): (usize, usize, usize),
    scale: f64,
    saved: Option<&SavedGrad>,
    chunk: impl Fn(usize, Option<&mut [T]>) -> Result<f64> + Sync,
) -> CpuOut {
    let sums = match saved {
        Some(saved) => {
            let mut g = zeroed_vec::<T>(n * k)?;
            let sums = map_chunks(&mut g, rpc * k, |ci, gc| chunk(ci, Some(gc)))?;
            saved.put(T::to_cpu_storage_owned(g), Shape::from((n, k)));
            sums
        }
        None => map_indices(n.div_ceil(rpc), |ci| chunk(ci, None))?,
    };
    let total = ordered_sum(&sums) * scale;
    let out = vec![T::from_acc(T::A::from_f64(total))];
    Ok((T::to_cpu_storage_owned(out), Shape::from(())))
}

/// `f(ci)` for the chunks `0..chunks` in parallel, each under [`vectorized`]; the results in
/// chunk order (the first error wins).
#[inline(always)]
pub(crate) fn map_indices<R: Send>(
    chunks: usize,
    f: impl Fn(usize) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let res: Vec<Result<R>> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            vectorized(
                #[inline(always)]
                || f(ci),
            )
        })
        .collect();
    res.into_iter().collect()
}

/// The arithmetic floor of the sigmoid focal loss's training step, for the benchmarks: the
/// same bytes (logits, and dense targets when given, read once; a gradient-sized output
/// written once, from [`zeroed_vec`]) and the same transcendental count per element as the
/// fused pass — `e^{-|x|}`, `log(1 + e)`, one division and `e^{γ·ln q}` (two exp, one log1p,
/// one division); with targets also the soft target's `ln q` and its second division — through
/// the same fast math, chunks and vector dispatch, and nothing else. Returns the sum of one
/// term per element (so nothing is optimised away).
pub(crate) fn focal_arithmetic_floor(x: &[f32], t: Option<&[f32]>, out: &mut [f32]) -> Result<f64> {
    use crate::fastmath::{exp_f32, exp_neg_abs, ln_f32, log1p_unit};
    const B: usize = 256;
    let sums = map_chunks(
        out,
        CHUNK_ELEMS,
        #[inline(always)]
        |ci, o| {
            let mut buf = [0f32; B];
            let mut s = 0f64;
            for (k, ob) in o.chunks_mut(B).enumerate() {
                let at = ci * CHUNK_ELEMS + k * B;
                let xb = x.get(at..at + ob.len()).unwrap_or(&[]);
                match t.and_then(|t| t.get(at..at + ob.len())) {
                    None => {
                        for ((g, b), &x) in ob.iter_mut().zip(buf.iter_mut()).zip(xb) {
                            let e = exp_neg_abs(x); // exp
                            let lp = log1p_unit(e); // log1p
                            let inv = 1.0 / (1.0 + e); // division
                            *g = exp_f32(-2.0 * lp) * inv; // exp
                            *b = lp;
                        }
                    }
                    Some(tb) => {
                        for (((g, b), &x), &t) in ob.iter_mut().zip(buf.iter_mut()).zip(xb).zip(tb)
                        {
                            let e = exp_neg_abs(x); // exp
                            let lp = log1p_unit(e); // log1p
                            let inv = 1.0 / (1.0 + e); // division
                            let q = t * inv + (1.0 - t) * e * inv;
                            let m = exp_f32(2.0 * ln_f32(q)); // the soft target's ln q, exp
                            *g = m * (inv / q); // its second division
                            *b = lp * t;
                        }
                    }
                }
                s += lane_sum(&buf[..ob.len()]) as f64;
            }
            Ok(s)
        },
    )?;
    Ok(ordered_sum(&sums))
}
