//! Elementwise box-regression losses: smooth L1 (Girshick 2015) and balanced L1 (Pang et al.
//! 2019, Libra R-CNN), fused into one custom op each with a hand-written backward.

use crate::check::{check_float, check_same_device};
use crate::cpu::{lane_sum, ordered_sum, scale_in_place, vectorized, zeroed_vec, CHUNK_ELEMS};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight::{self, CpuWeight, Weight};
use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

const SMOOTH: &str = "SmoothL1Loss";
const BALANCED: &str = "BalancedL1Loss";

/// Smooth L1 loss (Girshick, *Fast R-CNN*, 2015), the Faster R-CNN box-regression loss, fused
/// into one custom op with a hand-written backward.
///
/// # Formula
///
/// For a prediction `x`, a target `t` and `d = x - t`:
///
/// ```text
/// l = 0.5·d²/β      if |d| < β
///     |d| - 0.5·β   otherwise
/// ∂l/∂x = d/β  if |d| < β, else sign(d)      (sign(0) = 0)
/// ```
///
/// exactly as `torch.nn.functional.smooth_l1_loss`; `β = 0` is the plain L1 loss `|d|`, whose
/// gradient at `d = 0` is 0 (as torch's), never NaN. `pred` receives a gradient, and so does a
/// `target` that tracks one (`−∂l/∂x`).
///
/// [`forward_weighted`](Self::forward_weighted) multiplies each element loss by a weight inside
/// the kernel, before the reduction (mmdet's `weight`): `l_j·w_j`, with `∂/∂x_j = w_j·∂l/∂x_j`;
/// the weight is one value per row (the leading shape, shared by the row's `D` elements) or one
/// per element (mmdet's `bbox_weights`). A weight of ones gives `forward`'s bits; a weight that
/// tracks a gradient gets `∂/∂w`.
///
/// Reductions: `None` gives the input shape; `Sum`; `Mean` = sum / number of elements (0 for an
/// empty input; with a weight still the number of elements, not the weight sum: pass
/// `AvgFactor` for mmdet's `avg_factor`); `AvgFactor(f)` = sum / f. Scalar reductions are
/// computed inside the kernel.
///
/// # Shapes
///
/// - `pred`, `target`: any shape (usually `[N, 4]` box deltas), the same for both; f32 / f64 /
///   f16 / bf16, the same dtype for both (half types are computed in f32).
/// - `weight` (`forward_weighted`): `pred`'s leading shape `[...]` (`[N]` for `[N, 4]`: one per
///   row) or `pred`'s shape (one per element), in `pred`'s dtype.
/// - result: the input shape for `Reduction::None`, else a rank-0 tensor; the input dtype.
///
/// # Errors
///
/// Every message starts with `SmoothL1Loss:`. A tensor on a Metal device (only the CPU and CUDA
/// have kernels); `pred` not a float dtype; `target` of another shape, dtype or device; `beta`
/// negative or not finite; `AvgFactor` not finite and > 0; a weight of another shape, dtype or
/// device (values are not checked: a negative or NaN weight goes into the loss as it is).
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{Reduction, SmoothL1Loss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let pred = Var::new(&[[0.1f32, 0.2, 2.0, -0.5]], &dev)?;
/// let target = Tensor::new(&[[0.0f32, 0.2, 0.0, 0.0]], &dev)?;
/// let loss_fn = SmoothL1Loss { beta: 1.0 / 9.0, reduction: Reduction::Sum };
/// let loss = loss_fn.forward(pred.as_tensor(), &target)?;
/// let grads = loss.backward()?;
/// let g = grads.get(&pred).unwrap().to_vec2::<f32>()?;
/// assert_eq!(g[0][1], 0.0); // d = 0
/// assert_eq!(g[0][2], 1.0); // |d| ≥ β: sign(d)
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothL1Loss {
    /// Transition point β ≥ 0 between the quadratic and the linear part (1.0 in torch and
    /// mmdet; RetinaNet configs use 1/9 or 0.1). 0 gives the L1 loss.
    pub beta: f64,
    /// How the elementwise losses are reduced (default `Mean`).
    pub reduction: Reduction,
}

impl Default for SmoothL1Loss {
    fn default() -> Self {
        Self {
            beta: 1.0,
            reduction: Reduction::Mean,
        }
    }
}

impl SmoothL1Loss {
    /// Computes the loss of `pred` against `target` (same shape and dtype).
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        apply(self.op(pred)?, pred, target, None)
    }

    /// The loss with each element loss multiplied by `weight` inside the kernels (mmdet's
    /// `weight` / `bbox_weights`): of the leading shape of `pred` (`[N]` for `[N, 4]`, one
    /// weight per row, shared by its `D` elements) or of `pred`'s shape (one per element).
    /// `Mean` still divides by the number of elements. See the type's documentation.
    ///
    /// # Example
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use candle_detloss::{Reduction, SmoothL1Loss};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let pred = Var::new(&[[0.5f32, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]], &dev)?;
    /// let target = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
    /// let loss_fn = SmoothL1Loss { beta: 1.0, reduction: Reduction::Sum };
    /// // Box 2 is a negative anchor: weight 0 (one weight per box, mmdet's `weight`).
    /// let w = Tensor::new(&[1f32, 0.0], &dev)?;
    /// let loss = loss_fn.forward_weighted(pred.as_tensor(), &target, &w)?;
    /// assert_eq!(loss.to_scalar::<f32>()?, 0.125 + 1.5);
    /// let g = loss.backward()?.get(&pred).unwrap().to_vec2::<f32>()?;
    /// assert_eq!(g[1], [0.0; 4]);
    /// // Or one weight per element (mmdet's `bbox_weights`, `[N, 4]`).
    /// let w4 = Tensor::new(&[[1f32, 1.0, 0.5, 1.0], [0.0; 4]], &dev)?;
    /// let loss = loss_fn.forward_weighted(pred.as_tensor(), &target, &w4)?;
    /// assert_eq!(loss.to_scalar::<f32>()?, 0.125 + 0.75);
    /// # Ok(()) }
    /// ```
    pub fn forward_weighted(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        apply(self.op(pred)?, pred, target, Some(weight))
    }

    /// The validated op.
    fn op(&self, pred: &Tensor) -> Result<RegOp> {
        crate::check::check_supported_device(SMOOTH, pred)?;
        self.reduction.validate(SMOOTH)?;
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("{SMOOTH}: beta must be finite and >= 0, got {}", self.beta)
        }
        Ok(RegOp {
            kind: Kind::Smooth { beta: self.beta },
            reduction: self.reduction,
        })
    }
}

