//! Distribution focal loss (Li et al. 2020, GFL; YOLOv8's DFL) as a fused Candle custom op.
//!
//! Each row of bin logits is swept in L1 as the softmax rows are: its max, then `e^{x_k - m}`
//! (one `exp` per element, kept in a scratch row) and one lane sum, from which both
//! cross-entropies of the row follow; the gradient `∂l/∂x_k = p_k - w_k` comes from the same
//! scratch row. A scalar loss of logits that track gradients writes that gradient in the same
//! pass, and the backward only scales it. The gradient to the targets, `x_i - x_{i+1}`, needs
//! no log-sum-exp and has its own backward op.

use crate::check::{check_float_2d, check_same_device};
use crate::cpu::{self, lane_max, lane_sum, map_chunks, scalar_rows};
use crate::cpu::{rows_per_chunk, vectorized, zeroed_vec};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight::{self, Weight};
use candle_core::{bail, Result, Shape, Tensor};

const NAME: &str = "DistributionFocalLoss";

/// Distribution focal loss of GFL (Li et al., *Generalized Focal Loss*, 2020), also YOLOv8's
/// DFL: a box side's distance is predicted as a distribution over `K` bins, and the loss is the
/// cross-entropy towards the two bins around the continuous target, fused into one custom op
/// with a hand-written backward (mmdet's `distribution_focal_loss`).
///
/// # Formula
///
/// For a row of bin logits `x` (`K` bins `0..K`) and a target `y ∈ [0, K-1]`, with
/// `CE(x, j) = log Σ_k e^{x_k} - x_j` and `i = min(⌊y⌋, K-2)`:
///
/// ```text
/// l     = (i + 1 - y)·CE(x, i) + (y - i)·CE(x, i + 1)
/// ∂l/∂x_k = p_k - (i + 1 - y)·[k = i] - (y - i)·[k = i + 1],   p = softmax(x)
/// ∂l/∂y   = CE(x, i + 1) - CE(x, i) = x_i - x_{i+1}
/// ```
///
/// `i` is clamped to `K - 2` so that at `y = K - 1` only bin `K - 1` counts (`l = CE(x, K-1)`,
/// where mmdet and YOLOv8 would index bin `K`; they clamp `y` below `K - 1`) and `∂l/∂y` there is
/// the left derivative. At an integer `y < K - 1` the weight of bin `i + 1` is 0 and `∂l/∂y` is
/// the right derivative (`⌊y⌋` has no gradient, as in torch's autograd of this formula). `K = 1`
/// allows only `y = 0`: `l = 0`, zero gradients. The log-sum-exp subtracts the row max, and each
/// `CE` is evaluated as `log1p(Σ_{k≠a} e^{x_k - m}) + (m - x_j)` (`a` the max's bin), a sum of
/// non-negative terms, so logits of ±100 (f32) or ±30 (f16/bf16) give a finite loss and
/// gradient; a NaN logit makes its row's loss and gradients NaN (also `∂l/∂y`, as torch's,
/// whenever the row holds a NaN or `+∞`).
///
/// The targets receive a gradient when they track one (a `Var`, or computed from one).
///
/// [`forward_weighted`](Self::forward_weighted) multiplies each row's loss by its weight inside
/// the kernel, before the reduction: `w_i·l_i`, with `w_i·∂l/∂x` and `w_i·∂l/∂y` for the
/// logits and tracked targets, and `∂/∂w_i = l_i` for a weight that tracks one. A weight of
/// ones gives `forward`'s bits.
///
/// Reductions: `None` gives `[N]`; `Sum`; `Mean` = sum / N (0 for an empty batch; with a weight
/// still N); `AvgFactor(f)` = sum / f. Scalar reductions are computed inside the kernel; on the CPU a
/// scalar loss of logits that track gradients writes `∂l/∂x` in the same pass as the loss.
///
/// # Shapes
///
/// - `logits`: `[N, K]`, f32 / f64 / f16 / bf16, `K ≥ 1` (half types are computed in f32).
/// - `targets`: `[N]`, in the logits' dtype, each in `[0, K-1]`.
/// - `weight` (`forward_weighted`): the targets' shape (one per row), in the logits' dtype.
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
///
/// A YOLOv8 head predicts `[B, A, 4, K]` (`K = reg_max`, e.g. 16, four box sides per anchor)
/// with target distances `[B, A, 4]` (in bin units, from the anchor point): pass them as they
/// are (leading dimensions: one `[B·A·4, K]` problem). YOLOv8 weights each anchor's DFL by its
/// target score and averages the 4 sides: pass the `[B, A]` weight broadcast over the sides,
/// `weight.unsqueeze(2)?.broadcast_as((B, A, 4))?.contiguous()?`, to
/// [`forward_weighted`](Self::forward_weighted), with `AvgFactor(4 · Σ score)` for YOLOv8's
/// `mean(-1) · weight / target_scores_sum` (the example there).
///
/// # Errors
///
/// Every message starts with `DistributionFocalLoss:`. A tensor on a Metal device (only the CPU
/// and CUDA have kernels); logits not of rank 2, of a non-float dtype or with `K = 0`; targets
/// of another shape, dtype or device; a target outside `[0, K-1]` or NaN (checked in the same
/// pass as the loss; on CUDA the kernel raises a flag that becomes the `Err`); `AvgFactor` not
/// finite and > 0; a weight not of the targets' shape, dtype or device.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::DistributionFocalLoss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // 2 box sides, 4 bins; the targets 1.25 and 3.0 (= K - 1) in bin units.
/// let logits = Var::new(&[[0.1f32, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]], &dev)?;
/// let targets = Tensor::new(&[1.25f32, 3.0], &dev)?;
/// let loss = DistributionFocalLoss::default().forward(logits.as_tensor(), &targets)?;
/// let grads = loss.backward()?;
/// let g = grads.get(&logits).expect("logits receive a gradient").to_vec2::<f32>()?;
/// // Row 2: uniform p = 1/4, only bin 3 is the target: (p - 1) / N at bin 3.
/// assert!((g[1][3] - (0.25 - 1.0) / 2.0).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributionFocalLoss {
    /// How the `[N]` row losses are reduced (default `Mean` = sum / N).
    pub reduction: Reduction,
}

