//! The CPU kernels of the quality family: the element math (loss, ∂l/∂x, ∂l/∂t in one
//! evaluation), the row decoding of dense targets or (labels, scores), and the passes.

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::gpu;
use super::{Form, QualityOp};
use crate::cpu::{
    self, lane_sum, map_chunks, map_indices, ordered_sum, rows_per_chunk, zeroed_vec, CHUNK_ELEMS,
};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuInputs, CpuOut, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::{CpuTargets, RowLabel, RowTarget, TargetKind};
use crate::weight::RowScratch;
use candle_core::{bail, Result, Shape, Storage};

/// The hyper-parameters in the accumulator type.
#[derive(Clone, Copy)]
pub(super) struct Params<A> {
    /// Varifocal (else quality focal).
    vfl: bool,
    /// Varifocal positives weighted by q.
    iou: bool,
    /// β (QFL) or γ (VFL): the exponent of |t - p|.
    beta: A,
    /// The factor of the |t - p|^β term: α for VFL's negatives, 1 for QFL.
    k: A,
}

/// Lower bound put on `log|t - p|` before it is multiplied by β: keeps `0·log 0` at 0 (so
/// β = 0 gives exactly 1) while `β·bound` underflows `exp` to 0 for any β > 0 used in practice.
const LN_FLOOR: f64 = -1e30;

/// `|t-p|^β = e^z` with `z < -SMALL_Z` is computed as `e^{z+SHIFT}`, times `e^{-SHIFT}` last.
const SMALL_Z: f64 = 60.0;
const SHIFT: f64 = 64.0;
/// `e^{-64}` (a normal f32).
const EXP_NEG_SHIFT: f64 = 1.603_810_890_548_638e-28;

/// Below this `e = e^{-|x|}`, `log(1+e)/e = 1 - e/2` to f64 precision (the next term, e²/3, is
/// under 1e-16): the ratio then never divides two subnormals.
const RHO_SMALL: f64 = 1e-8;

