//! Softmax cross-entropy (the Faster R-CNN classification loss) and the softmax focal loss, as
//! fused Candle custom ops sharing one row kernel.
//!
//! Each row (in L1) is swept a few times with vectorised loops: its max, then `e^{x_k - m}`
//! (one `exp` per element, kept in a scratch row) and the sums, from which the row loss
//! follows; the gradient `∂l/∂x_j = a·p_j - c·w_j` (plus a label-column correction) comes from
//! the same scratch row. A scalar loss of logits that track gradients writes the gradient in
//! that same pass, and the backward only scales it; otherwise the backward op recomputes the
//! rows (bitwise the same result).

use crate::common::{
    acc_dtype, check_float_2d, check_non_negative, check_same_device, cpu_slice, decode_label,
    lane_max, lane_sum, ordered_sum, rows_per_chunk, vectorized, zeroed_vec, Acc, Elem, RowLabel,
    SavedGrad,
};
use crate::reduction::Reduction;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage};
use candle_core::{Tensor, WithDType};
use rayon::prelude::*;

const CE_NAME: &str = "CrossEntropyLoss";
const SF_NAME: &str = "SoftmaxFocalLoss";

/// Softmax cross-entropy with class weights, ignored rows and label smoothing, fused into one
/// custom op with a hand-written backward; the Faster R-CNN classification loss.
///
/// # Formula
///
/// For a row of logits `x` (`K` classes), label `y`, `lse = log Σ_k e^{x_k}`, class weights `w`
/// (all 1 when `class_weights` is `None`), `W = Σ_k w_k` and smoothing `ε`:
///
/// ```text
/// l = (1-ε)·w_y·(lse - x_y) + (ε/K)·Σ_k w_k·(lse - x_k)
/// ```
///
/// exactly as `torch.nn.functional.cross_entropy(x, y, weight=w, ignore_index=-1,
/// label_smoothing=ε)`. The log-sum-exp subtracts the row max, and `-log p_y` is evaluated as
/// `log1p(Σ_{k≠y} e^{x_k - x_y})` when `p_y ≥ ½`, so it keeps its relative accuracy as
/// `p_y → 1`; logits of ±1e4 give a finite loss and gradient. The gradient is the closed form
/// `∂l/∂x_j = (1-ε)·w_y·(p_j - δ_jy) + (ε/K)·(W·p_j - w_j)`, recomputed from the logits.
///
/// Reductions: `None` gives `[N]` (ignored rows 0); `Sum`; `Mean` = `Σ_i l_i / Σ_i w_{y_i}` over
/// the non-ignored rows, as torch (0 when every row is ignored, where torch returns NaN);
/// `AvgFactor(f)` = sum / f.
///
/// # Shapes
///
/// - `logits`: `[N, K]`, f32 / f64 / f16 / bf16, `K ≥ 1`.
/// - `labels`: `[N]`, `u32` or `i64`, in `0..K` or `-1` (i64, ignored row: no loss, zero
///   gradient, not counted by `Mean`). There is no background value: background is an ordinary
///   column.
/// - `class_weights`: `[K]`, in the logits' dtype or f32 (as [`crate::class_balanced_weights`]
///   returns them; used at f32 precision with f16/bf16 logits, converted exactly to f64 with f64
///   logits); expected ≥ 0.
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
///
/// # Errors
///
/// Every message starts with `CrossEntropyLoss:`. A tensor on a Metal device (only the CPU and CUDA
/// have kernels); logits not of rank 2, of a non-float dtype or with `K = 0`; labels of another
/// shape, dtype or device; a label outside `0..K` and not `-1`; class weights of a length other
/// than `K`, another dtype or device; `label_smoothing` outside `[0, 1]`; `AvgFactor` not finite
/// and > 0.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{CrossEntropyLoss, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0], [0.1, 0.2, 0.3]], &dev)?;
/// let labels = Tensor::new(&[0i64, 2, -1], &dev)?; // the last row is ignored
/// let ce = CrossEntropyLoss { label_smoothing: 0.1, ..Default::default() };
/// let loss = ce.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// let g = grads.get(&logits).expect("logits receive a gradient");
/// assert_eq!(g.get(2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CrossEntropyLoss {
    /// How the `[N]` row losses are reduced (default `Mean`, torch's weighted mean).
    pub reduction: Reduction,
    /// Per-class weights `[K]` (e.g. from [`crate::class_balanced_weights`]); `None` = all 1.
    pub class_weights: Option<Tensor>,
    /// Label smoothing `ε ∈ [0, 1]` (default 0).
    pub label_smoothing: f64,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            class_weights: None,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyLoss {
    /// Computes the loss of `logits` `[N, K]` against `labels` `[N]`.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        crate::common::check_supported_device(CE_NAME, logits)?;
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            bail!("{CE_NAME}: label_smoothing must be in [0, 1], got {eps}")
        }
        let kind = Kind::Ce { eps };
        apply(
            CE_NAME,
            kind,
            self.reduction,
            self.class_weights.as_ref(),
            logits,
            labels,
        )
    }
}

