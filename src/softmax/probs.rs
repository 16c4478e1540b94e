//! Class-probability targets of [`CrossEntropyLoss`](super::CrossEntropyLoss) (torch's
//! `cross_entropy` with float targets `[N, K]`): validation and the CPU row kernels.
//!
//! A row with logits `x`, targets `t`, class weights `w` and smoothing `ε` has
//! `u_k = w_k·((1-ε)·t_k + ε/K)` and, with the row max `m` and `s = Σ_k e^{x_k - m}`,
//!
//! ```text
//! l = -Σ_k u_k·log p_k = Σ_k u_k·(m - x_k) + (Σ_k u_k)·log s
//! ```
//!
//! (non-negative terms for targets ≥ 0: no cancellation). `∂l/∂x_j = p_j·Σ_k u_k - u_j` and
//! `∂l/∂t_k = -(1-ε)·w_k·log p_k = (1-ε)·w_k·((m - x_k) + log s)`. The row (in L1) is swept
//! as in the label kernels: its max, then the exponentials, products and fixed-order lane sums.

use super::{row_weight, times, Kind, SoftmaxOp};
use crate::cpu::zeroed_vec;
use crate::cpu::{self, lane_max, lane_sum, map_chunks, rows_per_chunk, scalar_rows, vectorized};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuOut, SavedGrad};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight::CpuWeight;
use candle_core::{bail, Result, Shape, Tensor};

/// Validates float targets next to logits `[n, k]`: class probabilities for cross-entropy
/// (`Dense`), an error naming the loss for the focal loss.
pub(super) fn target_kind(
    name: &str,
    kind: Kind,
    logits: &Tensor,
    targets: &Tensor,
    n: usize,
    k: usize,
) -> Result<TargetKind> {
    if !matches!(kind, Kind::Ce { .. }) {
        bail!(
            "{name}: labels must be u32 or i64 [N] (class-probability targets are CrossEntropyLoss's), got dtype {:?}",
            targets.dtype()
        )
    }
    crate::check::check_same_device(name, "targets", logits, targets)?;
    if targets.dtype() != logits.dtype() {
        bail!(
            "{name}: probability targets must have the logits' dtype {:?}, got {:?}",
            logits.dtype(),
            targets.dtype()
        )
    }
    if targets.dims() != [n, k] {
        bail!(
            "{name}: probability targets must have the logits' shape [{n}, {k}], got {:?}",
            targets.dims()
        )
    }
    Ok(TargetKind::Dense)
}

/// Statistics of one row relative to its max `m`: `s = Σ e^{x_k - m}`, `su = Σ u_k`,
/// `sd = Σ u_k (m - x_k)`.
#[derive(Clone, Copy)]
struct ProbStats<A> {
    m: A,
    s: A,
    su: A,
    sd: A,
}

/// Scratch rows of one chunk: `e[k] = e^{x_k - m}`, `u[k]`, and the products `d[k]`.
struct Scratch<A> {
    e: Vec<A>,
    u: Vec<A>,
    d: Vec<A>,
}

impl<A: Acc> Scratch<A> {
    fn new(k: usize) -> Self {
        Self {
            e: vec![A::ZERO; k],
            u: vec![A::ZERO; k],
            d: vec![A::ZERO; k],
        }
    }
}

/// The statistics of row `x` with targets `t`, filling the scratch rows (`a = 1 - ε`,
/// `c = ε / K`, `w` the class weights).
#[inline(always)]
fn prob_stats<T: Elem>(
    x: &[T],
    t: &[T],
    w: &[T::A],
    (a, c): (T::A, T::A),
    sc: &mut Scratch<T::A>,
) -> ProbStats<T::A> {
    for (ev, xv) in sc.e.iter_mut().zip(x) {
        *ev = xv.to_acc();
    }
    let m = lane_max(&sc.e, <T::A as Acc>::from_f64(f32::MIN as f64));
    for ((uv, tv), wv) in sc.u.iter_mut().zip(t).zip(w) {
        *uv = *wv * (a * tv.to_acc() + c);
    }
    for ((dv, ev), uv) in sc.d.iter_mut().zip(&sc.e).zip(&sc.u) {
        *dv = *uv * (m - *ev);
    }
    for ev in sc.e.iter_mut() {
        *ev = (*ev - m).exp();
    }
    ProbStats {
        m,
        s: lane_sum(&sc.e),
        su: lane_sum(&sc.u),
        sd: lane_sum(&sc.d),
    }
}

/// The row loss `Σ u_k (m - x_k) + Σ u_k · log s`.
#[inline(always)]
fn prob_loss<A: Acc>(st: &ProbStats<A>) -> A {
    st.sd + st.su * st.s.ln()
}

/// `g_j = coef · (p_j Σu - u_j)` from the scratch rows.
#[inline(always)]
fn prob_grad<T: Elem>(st: &ProbStats<T::A>, sc: &Scratch<T::A>, coef: T::A, g: &mut [T]) {
    let inv_s = <T::A as Acc>::ONE / st.s;
    for ((gj, ej), uj) in g.iter_mut().zip(&sc.e).zip(&sc.u) {
        *gj = T::from_acc(coef * (*ej * inv_s * st.su - *uj));
    }
}

