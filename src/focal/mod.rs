//! Sigmoid focal loss (Lin et al. 2017, RetinaNet) as a fused Candle custom op.

use crate::check::{check_float_2d, check_non_negative};
use crate::cpu::{
    self, lane_sum, map_chunks, map_indices, ordered_sum, rows_per_chunk, zeroed_vec, CHUNK_ELEMS,
};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::{self, RowLabel, RowTarget, TargetKind};
use crate::weight::{self, RowScratch, Weight};
use candle_core::{bail, DType, Result, Shape, Tensor};

const NAME: &str = "SigmoidFocalLoss";

/// Sigmoid focal loss of RetinaNet (Lin et al., *Focal Loss for Dense Object Detection*, 2017),
/// fused into one custom op with a hand-written backward.
///
/// # Formula
///
/// For a logit `x` and a target `t ∈ [0, 1]`, with `p = σ(x)`:
///
/// ```text
/// ce   = -t·log p - (1-t)·log(1-p)          = t·softplus(-x) + (1-t)·softplus(x)
/// 1-pₜ = p·(1-t) + (1-p)·t
/// αₜ   = α·t + (1-α)·(1-t)                  (1 when alpha is None)
/// l    = w · w_row · αₜ · (1-pₜ)^γ · ce
/// ```
///
/// exactly as `torchvision.ops.sigmoid_focal_loss`, evaluated with stable forms (for a hard
/// target `(1-pₜ)^γ = exp(-γ·softplus(±x))`), so logits of ±100 (f32) or ±30 (f16/bf16) give a
/// finite loss and gradient for every `γ ≥ 0`. `w_row` is `class_weights[label]` for integer
/// labels (background rows use `class_weights[C]` if given, else 1; ignored rows 0) and 1 for
/// dense targets. `w` is the element's weight of a
/// [`forward_weighted`](Self::forward_weighted) call (mmdet's `weight`, on top of the class
/// weights), 1 for [`forward`](Self::forward). The gradient is the closed form
/// `∂l/∂x = w·w_row·αₜ·(1-pₜ)^γ · [(p - t) + γ·ce·(1-2t)·p(1-p)/(1-pₜ)]`; dense targets that
/// track a gradient get `w·∂l/∂t` (torch's autograd of the same formula).
///
/// Reductions: `None` gives `[N, C]`; `Sum`; `Mean` = sum / (number of non-ignored rows × C)
/// (0 when every row is ignored; the same count with a weight, whose zeros do not change it);
/// `AvgFactor(f)` = sum / f (RetinaNet: the number of positive anchors). Scalar reductions are computed inside the kernel. On the CPU, a scalar loss of
/// logits that track gradients (a training step) writes the gradient in the same pass as the
/// loss, and the backward only scales it by the upstream gradient; the loss value is bitwise the
/// same as for detached logits.
///
/// # Shapes
///
/// - `logits`: `[N, C]`, f32 / f64 / f16 / bf16.
/// - `targets`: either dense `[N, C]` in the logits' dtype (one-hot or soft targets), or integer
///   labels `[N]` (`u32` or `i64`): `0..C` the class, `C` background, `-1` (i64) ignored.
/// - `class_weights` (labels only): `[C]` or `[C+1]`, in the logits' dtype or f32 (as
///   [`crate::class_balanced_weights`] returns them; used at f32 precision with f16/bf16 logits,
///   converted exactly to f64 with f64 logits).
/// - `weight` (`forward_weighted`): `[N]` (one per row) or `[N, C]` (one per element), in the
///   logits' dtype; it gets a gradient when it tracks one. A zero weight is how u32 labels
///   ignore a row.
/// - result: `[N, C]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
/// - Leading dimensions: `[..., C]` logits with targets (and a weight) of the matching leading
///   shape, or a weight of the logits' shape, are one `[N, C]` problem (N = the product of the
///   leading dimensions); `Reduction::None` then returns the leading shape plus `C`.
///
/// # Errors
///
/// Every message starts with `SigmoidFocalLoss:`. A tensor on a Metal device (only the CPU and CUDA
/// have kernels); logits not of rank 2 or not a float dtype; targets of another shape, dtype or
/// device; a label outside `0..=C` and not `-1`; class weights of the wrong length, dtype or
/// device, or given with dense targets; a weight of another shape, dtype or device;
/// `gamma < 0` or not finite; `alpha` outside `[0, 1]`; `AvgFactor` not finite and > 0.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{Reduction, SigmoidFocalLoss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
/// // Row 0 is class 2; row 1 is background (label C = 3).
/// let labels = Tensor::new(&[2i64, 3], &dev)?;
/// let loss_fn = SigmoidFocalLoss { reduction: Reduction::AvgFactor(1.0), ..Default::default() };
/// let loss = loss_fn.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SigmoidFocalLoss {
    /// Weight of the positive term, `Some(0.25)` in the paper; `None` disables α-balancing.
    pub alpha: Option<f64>,
    /// Focusing parameter γ ≥ 0 (2 in the paper); 0 gives plain (α-balanced) BCE.
    pub gamma: f64,
    /// How the `[N, C]` losses are reduced (default `Mean`).
    pub reduction: Reduction,
    /// Per-row weights indexed by the integer label: length C, or C+1 where the last entry
    /// weights background rows (default 1). E.g. from [`crate::class_balanced_weights`].
    pub class_weights: Option<Tensor>,
}

