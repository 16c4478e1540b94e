//! Softmax cross-entropy (the Faster R-CNN classification loss) and the softmax focal loss, as
//! fused Candle custom ops sharing one row kernel.
//!
//! Each row (in L1) is swept a few times with vectorised loops: its max, then `e^{x_k - m}`
//! (one `exp` per element, kept in a scratch row) and the sums, from which the row loss
//! follows; the gradient `∂l/∂x_j = a·p_j - c·w_j` (plus a label-column correction) comes from
//! the same scratch row. A scalar loss of logits that track gradients writes the gradient in
//! that same pass, and the backward only scales it; otherwise the backward op recomputes the
//! rows (bitwise the same result).

use crate::check::{check_float_2d, check_same_device};
use crate::cpu::scalar_rows;
use crate::cpu::{self, lane_max, lane_sum, map_chunks, ordered_sum, rows_per_chunk, vectorized};
use crate::cpu::{map_indices, zeroed_vec};
use crate::dtype::{acc_dtype, Acc, Elem};
use crate::op::{CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::{self, CpuTargets, TargetKind};
use crate::weight::{self, CpuWeight, Weight};
use candle_core::{bail, Result, Shape};
use candle_core::{DType, Tensor};

const CE_NAME: &str = "CrossEntropyLoss";
const SF_NAME: &str = "SoftmaxFocalLoss";

mod ce;
mod focal;
mod probs;

pub use ce::CrossEntropyLoss;
pub use focal::SoftmaxFocalLoss;

/// Which loss of the family.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Cross-entropy with label smoothing `eps`.
    Ce { eps: f64 },
    /// Softmax focal loss.
    Focal { alpha: f64, gamma: f64 },
}

/// Validates the inputs and applies the forward op; with `weight` (one per row, of the
/// labels' leading shape) the kernels multiply each row loss by it, and a weight that tracks a
/// gradient gets its own ([`weight::weighted`]).
fn apply(
    name: &'static str,
    kind: Kind,
    reduction: Reduction,
    class_weights: Option<&Tensor>,
    logits: &Tensor,
    labels: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    targets::with_leading_dims(name, logits, labels, |x, t| {
        let Some(w) = weight else {
            return apply_2d(name, kind, reduction, class_weights, x, t, None);
        };
        let w = weight::flatten_leading(logits.dims(), w)?;
        let fused = |wv: Option<&Tensor>, red: Reduction, detach: bool| {
            if detach {
                let (x, t) = (x.detach(), t.detach());
                apply_2d(name, kind, red, class_weights, &x, &t, wv)
            } else {
                apply_2d(name, kind, red, class_weights, x, t, wv)
            }
        };
        weight::weighted(name, reduction, &w, fused, || mean_den(class_weights, x, t))
    })
}

/// The `Mean` denominator as a rank-0 tensor in the logits' dtype: `Σ class_weights[label]`
/// over the non-ignored rows (1 each without class weights), summed in f64.
fn mean_den(class_weights: Option<&Tensor>, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, k) = logits.dims2()?;
    if labels.dtype().is_float() {
        // Probability targets: Mean = sum / N, as torch.
        return Tensor::new(n as f64, logits.device())?.to_dtype(logits.dtype());
    }
    let lab = labels.to_dtype(DType::I64)?;
    let valid = lab.ge(0i64)?.to_dtype(DType::F64)?;
    let per_row = match class_weights {
        None => valid,
        Some(w) => {
            let idx = lab.clamp(0i64, k.saturating_sub(1) as i64)?;
            let idx = idx.to_dtype(DType::U32)?;
            w.to_dtype(DType::F64)?.index_select(&idx, 0)?.mul(&valid)?
        }
    };
    per_row.sum_all()?.to_dtype(logits.dtype())
}

