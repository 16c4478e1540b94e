//! AP-Loss (Chen et al., *Towards Accurate One-Stage Object Detection with AP-Loss*, CVPR 2019)
//! with the error-driven update of the official implementation, in O((N+P) log P) time and
//! O(N+P) memory, and a three-phase API that pools the ranking across devices.
//!
//! # Algorithm
//!
//! Only the P positive scores are sorted. Their 2P window edges `s_i ± δ` cut the real line into
//! 2P+1 buckets; one pass over the negatives drops each into its bucket (a count, and the sum
//! of its offsets from a centre in exact 64-bit fixed point). Because `H` is piecewise linear,
//! prefix sums over the buckets give every `b_i` (and prefix sums over the sorted positives
//! every `a_i`) in O(log P) each; a running max gives the interpolated precisions. The update of
//! a negative `x` is affine in `x` inside each bucket, `α_b + β_b (x - centre)`, with
//! `α_b, β_b` from prefix sums of `f_i / (a_i + b_i)` over the sorted positives; a second pass
//! finds each score's bucket by binary search. Negatives below `min(s_P) - δ` fall into bucket 0
//! and touch nothing. No N×P matrix, no sort of the negatives. On the CPU, `forward` of logits
//! that track gradients is one training step: the bucket pass records each negative's bucket
//! (in a per-thread workspace) and the update pass reuses it, and the backward only scales the
//! saved update.
//!
//! The bucket sums are integers (fixed point with a power-of-two scale chosen from the range of
//! the positives), so merging partial results is exact and order-independent: the CPU result is
//! bitwise identical for any thread count, the CUDA kernels (integer atomics) give the same
//! statistics bit for bit, and shards merged by an all-reduce give exactly the pooled result.

use crate::common::{self, check_float_2d, cpu_slice, decode_label, rows_per_chunk, zeroed_vec};
use crate::common::{Acc, Elem, SavedGrad};
use crate::common::{Label, RowLabel, TargetKind};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Arc;

const NAME: &str = "ApLoss";

thread_local! {
    /// Workspace of [`ApLoss::forward`]'s CPU training step: one bucket id per score, grown to
    /// the largest batch seen on this thread and reused (its contents are rewritten each step).
    static IDS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// AP-Loss of Chen et al. (CVPR 2019): `1 - AP` over all valid anchor×class scores, ranked
/// jointly with a smoothed step, trained with the paper's error-driven update (the official
/// implementation's semantics, including its interpolated precision).
///
/// # Formula
///
/// Let `P` be the positive and `N` the negative elements (ignored elements take no part), `s`
/// the raw logits and `H(x) = clamp(x/(2δ) + 0.5, 0, 1)`. For each positive `i`:
///
/// ```text
/// a_i    = 1 + Σ_{k∈P, k≠i} H(s_k - s_i)          (rank among positives; H(0) = 0.5 for ties)
/// b_i    = Σ_{j∈N} H(s_j - s_i)                   (negatives ranked above i)
/// cur_i  = a_i / (a_i + b_i)
/// prec_i = max(cur_i, prec of every lower-scored positive)   with `interpolate`
///        = cur_i                                             without
/// loss   = 1 - (1/|P|) Σ_i prec_i                 (0 when there is no positive)
/// ```
///
/// The backward pass returns the error-driven update Δx of the paper (not a derivative of the
/// loss), times the upstream gradient: with `L_ij = H(s_j - s_i) / (a_i + b_i)`,
///
/// ```text
/// negative j:  Δx_j = (1/|P|) Σ_i f_i · L_ij
/// positive i:  Δx_i = -(1 - prec_i) / |P|
/// ignored:     0
/// ```
///
/// where, visiting the positives in ascending score order with a running maximum `m` (start 0):
/// `f_i = 1` when `m ≤ cur_i` (then `m = cur_i`; this covers `cur_i = 1`, which always sets the
/// maximum, so `1 - cur_i` is never divided by), else `f_i = (1 - m)/(1 - cur_i)` (which is
/// then in `[0, 1)`); without `interpolate`, `f_i = 1`. This is exactly the update of the
/// official code (`cccorn/AP-loss`, `max_prec <= current_prec` test included).
///
/// Everything is computed in f64 whatever the logits' dtype; the results are rounded to it.
/// A NaN or ±∞ among the valid scores makes the loss and every valid element's update NaN
/// (NaN propagates; ±∞ is treated the same).
///
/// # Shapes
///
/// - `logits`: `[N, C]`, f32 / f64 / f16 / bf16 (reshape `[B, A, C]` to `[B·A, C]`: all
///   scores are ranked jointly).
/// - `targets`: integer labels `[N]` (`u32` or `i64`): `0..C` makes that column positive and the
///   others negative, `C` is background (all negative), `-1` (i64) ignores the row; or dense
///   `[N, C]` in `i64` or in the logits' dtype with values in `{-1, 0, 1}` (`-1` ignores the
///   element, `0` negative, `1` positive).
/// - result: a rank-0 tensor in the logits' dtype; its gradient w.r.t. the logits is the update.
///
/// # Errors
///
/// Every message starts with `ApLoss:`. A tensor on a Metal device (only the CPU and CUDA have
/// kernels); `delta` not finite and `> 0`; logits not of rank 2 or not a float dtype; targets of
/// another shape, dtype or device; a label outside `0..=C` and not `-1`; a dense target not in
/// `{-1, 0, 1}`; in the sharded API, positives not sorted, statistics of different positives or
/// `delta`, or a shard whose positives are missing from the global ones.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::ApLoss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0], [0.2, 0.1, -0.4]], &dev)?;
/// // Row 0 is class 2, row 1 background (label C = 3), row 2 ignored.
/// let labels = Tensor::new(&[2i64, 3, -1], &dev)?;
/// let ap = ApLoss::default();
/// let loss = ap.forward(logits.as_tensor(), &labels)?;
/// // One positive (score 0.5); negatives 2.0 (H = 1) and 1.0 (H = 0.75) rank above it,
/// // -1.0 and -3.0 below, 0.0 gives H = 0.25: prec = 1 / (1 + 2.0) = 1/3.
/// assert!((loss.to_scalar::<f32>()? - 2.0 / 3.0).abs() < 1e-6);
/// let update = loss.backward()?.get(&logits).unwrap().to_vec2::<f32>()?;
/// assert!(update[0][2] < 0.0 && update[0][0] > 0.0); // the positive is pushed up, 2.0 down
/// assert_eq!(update[2], [0.0, 0.0, 0.0]); // ignored row
/// # Ok(()) }
/// ```
///
/// # Pooling across devices (data parallel)
///
/// AP is a ranking over the whole batch, so shards must be joined. The loss is split into three
/// phases that exchange only O(P) numbers:
///
/// 1. [`ApLoss::gather_positives`]: this shard's positive scores (sorted). All-gather them and
///    sort the concatenation ascending (`f64::total_cmp`).
/// 2. [`ApLoss::bucket_stats`]: this shard's per-bucket statistics against all positives, an
///    [`ApStats`] of `3(2P+1)+1` words. Sum them over the shards ([`ApStats::add`] in process,
///    or an all-reduce of [`ApStats::to_words`] followed by [`ApStats::set_words`]).
/// 3. [`ApLoss::finish`] turns the summed statistics into an [`ApGlobal`] (O(P), on the host):
///    the pooled loss and what each shard needs for its part of the update;
///    [`ApLoss::forward_shard`] gives the loss tensor whose backward is this shard's update
///    ([`ApLoss::shard_update`] gives the update directly).
///
/// The statistics are integers, so the shards' result equals the pooled one bit for bit.
/// With candle's `nccl` feature (`cudarc::nccl::safe::Comm`, as in candle's
/// `llama_multiprocess` example) one step would be:
///
/// ```text
/// let mine = ap.gather_positives(&logits, &targets)?;            // Vec<f64>, length P_r
/// // all_gather the lengths (one u64 per rank), pad `mine` to the largest length, all_gather
/// // the padded f64 buffers, keep each rank's first P_r values, then sort with total_cmp.
/// let all = /* ... */;
/// let mut stats = ap.bucket_stats(&logits, &targets, &all)?;
/// let mut words = stats.to_words();                               // Vec<u64>, 3(2P+1)+1
/// // copy `words` to the device and comm.all_reduce(&send, &mut recv, &ReduceOp::Sum) as
/// // u64 (ncclUint64; a wrapping sum is what the format expects), copy back into `words`.
/// stats.set_words(&words)?;
/// let global = ap.finish(&stats)?;                               // same on every rank
/// let loss = ap.forward_shard(&logits, &targets, &global)?;      // backward: this shard's update
/// ```
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_detloss::ApLoss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Tensor::new(&[[0.3f64, -1.2], [2.0, 0.1], [-0.4, 0.9], [1.5, -2.0]], &dev)?;
/// let labels = Tensor::new(&[0i64, 2, 1, 0], &dev)?;
/// let ap = ApLoss::default();
/// // Two shards of two rows each.
/// let shards = [(logits.narrow(0, 0, 2)?, labels.narrow(0, 0, 2)?),
///               (logits.narrow(0, 2, 2)?, labels.narrow(0, 2, 2)?)];
/// let mut all = Vec::new();
/// for (x, t) in &shards {
///     all.extend(ap.gather_positives(x, t)?); // all-gather
/// }
/// all.sort_by(f64::total_cmp);
/// let mut stats = ap.bucket_stats(&shards[0].0, &shards[0].1, &all)?;
/// stats.add(&ap.bucket_stats(&shards[1].0, &shards[1].1, &all)?)?; // all-reduce
/// let global = ap.finish(&stats)?;
/// let pooled = ap.forward(&logits, &labels)?.to_scalar::<f64>()?;
/// assert_eq!(global.loss(), pooled);
/// let u0 = ap.shard_update(&shards[0].0, &shards[0].1, &global)?;
/// let u1 = ap.shard_update(&shards[1].0, &shards[1].1, &global)?;
/// assert_eq!(Tensor::cat(&[u0, u1], 0)?.dims(), &[4, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApLoss {
    /// Half-width δ of the linear part of the smoothed step `H` (1 in the paper); `> 0`.
    pub delta: f64,
    /// Interpolated AP (each precision is the running max over lower-scored positives), as in
    /// the official implementation; `false` uses the raw precision of each positive.
    pub interpolate: bool,
}