impl Default for SigmoidFocalLoss {
    fn default() -> Self {
        Self {
            alpha: Some(0.25),
            gamma: 2.0,
            reduction: Reduction::Mean,
            class_weights: None,
        }
    }
}

impl SigmoidFocalLoss {
    /// Computes the loss of `logits` `[N, C]` against `targets` (dense `[N, C]` or labels `[N]`).
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        targets::with_leading_dims(NAME, logits, targets, |x, t| {
            self.forward_2d(x, t, None, self.reduction)
        })
    }

    /// [`forward`](Self::forward) with every element loss multiplied by `weight` (one value per
    /// row `[N]`, or per element `[N, C]`, in the logits' dtype; leading dimensions as the
    /// logits') inside the kernels, before the reduction; `Mean` divides by the same count as
    /// without a weight. The weight gets a gradient when it tracks one.
    ///
    /// # Example
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use candle_detloss::{Reduction, SigmoidFocalLoss};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
    /// // u32 labels cannot say -1: a zero weight leaves row 1 out of the loss.
    /// let labels = Tensor::new(&[2u32, 3], &dev)?;
    /// let weight = Tensor::new(&[1.0f32, 0.0], &dev)?;
    /// let loss_fn = SigmoidFocalLoss { reduction: Reduction::Sum, ..Default::default() };
    /// let loss = loss_fn.forward_weighted(logits.as_tensor(), &labels, &weight)?;
    /// let grads = loss.backward()?;
    /// let g = grads.get(&logits).unwrap().to_vec2::<f32>()?;
    /// assert_eq!(g[1], [0.0, 0.0, 0.0]);
    /// # Ok(()) }
    /// ```
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        let w = weight::flatten_leading(logits.dims(), weight)?;
        targets::with_leading_dims(NAME, logits, targets, |x, t| {
            let fused = |w: Option<&Tensor>, red: Reduction, detach: bool| {
                if detach {
                    self.forward_2d(&x.detach(), &t.detach(), w, red)
                } else {
                    self.forward_2d(x, t, w, red)
                }
            };
            weight::weighted(NAME, self.reduction, &w, fused, || mean_den(x, t))
        })
    }

    fn forward_2d(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weight: Option<&Tensor>,
        reduction: Reduction,
    ) -> Result<Tensor> {
        reduction.validate(NAME)?;
        check_non_negative(NAME, "gamma", self.gamma)?;
        if let Some(a) = self.alpha {
            if !(0.0..=1.0).contains(&a) {
                bail!("{NAME}: alpha must be in [0, 1] (or None), got {a}")
            }
        }
        let (n, c) = check_float_2d(NAME, "logits", logits)?;
        let kind = targets::target_kind(NAME, logits, targets, n, c)?;
        if kind == TargetKind::Dense && self.class_weights.is_some() {
            bail!("{NAME}: class_weights need integer labels; weight dense targets with forward_weighted")
        }
        let ew = weight
            .map(|w| Weight::new(NAME, logits, w, &[n], &[n, c]))
            .transpose()?;
        let weights = targets::row_weights(NAME, logits, c, self.class_weights.as_ref())?;
        let op = FocalOp {
            alpha: self.alpha,
            gamma: self.gamma,
            reduction,
            kind,
            weights,
        };
        // Training (a scalar loss of logits that track gradients): the forward pass also
        // computes the gradient, and the backward only scales it.
        let op = Fwd::new(op, reduction.is_scalar() && logits.track_op()).weighted(ew);
        logits.contiguous()?.apply_op2(&targets.contiguous()?, op)
    }
}