/// [`apply`] on logits `[N, K]`.
fn apply_2d(
    name: &'static str,
    kind: Kind,
    reduction: Reduction,
    class_weights: Option<&Tensor>,
    logits: &Tensor,
    labels: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    reduction.validate(name)?;
    let (n, k) = check_float_2d(name, "logits", logits)?;
    if k == 0 {
        bail!("{name}: logits must have at least one class, got shape [{n}, 0]")
    }
    let labels_kind = if labels.dtype().is_float() {
        probs::target_kind(name, kind, logits, labels, n, k)?
    } else {
        targets::label_kind(name, logits, labels, n, k)?
    };
    let weights = match class_weights {
        None => None,
        Some(w) => {
            check_same_device(name, "class_weights", logits, w)?;
            crate::check::check_class_weights_dtype(name, logits.dtype(), w.dtype())?;
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
    let w = weight
        .map(|w| Weight::new(name, logits, w, &[n], &[n]))
        .transpose()?;
    let op = Fwd::new(op, reduction.is_scalar() && logits.track_op()).weighted(w);
    logits.contiguous()?.apply_op2(&labels.contiguous()?, op)
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone)]
struct SoftmaxOp {
    name: &'static str,
    kind: Kind,
    reduction: Reduction,
    /// `LabelsU32` or `LabelsI64`; `Dense` for class-probability targets `[N, K]` (CE only).
    labels: TargetKind,
    /// Class weights `[K]` and their sum `[1]`, in the accumulator dtype; `None` = all 1.
    weights: Option<(Tensor, Tensor)>,
}

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

/// Derived per-row quantities: `s = Σ_k e^{x_k - m}`, `nll = -log p_t`, `q = 1 - p_t`, `p_t`,
/// and the focal factor `fq = (1 - p_t)^γ` (1 for cross-entropy), computed once for the loss
/// and the gradient.
#[derive(Clone, Copy)]
struct RowSoftmax<A> {
    s: A,
    nll: A,
    q: A,
    p_t: A,
    fq: A,
}

/// The row's softmax from its statistics, `x_t` and `e_t = e^{x_t - m}` (the row sweep's).
#[inline(always)]
fn row_softmax<A: Acc>(p: &Params<A>, st: &RowStats<A>, x_t: A, e_t: A) -> RowSoftmax<A> {
    let s = st.s_oth + e_t;
    // -log p_t = log(s / e_t) = log1p(s_oth / e_t): accurate for p_t ≥ ½ (e_t ≥ s_oth, e_t > 0);
    // otherwise log s + (m - x_t), a sum of non-negative terms.
    let nll = if st.s_oth <= e_t {
        (st.s_oth / e_t).log1p()
    } else {
        s.ln() + (st.m - x_t)
    };
    let q = st.s_oth / s;
    RowSoftmax {
        s,
        nll,
        q,
        p_t: e_t / s,
        fq: if p.focal { pow_q(q, p.gamma) } else { A::ONE },
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
        p.a * wt * r.fq * r.nll
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
        let f = r.fq * (<T::A as Acc>::ONE + p.gamma * r.p_t * ratio);
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
    let r = row_softmax(p, &st, x[t].to_acc(), e[t]);
    if let Some(g) = g {
        row_grad::<T, SMOOTH>(p, &r, e, t, w, coef, g);
    }
    row_loss(p, &st, &r, w[t], SMOOTH)
}

/// The `forward_weighted` weight of row `i` in the accumulator type (`None` without one).
#[inline(always)]
fn row_weight<T: Elem>(
    name: &str,
    ew: Option<&CpuWeight<'_, T>>,
    i: usize,
) -> Result<Option<T::A>> {
    match ew {
        None => Ok(None),
        Some(w) => match w.at(i, 0, 1) {
            Some(v) => Ok(Some(v.to_acc())),
            None => bail!("{name}: internal error, no weight for row {i}"),
        },
    }
}

/// `v · w` where a weight is present (`v` as it is otherwise: a weight of ones gives the
/// unweighted bits either way).
#[inline(always)]
fn times<A: Acc>(v: A, w: Option<A>) -> A {
    match w {
        Some(w) => v * w,
        None => v,
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

    /// True for class-probability targets.
    fn probs(&self) -> bool {
        self.labels == TargetKind::Dense
    }

    /// True when the smoothing term is present (CE with ε > 0).
    fn smooth(&self) -> bool {
        matches!(self.kind, Kind::Ce { eps } if eps > 0.0)
    }

    /// Class weights as a host vector (all 1 when absent) and their sum.
    fn cpu_weights<A: Acc>(&self, k: usize) -> Result<(Vec<A>, A)> {
        match &self.weights {
            None => Ok((vec![A::ONE; k], A::from_f64(k as f64))),
            Some((w, ws)) => {
                let wv = A::host_vec(self.name, "class weights", w)?;
                let sum = A::host_vec(self.name, "class weights", ws)?;
                Ok((wv, sum.first().copied().unwrap_or(A::ZERO)))
            }
        }
    }

    /// `Σ w_label` over the non-ignored rows (the `Mean` denominator), merged in chunk order.
    fn weight_sum<T: Elem>(
        &self,
        lab: &CpuTargets<'_, T>,
        w: &[T::A],
        n: usize,
        k: usize,
    ) -> Result<f64> {
        let rpc = rows_per_chunk(1);
        let parts = map_indices(n.div_ceil(rpc), |ci| {
            let mut s = 0f64;
            for i in ci * rpc..((ci + 1) * rpc).min(n) {
                if let Some(t) = lab.class(self.name, i, k)? {
                    s += w[t].to_f64();
                }
            }
            Ok(s)
        })?;
        Ok(ordered_sum(&parts))
    }

    /// The forward: per-row losses (`Reduction::None`) or the reduced loss; with `saved` (a
    /// scalar reduction) the same pass writes the gradient for the backward.
    fn cpu_fwd_t<T: Elem, const SMOOTH: bool>(
        &self,
        x: &[T],
        lab: &CpuTargets<'_, T>,
        ew: Option<&CpuWeight<'_, T>>,
        n: usize,
        k: usize,
        saved: Option<&SavedGrad>,
    ) -> CpuOut {
        let (w, wsum) = self.cpu_weights::<T::A>(k)?;
        let p = self.params::<T::A>(k, wsum);
        let rpc = rows_per_chunk(k);
        let name = self.name;
        let zero = <T::A as Acc>::ZERO;
        if self.reduction == Reduction::None {
            let mut out = vec![T::from_acc(zero); n];
            map_chunks(
                &mut out,
                rpc,
                #[inline(always)]
                |ci, o| {
                    let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                    for (r, oi) in o.iter_mut().enumerate() {
                        let i = ci * rpc + r;
                        if let Some(t) = lab.class(name, i, k)? {
                            let xr = &x[i * k..(i + 1) * k];
                            let l =
                                row_eval::<T, SMOOTH>(&p, xr, t, &w, (&mut e, &mut d), zero, None);
                            *oi = T::from_acc(times(l, row_weight(name, ew, i)?));
                        }
                    }
                    Ok(())
                },
            )?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from(n)));
        }
        // The normaliser first, so that a fused pass can scale the gradient as it writes it.
        let scale = self.reduction.scale(self.weight_sum(lab, &w, n, k)?);
        let coef = <T::A as Acc>::from_f64(scale);
        // Σ l per chunk of rows, merged in chunk order; the gradient chunk (empty without
        // `saved`) rides along.
        let chunk = |ci: usize, mut gc: Option<&mut [T]>| -> Result<f64> {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = 0f64;
                    let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                    for (r, i) in (ci * rpc..((ci + 1) * rpc).min(n)).enumerate() {
                        if let Some(t) = lab.class(name, i, k)? {
                            let xr = &x[i * k..(i + 1) * k];
                            let grow = gc.as_deref_mut().map(|g| &mut g[r * k..(r + 1) * k]);
                            let wi = row_weight(name, ew, i)?;
                            let ci = times(coef, wi);
                            let l =
                                row_eval::<T, SMOOTH>(&p, xr, t, &w, (&mut e, &mut d), ci, grow);
                            s += Acc::to_f64(times(l, wi));
                        }
                    }
                    Ok(s)
                },
            )
        };
        scalar_rows::<T>((n, k, rpc), scale, saved, chunk)
    }

    /// The backward when the forward saved nothing (or for `Reduction::None`): the same row
    /// kernel, so the same bits as the gradient a fused forward saves.
    fn cpu_bwd_t<T: Elem, const SMOOTH: bool>(
        &self,
        x: &[T],
        lab: &CpuTargets<'_, T>,
        ew: Option<&CpuWeight<'_, T>>,
        up: &[T],
        n: usize,
        k: usize,
    ) -> CpuOut {
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
        map_chunks(
            &mut g,
            rpc * k,
            #[inline(always)]
            |ci, gc| {
                let (mut e, mut d) = (vec![zero; k], vec![zero; k]);
                for (r, grow) in gc.chunks_mut(k).enumerate() {
                    let i = ci * rpc + r;
                    if let Some(t) = lab.class(name, i, k)? {
                        let coef = if scalar_up {
                            <T::A as Acc>::from_f64(scale)
                        } else {
                            <T::A as Acc>::from_f64(scale * Acc::to_f64(up[i].to_acc()))
                        };
                        let coef = times(coef, row_weight(name, ew, i)?);
                        let xr = &x[i * k..(i + 1) * k];
                        row_eval::<T, SMOOTH>(&p, xr, t, &w, (&mut e, &mut d), coef, Some(grow));
                    }
                }
                Ok(())
            },
        )?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, k))))
    }
}