/// Softmax (multi-class) focal loss, mmcv's `softmax_focal_loss`: the focal modulation of
/// [`CrossEntropyLoss`], fused into one custom op with a hand-written backward.
///
/// # Formula
///
/// With `p = softmax(x)` over the `K` classes of a row, `p_t = p[y]` and class weights `w`:
///
/// ```text
/// l = -α·w_y·(1 - p_t)^γ·log p_t
/// ```
///
/// `α` is a constant factor (1 when `None`). `log p_t` and `1 - p_t = Σ_{k≠y} p_k` are computed
/// from the row's max-shifted exponentials without cancellation, so the loss and gradient stay
/// finite and accurate for `p_t → 1` and `p_t → 0` in every dtype and for every `γ ≥ 0`. The
/// gradient is the closed form `∂l/∂x_j = α·w_y·F·(p_j - δ_jy)` with
/// `F = (1-p_t)^γ - γ·p_t·(1-p_t)^{γ-1}·log p_t ≥ 0`. With `γ = 0` and `alpha = None` this is
/// exactly [`CrossEntropyLoss`] without label smoothing.
///
/// Reductions: `None` gives `[N]`; `Sum`; `Mean` = `Σ_i l_i / Σ_i w_{y_i}` over the non-ignored
/// rows, as cross-entropy (α is not in the denominator; 0 when every row is ignored);
/// `AvgFactor(f)` = sum / f.
///
/// # Shapes
///
/// - `logits`: `[N, K]`, f32 / f64 / f16 / bf16, `K ≥ 1`.
/// - `labels`: `[N]`, `u32` or `i64`, in `0..K` or `-1` (i64, ignored).
/// - `class_weights`: `[K]`, in the logits' dtype or f32 (as for [`CrossEntropyLoss`]).
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
///
/// # Errors
///
/// Every message starts with `SoftmaxFocalLoss:`. As [`CrossEntropyLoss`], plus `gamma` or
/// `alpha` negative or not finite.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{Reduction, SoftmaxFocalLoss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
/// let labels = Tensor::new(&[0u32, 1], &dev)?;
/// let focal = SoftmaxFocalLoss { reduction: Reduction::Sum, ..Default::default() };
/// let loss = focal.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SoftmaxFocalLoss {
    /// Constant factor α (`Some(0.25)`, as mmcv's default); `None` = 1.
    pub alpha: Option<f64>,
    /// Focusing parameter γ ≥ 0 (2 in the paper); 0 gives (α-scaled) cross-entropy.
    pub gamma: f64,
    /// How the `[N]` row losses are reduced (default `Mean`).
    pub reduction: Reduction,
    /// Per-class weights `[K]`; `None` = all 1.
    pub class_weights: Option<Tensor>,
}

impl Default for SoftmaxFocalLoss {
    fn default() -> Self {
        Self {
            alpha: Some(0.25),
            gamma: 2.0,
            reduction: Reduction::Mean,
            class_weights: None,
        }
    }
}

impl SoftmaxFocalLoss {
    /// Computes the loss of `logits` `[N, K]` against `labels` `[N]`.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        crate::common::check_supported_device(SF_NAME, logits)?;
        check_non_negative(SF_NAME, "gamma", self.gamma)?;
        if let Some(a) = self.alpha {
            check_non_negative(SF_NAME, "alpha", a)?;
        }
        let kind = Kind::Focal {
            alpha: self.alpha.unwrap_or(1.0),
            gamma: self.gamma,
        };
        apply(
            SF_NAME,
            kind,
            self.reduction,
            self.class_weights.as_ref(),
            logits,
            labels,
        )
    }
}

/// Which loss of the family.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Cross-entropy with label smoothing `eps`.
    Ce { eps: f64 },
    /// Softmax focal loss.
    Focal { alpha: f64, gamma: f64 },
}

/// Integer label dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LabelKind {
    U32,
    I64,
}