/// Balanced L1 loss of Libra R-CNN (Pang et al., *Libra R-CNN: Towards Balanced Learning for
/// Object Detection*, 2019), fused into one custom op with a hand-written backward.
///
/// # Formula
///
/// With `d = x - t`, `b = e^{γ/α} - 1` (so that `α·ln(b+1) = γ`):
///
/// ```text
/// l = α/b·(b|d| + 1)·ln(b|d|/β + 1) - α|d|    if |d| < β
///     γ|d| + γ/b - α·β                         otherwise
/// ∂l/∂x = sign(d)·α·[ln(b|d|/β + 1) + (1-β)/(b|d| + β)]   if |d| < β
///         sign(d)·γ                                        otherwise
/// ```
///
/// the mmdetection `balanced_l1_loss` formula; the gradient is its exact derivative (for
/// `β = 1`, the paper's `α·ln(b|d| + 1)`). At `d = 0` the gradient is 0 (`sign(0) = 0`, as torch
/// autograd gives for mmdet's `|d|`). `pred` receives a gradient, and so does a `target` that
/// tracks one (`−∂l/∂x`).
///
/// [`forward_weighted`](Self::forward_weighted) multiplies each element loss by a weight inside
/// the kernel (`l_j·w_j`), one per row or one per element, as
/// [`SmoothL1Loss::forward_weighted`].
///
/// Reductions: `None` gives the input shape; `Sum`; `Mean` = sum / number of elements (0 for an
/// empty input; with a weight still the number of elements); `AvgFactor(f)` = sum / f.
///
/// # Shapes
///
/// - `pred`, `target`: any shape (usually `[N, 4]`), the same for both; f32 / f64 / f16 / bf16,
///   the same dtype for both.
/// - `weight` (`forward_weighted`): `pred`'s leading shape (one per row) or `pred`'s shape (one
///   per element), in `pred`'s dtype.
/// - result: the input shape for `Reduction::None`, else a rank-0 tensor; the input dtype.
///
/// # Errors
///
/// Every message starts with `BalancedL1Loss:`. A tensor on a Metal device (only the CPU and CUDA
/// have kernels); `pred` not a float dtype; `target` of another shape, dtype or device; `alpha ≤
/// 0`, `gamma ≤ 0` (b = 0 would divide by zero), `beta < 0`, any of them not finite, or `e^{γ/α}`
/// overflowing f64; `AvgFactor` not finite and > 0; a weight of another shape, dtype or device.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::BalancedL1Loss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let pred = Var::new(&[[0.5f32, 0.2, 3.0, -0.5]], &dev)?;
/// let target = Tensor::new(&[[0.0f32, 0.2, 0.0, 0.0]], &dev)?;
/// let loss = BalancedL1Loss::default().forward(pred.as_tensor(), &target)?;
/// let grads = loss.backward()?;
/// let g = grads.get(&pred).unwrap().to_vec2::<f32>()?;
/// // Outside |d| < β the gradient is γ / numel = 1.5 / 4.
/// assert!((g[0][2] - 0.375).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancedL1Loss {
    /// α > 0: scales the gradient of the inliers (0.5 in the paper).
    pub alpha: f64,
    /// γ > 0: the gradient of the outliers, `|∂l/∂x| = γ` for `|d| ≥ β` (1.5 in the paper).
    pub gamma: f64,
    /// β ≥ 0: the inlier / outlier boundary (1.0).
    pub beta: f64,
    /// How the elementwise losses are reduced (default `Mean`).
    pub reduction: Reduction,
}