/// `(l, ∂l/∂x, ∂l/∂t)` of one element, target `t ∈ [0, 1]`. Straight-line code: every
/// candidate is computed and the result selected (no branch, no early return), so the element
/// loops vectorise.
#[inline(always)]
pub(super) fn elem<A: Acc>(p: &Params<A>, x: A, t: A) -> (A, A, A) {
    let (one, zero) = (A::ONE, A::ZERO);
    let e = x.exp_neg_abs(); // e^{-|x|} ∈ (0, 1]: never overflows
    let lp = e.log1p_unit(); // log(1 + e^{-|x|})
    let sp_pos = x.relu() + lp; // softplus(x)  = -log(1-p)
    let sp_neg = (-x).relu() + lp; // softplus(-x) = -log p
    let ope = one + e;
    let inv = one / ope;
    let pos = x >= zero;
    let sig = if pos { inv } else { e * inv }; // p = σ(x)
    let sigm = if pos { e * inv } else { inv }; // 1-p = σ(-x), no cancellation
    let u = one - t;
    let bce = t * sp_neg + u * sp_pos; // BCE with logits, both terms ≥ 0; ∂bce/∂t = -x
    let d = sig * u - sigm * t; // p - t, exact at a hard target (no 1 - p cancellation)

    // Varifocal positive (q > 0): w = q (or 1), ∂w/∂x = 0.
    let vfl_pos = p.vfl & (t > zero);
    let w_pos = if p.iou { t } else { one };
    // ∂l/∂q = -x·w + bce·∂w/∂q; with w = q that is bce - x·q = softplus(-x) + x·(1-2q)
    // (x ≥ 0) or softplus(x) - 2q·x (x < 0): no cancellation of bce against x·q.
    let two_t = t + t;
    let g_iou = if pos {
        sp_neg + x * (one - two_t)
    } else {
        sp_pos - two_t * x
    };
    let gt_pos = if p.iou { g_iou } else { -x };

    // Quality focal term (and varifocal negatives, t = 0): bce·k·|t - p|^β.
    let a = d.abs(); // |t - p|
    let (t0, t1) = (t == zero, t == one);
    // ρ = log(1+e)/e, for bce/|t-p| where a hard target is approached (p → t).
    let rho = if e < A::from_f64(RHO_SMALL) {
        one - A::from_f64(0.5) * e
    } else {
        lp / e
    };
    // bce/|t-p| at a hard target: t = 0 (|t-p| = p) or t = 1 (|t-p| = 1-p); on the side where
    // p → t both bce and |t-p| vanish and the ratio is (1+e)·ρ, elsewhere bce·(1+e).
    let near = if t0 { !pos } else { pos };
    let bq_hard = ope * if near { rho } else { bce };
    // log|t-p|; r = p(1-p)/|t-p| (= ∂|t-p|/∂x up to the sign); bq = bce/|t-p|. At a hard
    // target from quantities already computed (log σ(∓x) = -softplus(±x)); where p == t both
    // ratios are 0 (their sign factor is 0).
    let soft_ok = a > zero;
    let ln_soft = a.ln();
    let r_soft = if soft_ok { sig * sigm / a } else { zero };
    let bq_soft = if soft_ok { bce / a } else { zero };
    let ln_a = if t0 {
        -sp_neg
    } else if t1 {
        -sp_pos
    } else {
        ln_soft
    };
    let r = if t0 {
        sigm
    } else if t1 {
        sig
    } else {
        r_soft
    };
    let bq = if t0 | t1 { bq_hard } else { bq_soft };
    let floor = A::from_f64(LN_FLOOR);
    let ln_a = if ln_a < floor { floor } else { ln_a }; // NaN stays NaN
                                                        // |t-p|^β = e^z (0^β = 0 for β > 0, 1 for β = 0). Where e^z is far below 1 it is taken as
                                                        // e^{z+SHIFT}·e^{-SHIFT}, the second factor applied last: a product of a tiny |t-p|^β with
                                                        // a factor up to |x| is then rounded once, not after |t-p|^β has lost its bits as a
                                                        // subnormal.
    let z = p.beta * ln_a;
    let small = z < A::from_f64(-SMALL_Z);
    let m = (if small { z + A::from_f64(SHIFT) } else { z }).exp();
    let post = if small {
        A::from_f64(EXP_NEG_SHIFT)
    } else {
        one
    };
    let sgn = if d > zero {
        one
    } else if d < zero {
        -one
    } else {
        zero
    };
    let km = p.k * m;
    let loss = bce * km * post;
    // ∂/∂x: |t-p|^β·(p-t) + bce·β·sign(p-t)·|t-p|^(β-1)·p(1-p)
    let gx = km * (d + p.beta * sgn * bce * r) * post;
    // ∂/∂t: -x·|t-p|^β - bce·β·sign(p-t)·|t-p|^(β-1)
    let gt = -km * (x + p.beta * sgn * bq) * post;
    if vfl_pos {
        (bce * w_pos, w_pos * d, gt_pos)
    } else {
        (loss, gx, gt)
    }
}

impl QualityOp {
    pub(super) fn name(&self) -> &'static str {
        self.form.name()
    }

    pub(super) fn params<A: Acc>(&self) -> Params<A> {
        match self.form {
            Form::Qfl { beta } => Params {
                vfl: false,
                iou: false,
                beta: A::from_f64(beta),
                k: A::ONE,
            },
            Form::Vfl {
                alpha,
                gamma,
                iou_weighted,
            } => Params {
                vfl: true,
                iou: iou_weighted,
                beta: A::from_f64(gamma),
                k: A::from_f64(alpha),
            },
        }
    }

    /// `f` with the row source of the inputs: the dense targets, or the scores and the labels
    /// (read from the op's labels tensor).
    fn with_src<T: Elem, R>(
        &self,
        inp: &CpuInputs<'_, T>,
        f: impl FnOnce(&Src<'_, T>) -> Result<R>,
    ) -> Result<R> {
        let name = self.name();
        let (n, c) = inp.dims2(name)?;
        let second = inp.t.dense(name)?;
        match &self.labels {
            None => {
                if second.len() != n * c {
                    bail!(
                        "{name}: internal error, targets have {} elements",
                        second.len()
                    )
                }
                f(&Src {
                    name,
                    c,
                    second,
                    labels: None,
                })
            }
            Some((labels, kind)) => {
                if second.len() != n {
                    bail!(
                        "{name}: internal error, scores have {} elements",
                        second.len()
                    )
                }
                let (st, l) = labels.storage_and_layout();
                let Storage::Cpu(s) = &*st else {
                    bail!("{name}: internal error, labels are not on the CPU")
                };
                let tg = CpuTargets::<T>::new(name, *kind, s, l)?;
                f(&Src {
                    name,
                    c,
                    second,
                    labels: Some(tg),
                })
            }
        }
    }

    /// The scale of the reduction: `Mean` divides by non-ignored rows × C.
    fn scale<T: Elem>(&self, src: &Src<'_, T>, n: usize) -> Result<f64> {
        Ok(match self.reduction {
            Reduction::Mean => self.reduction.scale((src.valid_rows(n)? * src.c) as f64),
            r => r.scale(0.0),
        })
    }
}