/// Validates the inputs and applies the forward op.
fn apply(
    name: &'static str,
    kind: Kind,
    reduction: Reduction,
    class_weights: Option<&Tensor>,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<Tensor> {
    reduction.validate(name)?;
    let (n, k) = check_float_2d(name, "logits", logits)?;
    if k == 0 {
        bail!("{name}: logits must have at least one class, got shape [{n}, 0]")
    }
    check_same_device(name, "labels", logits, labels)?;
    let labels_kind = match labels.dtype() {
        DType::U32 => LabelKind::U32,
        DType::I64 => LabelKind::I64,
        d => bail!("{name}: labels must be u32 or i64 [N], got dtype {d:?}"),
    };
    if labels.dims() != [n] {
        bail!(
            "{name}: labels must have shape [N] = [{n}] next to logits [{n}, {k}], got {:?}",
            labels.dims()
        )
    }
    let weights = match class_weights {
        None => None,
        Some(w) => {
            check_same_device(name, "class_weights", logits, w)?;
            crate::common::check_class_weights_dtype(name, logits.dtype(), w.dtype())?;
            match w.dims() {
                [len] if *len == k => {}
                [len] => bail!("{name}: class_weights has length {len}, expected K = {k}"),
                d => bail!("{name}: class_weights must have shape [K] = [{k}], got {d:?}"),
            }
            let w = w.to_dtype(acc_dtype(logits.dtype()))?.contiguous()?;
            // W = Σ_k w_k, needed by label smoothing; stays on the device.
            let wsum = w.sum_keepdim(0)?;
            Some((w, wsum))
        }
    };
    let op = SoftmaxOp {
        name,
        kind,
        reduction,
        labels: labels_kind,
        weights,
    };
    // Training (a scalar loss of logits that track gradients): the forward pass also computes
    // the gradient, and the backward only scales it.
    let saved = (reduction.is_scalar() && logits.track_op()).then(SavedGrad::default);
    logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, SoftmaxFwd { op, saved })
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone)]
struct SoftmaxOp {
    name: &'static str,
    kind: Kind,
    reduction: Reduction,
    labels: LabelKind,
    /// Class weights `[K]` and their sum `[1]`, in the accumulator dtype; `None` = all 1.
    weights: Option<(Tensor, Tensor)>,
}

/// Forward op: `(logits, labels) -> loss`; with `saved`, the CPU pass also stores the gradient.
struct SoftmaxFwd {
    op: SoftmaxOp,
    saved: Option<SavedGrad>,
}
/// Backward op: `(logits, labels, upstream gradient) -> ∂loss/∂logits`.
struct SoftmaxBwd(SoftmaxOp);

// ---------------------------------------------------------------------------------------------
// CPU row kernel
// ---------------------------------------------------------------------------------------------

/// Softmax statistics of one row with label column `t`, relative to the row max `m`.
#[derive(Clone, Copy)]
struct RowStats<A> {
    /// Row max.
    m: A,
    /// `Σ_{k≠t} e^{x_k - m}` (a sum of positive terms: `1 - p_t` without cancellation).
    s_oth: A,
    /// `Σ_k w_k (m - x_k)` (only with `SMOOTH`), a sum of non-negative terms.
    sw: A,
}

/// The softmax statistics of row `x` with label column `t`, in plain sweeps of the row (which
/// is in L1) that LLVM vectorises: the max, then `e[k] = e^{x_k - m}` (one `exp` per element,
/// kept in `e` for the gradient), then fixed-order lane sums. `w` (class weights) and the
/// scratch `d` are used only with `SMOOTH`.
#[inline(always)]
fn row_stats<T: Elem, const SMOOTH: bool>(
    x: &[T],
    t: usize,
    w: &[T::A],
    e: &mut [T::A],
    d: &mut [T::A],
) -> RowStats<T::A> {
    let zero = <T::A as Acc>::ZERO;
    for (ev, xv) in e.iter_mut().zip(x) {
        *ev = xv.to_acc();
    }
    // The max starts at a finite "lowest", so -inf logits (masked classes) give e = 0; a NaN is
    // never selected and reaches the sums through its e.
    let m = lane_max(e, <T::A as Acc>::from_f64(f32::MIN as f64));
    if SMOOTH {
        for ((dv, ev), wv) in d.iter_mut().zip(e.iter()).zip(w) {
            *dv = *wv * (m - *ev);
        }
    }
    for ev in e.iter_mut() {
        *ev = (*ev - m).exp();
    }
    // Σ over the other classes (e_t left out, not subtracted): q = 1 - p_t keeps its digits as
    // p_t → 1.
    let e_t = std::mem::replace(&mut e[t], zero);
    let s_oth = lane_sum(e);
    e[t] = e_t;
    RowStats {
        m,
        s_oth,
        sw: if SMOOTH { lane_sum(d) } else { zero },
    }
}

/// Derived per-row quantities: `s = Σ_k e^{x_k - m}`, `nll = -log p_t`, `q = 1 - p_t`, `p_t`.
#[derive(Clone, Copy)]
struct RowSoftmax<A> {
    s: A,
    nll: A,
    q: A,
    p_t: A,
}

#[inline(always)]
fn row_softmax<A: Acc>(st: &RowStats<A>, x_t: A) -> RowSoftmax<A> {
    let e_t = (x_t - st.m).exp();
    let s = st.s_oth + e_t;
    // -log p_t = log(s / e_t) = log1p(s_oth / e_t): accurate for p_t ≥ ½ (e_t ≥ s_oth, e_t > 0);
    // otherwise log s + (m - x_t), a sum of non-negative terms.
    let nll = if st.s_oth <= e_t {
        (st.s_oth / e_t).log1p()
    } else {
        s.ln() + (st.m - x_t)
    };
    RowSoftmax {
        s,
        nll,
        q: st.s_oth / s,
        p_t: e_t / s,
    }
}