impl Default for BalancedL1Loss {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            gamma: 1.5,
            beta: 1.0,
            reduction: Reduction::Mean,
        }
    }
}

impl BalancedL1Loss {
    /// Computes the loss of `pred` against `target` (same shape and dtype).
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        apply(self.op(pred)?, pred, target, None)
    }

    /// The loss with each element loss multiplied by `weight` inside the kernels: of the
    /// leading shape of `pred` (`[N]` for `[N, 4]`, one weight per row) or of `pred`'s shape
    /// (one per element), as [`SmoothL1Loss::forward_weighted`]. `Mean` still divides by the
    /// number of elements.
    pub fn forward_weighted(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        apply(self.op(pred)?, pred, target, Some(weight))
    }

    /// The validated op.
    fn op(&self, pred: &Tensor) -> Result<RegOp> {
        crate::check::check_supported_device(BALANCED, pred)?;
        self.reduction.validate(BALANCED)?;
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "{BALANCED}: alpha must be finite and > 0, got {}",
                self.alpha
            )
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            bail!(
                "{BALANCED}: gamma must be finite and > 0, got {}",
                self.gamma
            )
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!(
                "{BALANCED}: beta must be finite and >= 0, got {}",
                self.beta
            )
        }
        if !(self.gamma / self.alpha).exp().is_finite() {
            bail!(
                "{BALANCED}: gamma / alpha = {} is too large (e^(gamma/alpha) overflows)",
                self.gamma / self.alpha
            )
        }
        Ok(RegOp {
            kind: Kind::Balanced {
                alpha: self.alpha,
                gamma: self.gamma,
                beta: self.beta,
            },
            reduction: self.reduction,
        })
    }
}

/// Validates the inputs and applies the forward op, with the weight of a `forward_weighted`
/// call (its own gradient through [`weight::weighted`] when it tracks one).
fn apply(op: RegOp, pred: &Tensor, target: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let name = op.name();
    check_float(name, "pred", pred)?;
    check_same_device(name, "target", pred, target)?;
    if target.dtype() != pred.dtype() {
        bail!(
            "{name}: target dtype {:?} differs from the pred dtype {:?}",
            target.dtype(),
            pred.dtype()
        )
    }
    if target.dims() != pred.dims() {
        bail!(
            "{name}: target shape {:?} differs from the pred shape {:?}",
            target.dims(),
            pred.dims()
        )
    }
    let Some(w) = w else {
        return fused(op, pred, target, None);
    };
    let dims = pred.dims();
    // One weight per row: the leading shape (`[]` for a rank-0 or rank-1 input).
    let lead = &dims[..dims.len().saturating_sub(1)];
    let n = pred.elem_count();
    weight::weighted(
        name,
        op.reduction,
        w,
        |w, reduction, detach| {
            let op = RegOp { reduction, ..op };
            let (p, t) = if detach {
                (pred.detach(), target.detach())
            } else {
                (pred.clone(), target.clone())
            };
            let w = w
                .map(|w| Weight::new(name, &p, w, lead, dims))
                .transpose()?;
            fused(op, &p, &t, w)
        },
        // Mean = sum / number of elements, as without a weight.
        || Tensor::new(n as f64, pred.device())?.to_dtype(pred.dtype()),
    )
}