/// The `Mean` denominator of logits `[N, C]` and their targets as a rank-0 tensor in the
/// logits' dtype: non-ignored rows × C (only i64 labels can ignore a row).
fn mean_den(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let den = if t.dtype() == DType::I64 && t.rank() == 1 {
        let rows = t.ne(-1.0)?.to_dtype(DType::F32)?.sum_all()?;
        rows.affine(c as f64, 0.0)?
    } else {
        Tensor::new((n * c) as f32, x.device())?
    };
    den.to_dtype(x.dtype())
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone)]
struct FocalOp {
    alpha: Option<f64>,
    gamma: f64,
    reduction: Reduction,
    kind: TargetKind,
    /// Row weights by label, length C+1, in the accumulator dtype (f32, or f64 for f64 logits).
    weights: Tensor,
}

/// Hyper-parameters in the accumulator type. `α_t = a_pos·t + a_neg·(1-t)`, with
/// `a_pos = a_neg = 1` when alpha is disabled, so the element loop has no branch.
#[derive(Clone, Copy)]
struct Params<A> {
    a_pos: A,
    a_neg: A,
    gamma: A,
}

/// Lower bound put on `log(1-pₜ)` before it is multiplied by γ: keeps `0·log 0` at 0 (so γ = 0
/// gives exactly 1) while `γ·bound` still underflows `exp` to 0 for any γ > 0 used in practice.
const LN_Q_FLOOR: f64 = -1e30;