/// Hyper-parameters in the accumulator type.
#[derive(Clone, Copy)]
struct Params<A> {
    focal: bool,
    /// CE: `1 - ε`; focal: `α`.
    a: A,
    /// CE: `ε / K`.
    c: A,
    /// Focal: γ.
    gamma: A,
    /// `W = Σ_k w_k`.
    wsum: A,
}

/// `(1 - p_t)^γ` from `q = 1 - p_t`; γ = 0 gives exactly 1 even where q underflows to 0.
#[inline(always)]
fn pow_q<A: Acc>(q: A, gamma: A) -> A {
    if gamma == A::ZERO {
        A::ONE
    } else {
        (gamma * q.ln()).exp()
    }
}

/// Loss of one (non-ignored) row with label `t`, from its statistics.
#[inline(always)]
fn row_loss<A: Acc>(p: &Params<A>, st: &RowStats<A>, r: &RowSoftmax<A>, wt: A, smooth: bool) -> A {
    if p.focal {
        // -α w_t (1-p_t)^γ log p_t
        p.a * wt * pow_q(r.q, p.gamma) * r.nll
    } else {
        // (1-ε) w_t (lse - x_t) + (ε/K) Σ_k w_k (lse - x_k), with lse = m + log s:
        // Σ_k w_k (lse - x_k) = Σ_k w_k (m - x_k) + W log s.
        let smooth = if smooth {
            p.c * (st.sw + p.wsum * r.s.ln())
        } else {
            A::ZERO
        };
        p.a * wt * r.nll + smooth
    }
}

/// Gradient of one row from its statistics and `e[j] = e^{x_j - m}`: `g_j = coef·∂l/∂x_j`.
#[inline(always)]
fn row_grad<T: Elem, const SMOOTH: bool>(
    p: &Params<T::A>,
    r: &RowSoftmax<T::A>,
    e: &[T::A],
    t: usize,
    w: &[T::A],
    coef: T::A,
    g: &mut [T],
) {
    let wt = w[t];
    // ∂l/∂x_j = a_j·p_j - b·δ_jt - c·w_j, written for j = t as -b·q + (a_t·p_t - c·w_t - b + b)
    // with q = 1 - p_t (no cancellation at p_t → 1).
    let (a, b) = if p.focal {
        // l = -α w_t (1-p_t)^γ log p_t, ∂p_t/∂x_j = p_t(δ_jt - p_j), ∂log p_t/∂x_j = δ_jt - p_j:
        // ∂l/∂x_j = α w_t (p_j - δ_jt)·F, F = (1-p_t)^γ + γ p_t (1-p_t)^{γ-1}·(-log p_t)
        //         = (1-p_t)^γ·(1 + γ p_t·nll/q); nll/q → 1 as q → 0 (nll = -log(1-q)).
        let ratio = if r.q > <T::A as Acc>::ZERO {
            r.nll / r.q
        } else {
            <T::A as Acc>::ONE
        };
        let f = pow_q(r.q, p.gamma) * (<T::A as Acc>::ONE + p.gamma * r.p_t * ratio);
        let a = p.a * wt * f;
        (a, a)
    } else {
        // ∂l/∂x_j = (1-ε) w_t (p_j - δ_jt) + (ε/K)(W p_j - w_j)
        let b = p.a * wt;
        let a = if SMOOTH { b + p.c * p.wsum } else { b };
        (a, b)
    };
    let inv_s = <T::A as Acc>::ONE / r.s;
    let ca = coef * a;
    if SMOOTH {
        let cc = coef * p.c;
        for ((gj, ej), wj) in g.iter_mut().zip(e).zip(w) {
            *gj = T::from_acc(ca * (*ej * inv_s) - cc * *wj);
        }
    } else {
        for (gj, ej) in g.iter_mut().zip(e) {
            *gj = T::from_acc(ca * (*ej * inv_s));
        }
    }
    let smooth_t = if SMOOTH {
        p.c * (p.wsum * r.p_t - wt)
    } else {
        <T::A as Acc>::ZERO
    };
    g[t] = T::from_acc(coef * (smooth_t - b * r.q));
}

/// One non-ignored row: its loss, and with `g` its gradient times `coef`.
#[inline(always)]
fn row_eval<T: Elem, const SMOOTH: bool>(
    p: &Params<T::A>,
    x: &[T],
    t: usize,
    w: &[T::A],
    (e, d): (&mut [T::A], &mut [T::A]),
    coef: T::A,
    g: Option<&mut [T]>,
) -> T::A {
    let st = row_stats::<T, SMOOTH>(x, t, w, e, d);
    let r = row_softmax(&st, x[t].to_acc());
    if let Some(g) = g {
        row_grad::<T, SMOOTH>(p, &r, e, t, w, coef, g);
    }
    row_loss(p, &st, &r, w[t], SMOOTH)
}