impl Default for ApLoss {
    fn default() -> Self {
        Self {
            delta: 1.0,
            interpolate: true,
        }
    }
}

/// The kind of targets next to `[N, C]` logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Dense `{-1, 0, 1}` in the logits' dtype.
    Dense,
    /// Dense `{-1, 0, 1}` as `i64`.
    DenseI64,
    /// `u32` labels `[N]`.
    LabelsU32,
    /// `i64` labels `[N]` (`-1` = ignored row).
    LabelsI64,
}

/// Validated, contiguous inputs.
struct Inputs {
    logits: Tensor,
    targets: Tensor,
    kind: Kind,
    n: usize,
    c: usize,
}

impl ApLoss {
    fn check_delta(&self) -> Result<()> {
        if !(self.delta.is_finite() && self.delta > 0.0) {
            bail!("{NAME}: delta must be finite and > 0, got {}", self.delta)
        }
        Ok(())
    }

    /// Validates and prepares the inputs; every public method taking tensors starts here (or,
    /// for `forward`, with the device check), so a Metal tensor gets the crate's Metal error.
    fn prepare(&self, logits: &Tensor, targets: &Tensor) -> Result<Inputs> {
        common::check_supported_device(NAME, logits)?;
        self.check_delta()?;
        let (n, c) = check_float_2d(NAME, "logits", logits)?;
        common::check_same_device(NAME, "targets", logits, targets)?;
        let kind = if targets.dtype() == DType::I64 && targets.rank() == 2 {
            if targets.dims() != [n, c] {
                bail!(
                    "{NAME}: dense targets must have the logits' shape [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Kind::DenseI64
        } else {
            match common::target_kind(NAME, logits, targets, n, c)? {
                TargetKind::Dense => Kind::Dense,
                TargetKind::LabelsU32 => Kind::LabelsU32,
                TargetKind::LabelsI64 => Kind::LabelsI64,
            }
        };
        Ok(Inputs {
            logits: logits.contiguous()?,
            targets: targets.contiguous()?,
            kind,
            n,
            c,
        })
    }

    /// Computes the loss of `logits` `[N, C]` against `targets` (labels `[N]` or dense
    /// `{-1, 0, 1}` `[N, C]`), ranking all valid scores of the tensor jointly. `backward()`
    /// gives the error-driven update as the logits' gradient.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        common::check_supported_device(NAME, logits)?;
        if logits.device().is_cpu() && logits.track_op() && common::cpu_kernels() {
            return self.forward_fused_cpu(logits, targets);
        }
        let global = self.global(logits, targets)?;
        self.forward_shard(logits, targets, &global)
    }

    /// A CPU training step: the three phases and the update in one forward (the backward only
    /// scales the saved update), each negative's bucket looked up once and reused by the update
    /// pass. The same statistics, loss and update as the phases give.
    fn forward_fused_cpu(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let pos = self.gather_positives(logits, targets)?;
        let inp = self.prepare(logits, targets)?;
        let plan = Arc::new(Plan::new(self.delta, &pos)?);
        let saved = SavedGrad::default();
        let global = {
            let (s1, l1) = inp.logits.storage_and_layout();
            let (s2, l2) = inp.targets.storage_and_layout();
            let (kind, n, c) = (inp.kind, inp.n, inp.c);
            let (Storage::Cpu(a), Storage::Cpu(b)) = (&*s1, &*s2) else {
                bail!("{NAME}: logits and targets must both be on the CPU or on one CUDA device")
            };
            common::with_float_type!(NAME, a.dtype(), T, {
                let x = cpu_slice::<T>(NAME, a, l1)?;
                let tg = Tg::<T>::new(kind, b, l2)?;
                // The bucket ids live in a per-thread workspace kept from one step to the next:
                // on a VM, fresh pages cost about as much as the second lookup they save.
                let mut ids = IDS.with(|w| w.take());
                if ids.len() < n * c {
                    ids = zeroed_vec::<u32>(n * c)?;
                }
                let (nonfinite, cnt, sum) =
                    cpu_bucket(&plan, x, &tg, n, c, Some(&mut ids[..n * c]))?;
                let stats = ApStats {
                    plan: plan.clone(),
                    nonfinite,
                    cnt,
                    sum,
                };
                let global = self.finish(&stats)?;
                let upd = cpu_update(&global.0, x, &tg, 1.0, n, c, Some(&ids[..n * c]))?;
                IDS.with(|w| w.replace(ids));
                saved.put(T::to_cpu_storage_owned(upd), Shape::from((n, c)));
                global
            })
        };
        let op = ApFwd {
            op: ApOp {
                global,
                kind: inp.kind,
            },
            saved: Some(saved),
        };
        inp.logits.apply_op2(&inp.targets, op)
    }

    /// Phases 1-3 on one device: the [`ApGlobal`] of this batch alone (what
    /// [`ApLoss::forward`] uses).
    pub fn global(&self, logits: &Tensor, targets: &Tensor) -> Result<ApGlobal> {
        let pos = self.gather_positives(logits, targets)?;
        let stats = self.bucket_stats(logits, targets, &pos)?;
        self.finish(&stats)
    }

    /// Phase 1: the positive scores of this shard, as f64, sorted ascending
    /// (`f64::total_cmp`). Validates the inputs.
    pub fn gather_positives(&self, logits: &Tensor, targets: &Tensor) -> Result<Vec<f64>> {
        let inp = self.prepare(logits, targets)?;
        let (s1, l1) = inp.logits.storage_and_layout();
        let (s2, l2) = inp.targets.storage_and_layout();
        let (kind, n, c) = (inp.kind, inp.n, inp.c);
        let mut pos = match (&*s1, &*s2) {
            #[cfg(feature = "cuda-emu")]
            (Storage::Cpu(a), Storage::Cpu(b)) if crate::gpu::emu::active() => {
                crate::gpu::emu::run("ap-loss-gather", |g| {
                    gpu::gather(g, crate::gpu::arg(a, l1), crate::gpu::arg(b, l2), kind)
                })?
            }
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                common::with_float_type!(NAME, a.dtype(), T, {
                    let x = cpu_slice::<T>(NAME, a, l1)?;
                    cpu_gather(x, &Tg::<T>::new(kind, b, l2)?, n, c)?
                })
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                let g = crate::gpu::cuda::Cuda::of(a);
                gpu::gather(&g, crate::gpu::arg(a, l1), crate::gpu::arg(b, l2), kind)?
            }
            _ => bail!("{NAME}: logits and targets must both be on the CPU or on one CUDA device"),
        };
        pos.sort_unstable_by(f64::total_cmp);
        Ok(pos)
    }