/// Where a row's targets come from.
struct Src<'a, T> {
    name: &'static str,
    c: usize,
    /// Dense targets `[N, C]`, or scores `[N]`.
    second: &'a [T],
    labels: Option<CpuTargets<'a, T>>,
}

/// What a row is.
#[derive(Clone, Copy, PartialEq)]
enum Row {
    Ignored,
    Dense,
    /// A label: `k < C` the class whose target is the score, `k == C` background.
    Label(usize),
}

impl<T: Elem> Src<'_, T> {
    #[inline(always)]
    fn row(&self, i: usize) -> Result<Row> {
        let Some(l) = &self.labels else {
            return Ok(Row::Dense);
        };
        Ok(match l.row(self.name, i, self.c)? {
            RowTarget::Label(RowLabel::Class(k)) => Row::Label(k),
            _ => Row::Ignored,
        })
    }

    /// The score of row `i` (label rows), checked to lie in `[0, 1]`.
    #[inline(always)]
    fn score(&self, i: usize) -> Result<T::A> {
        let s = self.second[i].to_acc();
        if !(s >= T::A::ZERO && s <= T::A::ONE) {
            bail!(
                "{}: score {} at [{i}] is outside [0, 1]",
                self.name,
                s.to_f64()
            )
        }
        Ok(s)
    }

    /// Loads the targets of row `i` into `t` (checked to lie in `[0, 1]`); `Row::Ignored` leaves
    /// it as it is.
    #[inline(always)]
    fn load(&self, i: usize, t: &mut [T::A]) -> Result<Row> {
        let (c, zero, one) = (self.c, T::A::ZERO, T::A::ONE);
        let row = self.row(i)?;
        match row {
            Row::Ignored => {}
            Row::Dense => {
                let src = &self.second[i * c..(i + 1) * c];
                let mut ok = true;
                for (d, s) in t.iter_mut().zip(src) {
                    *d = s.to_acc();
                    ok &= *d >= zero && *d <= one; // false for NaN
                }
                if !ok {
                    let j = t
                        .iter()
                        .position(|v| !(*v >= zero && *v <= one))
                        .unwrap_or(0);
                    bail!(
                        "{}: target {} at [{i}, {j}] is outside [0, 1]",
                        self.name,
                        t[j].to_f64()
                    )
                }
            }
            Row::Label(k) => {
                t.fill(zero);
                if k < c {
                    t[k] = self.score(i)?;
                }
            }
        }
        Ok(row)
    }

    fn valid_rows(&self, n: usize) -> Result<usize> {
        match &self.labels {
            None => Ok(n),
            Some(l) => l.valid_rows(self.name, n, self.c),
        }
    }
}

/// The quality losses' row scratch: [`RowScratch`] with their row loading.
type Scratch<A> = RowScratch<A>;

impl<A: Acc> Scratch<A> {
    /// Loads row `i` of `x` and its targets.
    #[inline(always)]
    fn load_src<T: Elem<A = A>>(&mut self, src: &Src<'_, T>, x: &[T], i: usize) -> Result<Row> {
        let c = src.c;
        for (d, s) in self.x.iter_mut().zip(&x[i * c..(i + 1) * c]) {
            *d = s.to_acc();
        }
        src.load(i, &mut self.t)
    }
}

/// Which gradient of [`elem`] a backward pass wants.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    GradX,
    GradT,
}

#[inline(always)]
fn pick<A: Acc>(w: Want, r: (A, A, A)) -> A {
    match w {
        Want::GradX => r.1,
        Want::GradT => r.2,
    }
}