impl SoftmaxOp {
    /// `(1 - ε, ε / K)`.
    fn prob_params<A: Acc>(&self, k: usize) -> (A, A) {
        match self.kind {
            Kind::Ce { eps } => (A::from_f64(1.0 - eps), A::from_f64(eps / k as f64)),
            Kind::Focal { .. } => (A::ONE, A::ZERO),
        }
    }

    fn check_lens<T>(&self, x: &[T], t: &[T], n: usize, k: usize) -> Result<()> {
        if x.len() != n * k || t.len() != n * k {
            bail!(
                "{}: internal error, {} logits and {} targets for [{n}, {k}]",
                self.name,
                x.len(),
                t.len()
            )
        }
        Ok(())
    }

    /// The forward with probability targets: row losses (`None`) or the reduced loss
    /// (`Mean` = sum / N); with `saved` the same pass writes the gradient.
    pub(super) fn cpu_prob_fwd<T: Elem>(
        &self,
        x: &[T],
        t: &[T],
        ew: Option<&CpuWeight<'_, T>>,
        n: usize,
        k: usize,
        saved: Option<&SavedGrad>,
    ) -> CpuOut {
        self.check_lens(x, t, n, k)?;
        let (w, _) = self.cpu_weights::<T::A>(k)?;
        let ac = self.prob_params::<T::A>(k);
        let rpc = rows_per_chunk(k);
        let name = self.name;
        if self.reduction == Reduction::None {
            let mut out = vec![T::from_acc(<T::A as Acc>::ZERO); n];
            map_chunks(
                &mut out,
                rpc,
                #[inline(always)]
                |ci, o| {
                    let mut sc = Scratch::new(k);
                    for (r, oi) in o.iter_mut().enumerate() {
                        let i = ci * rpc + r;
                        let rows = i * k..(i + 1) * k;
                        let st = prob_stats(&x[rows.clone()], &t[rows], &w, ac, &mut sc);
                        *oi = T::from_acc(times(prob_loss(&st), row_weight(name, ew, i)?));
                    }
                    Ok(())
                },
            )?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from(n)));
        }
        let scale = self.reduction.scale(n as f64);
        let coef = <T::A as Acc>::from_f64(scale);
        let chunk = |ci: usize, mut gc: Option<&mut [T]>| -> Result<f64> {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = 0f64;
                    let mut sc = Scratch::new(k);
                    for (r, i) in (ci * rpc..((ci + 1) * rpc).min(n)).enumerate() {
                        let rows = i * k..(i + 1) * k;
                        let st = prob_stats(&x[rows.clone()], &t[rows], &w, ac, &mut sc);
                        let wi = row_weight(name, ew, i)?;
                        if let Some(gc) = gc.as_deref_mut() {
                            prob_grad(&st, &sc, times(coef, wi), &mut gc[r * k..(r + 1) * k]);
                        }
                        s += Acc::to_f64(times(prob_loss(&st), wi));
                    }
                    Ok(s)
                },
            )
        };
        scalar_rows::<T>((n, k, rpc), scale, saved, chunk)
    }

    /// The gradient with probability targets: to the logits, or (`wrt_t`) to the targets
    /// `coef · (1-ε) w_k ((m - x_k) + log s)`.
    pub(super) fn cpu_prob_bwd<T: Elem>(
        &self,
        x: &[T],
        t: &[T],
        ew: Option<&CpuWeight<'_, T>>,
        up: &[T],
        (n, k): (usize, usize),
        wrt_t: bool,
    ) -> CpuOut {
        self.check_lens(x, t, n, k)?;
        let (w, _) = self.cpu_weights::<T::A>(k)?;
        let ac = self.prob_params::<T::A>(k);
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up.len() != 1 || !scalar_up && up.len() != n {
            bail!("{}: upstream gradient has {} elements", self.name, up.len())
        }
        let scale = self.reduction.scale(n as f64);
        let rpc = rows_per_chunk(k);
        let name = self.name;
        let mut g = zeroed_vec::<T>(n * k)?;
        map_chunks(
            &mut g,
            rpc * k,
            #[inline(always)]
            |ci, gc| {
                let mut sc = Scratch::new(k);
                for (r, grow) in gc.chunks_mut(k).enumerate() {
                    let i = ci * rpc + r;
                    let coef = if scalar_up {
                        <T::A as Acc>::from_f64(scale)
                    } else {
                        <T::A as Acc>::from_f64(scale * Acc::to_f64(up[i].to_acc()))
                    };
                    let coef = times(coef, row_weight(name, ew, i)?);
                    let rows = i * k..(i + 1) * k;
                    let xr = &x[rows.clone()];
                    let st = prob_stats(xr, &t[rows], &w, ac, &mut sc);
                    if wrt_t {
                        let ls = st.s.ln();
                        let ca = coef * ac.0;
                        for ((gj, xj), wj) in grow.iter_mut().zip(xr).zip(&w) {
                            *gj = T::from_acc(ca * (*wj * ((st.m - xj.to_acc()) + ls)));
                        }
                    } else {
                        prob_grad(&st, &sc, coef, grow);
                    }
                }
                Ok(())
            },
        )?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, k))))
    }
}