impl Default for DistributionFocalLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
        }
    }
}

impl DistributionFocalLoss {
    /// Computes the loss of bin `logits` `[N, K]` against continuous `targets` `[N]` in
    /// `[0, K-1]`.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        crate::targets::with_leading_dims(NAME, logits, targets, |x, t| self.forward_2d(x, t, None))
    }

    /// The loss with each row's loss multiplied by `weight` inside the kernels: one value per
    /// row, of the targets' shape (the leading shape of the logits: `[N]` for `[N, K]`,
    /// `[B, A, 4]` for YOLOv8's `[B, A, 4, K]`). `Mean` still divides by N. The gradients of
    /// the logits and of tracked targets carry the weight; the weight gets its own gradient
    /// when it tracks one.
    ///
    /// # Example
    ///
    /// YOLOv8's DFL: each anchor's four side losses weighted by its target score (a `[B, A]`
    /// score broadcast over the sides to `[B, A, 4]`), averaged over the sides, summed and
    /// divided by the score sum: `AvgFactor(4 · Σ score)`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use candle_detloss::{DistributionFocalLoss, Reduction};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let (b, a, k) = (2, 3, 16); // batch, anchors, reg_max bins
    /// let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, a, 4, k), &dev)?)?;
    /// let targets = Tensor::rand(0f32, 15.0, (b, a, 4), &dev)?; // distances in bins
    /// let score = Tensor::new(&[[0.9f32, 0.0, 0.4], [0.7, 0.2, 0.0]], &dev)?; // [B, A]
    /// let weight = score.unsqueeze(2)?.broadcast_as((b, a, 4))?.contiguous()?;
    /// let score_sum = score.sum_all()?.to_scalar::<f32>()? as f64;
    /// let dfl = DistributionFocalLoss { reduction: Reduction::AvgFactor(4.0 * score_sum) };
    /// let loss = dfl.forward_weighted(logits.as_tensor(), &targets, &weight)?;
    /// let g = loss.backward()?.get(&logits).unwrap().flatten_all()?.to_vec1::<f32>()?;
    /// // Batch 0, anchor 1 (score 0): its 4 rows of K bins get no gradient.
    /// assert!(g[4 * k..8 * k].iter().all(|v| *v == 0.0));
    /// assert!(g[..4 * k].iter().any(|v| *v != 0.0));
    /// # Ok(()) }
    /// ```
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        crate::check::check_supported_device(NAME, logits)?;
        let dims = logits.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        if weight.dims() != lead {
            bail!(
                "{NAME}: weight must have shape {lead:?} (one per row of logits {dims:?}), got {:?}",
                weight.dims()
            )
        }
        let n: usize = lead.iter().product();
        weight::weighted(
            NAME,
            self.reduction,
            weight,
            |w, reduction, detach| {
                let loss = Self { reduction };
                let (x, t) = if detach {
                    (logits.detach(), targets.detach())
                } else {
                    (logits.clone(), targets.clone())
                };
                crate::targets::with_leading_dims(NAME, &x, &t, |x2, t2| {
                    let w = w
                        .map(|w| weight::flatten_leading(x.dims(), w))
                        .transpose()?;
                    loss.forward_2d(x2, t2, w.as_ref())
                })
            },
            // Mean = sum / N, as without a weight.
            || Tensor::new(n as f64, logits.device())?.to_dtype(logits.dtype()),
        )
    }

    fn forward_2d(&self, logits: &Tensor, targets: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        self.reduction.validate(NAME)?;
        let (n, k) = check_float_2d(NAME, "logits", logits)?;
        if k == 0 {
            bail!("{NAME}: logits must have at least one bin, got shape [{n}, 0]")
        }
        check_same_device(NAME, "targets", logits, targets)?;
        if targets.dtype() != logits.dtype() {
            bail!(
                "{NAME}: targets must have the logits' dtype {:?}, got {:?}",
                logits.dtype(),
                targets.dtype()
            )
        }
        if targets.dims() != [n] {
            bail!(
                "{NAME}: targets must have shape [N] = [{n}] next to logits [{n}, {k}], got {:?}",
                targets.dims()
            )
        }
        let w = w
            .map(|w| Weight::new(NAME, logits, w, &[n], &[n]))
            .transpose()?;
        let op = DflOp {
            reduction: self.reduction,
        };
        // Training (a scalar loss of logits that track gradients): the forward pass also
        // computes the gradient, and the backward only scales it.
        let op = Fwd::new(op, self.reduction.is_scalar() && logits.track_op()).weighted(w);
        logits.contiguous()?.apply_op2(&targets.contiguous()?, op)
    }
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone, Copy, Debug)]
struct DflOp {
    reduction: Reduction,
}