/// Loss and derivative of one element, `t ∈ [0, 1]`. `HARD` = the target is exactly 0 or 1
/// (integer labels), which lets `log(1-pₜ)` and `p(1-p)/(1-pₜ)` come from quantities already
/// computed. Straight-line code (selects only) so the element loops vectorise.
#[inline(always)]
fn focal_elem<A: Acc, const HARD: bool>(p: &Params<A>, x: A, t: A) -> (A, A) {
    let one = A::ONE;
    let e = x.exp_neg_abs(); // e^{-|x|} ∈ (0, 1]: never overflows
    let lp = e.log1p_unit(); // log(1 + e^{-|x|})
    let sp_pos = x.relu() + lp; // softplus(x)  = -log(1-p)
    let sp_neg = (-x).relu() + lp; // softplus(-x) = -log p
    let inv = one / (one + e);
    let pos = x >= A::ZERO;
    let p_ = if pos { inv } else { e * inv }; // p = σ(x)
    let pm = if pos { e * inv } else { inv }; // 1-p = σ(-x), no cancellation
    let u = one - t;
    let ce = t * sp_neg + u * sp_pos; // BCE with logits, both terms ≥ 0
    let q = p_ * u + pm * t; // 1 - pₜ
    let (ln_q, r) = if HARD {
        // log σ(∓x) = -softplus(±x); p(1-p)/(1-pₜ) = p (t = 1) or 1-p (t = 0).
        (-(t * sp_pos + u * sp_neg), t * p_ + u * pm)
    } else {
        // p(1-p)/(1-pₜ) ∈ [0, 1] (1-pₜ is a convex combination of p and 1-p); its limit is 1
        // where 1-pₜ underflows to 0 (then p(1-p) is 0 too).
        let r = p_ * pm / q;
        (q.ln(), if q > A::ZERO { r } else { one })
    };
    let floor = A::from_f64(LN_Q_FLOOR);
    let ln_q = if ln_q < floor { floor } else { ln_q }; // NaN stays NaN
    let m = (p.gamma * ln_q).exp(); // (1-pₜ)^γ
    let a_t = p.a_pos * t + p.a_neg * u;
    let loss = a_t * m * ce;
    let p_minus_t = p_ * u - pm * t; // = p - t, without cancellation at p → t = 1
                                     // d/dx [(1-pₜ)^γ·ce] = (1-pₜ)^γ·(p - t) + ce·γ(1-pₜ)^{γ-1}·p(1-p)(1-2t)
    let grad = a_t * m * (p_minus_t + p.gamma * ce * r * (u - t));
    (loss, grad)
}

/// `∂l/∂t` of one element with a soft target `t` (dense targets that track a gradient), the
/// derivative torch's autograd takes of torchvision's formula:
///
/// ```text
/// ∂l/∂t = (α_pos − α_neg)·m·ce + αₜ·(∂m/∂t·ce − m·x),   m = (1-pₜ)^γ,
/// ∂m/∂t = γ·(1-pₜ)^{γ-1}·(1 − 2p)   (0 for γ = 0, as torch's pow backward),
/// ∂ce/∂t = softplus(-x) − softplus(x) = −x.
/// ```
#[inline(always)]
fn focal_elem_dt<A: Acc>(p: &Params<A>, x: A, t: A) -> A {
    let one = A::ONE;
    let e = x.exp_neg_abs(); // e^{-|x|} ∈ (0, 1]
    let lp = e.log1p_unit(); // log(1 + e^{-|x|})
    let sp_pos = x.relu() + lp; // softplus(x)
    let sp_neg = (-x).relu() + lp; // softplus(-x)
    let inv = one / (one + e);
    let pos = x >= A::ZERO;
    let p_ = if pos { inv } else { e * inv }; // p = σ(x)
    let pm = if pos { e * inv } else { inv }; // 1-p, no cancellation
    let u = one - t;
    let ce = t * sp_neg + u * sp_pos;
    let q = p_ * u + pm * t; // 1 - pₜ
    let floor = A::from_f64(LN_Q_FLOOR);
    let ln_q = q.ln();
    let ln_q = if ln_q < floor { floor } else { ln_q }; // NaN stays NaN
    let m = (p.gamma * ln_q).exp(); // (1-pₜ)^γ
    let dm = p.gamma * ((p.gamma - one) * ln_q).exp() * (pm - p_); // ∂m/∂t
    let dm = if p.gamma > A::ZERO { dm } else { A::ZERO };
    let a_t = p.a_pos * t + p.a_neg * u;
    (p.a_pos - p.a_neg) * m * ce + a_t * (dm * ce - m * x)
}

/// The weight of a row: 1 for dense targets, 0 for an ignored row, `w[label]` otherwise.
#[inline(always)]
fn row_weight<A: Acc>(rt: &RowTarget<'_, impl Elem>, w: &[A], c: usize) -> A {
    match rt {
        RowTarget::Dense(_) => A::ONE,
        RowTarget::Label(RowLabel::Ignored) => A::ZERO,
        RowTarget::Label(RowLabel::Class(k)) => w[(*k).min(c)],
    }
}