/// Typed CPU view of the labels.
enum CpuLabels<'a> {
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl<'a> CpuLabels<'a> {
    fn new(kind: LabelKind, name: &str, s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        Ok(match kind {
            LabelKind::U32 => Self::U32(cpu_slice(name, s, l)?),
            LabelKind::I64 => Self::I64(cpu_slice(name, s, l)?),
        })
    }

    /// The label of row `i`: `Some(class)` or `None` when ignored; an error when out of range.
    #[inline(always)]
    fn get(&self, name: &str, i: usize, k: usize) -> Result<Option<usize>> {
        let v = match self {
            Self::U32(v) => v[i] as i64,
            Self::I64(v) => v[i],
        };
        Ok(match decode_label(name, v, k - 1)? {
            RowLabel::Ignored => None,
            RowLabel::Class(c) => Some(c),
        })
    }
}

impl SoftmaxOp {
    fn params<A: Acc>(&self, k: usize, wsum: A) -> Params<A> {
        match self.kind {
            Kind::Ce { eps } => Params {
                focal: false,
                a: A::from_f64(1.0 - eps),
                c: A::from_f64(eps / k as f64),
                gamma: A::ZERO,
                wsum,
            },
            Kind::Focal { alpha, gamma } => Params {
                focal: true,
                a: A::from_f64(alpha),
                c: A::ZERO,
                gamma: A::from_f64(gamma),
                wsum,
            },
        }
    }

    /// True when the smoothing term is present (CE with ε > 0).
    fn smooth(&self) -> bool {
        matches!(self.kind, Kind::Ce { eps } if eps > 0.0)
    }

    /// Class weights as a host vector (all 1 when absent) and their sum.
    fn cpu_weights<A: Acc + WithDType>(&self, k: usize) -> Result<(Vec<A>, A)> {
        match &self.weights {
            None => Ok((vec![A::ONE; k], <A as Acc>::from_f64(k as f64))),
            Some((w, ws)) => {
                let read = |t: &Tensor| -> Result<Vec<A>> {
                    let (st, l) = t.storage_and_layout();
                    match &*st {
                        Storage::Cpu(s) => Ok(cpu_slice::<A>(self.name, s, l)?.to_vec()),
                        _ => bail!("{}: class weights are not on the CPU", self.name),
                    }
                };
                let wv = read(w)?;
                let sum = read(ws)?.first().copied().unwrap_or(A::ZERO);
                Ok((wv, sum))
            }
        }
    }

    /// `Σ w_label` over the non-ignored rows (the `Mean` denominator), merged in chunk order.
    fn weight_sum<A: Acc>(&self, lab: &CpuLabels<'_>, w: &[A], n: usize, k: usize) -> Result<f64> {
        let rpc = rows_per_chunk(1);
        let parts: Vec<Result<f64>> = (0..n.div_ceil(rpc))
            .into_par_iter()
            .map(|ci| {
                let mut s = 0f64;
                for i in ci * rpc..((ci + 1) * rpc).min(n) {
                    if let Some(t) = lab.get(self.name, i, k)? {
                        s += w[t].to_f64();
                    }
                }
                Ok(s)
            })
            .collect();
        let parts = parts.into_iter().collect::<Result<Vec<f64>>>()?;
        Ok(ordered_sum(&parts))
    }