// ---------------------------------------------------------------------------------------------
// CPU row kernel
// ---------------------------------------------------------------------------------------------

/// Checks target `y` of row `i` against `[0, k-1]` (a NaN fails both comparisons).
#[inline(always)]
fn check_target<A: Acc>(y: A, k: usize, i: usize) -> Result<()> {
    if !(y >= A::ZERO && y <= A::from_f64((k - 1) as f64)) {
        bail!(
            "{NAME}: target {} at [{i}] is outside [0, {}] (K = {k} bins)",
            y.to_f64(),
            k - 1
        )
    }
    Ok(())
}

/// The two bins of a valid target `y` among `k` and their weights: `(i, j, w_i, w_j)` with
/// `i = min(⌊y⌋, k-2)`, `j = i + 1`, `w_i = i + 1 - y`, `w_j = y - i`; for `k = 1` bin 0 alone
/// (`j = i = 0`, `w_i = 1`, `w_j = 0`).
#[inline(always)]
fn bins<A: Acc>(y: A, k: usize) -> (usize, usize, A, A) {
    if k == 1 {
        return (0, 0, A::ONE, A::ZERO);
    }
    // y ≥ 0, so truncation is the floor.
    let i = (y.trunc_i32().max(0) as usize).min(k - 2);
    let fi = A::from_f64(i as f64);
    (i, i + 1, fi + A::ONE - y, y - fi)
}