/// The sigmoid focal loss's row scratch: [`RowScratch`] with its row loading and evaluation.
type Scratch<A> = RowScratch<A>;

impl<A: Acc> Scratch<A> {
    /// Loads row `x` and its targets; returns false for an ignored row.
    #[inline(always)]
    fn load<T: Elem<A = A>>(&mut self, x: &[T], rt: &RowTarget<'_, T>) -> bool {
        for (d, s) in self.x.iter_mut().zip(x) {
            *d = s.to_acc();
        }
        match rt {
            RowTarget::Label(RowLabel::Ignored) => return false,
            RowTarget::Label(RowLabel::Class(k)) => {
                self.t.fill(A::ZERO);
                if let Some(tk) = self.t.get_mut(*k) {
                    *tk = A::ONE; // k == C (background) leaves the row all-negative
                }
            }
            RowTarget::Dense(d) => {
                for (t, s) in self.t.iter_mut().zip(d.iter()) {
                    *t = s.to_acc();
                }
            }
        }
        true
    }

    /// `v[j] = loss(x[j], t[j])` (or its derivative when `GRAD`).
    #[inline(always)]
    fn eval<const HARD: bool, const GRAD: bool>(&mut self, p: &Params<A>) {
        for ((v, &x), &t) in self.v.iter_mut().zip(&self.x).zip(&self.t) {
            let (l, g) = focal_elem::<A, HARD>(p, x, t);
            *v = if GRAD { g } else { l };
        }
    }

    /// `v[j] = loss(x[j], t[j])` and `g[j] = coef · ∂loss/∂x[j]` in the same pass (both
    /// times `w[j]` when `WE`).
    #[inline(always)]
    fn eval_fused<const HARD: bool, const WE: bool, T: Elem<A = A>>(
        &mut self,
        p: &Params<A>,
        coef: A,
        g: &mut [T],
    ) {
        if WE {
            let it = self.v.iter_mut().zip(g).zip(&self.x).zip(&self.t);
            for ((((v, g), &x), &t), &w) in it.zip(&self.w) {
                let (l, d) = focal_elem::<A, HARD>(p, x, t);
                *v = l * w;
                *g = T::from_acc(coef * (d * w));
            }
            return;
        }
        for (((v, g), &x), &t) in self.v.iter_mut().zip(g).zip(&self.x).zip(&self.t) {
            let (l, d) = focal_elem::<A, HARD>(p, x, t);
            *v = l;
            *g = T::from_acc(coef * d);
        }
    }

    #[inline(always)]
    fn eval_row<const GRAD: bool>(&mut self, p: &Params<A>, hard: bool) {
        if hard {
            self.eval::<true, GRAD>(p)
        } else {
            self.eval::<false, GRAD>(p)
        }
    }
}

/// Loss of one row: writes `w_row · l` into `out` when given, else returns the row sum
/// (before the row weight, which the caller applies). `WE`: the element losses are first
/// multiplied by the loaded element weights `s.w`.
#[inline(always)]
fn row_forward<T: Elem, const WE: bool>(
    p: &Params<T::A>,
    s: &mut Scratch<T::A>,
    x: &[T],
    rt: &RowTarget<'_, T>,
    wrow: T::A,
    out: Option<&mut [T]>,
) -> T::A {
    if !s.load(x, rt) {
        if let Some(o) = out {
            o.fill(T::from_acc(T::A::ZERO));
        }
        return T::A::ZERO;
    }
    s.eval_row::<false>(p, matches!(rt, RowTarget::Label(_)));
    if WE {
        s.apply_w();
    }
    match out {
        Some(o) => {
            for (o, v) in o.iter_mut().zip(&s.v) {
                *o = T::from_acc(wrow * *v);
            }
            T::A::ZERO
        }
        None => lane_sum(&s.v),
    }
}