    /// The forward: per-row losses (`Reduction::None`) or the reduced loss; with `saved` (a
    /// scalar reduction) the same pass writes the gradient for the backward.
    fn cpu_fwd_t<T: Elem, const SMOOTH: bool>(
        &self,
        x: &[T],
        lab: &CpuLabels<'_>,
        n: usize,
        k: usize,
        saved: Option<&SavedGrad>,
    ) -> Result<(CpuStorage, Shape)>
    where
        T::A: WithDType,
    {
        let (w, wsum) = self.cpu_weights::<T::A>(k)?;
        let p = self.params::<T::A>(k, wsum);
        let rpc = rows_per_chunk(k);
        let name = self.name;
        let zero = <T::A as Acc>::ZERO;
        if self.reduction == Reduction::None {
            let mut out = vec![T::from_acc(zero); n];
            let res: Vec<Result<()>> = out
                .par_chunks_mut(rpc)
                .enumerate()
                .map(|(ci, o)| {
                    vectorized(
                        #[inline(always)]
                        || {
                            let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                            for (r, oi) in o.iter_mut().enumerate() {
                                let i = ci * rpc + r;
                                if let Some(t) = lab.get(name, i, k)? {
                                    let xr = &x[i * k..(i + 1) * k];
                                    let l = row_eval::<T, SMOOTH>(
                                        &p,
                                        xr,
                                        t,
                                        &w,
                                        (&mut e, &mut d),
                                        zero,
                                        None,
                                    );
                                    *oi = T::from_acc(l);
                                }
                            }
                            Ok(())
                        },
                    )
                })
                .collect();
            res.into_iter().collect::<Result<Vec<()>>>()?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from(n)));
        }
        // The normaliser first, so that a fused pass can scale the gradient as it writes it.
        let scale = self.reduction.scale(self.weight_sum(lab, &w, n, k)?);
        let coef = <T::A as Acc>::from_f64(scale);
        let mut g = match saved {
            Some(_) => zeroed_vec::<T>(n * k)?,
            None => Vec::new(),
        };
        // Σ l per chunk of rows, merged in chunk order; the gradient chunk (empty without
        // `saved`) rides along.
        let chunk = |ci: usize, mut gc: Option<&mut [T]>| -> Result<f64> {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = 0f64;
                    let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                    for (r, i) in (ci * rpc..((ci + 1) * rpc).min(n)).enumerate() {
                        if let Some(t) = lab.get(name, i, k)? {
                            let xr = &x[i * k..(i + 1) * k];
                            let grow = gc.as_deref_mut().map(|g| &mut g[r * k..(r + 1) * k]);
                            let l =
                                row_eval::<T, SMOOTH>(&p, xr, t, &w, (&mut e, &mut d), coef, grow);
                            s += Acc::to_f64(l);
                        }
                    }
                    Ok(s)
                },
            )
        };
        let parts: Vec<Result<f64>> = if saved.is_some() {
            g.par_chunks_mut(rpc * k)
                .enumerate()
                .map(|(ci, gc)| chunk(ci, Some(gc)))
                .collect()
        } else {
            (0..n.div_ceil(rpc))
                .into_par_iter()
                .map(|ci| chunk(ci, None))
                .collect()
        };
        let sums = parts.into_iter().collect::<Result<Vec<f64>>>()?;
        if let Some(saved) = saved {
            saved.put(T::to_cpu_storage_owned(g), Shape::from((n, k)));
        }
        let total = ordered_sum(&sums) * scale;
        let out = vec![T::from_acc(<T::A as Acc>::from_f64(total))];
        Ok((T::to_cpu_storage_owned(out), Shape::from(())))
    }

    /// The backward when the forward saved nothing (or for `Reduction::None`): the same row
    /// kernel, so the same bits as the gradient a fused forward saves.
    fn cpu_bwd_t<T: Elem, const SMOOTH: bool>(
        &self,
        x: &[T],
        lab: &CpuLabels<'_>,
        up: &[T],
        n: usize,
        k: usize,
    ) -> Result<(CpuStorage, Shape)>
    where
        T::A: WithDType,
    {
        let (w, wsum) = self.cpu_weights::<T::A>(k)?;
        let p = self.params::<T::A>(k, wsum);
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up.len() != 1 || !scalar_up && up.len() != n {
            bail!("{}: upstream gradient has {} elements", self.name, up.len())
        }
        let scale = match self.reduction {
            Reduction::Mean => self.reduction.scale(self.weight_sum(lab, &w, n, k)?),
            r => r.scale(0.0),
        };
        let rpc = rows_per_chunk(k);
        let name = self.name;
        let zero = <T::A as Acc>::ZERO;
        let mut g = zeroed_vec::<T>(n * k)?;
        let res: Vec<Result<()>> = g
            .par_chunks_mut(rpc * k)
            .enumerate()
            .map(|(ci, gc)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                        for (r, grow) in gc.chunks_mut(k).enumerate() {
                            let i = ci * rpc + r;
                            if let Some(t) = lab.get(name, i, k)? {
                                let coef = if scalar_up {
                                    <T::A as Acc>::from_f64(scale)
                                } else {
                                    <T::A as Acc>::from_f64(scale * Acc::to_f64(up[i].to_acc()))
                                };
                                let xr = &x[i * k..(i + 1) * k];
                                row_eval::<T, SMOOTH>(
                                    &p,
                                    xr,
                                    t,
                                    &w,
                                    (&mut e, &mut d),
                                    coef,
                                    Some(grow),
                                );
                            }
                        }
                        Ok(())
                    },
                )
            })
            .collect();
        res.into_iter().collect::<Result<Vec<()>>>()?;
        crate::common::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, k))))
    }
}