/// Softmax statistics of one row relative to its max `m`: `r = Σ_{k≠a} e^{x_k - m}` over every
/// bin but the (first) max `a` (whose term is 1), so `Σ_k e^{x_k - m} = 1 + r` and
/// `log Σ_k e^{x_k - m} = log1p(r)` keep their digits as `p_a → 1`. `a = K` when no logit
/// reaches the finite lowest start (NaN or `-∞` rows).
#[derive(Clone, Copy)]
struct RowStats<A> {
    m: A,
    r: A,
    a: usize,
}

/// The statistics of row `x`, in plain sweeps of the row (in L1) that LLVM vectorises: the max,
/// then `e[k] = e^{x_k - m}` (kept in `e` for the gradient), then a fixed-order lane sum.
#[inline(always)]
fn row_stats<T: Elem>(x: &[T], e: &mut [T::A]) -> RowStats<T::A> {
    for (ev, xv) in e.iter_mut().zip(x) {
        *ev = xv.to_acc();
    }
    // A finite "lowest" start: a NaN is never selected and reaches r through its e.
    let m = lane_max(e, <T::A as Acc>::from_f64(f32::MIN as f64));
    let a = e.iter().position(|v| *v == m).unwrap_or(e.len());
    for ev in e.iter_mut() {
        *ev = (*ev - m).exp();
    }
    let r = if a < e.len() {
        // Σ over the other bins (e_a left out, not subtracted).
        let e_a = std::mem::replace(&mut e[a], <T::A as Acc>::ZERO);
        let r = lane_sum(e);
        e[a] = e_a;
        r
    } else {
        lane_sum(e)
    };
    RowStats { m, r, a }
}

/// One row with target `y` (row index `row`, for the error): its loss, and with `g` its
/// gradient `∂l/∂x` times `coef`.
#[inline(always)]
fn row_eval<T: Elem>(
    x: &[T],
    y: T,
    row: usize,
    e: &mut [T::A],
    coef: T::A,
    g: Option<&mut [T]>,
) -> Result<T::A> {
    let k = x.len();
    let y = y.to_acc();
    check_target(y, k, row)?;
    let (i, j, wi, wj) = bins(y, k);
    let st = row_stats(x, e);
    // log Σ_k e^{x_k - m} = lse - m, and CE(x, b) = lse - x_b = log1p(r) + (m - x_b): two
    // non-negative terms.
    let lse_m = st.r.log1p();
    let ce_i = lse_m + (st.m - x[i].to_acc());
    let ce_j = lse_m + (st.m - x[j].to_acc());
    if let Some(g) = g {
        let one = <T::A as Acc>::ONE;
        let inv_s = one / (one + st.r); // 1 / Σ_k e^{x_k - m}
        for (gk, ek) in g.iter_mut().zip(e.iter()) {
            *gk = T::from_acc(coef * (*ek * inv_s)); // p_k (every bin but i, j, a)
        }
        // The target weight of bin b: w_i at i, w_j at j (both at bin 0 when K = 1).
        let w = |b: usize| {
            let zero = <T::A as Acc>::ZERO;
            (if b == i { wi } else { zero }) + (if b == j { wj } else { zero })
        };
        for b in [i, j, st.a] {
            if b < k {
                // p_b - w_b; at the max bin a, p_a - w_a = (1 - w_a) - r/s (no cancellation
                // as p_a → 1).
                let v = if b == st.a {
                    (one - w(b)) - st.r * inv_s
                } else {
                    e[b] * inv_s - w(b)
                };
                g[b] = T::from_acc(coef * v);
            }
        }
    }
    // (i + 1 - y)·CE(x, i) + (y - i)·CE(x, i + 1)
    Ok(wi * ce_i + wj * ce_j)
}