/// Loss and gradient of one non-ignored row: writes `g[j] = coef · ∂l/∂x[j]` and returns the
/// row's loss sum before the row weight (the same bits as `row_forward`); `WE` as there.
#[inline(always)]
fn row_fused<T: Elem, const WE: bool>(
    p: &Params<T::A>,
    s: &mut Scratch<T::A>,
    x: &[T],
    rt: &RowTarget<'_, T>,
    coef: T::A,
    g: &mut [T],
) -> T::A {
    if !s.load(x, rt) {
        return T::A::ZERO;
    }
    if matches!(rt, RowTarget::Label(_)) {
        s.eval_fused::<true, WE, T>(p, coef, g)
    } else {
        s.eval_fused::<false, WE, T>(p, coef, g)
    }
    lane_sum(&s.v)
}

/// Gradient of one row: `g[j] = coef · up[j] · ∂l/∂x[j]`, `up` = `None` for a scalar upstream;
/// `WE` as for `row_forward`.
#[inline(always)]
fn row_backward<T: Elem, const WE: bool>(
    p: &Params<T::A>,
    s: &mut Scratch<T::A>,
    x: &[T],
    rt: &RowTarget<'_, T>,
    coef: T::A,
    up: Option<&[T]>,
    g: &mut [T],
) {
    if !s.load(x, rt) {
        g.fill(T::from_acc(T::A::ZERO));
        return;
    }
    s.eval_row::<true>(p, matches!(rt, RowTarget::Label(_)));
    if WE {
        s.apply_w();
    }
    match up {
        Some(u) => {
            for ((g, v), u) in g.iter_mut().zip(&s.v).zip(u) {
                *g = T::from_acc(coef * u.to_acc() * *v);
            }
        }
        None => {
            for (g, v) in g.iter_mut().zip(&s.v) {
                *g = T::from_acc(coef * *v);
            }
        }
    }
}

impl FocalOp {
    fn params<A: Acc>(&self) -> Params<A> {
        let (a_pos, a_neg) = match self.alpha {
            Some(a) => (a, 1.0 - a),
            None => (1.0, 1.0),
        };
        Params {
            a_pos: A::from_f64(a_pos),
            a_neg: A::from_f64(a_neg),
            gamma: A::from_f64(self.gamma),
        }
    }