impl LossKernel for SoftmaxOp {
    fn names(&self) -> Names {
        let (fwd, bwd) = match self.kind {
            Kind::Ce { .. } => ("cross-entropy-fwd", "cross-entropy-bwd"),
            Kind::Focal { .. } => ("softmax-focal-fwd", "softmax-focal-bwd"),
        };
        Names {
            loss: self.name,
            fwd,
            bwd,
        }
    }

    fn target_kind(&self) -> TargetKind {
        self.labels
    }

    /// Probability targets: their own kernel. Integer labels never track a gradient.
    fn target_grad(&self) -> TargetGrad {
        if self.probs() {
            TargetGrad::Kernel
        } else {
            TargetGrad::Unsupported
        }
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        let (n, k) = inp.dims2(self.name)?;
        if self.probs() {
            let t = inp.t.dense(self.name)?;
            return self.cpu_prob_fwd::<T>(inp.x, t, inp.w.as_ref(), n, k, saved);
        }
        if self.smooth() {
            self.cpu_fwd_t::<T, true>(inp.x, &inp.t, inp.w.as_ref(), n, k, saved)
        } else {
            self.cpu_fwd_t::<T, false>(inp.x, &inp.t, inp.w.as_ref(), n, k, saved)
        }
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (n, k) = inp.dims2(self.name)?;
        if self.probs() {
            let t = inp.t.dense(self.name)?;
            return self.cpu_prob_bwd::<T>(inp.x, t, inp.w.as_ref(), up, (n, k), false);
        }
        if self.smooth() {
            self.cpu_bwd_t::<T, true>(inp.x, &inp.t, inp.w.as_ref(), up, n, k)
        } else {
            self.cpu_bwd_t::<T, false>(inp.x, &inp.t, inp.w.as_ref(), up, n, k)
        }
    }

    fn cpu_target_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (n, k) = inp.dims2(self.name)?;
        let t = inp.t.dense(self.name)?;
        self.cpu_prob_bwd::<T>(inp.x, t, inp.w.as_ref(), up, (n, k), true)
    }

    crate::op::gpu_kernel_methods!(target_grad);
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