/// The fused op on validated inputs.
fn fused(op: RegOp, pred: &Tensor, target: &Tensor, w: Option<Weight>) -> Result<Tensor> {
    // Training (a scalar loss of a `pred` that tracks gradients): the forward pass also computes
    // the gradient, and the backward only scales it.
    let op = Fwd::new(op, op.reduction.is_scalar() && pred.track_op()).weighted(w);
    pred.contiguous()?.apply_op2(&target.contiguous()?, op)
}

/// Which loss, with its hyper-parameters.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Smooth { beta: f64 },
    Balanced { alpha: f64, gamma: f64, beta: f64 },
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone, Copy, Debug)]
struct RegOp {
    kind: Kind,
    reduction: Reduction,
}

/// The per-element constants of a loss, precomputed in f64 (the kernels take them as 8
/// accumulator-typed scalars, the same slots on the CPU and in `kernels/regression.cu`).
///
/// Smooth L1: `[β, 0.5/β, 0.5·β, 1/β, 0, 0, 0, 0]` (`1/β = inf` for β = 0: only ever used in the
/// branch `|d| < β` that is then never selected).
/// Balanced L1: `[β, α, b, α/b, b/β, γ, γ/b - α·β, 1 - β]`.
fn consts(kind: Kind) -> [f64; 8] {
    match kind {
        Kind::Smooth { beta } => [beta, 0.5 / beta, 0.5 * beta, 1.0 / beta, 0., 0., 0., 0.],
        Kind::Balanced { alpha, gamma, beta } => {
            let b = (gamma / alpha).exp_m1();
            [
                beta,
                alpha,
                b,
                alpha / b,
                b / beta,
                gamma,
                gamma / b - alpha * beta,
                1.0 - beta,
            ]
        }
    }
}

impl RegOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Smooth { .. } => SMOOTH,
            Kind::Balanced { .. } => BALANCED,
        }
    }
}

/// `sign(d)` with `sign(±0) = 0` and NaN propagated; branch-free (selects).
#[inline(always)]
fn sign<A: Acc>(d: A) -> A {
    let pos = if d > A::ZERO { A::ONE } else { A::ZERO };
    let neg = if d < A::ZERO { A::ONE } else { A::ZERO };
    #[allow(clippy::eq_op)]
    let nan = d != d; // NaN
    if nan {
        d
    } else {
        pos - neg
    }
}

/// Loss and derivative of one element as a function of `d = pred - target`.
trait ElemLoss<A: Acc>: Copy + Send + Sync {
    fn new(c: &[f64; 8]) -> Self;
    fn loss(&self, d: A) -> A;
    fn grad(&self, d: A) -> A;
}

#[derive(Clone, Copy)]
struct Smooth<A> {
    beta: A,
    half_inv_beta: A,
    half_beta: A,
    inv_beta: A,
}

impl<A: Acc> ElemLoss<A> for Smooth<A> {
    fn new(c: &[f64; 8]) -> Self {
        Self {
            beta: A::from_f64(c[0]),
            half_inv_beta: A::from_f64(c[1]),
            half_beta: A::from_f64(c[2]),
            inv_beta: A::from_f64(c[3]),
        }
    }

    #[inline(always)]
    fn loss(&self, d: A) -> A {
        let ad = d.abs();
        let quad = d * d * self.half_inv_beta; // 0.5 d²/β
        let lin = ad - self.half_beta; // |d| - 0.5 β (carries a NaN d)
        if ad < self.beta {
            quad
        } else {
            lin
        }
    }

    #[inline(always)]
    fn grad(&self, d: A) -> A {
        let inner = d * self.inv_beta; // d/β
        if d.abs() < self.beta {
            inner
        } else {
            sign(d)
        }
    }
}

/// `UNIT_BETA`: β = 1 (the default), where the gradient's `(1-β)/(b|d| + β)` is `+0` (or NaN
/// for a NaN `d`, which then gives NaN anyway) and is left out, a division less per element,
/// with bitwise the same result.
#[derive(Clone, Copy)]
struct Balanced<A, const UNIT_BETA: bool> {
    beta: A,
    alpha: A,
    b: A,
    alpha_over_b: A,
    b_over_beta: A,
    gamma: A,
    lin_c: A,
    one_minus_beta: A,
}