    /// The forward; `WE`: with the weight of a `forward_weighted` call (the branch hoisted out
    /// of the loops, so the unweighted passes are unchanged).
    fn cpu_fwd_t<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        match inp.w {
            Some(_) => self.cpu_fwd_w::<T, true>(inp, saved),
            None => self.cpu_fwd_w::<T, false>(inp, saved),
        }
    }

    fn cpu_fwd_w<T: Elem, const WE: bool>(
        &self,
        inp: &CpuInputs<'_, T>,
        saved: Option<&SavedGrad>,
    ) -> CpuOut {
        let ((n, c), x, tg, ew) = (inp.dims2(NAME)?, inp.x, &inp.t, inp.w.as_ref());
        let p = self.params::<T::A>();
        let w = T::A::host_vec(NAME, "class weights", &self.weights)?;
        let rpc = rows_per_chunk(c);
        if let (Some(saved), true) = (saved, self.reduction.is_scalar()) {
            return self.cpu_fused_t::<T, WE>(inp, &p, &w, saved);
        }
        if self.reduction == Reduction::None {
            let mut out = zeroed_vec::<T>(n * c)?;
            map_chunks(
                &mut out,
                rpc * c,
                #[inline(always)]
                |ci, o| {
                    let mut sc = Scratch::new(c);
                    for (r, orow) in o.chunks_mut(c).enumerate() {
                        let i = ci * rpc + r;
                        let rt = tg.row(NAME, i, c)?;
                        let wr = row_weight(&rt, &w, c);
                        let xr = &x[i * c..(i + 1) * c];
                        if WE {
                            sc.load_w(NAME, ew, i)?;
                        }
                        row_forward::<T, WE>(&p, &mut sc, xr, &rt, wr, Some(orow));
                    }
                    Ok(())
                },
            )?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))));
        }
        // (weighted sum, non-ignored rows) per chunk, merged below in chunk order.
        let parts = map_indices(
            n.div_ceil(rpc),
            #[inline(always)]
            |ci| {
                let (mut s, mut k) = (0f64, 0usize);
                let mut sc = Scratch::new(c);
                for i in ci * rpc..((ci + 1) * rpc).min(n) {
                    let rt = tg.row(NAME, i, c)?;
                    if let RowTarget::Label(RowLabel::Ignored) = rt {
                        continue;
                    }
                    let wr = row_weight(&rt, &w, c);
                    let row = &x[i * c..(i + 1) * c];
                    if WE {
                        sc.load_w(NAME, ew, i)?;
                    }
                    s += (wr * row_forward::<T, WE>(&p, &mut sc, row, &rt, wr, None)).to_f64();
                    k += 1;
                }
                Ok((s, k))
            },
        )?;
        let sums: Vec<f64> = parts.iter().map(|p| p.0).collect();
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let total = ordered_sum(&sums) * self.reduction.scale((rows * c) as f64);
        let out = vec![T::from_acc(T::A::from_f64(total))];
        Ok((T::to_cpu_storage_owned(out), Shape::from(())))
    }

    /// Scalar loss and its gradient in one pass; the gradient (already times the reduction's
    /// normaliser and the row weights) goes to `saved`. Same chunks, so the same loss bits, as
    /// the loss-only pass.
    fn cpu_fused_t<T: Elem, const WE: bool>(
        &self,
        inp: &CpuInputs<'_, T>,
        p: &Params<T::A>,
        w: &[T::A],
        saved: &SavedGrad,
    ) -> CpuOut {
        let ((n, c), x, tg, ew) = (inp.dims2(NAME)?, inp.x, &inp.t, inp.w.as_ref());
        let rows = tg.valid_rows(NAME, n, c)?;
        let scale = self.reduction.scale((rows * c) as f64);
        let coef = T::A::from_f64(scale);
        let rpc = rows_per_chunk(c);
        let mut g = zeroed_vec::<T>(n * c)?;
        let sums = map_chunks(
            &mut g,
            rpc * c,
            #[inline(always)]
            |ci, gc| {
                let mut s = 0f64;
                let mut sc = Scratch::new(c);
                for (r, grow) in gc.chunks_mut(c).enumerate() {
                    let i = ci * rpc + r;
                    let rt = tg.row(NAME, i, c)?;
                    if let RowTarget::Label(RowLabel::Ignored) = rt {
                        continue; // its gradient row stays 0
                    }
                    let wr = row_weight(&rt, w, c);
                    let row = &x[i * c..(i + 1) * c];
                    if WE {
                        sc.load_w(NAME, ew, i)?;
                    }
                    let rs = row_fused::<T, WE>(p, &mut sc, row, &rt, coef * wr, grow);
                    s += (wr * rs).to_f64();
                }
                Ok(s)
            },
        )?;
        saved.put(T::to_cpu_storage_owned(g), Shape::from((n, c)));
        let total = ordered_sum(&sums) * scale;
        let out = vec![T::from_acc(T::A::from_f64(total))];
        Ok((T::to_cpu_storage_owned(out), Shape::from(())))
    }

    fn cpu_bwd_t<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        match inp.w {
            Some(_) => self.cpu_bwd_w::<T, true>(inp, up),
            None => self.cpu_bwd_w::<T, false>(inp, up),
        }
    }

    fn cpu_bwd_w<T: Elem, const WE: bool>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let ((n, c), x, tg, ew) = (inp.dims2(NAME)?, inp.x, &inp.t, inp.w.as_ref());
        let p = self.params::<T::A>();
        let w = T::A::host_vec(NAME, "class weights", &self.weights)?;
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up.len() != 1 || !scalar_up && up.len() != n * c {
            bail!("{NAME}: upstream gradient has {} elements", up.len())
        }
        let scale = match self.reduction {
            Reduction::Mean => self
                .reduction
                .scale((tg.valid_rows(NAME, n, c)? * c) as f64),
            r => r.scale(0.0),
        };
        let rpc = rows_per_chunk(c);
        let mut g = zeroed_vec::<T>(n * c)?;
        map_chunks(
            &mut g,
            rpc * c,
            #[inline(always)]
            |ci, gc| {
                let mut sc = Scratch::new(c);
                for (r, grow) in gc.chunks_mut(c).enumerate() {
                    let i = ci * rpc + r;
                    let rt = tg.row(NAME, i, c)?;
                    let coef = T::A::from_f64(scale) * row_weight(&rt, &w, c);
                    let u = (!scalar_up).then(|| &up[i * c..(i + 1) * c]);
                    let xr = &x[i * c..(i + 1) * c];
                    if WE {
                        sc.load_w(NAME, ew, i)?;
                    }
                    row_backward::<T, WE>(&p, &mut sc, xr, &rt, coef, u, grow);
                }
                Ok(())
            },
        )?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, c))))
    }

    /// `∂loss/∂targets` of dense targets that track a gradient, for an upstream gradient of 1
    /// then scaled by a scalar upstream (as the logits' gradient); times the element weights
    /// of a `forward_weighted` call.
    fn cpu_tbwd_t<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        match inp.w {
            Some(_) => self.cpu_tbwd_w::<T, true>(inp, up),
            None => self.cpu_tbwd_w::<T, false>(inp, up),
        }
    }

    fn cpu_tbwd_w<T: Elem, const WE: bool>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let ((n, c), x, t) = (inp.dims2(NAME)?, inp.x, inp.t.dense(NAME)?);
        let p = self.params::<T::A>();
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up.len() != 1 || !scalar_up && up.len() != n * c {
            bail!("{NAME}: upstream gradient has {} elements", up.len())
        }
        // Dense targets: Mean divides by N·C.
        let coef = T::A::from_f64(self.reduction.scale((n * c) as f64));
        let mut g = zeroed_vec::<T>(n * c)?;
        map_chunks(
            &mut g,
            CHUNK_ELEMS,
            #[inline(always)]
            |ci, gc| {
                let o = ci * CHUNK_ELEMS;
                for (j, gj) in gc.iter_mut().enumerate() {
                    let i = o + j;
                    let d = focal_elem_dt(&p, x[i].to_acc(), t[i].to_acc());
                    let d = if WE {
                        match inp.w.as_ref().and_then(|w| w.at(i / c, i % c, c)) {
                            Some(w) => d * w.to_acc(),
                            None => bail!("{NAME}: internal error, no weight for element {i}"),
                        }
                    } else {
                        d
                    };
                    let u = if scalar_up { T::A::ONE } else { up[i].to_acc() };
                    *gj = T::from_acc(coef * u * d);
                }
                Ok(())
            },
        )?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, c))))
    }
}

impl LossKernel for FocalOp {
    fn names(&self) -> Names {
        Names {
            loss: NAME,
            fwd: "sigmoid-focal-fwd",
            bwd: "sigmoid-focal-bwd",
        }
    }

    fn target_kind(&self) -> TargetKind {
        self.kind
    }

    /// Dense targets: the focal kernels' own `∂l/∂t` (labels never track a gradient).
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Kernel
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        self.cpu_fwd_t(inp, saved)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        self.cpu_bwd_t(inp, up)
    }

    fn cpu_target_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        self.cpu_tbwd_t(inp, up)
    }

    crate::op::gpu_kernel_methods!(target_grad);
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub(crate) mod gpu;