/// `∂l/∂y` of one row with a valid target `y`: `CE(x, i+1) - CE(x, i) = x_i - x_{i+1}` (the
/// log-sum-exp cancels, so no pass of `exp`); 0 for `K = 1`; NaN when the row holds a NaN or
/// `+∞` logit, where the loss and torch's gradient are NaN.
#[inline(always)]
fn target_grad<T: Elem>(x: &[T], y: T::A) -> T::A {
    let inf = <T::A as Acc>::from_f64(f64::INFINITY);
    // +∞ (Equal) or NaN (None): not below +∞.
    let poisoned = x.iter().fold(false, |b, v| {
        b | !matches!(v.to_acc().partial_cmp(&inf), Some(std::cmp::Ordering::Less))
    });
    if poisoned {
        return <T::A as Acc>::from_f64(f64::NAN);
    }
    let (i, j, _, _) = bins(y, x.len());
    x[i].to_acc() - x[j].to_acc() // 0 for K = 1 (i = j)
}

impl DflOp {
    /// The forward: per-row losses (`Reduction::None`) or the reduced loss; with `saved` (a
    /// scalar reduction) the same pass writes the gradient for the backward.
    fn cpu_fwd_t<T: Elem>(
        &self,
        (x, y, w): (&[T], &[T], Option<&[T]>),
        k: usize,
        saved: Option<&SavedGrad>,
    ) -> CpuOut {
        let n = y.len();
        let rpc = rows_per_chunk(k);
        let zero = <T::A as Acc>::ZERO;
        if self.reduction == Reduction::None {
            let mut out = vec![T::from_acc(zero); n];
            map_chunks(
                &mut out,
                rpc,
                #[inline(always)]
                |ci, o| {
                    let mut e = vec![zero; k];
                    for (r, oi) in o.iter_mut().enumerate() {
                        let i = ci * rpc + r;
                        let xr = &x[i * k..(i + 1) * k];
                        let l = row_eval(xr, y[i], i, &mut e, zero, None)?;
                        *oi = T::from_acc(match row_weight(w, i) {
                            Some(wi) => wi * l,
                            None => l,
                        });
                    }
                    Ok(())
                },
            )?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from(n)));
        }
        let scale = self.reduction.scale(n as f64);
        let coef = <T::A as Acc>::from_f64(scale);
        // Σ l per chunk of rows, merged in chunk order; the gradient chunk (empty without
        // `saved`) rides along.
        let chunk = |ci: usize, mut gc: Option<&mut [T]>| -> Result<f64> {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = 0f64;
                    let mut e = vec![zero; k];
                    for (r, i) in (ci * rpc..((ci + 1) * rpc).min(n)).enumerate() {
                        let xr = &x[i * k..(i + 1) * k];
                        let grow = gc.as_deref_mut().map(|g| &mut g[r * k..(r + 1) * k]);
                        // Weighted: w_i · l_i, and the gradient times coef · w_i.
                        s += Acc::to_f64(match row_weight(w, i) {
                            Some(wi) => wi * row_eval(xr, y[i], i, &mut e, coef * wi, grow)?,
                            None => row_eval(xr, y[i], i, &mut e, coef, grow)?,
                        });
                    }
                    Ok(s)
                },
            )
        };
        scalar_rows::<T>((n, k, rpc), scale, saved, chunk)
    }

    /// Checks the upstream gradient's length against the reduction (`n` rows).
    fn check_up(&self, up: usize, n: usize) -> Result<bool> {
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up != 1 || !scalar_up && up != n {
            bail!("{NAME}: upstream gradient has {up} elements")
        }
        Ok(scalar_up)
    }

    /// `∂loss/∂x` when the forward saved nothing (or for `Reduction::None`): the same row
    /// kernel, so the same bits as the gradient a fused forward saves.
    fn cpu_bwd_t<T: Elem>(
        &self,
        (x, y, w): (&[T], &[T], Option<&[T]>),
        up: &[T],
        k: usize,
    ) -> CpuOut {
        let n = y.len();
        let scalar_up = self.check_up(up.len(), n)?;
        let scale = self.reduction.scale(n as f64);
        let rpc = rows_per_chunk(k);
        let zero = <T::A as Acc>::ZERO;
        let mut g = zeroed_vec::<T>(n * k)?;
        map_chunks(
            &mut g,
            rpc * k,
            #[inline(always)]
            |ci, gc| {
                let mut e = vec![zero; k];
                for (r, grow) in gc.chunks_mut(k).enumerate() {
                    let i = ci * rpc + r;
                    let coef = if scalar_up {
                        <T::A as Acc>::from_f64(scale)
                    } else {
                        <T::A as Acc>::from_f64(scale * Acc::to_f64(up[i].to_acc()))
                    };
                    let coef = row_weight(w, i).map_or(coef, |wi| coef * wi);
                    let xr = &x[i * k..(i + 1) * k];
                    row_eval(xr, y[i], i, &mut e, coef, Some(grow))?;
                }
                Ok(())
            },
        )?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, k))))
    }

    /// `∂loss/∂y` `[N]`: one read of each row (no `exp`).
    fn cpu_target_bwd_t<T: Elem>(
        &self,
        (x, y, w): (&[T], &[T], Option<&[T]>),
        up: &[T],
        k: usize,
    ) -> CpuOut {
        let n = y.len();
        let scalar_up = self.check_up(up.len(), n)?;
        let scale = self.reduction.scale(n as f64);
        let rpc = rows_per_chunk(k);
        let mut g = zeroed_vec::<T>(n)?;
        map_chunks(
            &mut g,
            rpc,
            #[inline(always)]
            |ci, gc| {
                for (r, gi) in gc.iter_mut().enumerate() {
                    let i = ci * rpc + r;
                    let yi = y[i].to_acc();
                    check_target(yi, k, i)?;
                    let u = up[if scalar_up { 0 } else { i }].to_acc();
                    let coef = <T::A as Acc>::from_f64(scale * Acc::to_f64(u));
                    let coef = row_weight(w, i).map_or(coef, |wi| coef * wi);
                    *gi = T::from_acc(coef * target_grad(&x[i * k..(i + 1) * k], yi));
                }
                Ok(())
            },
        )?;
        Ok((T::to_cpu_storage_owned(g), Shape::from(n)))
    }
}