impl<A: Acc, const UNIT_BETA: bool> ElemLoss<A> for Balanced<A, UNIT_BETA> {
    fn new(c: &[f64; 8]) -> Self {
        Self {
            beta: A::from_f64(c[0]),
            alpha: A::from_f64(c[1]),
            b: A::from_f64(c[2]),
            alpha_over_b: A::from_f64(c[3]),
            b_over_beta: A::from_f64(c[4]),
            gamma: A::from_f64(c[5]),
            lin_c: A::from_f64(c[6]),
            one_minus_beta: A::from_f64(c[7]),
        }
    }

    #[inline(always)]
    fn loss(&self, d: A) -> A {
        let ad = d.abs();
        let ln = (self.b_over_beta * ad).log1p(); // ln(b|d|/β + 1)
        let inner = self.alpha_over_b * (self.b * ad + A::ONE) * ln - self.alpha * ad;
        let outer = self.gamma * ad + self.lin_c; // γ|d| + γ/b - αβ (carries a NaN d)
        if ad < self.beta {
            inner
        } else {
            outer
        }
    }

    #[inline(always)]
    fn grad(&self, d: A) -> A {
        let ad = d.abs();
        let ln = (self.b_over_beta * ad).log1p();
        // d/d|d| of the inner branch: α ln(b|d|/β + 1) + α (b|d| + 1)/(b|d| + β) - α
        //                           = α [ln(b|d|/β + 1) + (1 - β)/(b|d| + β)]
        let inner = if UNIT_BETA {
            // ln ≥ +0 (never -0), so ln + (+0) would be ln: the same bits.
            self.alpha * ln
        } else {
            self.alpha * (ln + self.one_minus_beta / (self.b * ad + self.beta))
        };
        let m = if ad < self.beta { inner } else { self.gamma };
        sign(d) * m
    }
}

/// Elements per block of the scalar reductions: the losses of a block are written to a stack
/// buffer by a plain map loop (which vectorises like the `None` path), then summed with
/// [`lane_sum`] in the accumulator type and flushed to f64 once per block, always in the same
/// order (deterministic).
const BLOCK: usize = 256;

/// How the kernels read the weight of a `forward_weighted` call (a const parameter, so that the
/// unweighted kernels are compiled exactly as without one).
const W_NONE: u8 = 0;
/// One weight per row of `d` elements: element `j` reads `w[j / d]`.
const W_ROW: u8 = 1;
/// One weight per element: element `j` reads `w[j]`.
const W_ELEM: u8 = 2;

/// The weight as the regression kernels read it: its values and the row length `d` (the last
/// dimension of the input; 1 for a rank-0 input).
#[derive(Clone, Copy)]
struct Wts<'a, T> {
    v: &'a [T],
    d: usize,
}

impl<'a, T: Elem> Wts<'a, T> {
    /// The weight of `n` elements in rows of `d`, its length checked against its mode (an
    /// empty input reads none of it).
    fn new(name: &str, w: CpuWeight<'a, T>, n: usize, d: usize) -> Result<Self> {
        let d = d.max(1);
        let want = if w.per_elem { n } else { n / d };
        if n > 0 && w.v.len() != want {
            bail!(
                "{name}: internal error, a weight of {} values for {n} elements",
                w.v.len()
            )
        }
        Ok(Self { v: w.v, d })
    }

    /// An empty weight (the unweighted kernels never read it).
    fn none() -> Self {
        Self { v: &[], d: 1 }
    }

    /// `buf[k]` = the weight of element `start + k` (`W_ROW`: `w[j / d]`, `W_ELEM`: `w[j]`), in
    /// the accumulator type; a position outside the weight (never, for a checked weight) reads
    /// 0.
    #[inline(always)]
    fn load<const W: u8>(&self, start: usize, buf: &mut [T::A]) {
        if W == W_ELEM {
            let src = self.v.get(start..).unwrap_or(&[]);
            let m = src.len().min(buf.len());
            buf[m..].fill(T::A::ZERO);
            for (b, v) in buf.iter_mut().zip(src) {
                *b = v.to_acc();
            }
        } else {
            // Row r = j / d, column c = j % d, stepped without a division per element.
            let (mut r, mut c) = (start / self.d, start % self.d);
            let mut wr = self.v.get(r).map_or(T::A::ZERO, |v| v.to_acc());
            for b in buf.iter_mut() {
                *b = wr;
                c += 1;
                if c == self.d {
                    c = 0;
                    r += 1;
                    wr = self.v.get(r).map_or(T::A::ZERO, |v| v.to_acc());
                }
            }
        }
    }
}