    /// Phase 2: this shard's bucket statistics against `all_positives`, the positive scores of
    /// every shard sorted ascending (NaN-free input must satisfy `all[k] <= all[k+1]`).
    /// O(N log P) time, O(P) result.
    pub fn bucket_stats(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        all_positives: &[f64],
    ) -> Result<ApStats> {
        let inp = self.prepare(logits, targets)?;
        let plan = Arc::new(Plan::new(self.delta, all_positives)?);
        let (s1, l1) = inp.logits.storage_and_layout();
        let (s2, l2) = inp.targets.storage_and_layout();
        let (kind, n, c) = (inp.kind, inp.n, inp.c);
        let (nonfinite, cnt, sum) = match (&*s1, &*s2) {
            #[cfg(feature = "cuda-emu")]
            (Storage::Cpu(a), Storage::Cpu(b)) if crate::gpu::emu::active() => {
                crate::gpu::emu::run("ap-loss-bucket", |g| {
                    let (x, t) = (crate::gpu::arg(a, l1), crate::gpu::arg(b, l2));
                    gpu::bucket(g, &plan, x, t, kind)
                })?
            }
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                common::with_float_type!(NAME, a.dtype(), T, {
                    let x = cpu_slice::<T>(NAME, a, l1)?;
                    cpu_bucket(&plan, x, &Tg::<T>::new(kind, b, l2)?, n, c, None)?
                })
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                let g = crate::gpu::cuda::Cuda::of(a);
                gpu::bucket(
                    &g,
                    &plan,
                    crate::gpu::arg(a, l1),
                    crate::gpu::arg(b, l2),
                    kind,
                )?
            }
            _ => bail!("{NAME}: logits and targets must both be on the CPU or on one CUDA device"),
        };
        Ok(ApStats {
            plan,
            nonfinite,
            cnt,
            sum,
        })
    }

    /// Phase 3: the pooled result from statistics summed over every shard. O(P log P) on the
    /// host; the same on every rank.
    pub fn finish(&self, stats: &ApStats) -> Result<ApGlobal> {
        self.check_delta()?;
        if stats.plan.delta.to_bits() != self.delta.to_bits() {
            bail!(
                "{NAME}: the statistics were computed with delta {}, this loss has delta {}",
                stats.plan.delta,
                self.delta
            )
        }
        Ok(ApGlobal(Arc::new(finish_impl(stats, self.interpolate))))
    }

    /// The pooled loss (a rank-0 tensor in the logits' dtype) for this shard: its value is
    /// `global.loss()`, its backward gives this shard's part of the update times the upstream
    /// gradient. `global` must come from statistics that include this shard.
    pub fn forward_shard(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        global: &ApGlobal,
    ) -> Result<Tensor> {
        let inp = self.prepare(logits, targets)?;
        self.check_global(global)?;
        let op = ApFwd {
            op: ApOp {
                global: global.clone(),
                kind: inp.kind,
            },
            saved: None,
        };
        inp.logits.apply_op2(&inp.targets, op)
    }

    /// This shard's update `[N, C]` (the logits' gradient for an upstream gradient of 1), in
    /// the logits' dtype.
    pub fn shard_update(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        global: &ApGlobal,
    ) -> Result<Tensor> {
        let inp = self.prepare(logits, targets)?;
        self.check_global(global)?;
        let one = Tensor::ones((), inp.logits.dtype(), inp.logits.device())?;
        let op = ApUpdate(ApOp {
            global: global.clone(),
            kind: inp.kind,
        });
        inp.logits.apply_op3_no_bwd(&inp.targets, &one, &op)
    }

    fn check_global(&self, global: &ApGlobal) -> Result<()> {
        let (d, i) = (global.0.plan.delta, global.0.interpolate);
        if d.to_bits() != self.delta.to_bits() || i != self.interpolate {
            bail!(
                "{NAME}: the ApGlobal was computed with delta {d}, interpolate {i}; this loss has delta {}, interpolate {}",
                self.delta,
                self.interpolate
            )
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Plan: the sorted positives, the bucket edges and the fixed-point scale (shared by all shards).
// ---------------------------------------------------------------------------------------------

/// Everything derived from the (global) sorted positives alone.
#[derive(Debug)]
struct Plan {
    delta: f64,
    /// All positive scores, ascending.
    pos: Vec<f64>,
    /// The 2P window edges `p - δ`, `p + δ`, ascending. Bucket `b` (0..=2P) holds the scores
    /// `x` with exactly `b` edges `<= x`: bucket 0 lies below every window, bucket 2P above.
    /// Empty when there is no positive or a positive is not finite.
    edges: Vec<f64>,
    /// Search accelerator: the range `[edges[0], edges[last]]` cut into `cells.len() - 1`
    /// equal cells; `cells[k]` = number of edges whose cell is `< k`. As the cell of a value is
    /// a monotone function of it, a score in cell `k` has exactly `cells[k]` edges of lower
    /// cells below it, and only the edges of its own cell are left to search: O(1) expected,
    /// O(log P) at worst, and exact whatever the rounding of the cell computation.
    cells: Vec<u32>,
    /// `number of cells / (edges[last] - edges[0])`.
    cell_scale: f64,
    /// Centre of the fixed-point offsets, `(min p + max p)/2`.
    center: f64,
    /// `2^F`, chosen so that `|x - center|·2^F <= 2^61` for every score inside the windows.
    scale: f64,
    /// `2^-F`.
    inv_scale: f64,
    /// A positive (or an edge `p ± δ`) is NaN or infinite: the whole result is NaN.
    nonfinite: bool,
}

/// The cell of `v >= lo` among `ncell` cells (monotone in `v`; saturating).
#[inline(always)]
fn cell_of(v: f64, lo: f64, scale: f64, ncell: usize) -> usize {
    (((v - lo) * scale) as usize).min(ncell - 1)
}

/// `y` rounded to an integer, ties to even (`f64::round_ties_even` without the libm call of
/// targets lacking SSE4.1): below 2^52 adding and removing 2^52 rounds in the FPU's default
/// mode; from 2^52 on every f64 is an integer.
#[inline(always)]
fn round_even(y: f64) -> f64 {
    const TWO52: f64 = 4_503_599_627_370_496.0;
    if y.abs() < TWO52 {
        let s = TWO52.copysign(y);
        ((y + s) - s).copysign(y) // -0.5 rounds to -0, as round_ties_even
    } else {
        y
    }
}

/// `2^e` for `e` in the normal exponent range.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Plan {
    fn new(delta: f64, pos: &[f64]) -> Result<Self> {
        if let Some(k) = pos.windows(2).position(|w| w[1] < w[0]) {
            bail!(
                "{NAME}: all_positives must be sorted ascending (f64::total_cmp), but {} > {} at index {k}",
                pos[k],
                pos[k + 1]
            )
        }
        let mut plan = Plan {
            delta,
            pos: pos.to_vec(),
            edges: Vec::new(),
            cells: Vec::new(),
            cell_scale: 0.0,
            center: 0.0,
            scale: 1.0,
            inv_scale: 1.0,
            nonfinite: pos.iter().any(|p| !p.is_finite()),
        };
        if pos.is_empty() || plan.nonfinite {
            return Ok(plan);
        }
        let mut edges: Vec<f64> = pos.iter().flat_map(|p| [p - delta, p + delta]).collect();
        edges.sort_unstable_by(f64::total_cmp);
        let (lo, hi) = (edges[0], edges[edges.len() - 1]);
        let center = pos[0] / 2.0 + pos[pos.len() - 1] / 2.0;
        let t = (lo - center).abs().max((hi - center).abs());
        if !(lo.is_finite() && hi.is_finite() && t.is_finite() && t > 0.0) {
            plan.nonfinite = true;
            return Ok(plan);
        }
        // t <= 2^e, so |x - center|·2^F <= 2^61 (log2 may be off by one ulp: 2^61 leaves room
        // below the i64 limit of 2^63).
        let e = t.log2().ceil() as i32;
        let f = (61 - e).clamp(-1000, 1000);
        // Sixteen cells per edge on average: most cells then hold no edge, and a lookup is one
        // read of the (L2-resident) cell table plus at most a compare or two.
        let ncell = 16 * edges.len();
        plan.cell_scale = ncell as f64 / (hi - lo);
        plan.cells = vec![0u32; ncell + 1];
        for &e in &edges {
            let k = cell_of(e, lo, plan.cell_scale, ncell);
            plan.cells[k + 1] += 1;
        }
        for k in 0..ncell {
            plan.cells[k + 1] += plan.cells[k];
        }
        plan.edges = edges;
        plan.center = center;
        plan.scale = pow2(f);
        plan.inv_scale = pow2(-f);
        Ok(plan)
    }

    /// Number of buckets, 2P+1 (1 without positives).
    fn buckets(&self) -> usize {
        self.edges.len() + 1
    }

    /// The bucket of a finite score: the number of edges `<= v`.
    #[inline(always)]
    fn bucket(&self, v: f64) -> usize {
        match self.edges.first() {
            Some(&e0) if v >= e0 => {
                let k = cell_of(v, e0, self.cell_scale, self.cells.len() - 1);
                let (a, b) = (self.cells[k] as usize, self.cells[k + 1] as usize);
                a + self.edges[a..b].partition_point(|e| *e <= v)
            }
            _ => 0,
        }
    }

    /// The fixed-point offset `round((v - center)·2^F)` (ties to even, as CUDA's
    /// `__double2ll_rn`; the scaling by a power of two is exact).
    #[inline(always)]
    fn quant(&self, v: f64) -> i64 {
        round_even((v - self.center) * self.scale) as i64
    }

    fn same_as(&self, o: &Plan) -> bool {
        self.delta.to_bits() == o.delta.to_bits()
            && self.pos.len() == o.pos.len()
            && self
                .pos
                .iter()
                .zip(&o.pos)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2 result and its merge / wire format.
// ---------------------------------------------------------------------------------------------

/// Per-bucket statistics of the negatives of one or more shards (phase 2 of the pooled API):
/// for each of the 2P+1 buckets cut by the windows `[s_i - δ, s_i + δ]` of the positives, the
/// number of negatives and the sum of their offsets in exact fixed point, plus the number of
/// non-finite scores. O(P) in size; sums of shards are exact.
#[derive(Debug, Clone)]
pub struct ApStats {
    plan: Arc<Plan>,
    nonfinite: u64,
    cnt: Vec<u64>,
    sum: Vec<i128>,
}

/// Low bits of the split fixed-point sums in the wire format.
const LO_BITS: u32 = 31;

impl ApStats {
    /// Adds another shard's statistics (computed against the same positives and `delta`).
    pub fn add(&mut self, other: &ApStats) -> Result<()> {
        if !(Arc::ptr_eq(&self.plan, &other.plan) || self.plan.same_as(&other.plan)) {
            bail!("{NAME}: cannot add statistics computed against different positives or delta")
        }
        self.nonfinite = self.nonfinite.wrapping_add(other.nonfinite);
        for (a, b) in self.cnt.iter_mut().zip(&other.cnt) {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a = a.wrapping_add(*b);
        }
        Ok(())
    }

    /// Number of positives the statistics were computed against.
    pub fn num_positives(&self) -> usize {
        self.plan.pos.len()
    }

    /// The statistics as `3·(2P+1) + 1` words (`[non-finite, counts, sums high, sums low]`)
    /// whose element-wise wrapping sum over shards is the wire form of the summed statistics:
    /// all-reduce them as `u64` with a sum, then [`ApStats::set_words`]. Exact for fewer than
    /// 2^32 scores in total.
    pub fn to_words(&self) -> Vec<u64> {
        let nb = self.cnt.len();
        let mut w = Vec::with_capacity(3 * nb + 1);
        w.push(self.nonfinite);
        w.extend_from_slice(&self.cnt);
        // s = hi·2^31 + lo with 0 <= lo < 2^31: summing the parts separately cannot carry.
        w.extend(self.sum.iter().map(|s| (s >> LO_BITS) as i64 as u64));
        w.extend(self.sum.iter().map(|s| (s & ((1 << LO_BITS) - 1)) as u64));
        w
    }

    /// Replaces the statistics by `words` (the all-reduced [`ApStats::to_words`] of every
    /// shard). Errors when the length does not match this statistics' positives.
    pub fn set_words(&mut self, words: &[u64]) -> Result<()> {
        let nb = self.cnt.len();
        if words.len() != 3 * nb + 1 {
            bail!(
                "{NAME}: expected {} statistics words for {} positives, got {}",
                3 * nb + 1,
                self.plan.pos.len(),
                words.len()
            )
        }
        self.nonfinite = words[0];
        self.cnt.copy_from_slice(&words[1..1 + nb]);
        for (b, s) in self.sum.iter_mut().enumerate() {
            let hi = words[1 + nb + b] as i64 as i128;
            *s = hi
                .wrapping_shl(LO_BITS)
                .wrapping_add(words[1 + 2 * nb + b] as i128);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 3: precisions, loss and update coefficients.
// ---------------------------------------------------------------------------------------------

/// The pooled result of a batch (phase 3): the loss, the precision of every positive and the
/// O(P) coefficients each shard needs to compute its part of the update. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApGlobal(Arc<Global>);

#[derive(Debug)]
struct Global {
    plan: Arc<Plan>,
    interpolate: bool,
    loss: f64,
    /// The whole result is NaN (a non-finite score).
    nan: bool,
    /// Precision of each positive, in the order of `plan.pos`.
    prec: Vec<f64>,
    /// Update of each positive, `-(1 - prec)/P`.
    pos_upd: Vec<f64>,
    /// Update of a negative `x` in bucket `b`: `alpha[b] + beta[b]·(x - center)` (the CUDA
    /// update kernel reads them separately; the CPU uses `coef`).
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
    alpha: Vec<f64>,
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
    beta: Vec<f64>,
    /// `[alpha[b], beta[b]]` side by side for the CPU update pass.
    coef: Vec<[f64; 2]>,
}

impl ApGlobal {
    /// The pooled loss `1 - AP` (0 without positives, NaN for a non-finite score).
    pub fn loss(&self) -> f64 {
        self.0.loss
    }

    /// Number of positives of the pooled batch.
    pub fn num_positives(&self) -> usize {
        self.0.plan.pos.len()
    }

    /// The pooled positive scores, ascending.
    pub fn positives(&self) -> &[f64] {
        &self.0.plan.pos
    }

    /// The (interpolated) precision of each positive, in the order of [`ApGlobal::positives`].
    pub fn precisions(&self) -> &[f64] {
        &self.0.prec
    }
}

fn finish_impl(stats: &ApStats, interpolate: bool) -> Global {
    let plan = stats.plan.clone();
    let p = plan.pos.len();
    let nb = plan.buckets();
    let nan = plan.nonfinite || stats.nonfinite > 0;
    if p == 0 || nan {
        let v = if nan { f64::NAN } else { 0.0 };
        return Global {
            plan,
            interpolate,
            loss: v,
            nan,
            prec: vec![v; p],
            pos_upd: vec![v; p],
            alpha: vec![v; nb],
            beta: vec![v; nb],
            coef: vec![[v; 2]; nb],
        };
    }
    let (delta, pos, edges) = (plan.delta, &plan.pos, &plan.edges);
    let two_delta = 2.0 * delta;
    let pf = p as f64;
    // Prefix sums over buckets (negatives) and over the sorted positives, exact integers.
    let mut ccnt = vec![0u64; nb + 1];
    let mut csum = vec![0i128; nb + 1];
    for b in 0..nb {
        ccnt[b + 1] = ccnt[b].wrapping_add(stats.cnt[b]);
        csum[b + 1] = csum[b].wrapping_add(stats.sum[b]);
    }
    let q: Vec<i64> = pos.iter().map(|v| plan.quant(*v)).collect();
    let mut qp = vec![0i128; p + 1];
    for k in 0..p {
        qp[k + 1] = qp[k] + q[k] as i128;
    }
    // Σ over `n` scores with offset sum `s` inside the window of a positive with offset `qi`
    // of H = (x - s_i)/(2δ) + 0.5: the offsets' difference is exact, rounded once.
    let lin = |s: i128, n: u64, qi: i64| -> f64 {
        let d = s.wrapping_sub((n as i128).wrapping_mul(qi as i128));
        d as f64 * plan.inv_scale / two_delta + 0.5 * n as f64
    };
    let mut lo_b = vec![0usize; p]; // L_i: first bucket with x >= s_i - δ
    let mut up_b = vec![0usize; p]; // U_i: first bucket with x >= s_i + δ (H = 1 from there)
    let mut prec = vec![0.0; p];
    let mut w = vec![0.0; p]; // f_i / ((a_i + b_i)·P)
    let mut running = 0.0f64;
    for i in 0..p {
        let (lo, up) = (pos[i] - delta, pos[i] + delta);
        let li = edges.partition_point(|e| *e <= lo);
        let ui = edges.partition_point(|e| *e <= up);
        lo_b[i] = li;
        up_b[i] = ui;
        // b_i: negatives above the window count 1, those inside H.
        // (wrapping: statistics set from arbitrary words must not panic)
        let b_i = ccnt[nb].wrapping_sub(ccnt[ui]) as f64
            + lin(
                csum[ui].wrapping_sub(csum[li]),
                ccnt[ui].wrapping_sub(ccnt[li]),
                q[i],
            );
        // a_i = 0.5 + Σ_{k∈P} H(s_k - s_i): the k = i term is H(0) = 0.5, so this is
        // 1 + Σ_{k≠i}; tied positives get H = 0.5 each, exactly (equal offsets).
        let kl = pos.partition_point(|v| *v < lo);
        let ku = pos.partition_point(|v| *v < up);
        let a_i = 0.5 + (p - ku) as f64 + lin(qp[ku] - qp[kl], (ku - kl) as u64, q[i]);
        let cur = a_i / (a_i + b_i);
        // Running max in ascending score order, `<=` as the official code: cur = 1 always
        // takes the max (f = 1), so 1 - cur is only divided by when cur < running <= 1.
        let (pr, f) = if !interpolate {
            (cur, 1.0)
        } else if running <= cur {
            running = cur;
            (cur, 1.0)
        } else {
            (running, (1.0 - running) / (1.0 - cur))
        };
        prec[i] = pr;
        w[i] = f / (a_i + b_i) / pf;
    }
    let loss = 1.0 - common::ordered_sum(&prec) / pf;
    let pos_upd = prec.iter().map(|pr| -(1.0 - pr) / pf).collect();
    // Update of a negative in bucket b: positives with U_i <= b (a prefix, as U is
    // non-decreasing) give w_i; those with L_i <= b < U_i give w_i·((x - s_i)/(2δ) + 0.5).
    let mut wp = vec![0.0; p + 1];
    let mut ws = vec![0.0; p + 1];
    for i in 0..p {
        wp[i + 1] = wp[i] + w[i];
        ws[i + 1] = ws[i] + w[i] * (pos[i] - plan.center);
    }
    let (mut alpha, mut beta) = (vec![0.0; nb], vec![0.0; nb]);
    let (mut u, mut l) = (0usize, 0usize);
    for b in 0..nb {
        while u < p && up_b[u] <= b {
            u += 1;
        }
        while l < p && lo_b[l] <= b {
            l += 1;
        }
        let dw = wp[l] - wp[u];
        alpha[b] = wp[u] + 0.5 * dw - (ws[l] - ws[u]) / two_delta;
        beta[b] = dw / two_delta;
    }
    let coef = alpha.iter().zip(&beta).map(|(a, b)| [*a, *b]).collect();
    Global {
        plan,
        interpolate,
        loss,
        nan,
        prec,
        pos_upd,
        alpha,
        beta,
        coef,
    }
}

impl Global {
    /// The update of a negative score `v` (finite, as `nan` is false).
    #[inline(always)]
    fn neg_update(&self, v: f64) -> f64 {
        self.neg_update_in(self.plan.bucket(v), v)
    }

    /// The update of a negative score `v` in bucket `b`.
    #[inline(always)]
    fn neg_update_in(&self, b: usize, v: f64) -> f64 {
        match b.min(self.coef.len() - 1) {
            0 => 0.0,
            b => {
                let [a, s] = self.coef[b];
                a + s * (v - self.plan.center)
            }
        }
    }

    /// The update of a positive score `v`, or `None` when `v` is not among the positives.
    #[inline(always)]
    fn pos_update(&self, v: f64) -> Option<f64> {
        let pos = &self.plan.pos;
        let k = pos.partition_point(|p| *p < v);
        (k < pos.len() && pos[k] == v).then(|| self.pos_upd[k])
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.
// ---------------------------------------------------------------------------------------------

/// What an element is: ignored, negative or positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Ignored,
    Neg,
    Pos,
}

/// Typed CPU view of the targets.
enum Tg<'a, T> {
    Dense(&'a [T]),
    DenseI64(&'a [i64]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

fn dense_error(v: impl std::fmt::Display, i: usize, j: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{NAME}: target {v} at [{i}, {j}] is not -1, 0 or 1"
    ))
}

#[inline(always)]
fn label_row(k: i64, c: usize, mut f: impl FnMut(usize, Role)) -> Result<()> {
    match decode_label(NAME, k, c)? {
        RowLabel::Ignored => (0..c).for_each(|j| f(j, Role::Ignored)),
        RowLabel::Class(k) => {
            (0..c).for_each(|j| f(j, if j == k { Role::Pos } else { Role::Neg }));
        }
    }
    Ok(())
}

impl<'a, T: Elem> Tg<'a, T> {
    fn new(kind: Kind, s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        Ok(match kind {
            Kind::Dense => Self::Dense(cpu_slice(NAME, s, l)?),
            Kind::DenseI64 => Self::DenseI64(cpu_slice(NAME, s, l)?),
            Kind::LabelsU32 => Self::U32(cpu_slice(NAME, s, l)?),
            Kind::LabelsI64 => Self::I64(cpu_slice(NAME, s, l)?),
        })
    }

    /// Calls `f(j, role)` for every column `j` of row `i`; errors on an invalid target.
    #[inline(always)]
    fn row(&self, i: usize, c: usize, mut f: impl FnMut(usize, Role)) -> Result<()> {
        match self {
            Self::U32(v) => label_row(v[i].get(), c, f),
            Self::I64(v) => label_row(v[i].get(), c, f),
            Self::Dense(d) => {
                for (j, t) in d[i * c..(i + 1) * c].iter().enumerate() {
                    let v = t.to_f64();
                    f(
                        j,
                        if v == 0.0 {
                            Role::Neg
                        } else if v == 1.0 {
                            Role::Pos
                        } else if v == -1.0 {
                            Role::Ignored
                        } else {
                            return Err(dense_error(v, i, j));
                        },
                    );
                }
                Ok(())
            }
            Self::DenseI64(d) => {
                for (j, &v) in d[i * c..(i + 1) * c].iter().enumerate() {
                    f(
                        j,
                        match v {
                            0 => Role::Neg,
                            1 => Role::Pos,
                            -1 => Role::Ignored,
                            v => return Err(dense_error(v, i, j)),
                        },
                    );
                }
                Ok(())
            }
        }
    }
}

/// Phase 1 on the CPU: the positive scores, in element order (chunks merged in order).
fn cpu_gather<T: Elem>(x: &[T], tg: &Tg<'_, T>, n: usize, c: usize) -> Result<Vec<f64>> {
    let rpc = rows_per_chunk(c);
    let parts: Vec<Result<Vec<f64>>> = (0..n.div_ceil(rpc))
        .into_par_iter()
        .map(|ci| {
            let mut out = Vec::new();
            for i in ci * rpc..((ci + 1) * rpc).min(n) {
                let xr = &x[i * c..(i + 1) * c];
                tg.row(
                    i,
                    c,
                    #[inline(always)]
                    |j, r| {
                        if r == Role::Pos {
                            out.push(xr[j].to_f64());
                        }
                    },
                )?;
            }
            Ok(out)
        })
        .collect();
    let mut pos = Vec::new();
    for part in parts {
        pos.extend(part?);
    }
    Ok(pos)
}

/// Per-bucket accumulators of one rayon task.
struct BucketAcc {
    nonfinite: u64,
    bins: Vec<Bin>,
}

/// Count and offset sum of one bucket, side by side (one cache line per update).
#[derive(Clone, Copy, Default)]
struct Bin {
    sum: i128,
    cnt: u64,
}

impl BucketAcc {
    fn new(nb: usize) -> Self {
        Self {
            nonfinite: 0,
            bins: vec![Bin::default(); nb],
        }
    }

    /// Integer sums: associative and commutative, so any merge order gives the same bits.
    fn merge(mut self, o: BucketAcc) -> Self {
        self.nonfinite = self.nonfinite.wrapping_add(o.nonfinite);
        for (a, b) in self.bins.iter_mut().zip(&o.bins) {
            a.cnt = a.cnt.wrapping_add(b.cnt);
            a.sum = a.sum.wrapping_add(b.sum);
        }
        self
    }
}

type BucketResult = (u64, Vec<u64>, Vec<i128>);

/// Phase 2 on the CPU: every negative into its bucket. Rayon over fixed chunks; the sums are
/// integers, so the merge order (rayon's) does not change a bit.
fn cpu_bucket<T: Elem>(
    plan: &Plan,
    x: &[T],
    tg: &Tg<'_, T>,
    n: usize,
    c: usize,
    ids: Option<&mut [u32]>,
) -> Result<BucketResult> {
    let nb = plan.buckets();
    let top = nb - 1;
    let rpc = rows_per_chunk(c);
    // Each task folds several chunks into one accumulator of 2P+1 buckets.
    let min_chunks = (nb * 4).div_ceil(rpc * c.max(1)).max(1);
    // One chunk of rows; with `ids`, each negative's bucket is also recorded there (for an
    // update pass in the same forward, which then needs no second lookup).
    let body = |mut acc: BucketAcc, ci: usize, mut ids: Option<&mut [u32]>| -> Result<BucketAcc> {
        for i in ci * rpc..((ci + 1) * rpc).min(n) {
            let xr = &x[i * c..(i + 1) * c];
            let row0 = (i - ci * rpc) * c;
            tg.row(
                i,
                c,
                #[inline(always)]
                |j, r| {
                    if r != Role::Neg {
                        return;
                    }
                    let v = xr[j].to_f64();
                    if !v.is_finite() {
                        acc.nonfinite += 1;
                        return;
                    }
                    let b = plan.bucket(v);
                    if let Some(slot) = ids.as_deref_mut().and_then(|d| d.get_mut(row0 + j)) {
                        *slot = b as u32;
                    }
                    if b == 0 {
                        return; // below every window: H = 0 for every positive
                    }
                    let bin = &mut acc.bins[b];
                    bin.cnt += 1;
                    if b < top {
                        // Inside some window: its offset enters the linear part of H.
                        bin.sum += plan.quant(v) as i128;
                    }
                },
            )?;
        }
        Ok(acc)
    };
    let merge = |a: BucketAcc, b: BucketAcc| Ok(a.merge(b));
    let acc = match ids {
        Some(ids) if c > 0 => ids
            .par_chunks_mut(rpc * c)
            .enumerate()
            .with_min_len(min_chunks)
            .try_fold(
                || BucketAcc::new(nb),
                |acc, (ci, chunk)| body(acc, ci, Some(chunk)),
            )
            .try_reduce(|| BucketAcc::new(nb), merge)?,
        _ => (0..n.div_ceil(rpc))
            .into_par_iter()
            .with_min_len(min_chunks)
            .try_fold(|| BucketAcc::new(nb), |acc, ci| body(acc, ci, None))
            .try_reduce(|| BucketAcc::new(nb), merge)?,
    };
    let cnt = acc.bins.iter().map(|b| b.cnt).collect();
    let sum = acc.bins.iter().map(|b| b.sum).collect();
    Ok((acc.nonfinite, cnt, sum))
}

/// The update of every element of the shard, times `g` (rounded to `T`, then scaled by `g`
/// when it is not 1, as a saved update is). `ids`: the negatives' buckets recorded by the
/// bucket pass (else looked up again).
fn cpu_update<T: Elem>(
    gl: &Global,
    x: &[T],
    tg: &Tg<'_, T>,
    g: f64,
    n: usize,
    c: usize,
    ids: Option<&[u32]>,
) -> Result<Vec<T>> {
    let mut out = zeroed_vec::<T>(n * c)?;
    if c == 0 {
        return Ok(out);
    }
    let rpc = rows_per_chunk(c);
    let res: Vec<Result<()>> = out
        .par_chunks_mut(rpc * c)
        .enumerate()
        .map(|(ci, oc)| {
            for (r, orow) in oc.chunks_mut(c).enumerate() {
                let i = ci * rpc + r;
                let xr = &x[i * c..(i + 1) * c];
                let mut missing = None;
                tg.row(i, c, #[inline(always)] |j, role| {
                    let v = xr[j].to_f64();
                    let d = match role {
                        Role::Ignored => return,
                        _ if gl.nan => f64::NAN,
                        Role::Neg => match ids.and_then(|d| d.get(i * c + j)) {
                            Some(&b) => gl.neg_update_in(b as usize, v),
                            None => gl.neg_update(v),
                        },
                        Role::Pos => match gl.pos_update(v) {
                            Some(d) => d,
                            None => {
                                missing = Some((v, j));
                                return;
                            }
                        },
                    };
                    // Rounded through the accumulator type, as the CUDA kernel does.
                    orow[j] = T::from_acc(T::A::from_f64(d));
                })?;
                if let Some((v, j)) = missing {
                    bail!("{NAME}: positive score {v} at [{i}, {j}] is not among the global positives (ApGlobal from other inputs?)")
                }
            }
            Ok(())
        })
        .collect();
    res.into_iter().collect::<Result<Vec<()>>>()?;
    if g != 1.0 {
        common::scale_in_place(&mut out, g);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Custom ops: forward (loss value) and update.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct ApOp {
    global: ApGlobal,
    kind: Kind,
}

/// `(logits, targets) -> loss`; the loss was computed by the phases, the op carries it into
/// the graph so that `backward()` reaches the update.
struct ApFwd {
    op: ApOp,
    /// The update, when the forward computed it (CPU training step).
    saved: Option<SavedGrad>,
}
/// `(logits, targets, upstream) -> update · upstream`.
struct ApUpdate(ApOp);

impl CustomOp2 for ApFwd {
    fn name(&self) -> &'static str {
        "ap-loss-fwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let loss = self.op.global.0.loss;
        common::emulate!("ap-loss-fwd", |g| gpu::scalar(g, s1, loss));
        common::with_float_type!(NAME, s1.dtype(), T, {
            let v = T::from_acc(<<T as Elem>::A as Acc>::from_f64(loss));
            Ok((T::to_cpu_storage_owned(vec![v]), Shape::from(())))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = crate::gpu::cuda::Cuda::of(s1);
        gpu::scalar(&g, s1, self.op.global.0.loss)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = ApUpdate(self.op.clone());
        let saved = self.saved.as_ref();
        common::saved_or_backward(NAME, saved, logits, targets, grad_res, &bwd)
    }
}

impl CustomOp3 for ApUpdate {
    fn name(&self) -> &'static str {
        "ap-loss-update"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        common::emulate!("ap-loss-update", |g| gpu::update(
            g,
            &self.0.global.0,
            self.0.kind,
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2),
            crate::gpu::arg(s3, l3)
        ));
        let (n, c) = crate::common::layout_dims2(NAME, l1)?;
        common::with_float_type!(NAME, s1.dtype(), T, {
            let x = cpu_slice::<T>(NAME, s1, l1)?;
            let tg = Tg::<T>::new(self.0.kind, s2, l2)?;
            let up = cpu_slice::<T>(NAME, s3, l3)?;
            let [g] = up else {
                bail!(
                    "{NAME}: upstream gradient has {} elements, expected 1",
                    up.len()
                )
            };
            let g = candle_core::WithDType::to_f64(*g);
            let out = cpu_update(&self.0.global.0, x, &tg, g, n, c, None)?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = crate::gpu::cuda::Cuda::of(s1);
        let (x, tg, up) = (
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2),
            crate::gpu::arg(s3, l3),
        );
        gpu::update(&g, &self.0.global.0, self.0.kind, x, tg, up)
    }
}

#[cfg(test)]
mod tests {
    use super::{round_even, Plan};

    #[test]
    fn round_even_equals_round_ties_even() {
        let mut v = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999999999999994,
            1e300,
            -0.0,
        ];
        let two52 = 4_503_599_627_370_496.0f64;
        for k in -3..=3 {
            for base in [two52, two52 / 2.0, two52 * 2.0] {
                v.push(base + k as f64 * 0.5);
                v.push(-(base + k as f64 * 0.5));
            }
        }
        let mut s = 0x1234_5678u64;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            v.push(m * 2f64.powi((s % 130) as i32));
            v.push(((s % 2001) as f64 - 1000.0) * 0.5);
        }
        for y in v {
            assert_eq!(
                round_even(y).to_bits(),
                y.round_ties_even().to_bits(),
                "{y}"
            );
        }
    }

    #[test]
    fn bucket_accelerator_equals_binary_search() {
        // Clustered positives, an outlier, exact ties and scores on the edges themselves.
        let mut pos = vec![0.0, 0.0, 0.1, 0.1, 0.1000001, 0.3, 0.3, 57.0, -3.25];
        pos.extend((0..50).map(|i| 1.0 + i as f64 * 1e-9));
        pos.sort_by(f64::total_cmp);
        for delta in [1.0, 0.25, 1e-7] {
            let plan = Plan::new(delta, &pos).unwrap();
            assert_eq!(plan.buckets(), 2 * pos.len() + 1);
            let mut probes: Vec<f64> = plan.edges.clone();
            probes.extend(plan.edges.iter().map(|e| e.next_up()));
            probes.extend(plan.edges.iter().map(|e| e.next_down()));
            probes.extend((0..4000).map(|i| -5.0 + i as f64 * 0.016));
            probes.extend([f64::MAX, -f64::MAX, 1e-300]);
            for v in probes {
                let want = plan.edges.partition_point(|e| *e <= v);
                assert_eq!(plan.bucket(v), want, "v={v} delta={delta}");
            }
        }
    }
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu {
    use super::{BucketResult, Global, Kind, Plan, LO_BITS, NAME};
    use crate::common::{layout_dims2, Acc, Elem};
    use crate::gpu::params::{ApBucketParams, ApCompactParams, ApCountParams, ApUpdateParams};
    use crate::gpu::{self, Arg, DevElem, ErrorFlag, Gpu, KernelError, Launch, AP_LOSS};
    use candle_core::{Result, Shape};

    /// Dynamic shared memory a bucket block may use: the default 48 KiB per block without an
    /// opt-in, less room for the kernel's static shared memory (256 bytes).
    const SMEM_LIMIT: usize = 47 * 1024;

    fn kind_suffix(k: Kind) -> &'static str {
        match k {
            Kind::Dense => "dense",
            Kind::DenseI64 => "densei64",
            Kind::LabelsU32 => "u32",
            Kind::LabelsI64 => "i64",
        }
    }

    /// The targets' address, of the type the kernel expects.
    fn targets<G: Gpu, T: DevElem>(g: &G, kind: Kind, tg: &Arg<'_, G::Storage>) -> Result<u64> {
        match kind {
            Kind::Dense => g.input::<T>(NAME, tg.s, tg.l),
            Kind::DenseI64 | Kind::LabelsI64 => g.input::<i64>(NAME, tg.s, tg.l),
            Kind::LabelsU32 => g.input::<u32>(NAME, tg.s, tg.l),
        }
    }

    /// The message of a kernel error (`[code, payload, value bits]`).
    fn message(e: KernelError, c: usize) -> String {
        let (i, j) = (e.a / c.max(1) as u64, e.a % c.max(1) as u64);
        let v = e.value();
        match e.code {
            gpu::ERR_LABEL => e.label(NAME, c),
            gpu::ERR_TARGET => format!("{NAME}: target {v} at [{i}, {j}] is not -1, 0 or 1"),
            gpu::ERR_POSITIVE => format!("{NAME}: positive score {v} at [{i}, {j}] is not among the global positives (ApGlobal from other inputs?)"),
            code => format!("{NAME}: internal error: kernel error code {code}"),
        }
    }

    fn sfx<T: candle_core::WithDType>(kind: Kind) -> Result<String> {
        Ok(format!(
            "{}_{}",
            gpu::dtype_suffix(NAME, T::DTYPE)?,
            kind_suffix(kind)
        ))
    }

    fn gather_t<G: Gpu, T: Elem + DevElem>(
        g: &G,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        kind: Kind,
    ) -> Result<Vec<f64>> {
        let (n, c) = layout_dims2(NAME, x.l)?;
        let total = (n * c) as u64;
        if total == 0 {
            return Ok(Vec::new());
        }
        let sfx = sfx::<T>(kind)?;
        let tg = targets::<G, T>(g, kind, &tg)?;
        let err = ErrorFlag::new(g)?;
        let cnt = g.words(1)?;
        let p = ApCountParams {
            tg,
            cnt: g.words_addr(&cnt),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
        };
        g.launch(
            &AP_LOSS,
            &format!("ap_count_{sfx}"),
            Launch::partials(total),
            &p,
        )?;
        err.check(g, |e| message(e, c))?;
        let np = g.download(&cnt)?.first().copied().unwrap_or(0);
        if np == 0 {
            return Ok(Vec::new());
        }
        let out = g.words(np as usize)?;
        let next = g.words(1)?;
        let p = ApCompactParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg,
            out: g.words_addr(&out),
            next: g.words_addr(&next),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            cap: np,
        };
        g.launch(
            &AP_LOSS,
            &format!("ap_compact_{sfx}"),
            Launch::elems(total),
            &p,
        )?;
        // Only the P positive scores come back to the host, in the order the threads wrote
        // them: sorted here.
        let mut pos: Vec<f64> = g.download(&out)?.into_iter().map(f64::from_bits).collect();
        pos.sort_unstable_by(f64::total_cmp);
        Ok(pos)
    }

    fn bucket_t<G: Gpu, T: Elem + DevElem>(
        g: &G,
        plan: &Plan,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        kind: Kind,
    ) -> Result<BucketResult> {
        let (n, c) = layout_dims2(NAME, x.l)?;
        let nb = plan.buckets();
        let total = (n * c) as u64;
        if total == 0 {
            return Ok((0, vec![0; nb], vec![0; nb]));
        }
        let edges = gpu::upload_f64(g, &plan.edges)?;
        let (cnt, hi, lo) = (g.words(nb)?, g.words(nb)?, g.words(nb)?);
        let nonfinite = g.words(1)?;
        let err = ErrorFlag::new(g)?;
        let smem = 3 * nb * std::mem::size_of::<u64>();
        let use_smem = smem <= SMEM_LIMIT;
        let mut cfg = Launch::partials(total);
        if use_smem {
            cfg = cfg.with_shmem(smem);
        }
        let p = ApBucketParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: targets::<G, T>(g, kind, &tg)?,
            edges: g.words_addr(&edges),
            cnt: g.words_addr(&cnt),
            hi: g.words_addr(&hi),
            lo: g.words_addr(&lo),
            nonfinite: g.words_addr(&nonfinite),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            ne: plan.edges.len() as u64,
            center: plan.center,
            scale: plan.scale,
            use_smem: use_smem as i32,
        };
        g.launch(&AP_LOSS, &format!("ap_bucket_{}", sfx::<T>(kind)?), cfg, &p)?;
        err.check(g, |e| message(e, c))?;
        let cnt = g.download(&cnt)?;
        let hi = g.download(&hi)?;
        let lo = g.download(&lo)?;
        let nonfinite = g.download(&nonfinite)?.first().copied().unwrap_or(0);
        // Σq = Σhi·2^31 + Σlo, exactly.
        let sum = hi
            .iter()
            .zip(&lo)
            .map(|(h, l)| ((*h as i64) as i128).wrapping_shl(LO_BITS) + *l as i128)
            .collect();
        Ok((nonfinite, cnt, sum))
    }

    fn update_t<G: Gpu, T: Elem + DevElem>(
        g: &G,
        gl: &Global,
        kind: Kind,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)> {
        let (n, c) = layout_dims2(NAME, x.l)?;
        gpu::check_upstream(NAME, up.l, true, 1)?;
        let total = (n * c) as u64;
        let out = g.output::<T>(n * c)?;
        if total > 0 {
            let plan = &gl.plan;
            let pos = gpu::upload_f64(g, &plan.pos)?;
            let pos_upd = gpu::upload_f64(g, &gl.pos_upd)?;
            let edges = gpu::upload_f64(g, &plan.edges)?;
            let alpha = gpu::upload_f64(g, &gl.alpha)?;
            let beta = gpu::upload_f64(g, &gl.beta)?;
            let err = ErrorFlag::new(g)?;
            let p = ApUpdateParams {
                x: g.input::<T>(NAME, x.s, x.l)?,
                tg: targets::<G, T>(g, kind, &tg)?,
                up: g.input::<T>(NAME, up.s, up.l)?,
                pos: g.words_addr(&pos),
                pos_upd: g.words_addr(&pos_upd),
                edges: g.words_addr(&edges),
                alpha: g.words_addr(&alpha),
                beta: g.words_addr(&beta),
                out: g.out_addr(&out),
                err: err.addr(g),
                n: n as u64,
                c: c as u64,
                np: plan.pos.len() as u64,
                ne: plan.edges.len() as u64,
                center: plan.center,
                nan: gl.nan as i32,
            };
            let kernel = format!("ap_update_{}", sfx::<T>(kind)?);
            g.launch(&AP_LOSS, &kernel, Launch::elems(total), &p)?;
            err.check(g, |e| message(e, c))?;
        }
        Ok((g.storage(out), Shape::from((n, c))))
    }

    /// Phase 1 on backend `g`: the positive scores, sorted ascending.
    pub(super) fn gather<G: Gpu>(
        g: &G,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        kind: Kind,
    ) -> Result<Vec<f64>> {
        crate::common::with_float_type!(NAME, g.dtype(x.s), T, { gather_t::<G, T>(g, x, tg, kind) })
    }

    /// Phase 2 on backend `g`: the bucket statistics of the negatives.
    pub(super) fn bucket<G: Gpu>(
        g: &G,
        plan: &Plan,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        kind: Kind,
    ) -> Result<BucketResult> {
        crate::common::with_float_type!(NAME, g.dtype(x.s), T, {
            bucket_t::<G, T>(g, plan, x, tg, kind)
        })
    }

    /// The update times the upstream gradient on backend `g`.
    pub(super) fn update<G: Gpu>(
        g: &G,
        gl: &Global,
        kind: Kind,
        x: Arg<'_, G::Storage>,
        tg: Arg<'_, G::Storage>,
        up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)> {
        crate::common::with_float_type!(NAME, g.dtype(x.s), T, {
            update_t::<G, T>(g, gl, kind, x, tg, up)
        })
    }

    /// The rank-0 loss `v` on backend `g`, in the dtype of `like`.
    pub(super) fn scalar<G: Gpu>(g: &G, like: &G::Storage, v: f64) -> Result<(G::Storage, Shape)> {
        crate::common::with_float_type!(NAME, g.dtype(like), T, {
            let s = g.storage_from(vec![T::from_acc(<<T as Elem>::A as Acc>::from_f64(v))])?;
            Ok((s, Shape::from(())))
        })
    }
}
