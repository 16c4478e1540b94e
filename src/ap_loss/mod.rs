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
//! saved update. Both CPU passes take a chunk's scores as negatives first (the bucket lookups,
//! their fixed-point offsets and the updates eight at a time with AVX-512 where the CPU has it,
//! the same integers and the same IEEE operations), then correct the few other elements; the
//! bucket pass keeps each bucket's count and offset sum packed in one 128-bit integer.
//!
//! The bucket sums are integers (fixed point with a power-of-two scale chosen from the range of
//! the positives), so merging partial results is exact and order-independent: the CPU result is
//! bitwise identical for any thread count, the CUDA kernels (integer atomics) give the same
//! statistics bit for bit, and shards merged by an all-reduce give exactly the pooled result.

use crate::check::{check_float_2d, check_same_device};
use crate::cpu::{self, rows_per_chunk, zeroed_vec};
use crate::dtype::{with_float_type, Acc, Elem};
use crate::op::{
    cpu_slice, Bwd, CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad, Wrt,
};
use crate::targets::{self, CpuTargets, Role, TargetKind as Kind};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Result, Shape};
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
/// - `logits`: `[N, C]` or `[..., C]` (targets of the matching leading shape), f32 / f64 /
///   f16 / bf16; `[B, A, C]` is `[B·A, C]`: all scores are ranked jointly.
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
/// `{-1, 0, 1}`; 2^29 positives or more, or rows of 2^31 classes or more; in the sharded API,
/// positives not sorted, statistics of different positives or `delta`, or a shard whose
/// positives are missing from the global ones.
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
        crate::check::check_supported_device(NAME, logits)?;
        self.check_delta()?;
        crate::check::check_float(NAME, "logits", logits)?;
        check_same_device(NAME, "targets", logits, targets)?;
        // `[..., C]` logits: all scores ranked jointly, as one `[N, C]` problem.
        let (logits, targets) = &targets::flatten_leading(NAME, logits, targets)?;
        let (n, c) = check_float_2d(NAME, "logits", logits)?;
        check_same_device(NAME, "targets", logits, targets)?;
        let kind = if targets.dtype() == DType::I64 && targets.rank() == 2 {
            if targets.dims() != [n, c] {
                bail!(
                    "{NAME}: dense targets must have the logits' shape [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Kind::DenseI64
        } else {
            targets::target_kind(NAME, logits, targets, n, c)?
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
        crate::check::check_supported_device(NAME, logits)?;
        if logits.device().is_cpu() && logits.track_op() && cpu::cpu_kernels() {
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
            with_float_type!(NAME, a.dtype(), T, {
                let x = cpu_slice::<T>(NAME, a, l1)?;
                let tg = CpuTargets::<T>::new(NAME, kind, b, l2)?;
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
        let op = Fwd {
            k: ApOp {
                global,
                kind: inp.kind,
            },
            saved: Some(saved),
            w: None,
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
                with_float_type!(NAME, a.dtype(), T, {
                    let x = cpu_slice::<T>(NAME, a, l1)?;
                    cpu_gather(x, &CpuTargets::<T>::new(NAME, kind, b, l2)?, n, c)?
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
                with_float_type!(NAME, a.dtype(), T, {
                    let x = cpu_slice::<T>(NAME, a, l1)?;
                    cpu_bucket(
                        &plan,
                        x,
                        &CpuTargets::<T>::new(NAME, kind, b, l2)?,
                        n,
                        c,
                        None,
                    )?
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
        let op = ApOp {
            global: global.clone(),
            kind: inp.kind,
        };
        let op = Fwd::new(op, false);
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
        let op = Bwd(
            ApOp {
                global: global.clone(),
                kind: inp.kind,
            },
            Wrt::Input,
            None,
        );
        inp.logits
            .apply_op3_no_bwd(&inp.targets, &one, &op)?
            .reshape(logits.dims())
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

mod passes;
mod plan;
mod stats;

use passes::*;
use plan::*;
use stats::*;
pub use stats::{ApGlobal, ApStats};

// ---------------------------------------------------------------------------------------------
// Custom ops: forward (loss value) and update.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct ApOp {
    global: ApGlobal,
    kind: Kind,
}

impl LossKernel for ApOp {
    fn names(&self) -> Names {
        Names {
            loss: NAME,
            fwd: "ap-loss-fwd",
            bwd: "ap-loss-update",
        }
    }

    fn target_kind(&self) -> Kind {
        self.kind
    }

    /// The targets select roles; their gradient is zero.
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Zero
    }

    /// The loss the phases computed, carried into the graph so that `backward()` reaches the
    /// update (with `saved`: the update the fused CPU step already computed).
    fn cpu_forward<T: Elem>(&self, _inp: &CpuInputs<'_, T>, _saved: Option<&SavedGrad>) -> CpuOut {
        let v = T::from_acc(T::A::from_f64(self.global.0.loss));
        Ok((T::to_cpu_storage_owned(vec![v]), Shape::from(())))
    }

    /// The update times the (scalar) upstream gradient.
    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (n, c) = inp.dims2(NAME)?;
        let [g] = up else {
            bail!(
                "{NAME}: upstream gradient has {} elements, expected 1",
                up.len()
            )
        };
        let g = WithDType::to_f64(*g);
        let out = cpu_update(&self.global.0, inp.x, &inp.t, g, n, c, None)?;
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))))
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_forward<G: crate::gpu::Gpu, T: crate::gpu::DevFloat>(
        &self,
        g: &G,
        _a: crate::gpu::FwdIn<'_, G>,
    ) -> crate::gpu::Out<G> {
        let v = T::from_acc(<T::A as Acc>::from_f64(self.global.0.loss));
        Ok((g.storage_from(vec![v])?, Shape::from(())))
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_backward<G: crate::gpu::Gpu, T: crate::gpu::DevFloat>(
        &self,
        g: &G,
        a: crate::gpu::BwdIn<'_, G>,
    ) -> crate::gpu::Out<G> {
        gpu::update::<G, T>(g, &self.global.0, self.kind, a.x, a.t, a.up)
    }
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