impl QualityOp {
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
        let name = self.name();
        let (n, c) = inp.dims2(name)?;
        let p = self.params::<T::A>();
        let (x, ew) = (inp.x, inp.w.as_ref());
        let rpc = rows_per_chunk(c);
        self.with_src(inp, |src| {
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
                            if sc.load_src(src, x, i)? == Row::Ignored {
                                continue; // stays 0
                            }
                            if WE {
                                sc.load_w(name, ew, i)?;
                                let it = orow.iter_mut().zip(&sc.x).zip(&sc.t).zip(&sc.w);
                                for (((o, &x), &t), &w) in it {
                                    *o = T::from_acc(elem(&p, x, t).0 * w);
                                }
                                continue;
                            }
                            for ((o, &x), &t) in orow.iter_mut().zip(&sc.x).zip(&sc.t) {
                                *o = T::from_acc(elem(&p, x, t).0);
                            }
                        }
                        Ok(())
                    },
                )?;
                return Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))));
            }
            let scale = self.scale(src, n)?;
            // The fused training step: ∂loss/∂x (times the reduction's scale) in the same pass.
            let sums = if let Some(saved) = saved {
                let coef = T::A::from_f64(scale);
                let mut g = zeroed_vec::<T>(n * c)?;
                let sums = map_chunks(
                    &mut g,
                    rpc * c,
                    #[inline(always)]
                    |ci, gc| {
                        let (mut s, mut sc) = (0f64, Scratch::new(c));
                        for (r, grow) in gc.chunks_mut(c).enumerate() {
                            let i = ci * rpc + r;
                            if sc.load_src(src, x, i)? == Row::Ignored {
                                continue; // its gradient row stays 0
                            }
                            if WE {
                                sc.load_w(name, ew, i)?;
                                let it = sc.v.iter_mut().zip(grow.iter_mut()).zip(&sc.x);
                                for ((((v, g), &x), &t), &w) in it.zip(&sc.t).zip(&sc.w) {
                                    let (l, gx, _) = elem(&p, x, t);
                                    *v = l * w;
                                    *g = T::from_acc(coef * (gx * w));
                                }
                                s += lane_sum(&sc.v).to_f64();
                                continue;
                            }
                            for (((v, g), &x), &t) in
                                sc.v.iter_mut().zip(grow).zip(&sc.x).zip(&sc.t)
                            {
                                let (l, gx, _) = elem(&p, x, t);
                                *v = l;
                                *g = T::from_acc(coef * gx);
                            }
                            s += lane_sum(&sc.v).to_f64();
                        }
                        Ok(s)
                    },
                )?;
                saved.put(T::to_cpu_storage_owned(g), Shape::from((n, c)));
                sums
            } else {
                map_indices(
                    n.div_ceil(rpc),
                    #[inline(always)]
                    |ci| {
                        let (mut s, mut sc) = (0f64, Scratch::new(c));
                        for i in ci * rpc..((ci + 1) * rpc).min(n) {
                            if sc.load_src(src, x, i)? == Row::Ignored {
                                continue;
                            }
                            if WE {
                                sc.load_w(name, ew, i)?;
                                let it = sc.v.iter_mut().zip(&sc.x).zip(&sc.t).zip(&sc.w);
                                for (((v, &x), &t), &w) in it {
                                    *v = elem(&p, x, t).0 * w;
                                }
                            } else {
                                for ((v, &x), &t) in sc.v.iter_mut().zip(&sc.x).zip(&sc.t) {
                                    *v = elem(&p, x, t).0;
                                }
                            }
                            s += lane_sum(&sc.v).to_f64();
                        }
                        Ok(s)
                    },
                )?
            };
            let total = ordered_sum(&sums) * scale;
            let out = vec![T::from_acc(T::A::from_f64(total))];
            Ok((T::to_cpu_storage_owned(out), Shape::from(())))
        })
    }

    /// `coef · up · ∂l/∂x` (`want` = GradX) or `∂l/∂t` of dense targets (GradT), `[N, C]`,
    /// times the element weights of a `forward_weighted` call.
    fn cpu_bwd_elems<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T], want: Want) -> CpuOut {
        match inp.w {
            Some(_) => self.cpu_bwd_elems_w::<T, true>(inp, up, want),
            None => self.cpu_bwd_elems_w::<T, false>(inp, up, want),
        }
    }

    fn cpu_bwd_elems_w<T: Elem, const WE: bool>(
        &self,
        inp: &CpuInputs<'_, T>,
        up: &[T],
        want: Want,
    ) -> CpuOut {
        let name = self.name();
        let (n, c) = inp.dims2(name)?;
        let scalar_up = self.check_up(up.len(), n * c)?;
        let p = self.params::<T::A>();
        let (x, ew) = (inp.x, inp.w.as_ref());
        let rpc = rows_per_chunk(c);
        let mut g = zeroed_vec::<T>(n * c)?;
        self.with_src(inp, |src| {
            let coef = T::A::from_f64(self.scale(src, n)?);
            map_chunks(
                &mut g,
                rpc * c,
                #[inline(always)]
                |ci, gc| {
                    let mut sc = Scratch::new(c);
                    for (r, grow) in gc.chunks_mut(c).enumerate() {
                        let i = ci * rpc + r;
                        if sc.load_src(src, x, i)? == Row::Ignored {
                            continue; // stays 0
                        }
                        let u = (!scalar_up).then(|| &up[i * c..(i + 1) * c]);
                        if WE {
                            sc.load_w(name, ew, i)?;
                            let it = grow.iter_mut().zip(&sc.x).zip(&sc.t).zip(&sc.w);
                            for (j, (((g, &x), &t), &w)) in it.enumerate() {
                                let uj = u.map_or(T::A::ONE, |u| u[j].to_acc());
                                *g = T::from_acc(coef * uj * (pick(want, elem(&p, x, t)) * w));
                            }
                            continue;
                        }
                        for (j, ((g, &x), &t)) in grow.iter_mut().zip(&sc.x).zip(&sc.t).enumerate()
                        {
                            let uj = u.map_or(T::A::ONE, |u| u[j].to_acc());
                            *g = T::from_acc(coef * uj * pick(want, elem(&p, x, t)));
                        }
                    }
                    Ok(())
                },
            )?;
            Ok(())
        })?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, c))))
    }

    /// `∂loss/∂scores`, `[N]`: the label column's `∂l/∂t` (0 for background and ignored rows),
    /// times that element's weight of a `forward_weighted` call.
    fn cpu_bwd_scores<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let name = self.name();
        let (n, c) = inp.dims2(name)?;
        let scalar_up = self.check_up(up.len(), n * c)?;
        let p = self.params::<T::A>();
        let (x, ew) = (inp.x, inp.w.as_ref());
        let mut g = zeroed_vec::<T>(n)?;
        self.with_src(inp, |src| {
            let coef = T::A::from_f64(self.scale(src, n)?);
            map_chunks(
                &mut g,
                CHUNK_ELEMS,
                #[inline(always)]
                |ci, gc| {
                    for (r, g) in gc.iter_mut().enumerate() {
                        let i = ci * CHUNK_ELEMS + r;
                        if let Row::Label(k) = src.row(i)? {
                            if k < c {
                                let e = i * c + k;
                                let u = if scalar_up { T::A::ONE } else { up[e].to_acc() };
                                let gt = elem(&p, x[e].to_acc(), src.score(i)?).2;
                                let gt = match ew {
                                    None => gt,
                                    Some(w) => match w.at(i, k, c) {
                                        Some(w) => gt * w.to_acc(),
                                        None => {
                                            bail!("{name}: internal error, no weight for row {i}")
                                        }
                                    },
                                };
                                *g = T::from_acc(coef * u * gt);
                            }
                        }
                    }
                    Ok(())
                },
            )?;
            Ok(())
        })?;
        cpu::apply_scalar_upstream(&mut g, scalar_up, up);
        Ok((T::to_cpu_storage_owned(g), Shape::from(n)))
    }

    /// Checks the upstream gradient's length; returns whether it is a scalar.
    fn check_up(&self, len: usize, nc: usize) -> Result<bool> {
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && len != 1 || !scalar_up && len != nc {
            bail!("{}: upstream gradient has {len} elements", self.name())
        }
        Ok(scalar_up)
    }
}

impl LossKernel for QualityOp {
    fn names(&self) -> Names {
        let (fwd, bwd) = match self.form {
            Form::Qfl { .. } => ("quality-focal-fwd", "quality-focal-bwd"),
            Form::Vfl { .. } => ("varifocal-fwd", "varifocal-bwd"),
        };
        Names {
            loss: self.name(),
            fwd,
            bwd,
        }
    }

    /// The second input is float either way: dense targets, or the scores (the labels are
    /// held by the op).
    fn target_kind(&self) -> TargetKind {
        TargetKind::Dense
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        self.cpu_fwd_t(inp, saved)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        self.cpu_bwd_elems(inp, up, Want::GradX)
    }

    /// Dense targets and scores: the quality kernels' own `∂l/∂t`.
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Kernel
    }

    fn cpu_target_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        match self.labels {
            None => self.cpu_bwd_elems(inp, up, Want::GradT),
            Some(_) => self.cpu_bwd_scores(inp, up),
        }
    }

    crate::op::gpu_kernel_methods!(target_grad);
}