/// Sum of the losses of one chunk (its first element is element `start` of the input), in a
/// fixed order (deterministic); with `GRAD` it also writes `g[j] = coef · ∂l/∂x[j]` (`g` has
/// the chunk's length; without `GRAD` it is not touched). With a weight (`W ≠ W_NONE`) each
/// loss is `w_j · l_j` and each gradient `(coef · w_j) · ∂l/∂x[j]`: a weight of ones gives the
/// unweighted bits. The loss sum has the same bits with or without `GRAD`: the same
/// expressions, blocks and summation order.
#[inline(always)]
fn chunk_pass<T: Elem, L: ElemLoss<T::A>, const GRAD: bool, const W: u8>(
    l: &L,
    x: &[T],
    t: &[T],
    coef: T::A,
    g: &mut [T],
    w: Wts<'_, T>,
    start: usize,
) -> f64 {
    let mut total = 0f64;
    let mut buf = [T::A::ZERO; BLOCK];
    let mut wb = [T::A::ZERO; BLOCK];
    for (bi, (xb, tb)) in x.chunks(BLOCK).zip(t.chunks(BLOCK)).enumerate() {
        let m = xb.len().min(tb.len());
        if W != W_NONE {
            w.load::<W>(start + bi * BLOCK, &mut wb[..m]);
        }
        if GRAD {
            let gs = (bi * BLOCK).min(g.len());
            let ge = (gs + m).min(g.len());
            let gb = &mut g[gs..ge];
            if W == W_NONE {
                for (((b, gj), a), c) in buf.iter_mut().zip(gb).zip(xb).zip(tb) {
                    let d = a.to_acc() - c.to_acc();
                    *b = l.loss(d);
                    *gj = T::from_acc(coef * l.grad(d));
                }
            } else {
                for ((((b, gj), a), c), wj) in buf.iter_mut().zip(gb).zip(xb).zip(tb).zip(&wb) {
                    let d = a.to_acc() - c.to_acc();
                    *b = *wj * l.loss(d);
                    *gj = T::from_acc((coef * *wj) * l.grad(d));
                }
            }
        } else if W == W_NONE {
            for ((b, a), c) in buf.iter_mut().zip(xb).zip(tb) {
                *b = l.loss(a.to_acc() - c.to_acc());
            }
        } else {
            for (((b, a), c), wj) in buf.iter_mut().zip(xb).zip(tb).zip(&wb) {
                *b = *wj * l.loss(a.to_acc() - c.to_acc());
            }
        }
        total += lane_sum(&buf[..m]).to_f64();
    }
    total
}

/// `o[j] = T(f_j · e(x[j] − t[j]))` over one chunk (element `start` first), block by block, with
/// `f_j = w_j · u[j]` for a per-element upstream `u`, else `w_j · coef`: the weighted `None`
/// forward (`e` the loss, `coef` 1) and the weighted backward (`e` the derivative).
#[inline(always)]
fn weighted_map<T: Elem, const W: u8>(
    w: Wts<'_, T>,
    start: usize,
    (x, t): (&[T], &[T]),
    u: Option<&[T]>,
    coef: T::A,
    o: &mut [T],
    e: impl Fn(T::A) -> T::A,
) {
    let mut f = [T::A::ZERO; BLOCK];
    let blocks = o
        .chunks_mut(BLOCK)
        .zip(x.chunks(BLOCK).zip(t.chunks(BLOCK)));
    for (bi, (ob, (xb, tb))) in blocks.enumerate() {
        let m = ob.len().min(xb.len()).min(tb.len());
        w.load::<W>(start + bi * BLOCK, &mut f[..m]);
        match u.and_then(|u| u.get(bi * BLOCK..)) {
            Some(ub) => {
                for (fj, uj) in f.iter_mut().zip(ub) {
                    *fj = *fj * uj.to_acc();
                }
            }
            None => {
                for fj in f.iter_mut() {
                    *fj = *fj * coef;
                }
            }
        }
        for (((oj, a), c), fj) in ob.iter_mut().zip(xb).zip(tb).zip(&f) {
            *oj = T::from_acc(*fj * e(a.to_acc() - c.to_acc()));
        }
    }
}