impl CustomOp2 for SoftmaxFwd {
    fn name(&self) -> &'static str {
        match self.op.kind {
            Kind::Ce { .. } => "cross-entropy-fwd",
            Kind::Focal { .. } => "softmax-focal-fwd",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.op;
        crate::common::emulate!(op.name, |g| gpu::forward(
            g,
            op,
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2)
        ));
        let (n, k) = crate::common::layout_dims2(op.name, l1)?;
        let saved = self.saved.as_ref();
        crate::common::with_float_type!(op.name, s1.dtype(), T, {
            let x = cpu_slice::<T>(op.name, s1, l1)?;
            let lab = CpuLabels::new(op.labels, op.name, s2, l2)?;
            if op.smooth() {
                op.cpu_fwd_t::<T, true>(x, &lab, n, k, saved)
            } else {
                op.cpu_fwd_t::<T, false>(x, &lab, n, k, saved)
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = crate::gpu::cuda::Cuda::of(s1);
        gpu::forward(
            &g,
            &self.op,
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2),
        )
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = SoftmaxBwd(self.op.clone());
        let (name, saved) = (self.op.name, self.saved.as_ref());
        crate::common::saved_or_backward(name, saved, logits, labels, grad_res, &bwd)
    }
}

impl CustomOp3 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        match self.0.kind {
            Kind::Ce { .. } => "cross-entropy-bwd",
            Kind::Focal { .. } => "softmax-focal-bwd",
        }
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
        let op = &self.0;
        crate::common::emulate!(op.name, |g| gpu::backward(
            g,
            op,
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2),
            crate::gpu::arg(s3, l3)
        ));
        let (n, k) = crate::common::layout_dims2(op.name, l1)?;
        crate::common::with_float_type!(op.name, s1.dtype(), T, {
            let x = cpu_slice::<T>(op.name, s1, l1)?;
            let lab = CpuLabels::new(op.labels, op.name, s2, l2)?;
            let up = cpu_slice::<T>(op.name, s3, l3)?;
            if op.smooth() {
                op.cpu_bwd_t::<T, true>(x, &lab, up, n, k)
            } else {
                op.cpu_bwd_t::<T, false>(x, &lab, up, n, k)
            }
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
        let (x, lab, up) = (
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2),
            crate::gpu::arg(s3, l3),
        );
        gpu::backward(&g, &self.0, x, lab, up)
    }
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu {
    use super::{Kind, LabelKind, SoftmaxOp};
    use crate::common::{layout_dims2, Elem};
    use crate::gpu::params::{SoftmaxBwdParams, SoftmaxDenParams, SoftmaxFwdParams};
    use crate::gpu::{self, Arg, DevElem, ErrorFlag, Gpu, Launch, Partials, Scale, SOFTMAX};
    use crate::reduction::Reduction;
    use candle_core::{Result, Shape};

    /// Rows of at most this many classes get one warp each; longer rows one block each.
    const WARP_MAX_K: usize = 1024;

    /// Launch shape: `(config, warp-per-row)`, at most `MAX_PARTIAL_BLOCKS` blocks (grid-stride
    /// over rows), so the per-block partials fit the finalize kernel.
    fn row_grid(n: usize, k: usize) -> (Launch, bool) {
        let warp = k <= WARP_MAX_K;
        let rows_per_block = if warp { (gpu::BLOCK / 32) as u64 } else { 1 };
        let groups = (n as u64).div_ceil(rows_per_block);
        // Launch::partials puts one thread per item: ask for one block per group.
        let cfg = Launch::partials(groups * gpu::BLOCK as u64);
        (cfg, warp)
    }

    fn label_suffix(l: LabelKind) -> &'static str {
        match l {
            LabelKind::U32 => "u32",
            LabelKind::I64 => "i64",
        }
    }

    /// `(focal, a, c, gamma)` of the kernels' `P<A>`.
    fn hyper(op: &SoftmaxOp, k: usize) -> (i32, f64, f64, f64) {
        match op.kind {
            Kind::Ce { eps } => (0, 1.0 - eps, eps / k as f64, 0.0),
            Kind::Focal { alpha, gamma } => (1, alpha, 0.0, gamma),
        }
    }

    /// The addresses of what every softmax kernel reads: labels, weights, their sum, has_w.
    struct Common {
        lab: u64,
        w: u64,
        wsum: u64,
        has_w: i32,
    }

    fn common<G: Gpu, A: DevElem>(
        g: &G,
        op: &SoftmaxOp,
        lab: &Arg<'_, G::Storage>,
    ) -> Result<Common> {
        let lab = match op.labels {
            LabelKind::U32 => g.input::<u32>(op.name, lab.s, lab.l)?,
            LabelKind::I64 => g.input::<i64>(op.name, lab.s, lab.l)?,
        };
        Ok(match &op.weights {
            None => Common {
                lab,
                w: 0,
                wsum: 0,
                has_w: 0,
            },
            Some((w, ws)) => Common {
                lab,
                w: g.tensor::<A>(op.name, w)?,
                wsum: g.tensor::<A>(op.name, ws)?,
                has_w: 1,
            },
        })
    }

    fn suffix<T: candle_core::WithDType>(op: &SoftmaxOp, warp: bool) -> Result<String> {
        Ok(format!(
            "{}_{}_s{}_{}",
            gpu::dtype_suffix(op.name, T::DTYPE)?,
            label_suffix(op.labels),
            op.smooth() as u8,
            if warp { "warp" } else { "block" }
        ))
    }

    fn fwd_t<G: Gpu, T: Elem + DevElem>(
        g: &G,
        op: &SoftmaxOp,
        x: Arg<'_, G::Storage>,
        lab: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)>
    where
        T::A: DevElem,
    {
        let name = op.name;
        let (n, k) = layout_dims2(name, x.l)?;
        let (cfg, warp) = row_grid(n, k);
        let (focal, a, c, gamma) = hyper(op, k);
        let none = op.reduction == Reduction::None;
        let cm = common::<G, T::A>(g, op, &lab)?;
        let err = ErrorFlag::new(g)?;
        // The partials are sized for the launch: one per block.
        let parts = Partials::new(g, cfg.grid as u64 * gpu::BLOCK as u64)?;
        let out = g.output::<T>(if none { n } else { 1 })?;
        let p = SoftmaxFwdParams {
            x: g.input::<T>(name, x.s, x.l)?,
            lab: cm.lab,
            w: cm.w,
            wsum: cm.wsum,
            out: if none { g.out_addr(&out) } else { 0 },
            psum: g.words_addr(&parts.psum),
            pden: g.words_addr(&parts.pden),
            err: err.addr(g),
            n: n as u64,
            k: k as u64,
            a,
            c,
            gamma,
            has_w: cm.has_w,
            focal,
            none: none as i32,
        };
        if n > 0 {
            let kernel = format!("softmax_fwd_{}", suffix::<T>(op, warp)?);
            g.launch(&SOFTMAX, &kernel, cfg, &p)?;
        }
        let (out, shape) = if none {
            (out, Shape::from(n))
        } else {
            // Mean: Σ w·l / Σ w over the non-ignored rows, both summed per block.
            let scale = match op.reduction {
                Reduction::Mean => Scale::device(1.0),
                r => Scale::host(r.scale(0.0)),
            };
            (
                gpu::finalize::<G, T>(g, name, &parts, scale, None)?,
                Shape::from(()),
            )
        };
        err.check_labels(g, name, k - 1)?;
        Ok((g.storage(out), shape))
    }

    fn bwd_t<G: Gpu, T: Elem + DevElem>(
        g: &G,
        op: &SoftmaxOp,
        x: Arg<'_, G::Storage>,
        lab: Arg<'_, G::Storage>,
        up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)>
    where
        T::A: DevElem,
    {
        let name = op.name;
        let (n, k) = layout_dims2(name, x.l)?;
        let scalar_up = op.reduction.is_scalar();
        gpu::check_upstream(name, up.l, scalar_up, n)?;
        let (cfg, warp) = row_grid(n, k);
        let (focal, a, c, gamma) = hyper(op, k);
        let cm = common::<G, T::A>(g, op, &lab)?;
        let err = ErrorFlag::new(g)?;
        let out = g.output::<T>(n * k)?;
        if n > 0 {
            // Mean: the scale 1 / Σ w_label is computed on the device (no host round trip).
            let mean = op.reduction == Reduction::Mean;
            let scale_buf = g.words(1)?;
            if mean {
                let parts = Partials::new(g, n as u64)?;
                let p = SoftmaxDenParams {
                    lab: cm.lab,
                    w: cm.w,
                    pden: g.words_addr(&parts.pden),
                    err: err.addr(g),
                    n: n as u64,
                    k: k as u64,
                    has_w: cm.has_w,
                };
                let dt = gpu::dtype_suffix(name, T::DTYPE)?;
                let kernel = format!("softmax_den_{dt}_{}", label_suffix(op.labels));
                g.launch(&SOFTMAX, &kernel, parts.cfg, &p)?;
                gpu::finalize::<G, T>(g, name, &parts, Scale::device(1.0), Some(&scale_buf))?;
            }
            let p = SoftmaxBwdParams {
                x: g.input::<T>(name, x.s, x.l)?,
                lab: cm.lab,
                w: cm.w,
                wsum: cm.wsum,
                up: g.input::<T>(name, up.s, up.l)?,
                g: g.out_addr(&out),
                scale_p: if mean { g.words_addr(&scale_buf) } else { 0 },
                err: err.addr(g),
                n: n as u64,
                k: k as u64,
                a,
                c,
                gamma,
                scale: op.reduction.scale(0.0),
                has_w: cm.has_w,
                focal,
                up_scalar: scalar_up as i32,
            };
            let kernel = format!("softmax_bwd_{}", suffix::<T>(op, warp)?);
            g.launch(&SOFTMAX, &kernel, cfg, &p)?;
        }
        err.check_labels(g, name, k - 1)?;
        Ok((g.storage(out), Shape::from((n, k))))
    }

    /// The forward on backend `g`: per-row losses or the reduced scalar.
    pub(super) fn forward<G: Gpu>(
        g: &G,
        op: &SoftmaxOp,
        x: Arg<'_, G::Storage>,
        lab: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)> {
        crate::common::with_float_type!(op.name, g.dtype(x.s), T, { fwd_t::<G, T>(g, op, x, lab) })
    }

    /// The gradient on backend `g`.
    pub(super) fn backward<G: Gpu>(
        g: &G,
        op: &SoftmaxOp,
        x: Arg<'_, G::Storage>,
        lab: Arg<'_, G::Storage>,
        up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)> {
        crate::common::with_float_type!(op.name, g.dtype(x.s), T, {
            bwd_t::<G, T>(g, op, x, lab, up)
        })
    }
}