/// The weight of row `i` (a `forward_weighted` call), in the accumulator type; `None` without
/// a weight. The weight's length is checked by [`cpu_inputs`].
#[inline(always)]
fn row_weight<T: Elem>(w: Option<&[T]>, i: usize) -> Option<T::A> {
    w.and_then(|w| w.get(i)).map(|v| v.to_acc())
}

/// The logits, the targets and the weight (one per row) of the CPU inputs.
type Xyw<'a, T> = (&'a [T], &'a [T], Option<&'a [T]>);

/// The logits, targets, weight (one per row) and `K` of the CPU inputs.
fn cpu_inputs<'a, T: Elem>(inp: &CpuInputs<'a, T>) -> Result<(Xyw<'a, T>, usize)> {
    let (n, k) = inp.dims2(NAME)?;
    let y = inp.t.dense(NAME)?;
    if y.len() != n || k == 0 {
        bail!(
            "{NAME}: internal error, {} targets next to logits [{n}, {k}]",
            y.len()
        )
    }
    let w = inp.w.map(|w| w.v);
    if let Some(w) = w {
        if w.len() != n {
            bail!(
                "{NAME}: internal error, a weight of {} values for {n} rows",
                w.len()
            )
        }
    }
    Ok(((inp.x, y, w), k))
}

impl LossKernel for DflOp {
    fn names(&self) -> Names {
        Names {
            loss: NAME,
            fwd: "distribution-focal-fwd",
            bwd: "distribution-focal-bwd",
        }
    }

    /// One float target per row, read as dense.
    fn target_kind(&self) -> TargetKind {
        TargetKind::Dense
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        let (xyw, k) = cpu_inputs(inp)?;
        self.cpu_fwd_t(xyw, k, saved)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (xyw, k) = cpu_inputs(inp)?;
        self.cpu_bwd_t(xyw, up, k)
    }

    /// `∂l/∂y = CE(x, i+1) − CE(x, i)`, the DFL kernels' own.
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Kernel
    }

    fn cpu_target_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (xyw, k) = cpu_inputs(inp)?;
        self.cpu_target_bwd_t(xyw, up, k)
    }

    crate::op::gpu_kernel_methods!(target_grad);
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