/// Runs `$body` with the const `$W` set to the weight's mode (`W_NONE` without one).
macro_rules! by_weight {
    ($w:expr, $W:ident, $body:expr) => {
        match $w {
            None => {
                const $W: u8 = W_NONE;
                $body
            }
            Some(v) if !v.per_elem => {
                const $W: u8 = W_ROW;
                $body
            }
            Some(_) => {
                const $W: u8 = W_ELEM;
                $body
            }
        }
    };
}

fn cpu_fwd_t<T: Elem, L: ElemLoss<T::A>>(
    op: &RegOp,
    inp: (&[T], &[T], Option<CpuWeight<'_, T>>),
    shape: &Shape,
    saved: Option<&SavedGrad>,
) -> CpuOut {
    let (x, t, cw) = inp;
    let l = L::new(&consts(op.kind));
    let n = x.len();
    if n != t.len() {
        bail!(
            "{}: internal error, {n} predictions vs {} targets",
            op.name(),
            t.len()
        )
    }
    let d = shape.dims().last().copied().unwrap_or(1);
    let w = match cw {
        Some(cw) => Wts::new(op.name(), cw, n, d)?,
        None => Wts::none(),
    };
    if op.reduction == Reduction::None {
        let mut out = zeroed_vec::<T>(n)?;
        let one = T::A::ONE;
        out.par_chunks_mut(CHUNK_ELEMS)
            .zip(x.par_chunks(CHUNK_ELEMS).zip(t.par_chunks(CHUNK_ELEMS)))
            .enumerate()
            .for_each(|(ci, (o, (xs, ts)))| {
                vectorized(
                    #[inline(always)]
                    || {
                        by_weight!(cw, W, {
                            if W == W_NONE {
                                for ((oj, a), b) in o.iter_mut().zip(xs).zip(ts) {
                                    *oj = T::from_acc(l.loss(a.to_acc() - b.to_acc()));
                                }
                            } else {
                                let start = ci * CHUNK_ELEMS;
                                weighted_map::<T, W>(w, start, (xs, ts), None, one, o, |d| {
                                    l.loss(d)
                                });
                            }
                        })
                    },
                )
            });
        return Ok((T::to_cpu_storage_owned(out), shape.clone()));
    }
    let scale = op.reduction.scale(n as f64);
    let parts: Vec<f64> = match saved {
        // Training: the same pass also writes the gradient (for an upstream gradient of 1).
        Some(saved) => {
            let coef = T::A::from_f64(scale);
            let mut g = zeroed_vec::<T>(n)?;
            let parts = g
                .par_chunks_mut(CHUNK_ELEMS)
                .zip(x.par_chunks(CHUNK_ELEMS).zip(t.par_chunks(CHUNK_ELEMS)))
                .enumerate()
                .map(|(ci, (gs, (xs, ts)))| {
                    vectorized(
                        #[inline(always)]
                        || {
                            let s = ci * CHUNK_ELEMS;
                            by_weight!(cw, W, {
                                chunk_pass::<T, L, true, W>(&l, xs, ts, coef, gs, w, s)
                            })
                        },
                    )
                })
                .collect();
            saved.put(T::to_cpu_storage_owned(g), shape.clone());
            parts
        }
        None => x
            .par_chunks(CHUNK_ELEMS)
            .zip(t.par_chunks(CHUNK_ELEMS))
            .enumerate()
            .map(|(ci, (xs, ts))| {
                vectorized(
                    #[inline(always)]
                    || {
                        let (s, z) = (ci * CHUNK_ELEMS, T::A::ZERO);
                        by_weight!(cw, W, {
                            chunk_pass::<T, L, false, W>(&l, xs, ts, z, &mut [], w, s)
                        })
                    },
                )
            })
            .collect(),
    };
    let total = ordered_sum(&parts) * scale;
    let out = vec![T::from_acc(T::A::from_f64(total))];
    Ok((T::to_cpu_storage_owned(out), Shape::from(())))
}

fn cpu_bwd_t<T: Elem, L: ElemLoss<T::A>>(
    op: &RegOp,
    inp: (&[T], &[T], Option<CpuWeight<'_, T>>),
    up: &[T],
    shape: &Shape,
) -> CpuOut {
    let (x, t, cw) = inp;
    let l = L::new(&consts(op.kind));
    let n = x.len();
    let scalar_up = op.reduction.is_scalar();
    if n != t.len() || (scalar_up && up.len() != 1) || (!scalar_up && up.len() != n) {
        bail!(
            "{}: internal error, {n} predictions, {} targets, upstream gradient of {} elements",
            op.name(),
            t.len(),
            up.len()
        )
    }
    let d = shape.dims().last().copied().unwrap_or(1);
    let w = match cw {
        Some(cw) => Wts::new(op.name(), cw, n, d)?,
        None => Wts::none(),
    };
    let mut g = zeroed_vec::<T>(n)?;
    if let (true, Some(u)) = (scalar_up, up.first()) {
        // As the fused forward: the gradient for an upstream of 1, then scaled by the upstream
        // scalar (bit for bit what a gradient saved by the forward becomes).
        let coef = T::A::from_f64(op.reduction.scale(n as f64));
        g.par_chunks_mut(CHUNK_ELEMS)
            .zip(x.par_chunks(CHUNK_ELEMS).zip(t.par_chunks(CHUNK_ELEMS)))
            .enumerate()
            .for_each(|(ci, (gs, (xs, ts)))| {
                vectorized(
                    #[inline(always)]
                    || {
                        by_weight!(cw, W, {
                            if W == W_NONE {
                                for ((gj, a), b) in gs.iter_mut().zip(xs).zip(ts) {
                                    *gj = T::from_acc(coef * l.grad(a.to_acc() - b.to_acc()));
                                }
                            } else {
                                let s = ci * CHUNK_ELEMS;
                                weighted_map::<T, W>(w, s, (xs, ts), None, coef, gs, |d| l.grad(d));
                            }
                        })
                    },
                )
            });
        let u = u.to_acc().to_f64();
        if u != 1.0 {
            scale_in_place(&mut g, u);
        }
    } else {
        g.par_chunks_mut(CHUNK_ELEMS)
            .zip(x.par_chunks(CHUNK_ELEMS).zip(t.par_chunks(CHUNK_ELEMS)))
            .zip(up.par_chunks(CHUNK_ELEMS))
            .enumerate()
            .for_each(|(ci, ((gs, (xs, ts)), us))| {
                vectorized(
                    #[inline(always)]
                    || {
                        by_weight!(cw, W, {
                            if W == W_NONE {
                                for (((gj, a), b), u) in gs.iter_mut().zip(xs).zip(ts).zip(us) {
                                    let gr = l.grad(a.to_acc() - b.to_acc());
                                    *gj = T::from_acc(u.to_acc() * gr);
                                }
                            } else {
                                let (s, one) = (ci * CHUNK_ELEMS, T::A::ONE);
                                let u = Some(us);
                                weighted_map::<T, W>(w, s, (xs, ts), u, one, gs, |d| l.grad(d));
                            }
                        })
                    },
                )
            });
    }
    Ok((T::to_cpu_storage_owned(g), shape.clone()))
}

/// Runs `$f::<T, L>(args)` with `L` the element loss of `$op.kind` (balanced L1 with β = 1
/// has its own instance).
macro_rules! by_kind {
    ($op:expr, $f:ident, $T:ty, $($arg:expr),*) => {
        match $op.kind {
            Kind::Smooth { .. } => $f::<$T, Smooth<<$T as Elem>::A>>($op, $($arg),*),
            Kind::Balanced { beta: 1.0, .. } => {
                $f::<$T, Balanced<<$T as Elem>::A, true>>($op, $($arg),*)
            }
            Kind::Balanced { .. } => $f::<$T, Balanced<<$T as Elem>::A, false>>($op, $($arg),*),
        }
    };
}

impl LossKernel for RegOp {
    fn names(&self) -> Names {
        let (fwd, bwd) = match self.kind {
            Kind::Smooth { .. } => ("smooth-l1-fwd", "smooth-l1-bwd"),
            Kind::Balanced { .. } => ("balanced-l1-fwd", "balanced-l1-bwd"),
        };
        Names {
            loss: self.name(),
            fwd,
            bwd,
        }
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Dense
    }

    /// A function of `pred − target`.
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::NegatedInput
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        let t = inp.t.dense(self.name())?;
        by_kind!(self, cpu_fwd_t, T, (inp.x, t, inp.w), inp.shape, saved)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let t = inp.t.dense(self.name())?;
        by_kind!(self, cpu_bwd_t, T, (inp.x, t, inp.w), up, inp.shape)
    }

    crate::op::gpu_kernel_methods!();
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
