//! IoU-family box losses (IoU, GIoU, DIoU, CIoU) on paired boxes, fused into one custom op with a
//! hand-derived backward; torchvision semantics and eps placement.

use crate::check::{check_float, check_same_device};
use crate::cpu::{
    apply_scalar_upstream, lane_sum, ordered_sum, rows_per_chunk, vectorized, zeroed_vec,
};
use crate::dtype::{Acc, Elem};
use crate::op::{CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight::{self, Weight};
use candle_core::{bail, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const NAME: &str = "BoxIouLoss";

/// Which IoU-based loss [`BoxIouLoss`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IouKind {
    /// `1 - IoU`.
    Iou,
    /// Generalized IoU (Rezatofighi et al. 2019): `1 - IoU + (C - U)/C`, `C` the area of the
    /// smallest enclosing box.
    #[default]
    Giou,
    /// Distance IoU (Zheng et al. 2020): `1 - IoU + ρ²/c²`, `ρ` the distance of the centres,
    /// `c` the diagonal of the enclosing box.
    Diou,
    /// Complete IoU (Zheng et al. 2020): DIoU `+ α·v` with the aspect-ratio term `v`.
    Ciou,
}

/// IoU-family box regression loss on boxes paired row by row, fused into one custom op with a
/// hand-derived backward.
///
/// # Formula
///
/// Boxes are `(x1, y1, x2, y2)`. For a predicted box `p` and its target `g`, exactly as
/// torchvision's `_loss_inter_union` and `generalized_box_iou_loss` / `distance_box_iou_loss` /
/// `complete_box_iou_loss`:
///
/// ```text
/// iw = min(x2, x2g) - max(x1, x1g),  ih = min(y2, y2g) - max(y1, y1g)
/// I  = iw·ih if iw > 0 and ih > 0, else 0          (strict mask, not a clamp)
/// U  = (x2-x1)(y2-y1) + (x2g-x1g)(y2g-y1g) - I     (no eps)
/// IoU = I / (U + eps)
/// Iou:  l = 1 - IoU
/// Giou: l = 1 - (IoU - (C - U)/(C + eps)),     C = area of the smallest enclosing box
/// Diou: l = 1 - IoU + ρ²/(cw² + ch² + eps),    ρ = distance of the centres, cw, ch the
///                                              enclosing box's width and height
/// Ciou: l = Diou + α·v,  v = 4/π²·(atan(wg/hg) - atan(w/h))²,  α = v / (1 - IoU + v + eps)
/// ```
///
/// The gradient is derived by hand. As in torchvision, CIoU's trade-off `α` is a constant for
/// the gradient (torchvision computes it under `no_grad`). Where torch's `max`/`min` meet a tie
/// (a predicted coordinate equal to the target's), the gradient is split ½/½ between the two
/// arguments, as torch autograd does; where an overlap width or height is exactly 0 the
/// intersection term has zero gradient (the strict mask). So the gradient equals torch
/// autograd's also at those non-differentiable points. **Only `pred` (the first argument)
/// receives a gradient**: the target boxes are constants.
///
/// Differences from torchvision, all where torchvision returns NaN or inf: a division whose
/// denominator is exactly 0 (possible only with `eps = 0`, or with inverted boxes) gives 0, and
/// `atan(w/h)` of a zero-size box `0/0` is taken as 0 (torchvision: NaN); the derivative of
/// `atan(w/h)` is evaluated as `h/(w²+h²)`, `-w/(w²+h²)` (0 when `w = h = 0`), finite also for
/// `h = 0` (where `atan(w/h) = ±π/2` as in torchvision). So every finite input gives a finite
/// loss and gradient; NaN inputs propagate. torchvision's CIoU also uses its default `eps = 1e-7`
/// inside the DIoU part whatever `eps` is passed; here `eps` is used in every place (identical
/// for the default `eps`).
///
/// **Inverted corners** (`x2 < x1` or `y2 < y1`) are not reordered: they follow the same
/// arithmetic as torchvision, i.e. a negative width enters the area (`(x2-x1)(y2-y1)`, which
/// may be negative or, with both sides inverted, positive), the centre, the aspect ratio and the
/// enclosing box as is, and such a box never intersects (the strict mask). The result is finite
/// but not meaningful as a box loss; sanitise boxes upstream (e.g. decode with `exp` widths).
///
/// [`forward_weighted`](Self::forward_weighted) multiplies each pair's loss by its weight inside
/// the kernel, before the reduction (mmdet's `weight`): `l_i·w_i`; both boxes' gradients are
/// `w_i·∂l_i`, and a weight that tracks a gradient gets `∂/∂w_i`. A weight of ones gives
/// `forward`'s bits.
///
/// Reductions: `None` gives `[N]`; `Sum`; `Mean` = sum / N (0 for an empty batch, as
/// torchvision's `0.0 * loss.sum()`; with a weight still N, not the weight sum: pass
/// `AvgFactor` for mmdet's `avg_factor`); `AvgFactor(f)` = sum / f.
///
/// # Shapes
///
/// - `pred`, `target`: `[N, 4]`, the same shape, f32 / f64 / f16 / bf16, the same dtype (half
///   types are computed in f32).
/// - `weight` (`forward_weighted`): `[N]` (the boxes' leading shape: one per pair), in the
///   boxes' dtype.
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the input dtype. The gradient of
///   `pred` is `[N, 4]`.
/// - Leading dimensions: boxes `[..., 4]` (both of the same shape) are one `[N, 4]` problem;
///   `Reduction::None` returns the leading shape. Both boxes get a gradient when they track
///   one (the loss is symmetric in them; CIoU's α held constant, as torchvision).
///
/// # Errors
///
/// Every message starts with `BoxIouLoss:`. A tensor on a Metal device (only the CPU and CUDA have
/// kernels); inputs not of shape `[N, 4]` (last dimension not 4, other rank), shapes differing, a
/// non-float dtype or differing dtypes, different devices, `eps` negative or not finite,
/// `AvgFactor` not finite and > 0; a weight not of the boxes' leading shape, dtype or device.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{BoxIouLoss, IouKind, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let pred = Var::new(&[[0f32, 0., 2., 2.], [1., 1., 3., 4.]], &dev)?;
/// let target = Tensor::new(&[[1f32, 1., 3., 3.], [1., 1., 3., 4.]], &dev)?;
/// let loss_fn = BoxIouLoss { kind: IouKind::Ciou, reduction: Reduction::None, ..Default::default() };
/// let loss = loss_fn.forward(pred.as_tensor(), &target)?;
/// let l = loss.to_vec1::<f32>()?;
/// assert!(l[1].abs() < 1e-5); // identical boxes
/// let grads = loss.sum_all()?.backward()?;
/// assert_eq!(grads.get(&pred).unwrap().dims(), &[2, 4]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxIouLoss {
    /// Which loss of the family (default GIoU).
    pub kind: IouKind,
    /// The small constant of torchvision's denominators (default 1e-7), ≥ 0.
    pub eps: f64,
    /// How the `[N]` row losses are reduced (default `Mean`).
    pub reduction: Reduction,
}

impl Default for BoxIouLoss {
    fn default() -> Self {
        Self {
            kind: IouKind::Giou,
            eps: 1e-7,
            reduction: Reduction::Mean,
        }
    }
}

impl BoxIouLoss {
    /// Computes the loss of the predicted boxes `pred` `[N, 4]` against `target` `[N, 4]`.
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        crate::targets::with_leading_dims(NAME, pred, target, |x, t| self.forward_2d(x, t, None))
    }

    /// The loss with each pair's loss multiplied by `weight` inside the kernels (mmdet's
    /// `weight`): one value per box pair, of the leading shape of the boxes (`[N]` for
    /// `[N, 4]`). `Mean` still divides by N. Both boxes' gradients carry the weight; so does
    /// the weight's own gradient when it tracks one. See the type's documentation.
    pub fn forward_weighted(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        crate::check::check_supported_device(NAME, pred)?;
        let dims = pred.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        if weight.dims() != lead {
            bail!(
                "{NAME}: weight must have shape {lead:?} (one per box pair of pred {dims:?}), got {:?}",
                weight.dims()
            )
        }
        let n = pred.elem_count() / 4;
        weight::weighted(
            NAME,
            self.reduction,
            weight,
            |w, reduction, detach| {
                let loss = Self { reduction, ..*self };
                let (p, t) = if detach {
                    (pred.detach(), target.detach())
                } else {
                    (pred.clone(), target.clone())
                };
                crate::targets::with_leading_dims(NAME, &p, &t, |x, t| {
                    let w = w
                        .map(|w| weight::flatten_leading(p.dims(), w))
                        .transpose()?;
                    loss.forward_2d(x, t, w.as_ref())
                })
            },
            // Mean = sum / N, as without a weight.
            || Tensor::new(n as f64, pred.device())?.to_dtype(pred.dtype()),
        )
    }

    fn forward_2d(&self, pred: &Tensor, target: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        self.reduction.validate(NAME)?;
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("{NAME}: eps must be finite and >= 0, got {}", self.eps)
        }
        check_float(NAME, "pred", pred)?;
        check_same_device(NAME, "target", pred, target)?;
        match pred.dims() {
            [_, 4] => {}
            d => bail!("{NAME}: pred must have shape [N, 4] (x1, y1, x2, y2), got {d:?}"),
        }
        if target.dtype() != pred.dtype() {
            bail!(
                "{NAME}: target dtype {:?} differs from the pred dtype {:?}",
                target.dtype(),
                pred.dtype()
            )
        }
        if target.dims() != pred.dims() {
            bail!(
                "{NAME}: target shape {:?} differs from the pred shape {:?}",
                target.dims(),
                pred.dims()
            )
        }
        let n = pred.dims()[0];
        let w = w
            .map(|w| Weight::new(NAME, pred, w, &[n], &[n]))
            .transpose()?;
        let op = IouOp {
            kind: self.kind,
            eps: self.eps,
            reduction: self.reduction,
        };
        // Training (a scalar loss of a `pred` that tracks gradients): the forward pass also
        // computes the gradient, and the backward only scales it.
        let op = Fwd::new(op, self.reduction.is_scalar() && pred.track_op()).weighted(w);
        pred.contiguous()?.apply_op2(&target.contiguous()?, op)
    }
}

/// Parameters shared by the forward and backward ops.
#[derive(Clone, Copy, Debug)]
struct IouOp {
    kind: IouKind,
    eps: f64,
    reduction: Reduction,
}

const KIND_IOU: u8 = 0;
const KIND_GIOU: u8 = 1;
const KIND_DIOU: u8 = 2;
const KIND_CIOU: u8 = 3;

/// `4/π²`, the CIoU aspect-ratio constant.
const V_COEF: f64 = 4.0 / (std::f64::consts::PI * std::f64::consts::PI);

#[inline(always)]
fn max<A: Acc>(a: A, b: A) -> A {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn min<A: Acc>(a: A, b: A) -> A {
    if a < b {
        a
    } else {
        b
    }
}

/// ∂max(a, b)/∂a as torch autograd takes it: 1 if a > b, ½ at a tie, else 0.
#[inline(always)]
fn d_max<A: Acc>(a: A, b: A, half: A) -> A {
    if a > b {
        A::ONE
    } else if a == b {
        half
    } else {
        A::ZERO
    }
}

/// `v != v`: true only for NaN (a select, unlike a call that LLVM might not vectorise).
#[inline(always)]
#[allow(clippy::eq_op)]
fn is_nan<A: Acc>(v: A) -> bool {
    v != v
}

/// `1/d`, 0 where `d == 0` (NaN stays NaN).
#[inline(always)]
fn recip<A: Acc>(d: A) -> A {
    let r = A::ONE / d;
    if d == A::ZERO {
        A::ZERO
    } else {
        r
    }
}

/// Loss of one box pair and, when `GRAD`, its gradient w.r.t. the predicted box scaled by `up`.
/// `K` is the loss kind (`KIND_*`): the branches on it are resolved at compile time.
#[inline(always)]
fn box_pair<A: Acc, const K: u8, const GRAD: bool>(
    p: [A; 4],
    t: [A; 4],
    eps: A,
    v_coef: A,
    up: A,
) -> (A, [A; 4]) {
    let one = A::ONE;
    let zero = A::ZERO;
    let half = A::from_f64(0.5);
    let [x1, y1, x2, y2] = p;
    let [gx1, gy1, gx2, gy2] = t;
    // Intersection (torchvision: intersection set through the strict mask iw > 0 && ih > 0).
    let iw = min(x2, gx2) - max(x1, gx1);
    let ih = min(y2, gy2) - max(y1, gy1);
    let mask = iw > zero && ih > zero;
    let inter = if mask { iw * ih } else { zero };
    let w = x2 - x1;
    let h = y2 - y1;
    let wg = gx2 - gx1;
    let hg = gy2 - gy1;
    let union = w * h + wg * hg - inter; // no eps here (_loss_inter_union)
    let q = recip(union + eps); // 1/(U + eps)
    let iou = inter * q;
    let mut loss = one - iou;
    // dL/dI and dL/dA1 (A1 = w·h, the predicted area) via IoU = I/(A1 + A2 - I + eps):
    // dIoU/dI = q(1 + IoU), dIoU/dA1 = -IoU·q, and dL/dIoU = -1.
    let mut g_inter = -(q * (one + iou));
    let mut g_area = iou * q;
    // Enclosing box (GIoU, DIoU, CIoU).
    let cw = max(x2, gx2) - min(x1, gx1);
    let ch = max(y2, gy2) - min(y1, gy1);
    let mut g_cw = zero;
    let mut g_ch = zero;
    let (mut dx, mut dy, mut g_rho) = (zero, zero, zero);
    let (mut g_w, mut g_h) = (zero, zero);
    if K == KIND_GIOU {
        let c = cw * ch;
        let qc = recip(c + eps);
        let pen = (c - union) * qc; // (C - U)/(C + eps)
        loss = one - (iou - pen);
        // dpen/dC = qc(1 - pen), dpen/dU = -qc, U = A1 + A2 - I.
        let g_c = qc * (one - pen);
        g_cw = g_c * ch;
        g_ch = g_c * cw;
        g_area = g_area - qc;
        g_inter += qc;
    }
    if K == KIND_DIOU || K == KIND_CIOU {
        let qd = recip(cw * cw + ch * ch + eps); // 1/(c² + eps)
        dx = (x2 + x1) * half - (gx1 + gx2) * half; // centre distance (torchvision's order)
        dy = (y2 + y1) * half - (gy1 + gy2) * half;
        let rho2 = dx * dx + dy * dy;
        let r = rho2 * qd;
        loss = one - iou + r;
        // dR/drho2 = qd, dR/dc² = -R·qd.
        g_rho = qd;
        let g_diag = -(r * qd);
        g_cw = (g_diag + g_diag) * cw;
        g_ch = (g_diag + g_diag) * ch;
    }
    if K == KIND_CIOU {
        // atan(w/h), 0 for a 0/0 box (torchvision: NaN), ±π/2 for h = 0.
        let ratio = |a: A, b: A| {
            let r = a / b;
            if is_nan(r) && !is_nan(a) && !is_nan(b) {
                zero
            } else {
                r
            }
        };
        let dt = ratio(wg, hg).atan() - ratio(w, h).atan();
        let v = v_coef * dt * dt;
        let alpha = v * recip(one - iou + v + eps); // a constant for the gradient
        loss += alpha * v;
        // d(αv)/dw = α·dv/d atan(w/h)·h/(w²+h²), dv/d atan(w/h) = -2·(4/π²)·dt.
        let gv = -(alpha * (v_coef + v_coef) * dt) * recip(w * w + h * h);
        g_w = gv * h;
        g_h = -(gv * w);
    }
    if !GRAD {
        return (loss, [zero; 4]);
    }
    let gi = if mask { g_inter * up } else { zero };
    let (ga, gcw, gch, gr) = (g_area * up, g_cw * up, g_ch * up, g_rho * up);
    let (gw, gh) = (g_w * up, g_h * up);
    // A1 = (x2-x1)(y2-y1); I = iw·ih with iw = min(x2, gx2) - max(x1, gx1);
    // cw = max(x2, gx2) - min(x1, gx1); rho2 = dx² + dy², d(dx)/dx1 = d(dx)/dx2 = ½.
    let gx1_ =
        -(ga * h) - gi * ih * d_max(x1, gx1, half) - gcw * d_max(gx1, x1, half) + gr * dx - gw;
    let gx2_ = ga * h + gi * ih * d_max(gx2, x2, half) + gcw * d_max(x2, gx2, half) + gr * dx + gw;
    let gy1_ =
        -(ga * w) - gi * iw * d_max(y1, gy1, half) - gch * d_max(gy1, y1, half) + gr * dy - gh;
    let gy2_ = ga * w + gi * iw * d_max(gy2, y2, half) + gch * d_max(y2, gy2, half) + gr * dy + gh;
    (loss, [gx1_, gy1_, gx2_, gy2_])
}

/// Rows per block of the CPU kernels.
const BLOCK_ROWS: usize = 256;

/// A block of up to `BLOCK_ROWS` box pairs deinterleaved into one array per coordinate
/// (`x1, y1, x2, y2` of the prediction, then of the target), so that the per-pair math runs as
/// a loop over unit-stride arrays, which LLVM vectorises; the `[N, 4]` rows are strided by 4.
struct Block<A> {
    c: [[A; BLOCK_ROWS]; 8],
    /// Per-row upstream gradient (or the scalar coefficient in every row).
    up: [A; BLOCK_ROWS],
    /// Per-row losses.
    loss: [A; BLOCK_ROWS],
    /// Per-row gradient, one array per coordinate.
    d: [[A; BLOCK_ROWS]; 4],
    /// Per-row weight of a `forward_weighted` call (read only by the weighted kernels).
    w: [A; BLOCK_ROWS],
}

impl<A: Acc> Block<A> {
    fn new(up: A) -> Self {
        Self {
            c: [[A::ZERO; BLOCK_ROWS]; 8],
            up: [up; BLOCK_ROWS],
            loss: [A::ZERO; BLOCK_ROWS],
            d: [[A::ZERO; BLOCK_ROWS]; 4],
            w: [A::ZERO; BLOCK_ROWS],
        }
    }

    /// Loads the rows' weights (`w` from the block's first row on). Rows past its end keep
    /// older values: they are never read.
    #[inline(always)]
    fn load_weights<T: Elem<A = A>>(&mut self, w: &[T]) {
        for (d, v) in self.w.iter_mut().zip(w) {
            *d = v.to_acc();
        }
    }

    /// Every row's upstream factor `base · w_i` (a scalar upstream coefficient, weighted).
    #[inline(always)]
    fn weighted_up(&mut self, base: A) {
        for (u, w) in self.up.iter_mut().zip(&self.w) {
            *u = base * *w;
        }
    }

    /// Loads the rows of `p` and `g` (at most `BLOCK_ROWS`); returns the number of rows. Rows
    /// past it keep older values: they are computed but never read.
    #[inline(always)]
    fn load<T: Elem<A = A>>(&mut self, p: &[T], g: &[T]) -> usize {
        let rows = p.chunks_exact(4).zip(g.chunks_exact(4)).take(BLOCK_ROWS);
        let mut m = 0;
        for (i, (pr, gr)) in rows.enumerate() {
            for j in 0..4 {
                self.c[j][i] = pr[j].to_acc();
                self.c[4 + j][i] = gr[j].to_acc();
            }
            m = i + 1;
        }
        m
    }

    /// Loss (and, with `GRAD`, gradient times `up`) of every pair of the block: a loop of fixed
    /// length over unit-stride arrays, with no branch on the data, so that it vectorises.
    /// (Indexed by row: one index into the 14 arrays, of a constant trip count.) With `W` the
    /// loss is `w_i · l_i` (the weight of the gradient is in `up`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn eval<const K: u8, const GRAD: bool, const W: bool>(&mut self, eps: A, vc: A) {
        let c = &self.c;
        for i in 0..BLOCK_ROWS {
            let p = [c[0][i], c[1][i], c[2][i], c[3][i]];
            let g = [c[4][i], c[5][i], c[6][i], c[7][i]];
            let (l, di) = box_pair::<A, K, GRAD>(p, g, eps, vc, self.up[i]);
            self.loss[i] = if W { self.w[i] * l } else { l };
            if GRAD {
                for (dj, v) in self.d.iter_mut().zip(di) {
                    dj[i] = v;
                }
            }
        }
    }

    /// Writes the gradient of the first `gb.len() / 4` rows, interleaved, into `gb`.
    #[inline(always)]
    fn store_grad<T: Elem<A = A>>(&self, gb: &mut [T]) {
        for (i, gr) in gb.chunks_exact_mut(4).take(BLOCK_ROWS).enumerate() {
            for (v, dj) in gr.iter_mut().zip(&self.d) {
                *v = T::from_acc(dj[i]);
            }
        }
    }
}

/// Loss sum of the rows of one chunk, blocks summed with [`lane_sum`] and flushed to f64 per
/// block (a fixed order: deterministic); with `GRAD` it also writes `coef · ∂l/∂pred` into `g`
/// (the chunk's `[rows, 4]` gradient). The sum has the same bits either way. With `W` the rows'
/// weights `ws` multiply the losses and the gradients (`(coef · w_i) · ∂l/∂pred`).
#[inline(always)]
fn chunk_sum<T: Elem, const K: u8, const GRAD: bool, const W: bool>(
    xs: &[T],
    ts: &[T],
    ws: &[T],
    eps: T::A,
    vc: T::A,
    coef: T::A,
    g: &mut [T],
) -> f64 {
    let mut s = 0f64;
    let mut blk = Block::<T::A>::new(coef);
    let blocks = xs.chunks(4 * BLOCK_ROWS).zip(ts.chunks(4 * BLOCK_ROWS));
    for (bi, (xb, tb)) in blocks.enumerate() {
        let m = blk.load(xb, tb).min(BLOCK_ROWS);
        if W {
            blk.load_weights(ws.get(bi * BLOCK_ROWS..).unwrap_or(&[]));
            if GRAD {
                blk.weighted_up(coef);
            }
        }
        blk.eval::<K, GRAD, W>(eps, vc);
        s += lane_sum(&blk.loss[..m]).to_f64();
        if GRAD {
            let start = (bi * 4 * BLOCK_ROWS).min(g.len());
            let end = (start + 4 * m).min(g.len());
            blk.store_grad(&mut g[start..end]);
        }
    }
    s
}

/// The forward, weighted by `w` (one value per row) when given.
fn cpu_fwd_t<T: Elem, const K: u8>(
    op: &IouOp,
    x: &[T],
    t: &[T],
    w: Option<&[T]>,
    saved: Option<&SavedGrad>,
) -> CpuOut {
    match w {
        None => cpu_fwd_w::<T, K, false>(op, x, t, &[], saved),
        Some(w) => cpu_fwd_w::<T, K, true>(op, x, t, w, saved),
    }
}

fn cpu_fwd_w<T: Elem, const K: u8, const W: bool>(
    op: &IouOp,
    x: &[T],
    t: &[T],
    w: &[T],
    saved: Option<&SavedGrad>,
) -> CpuOut {
    let n = x.len() / 4;
    check_weight_len(W, w, n)?;
    let eps = T::A::from_f64(op.eps);
    let vc = T::A::from_f64(V_COEF);
    let rpc = rows_per_chunk(4);
    if op.reduction == Reduction::None {
        let mut out = zeroed_vec::<T>(n)?;
        out.par_chunks_mut(rpc)
            .zip(x.par_chunks(rpc * 4).zip(t.par_chunks(rpc * 4)))
            .enumerate()
            .for_each(|(ci, (o, (xs, ts)))| {
                vectorized(
                    #[inline(always)]
                    || {
                        let mut blk = Block::<T::A>::new(T::A::ONE);
                        let blocks = xs.chunks(4 * BLOCK_ROWS).zip(ts.chunks(4 * BLOCK_ROWS));
                        for (bi, (ob, (xb, tb))) in o.chunks_mut(BLOCK_ROWS).zip(blocks).enumerate()
                        {
                            let m = blk.load(xb, tb).min(BLOCK_ROWS);
                            if W {
                                let r0 = ci * rpc + bi * BLOCK_ROWS;
                                blk.load_weights(w.get(r0..).unwrap_or(&[]));
                            }
                            blk.eval::<K, false, W>(eps, vc);
                            for (oi, l) in ob.iter_mut().zip(&blk.loss[..m]) {
                                *oi = T::from_acc(*l);
                            }
                        }
                    },
                )
            });
        return Ok((T::to_cpu_storage_owned(out), Shape::from(n)));
    }
    let scale = op.reduction.scale(n as f64);
    let parts: Vec<f64> = match saved {
        // Training: the same pass also writes the gradient (for an upstream gradient of 1).
        Some(saved) => {
            let coef = T::A::from_f64(scale);
            let mut g = zeroed_vec::<T>(n * 4)?;
            let parts = g
                .par_chunks_mut(rpc * 4)
                .zip(x.par_chunks(rpc * 4).zip(t.par_chunks(rpc * 4)))
                .enumerate()
                .map(|(ci, (gs, (xs, ts)))| {
                    let ws = w.get(ci * rpc..).unwrap_or(&[]);
                    vectorized(
                        #[inline(always)]
                        || chunk_sum::<T, K, true, W>(xs, ts, ws, eps, vc, coef, gs),
                    )
                })
                .collect();
            saved.put(T::to_cpu_storage_owned(g), Shape::from((n, 4)));
            parts
        }
        None => x
            .par_chunks(rpc * 4)
            .zip(t.par_chunks(rpc * 4))
            .enumerate()
            .map(|(ci, (xs, ts))| {
                let ws = w.get(ci * rpc..).unwrap_or(&[]);
                vectorized(
                    #[inline(always)]
                    || chunk_sum::<T, K, false, W>(xs, ts, ws, eps, vc, T::A::ONE, &mut []),
                )
            })
            .collect(),
    };
    let total = ordered_sum(&parts) * scale;
    Ok((
        T::to_cpu_storage_owned(vec![T::from_acc(T::A::from_f64(total))]),
        Shape::from(()),
    ))
}

/// The backward, weighted by `w` (one value per row) when given.
fn cpu_bwd_t<T: Elem, const K: u8>(
    op: &IouOp,
    x: &[T],
    t: &[T],
    w: Option<&[T]>,
    up: &[T],
) -> CpuOut {
    match w {
        None => cpu_bwd_w::<T, K, false>(op, x, t, &[], up),
        Some(w) => cpu_bwd_w::<T, K, true>(op, x, t, w, up),
    }
}

fn cpu_bwd_w<T: Elem, const K: u8, const W: bool>(
    op: &IouOp,
    x: &[T],
    t: &[T],
    w: &[T],
    up: &[T],
) -> CpuOut {
    let n = x.len() / 4;
    check_weight_len(W, w, n)?;
    let scalar_up = op.reduction.is_scalar();
    if (scalar_up && up.len() != 1) || (!scalar_up && up.len() != n) {
        bail!(
            "{NAME}: upstream gradient has {} elements, expected {}",
            up.len(),
            if scalar_up { 1 } else { n }
        )
    }
    let eps = T::A::from_f64(op.eps);
    let vc = T::A::from_f64(V_COEF);
    let rpc = rows_per_chunk(4);
    // A scalar upstream is applied afterwards, exactly as to a gradient saved by the forward.
    let coef = T::A::from_f64(if scalar_up {
        op.reduction.scale(n as f64)
    } else {
        1.0
    });
    let mut g = zeroed_vec::<T>(n * 4)?;
    g.par_chunks_mut(rpc * 4)
        .zip(x.par_chunks(rpc * 4).zip(t.par_chunks(rpc * 4)))
        .enumerate()
        .for_each(|(ci, (gs, (xs, ts)))| {
            vectorized(
                #[inline(always)]
                || {
                    let mut blk = Block::<T::A>::new(coef);
                    let blocks = xs.chunks(4 * BLOCK_ROWS).zip(ts.chunks(4 * BLOCK_ROWS));
                    for (bi, (gb, (xb, tb))) in
                        gs.chunks_mut(4 * BLOCK_ROWS).zip(blocks).enumerate()
                    {
                        let m = blk.load(xb, tb).min(BLOCK_ROWS);
                        let r0 = ci * rpc + bi * BLOCK_ROWS;
                        if W {
                            blk.load_weights(w.get(r0..).unwrap_or(&[]));
                        }
                        if !scalar_up {
                            let r0 = r0.min(up.len());
                            let r1 = (r0 + m).min(up.len());
                            for (u, v) in blk.up.iter_mut().zip(&up[r0..r1]) {
                                *u = v.to_acc();
                            }
                            if W {
                                // u_i · w_i
                                for (u, wi) in blk.up.iter_mut().zip(&blk.w) {
                                    *u = *u * *wi;
                                }
                            }
                        } else if W {
                            blk.weighted_up(coef);
                        }
                        blk.eval::<K, true, false>(eps, vc);
                        blk.store_grad(gb);
                    }
                },
            )
        });
    apply_scalar_upstream(&mut g, scalar_up, up);
    Ok((T::to_cpu_storage_owned(g), Shape::from((n, 4))))
}

/// Calls `$f::<T, KIND>(args…)` for the op's kind.
macro_rules! by_kind {
    ($kind:expr, $f:ident, $T:ty, $($args:expr),*) => {
        match $kind {
            IouKind::Iou => $f::<$T, KIND_IOU>($($args),*),
            IouKind::Giou => $f::<$T, KIND_GIOU>($($args),*),
            IouKind::Diou => $f::<$T, KIND_DIOU>($($args),*),
            IouKind::Ciou => $f::<$T, KIND_CIOU>($($args),*),
        }
    };
}

/// A weight of one value per row (`n` rows) when the kernel reads one (`weighted`).
fn check_weight_len<T>(weighted: bool, w: &[T], n: usize) -> Result<()> {
    if weighted && w.len() != n {
        bail!(
            "{NAME}: internal error, a weight of {} values for {n} box pairs",
            w.len()
        )
    }
    Ok(())
}

fn check_rows(l: &Layout) -> Result<()> {
    match l.dims() {
        [_, 4] => Ok(()),
        d => bail!("{NAME}: pred must have shape [N, 4], got {d:?}"),
    }
}

impl LossKernel for IouOp {
    fn names(&self) -> Names {
        Names {
            loss: NAME,
            fwd: "box-iou-fwd",
            bwd: "box-iou-bwd",
        }
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Dense
    }

    /// IoU, GIoU, DIoU and CIoU are symmetric in the two boxes (CIoU's α is held constant).
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Swapped
    }

    fn check_layout(&self, x: &Layout) -> Result<()> {
        check_rows(x)
    }

    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut {
        let (x, t) = paired(inp)?;
        let w = inp.w.map(|w| w.v);
        by_kind!(self.kind, cpu_fwd_t, T, self, x, t, w, saved)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let (x, t) = paired(inp)?;
        let w = inp.w.map(|w| w.v);
        by_kind!(self.kind, cpu_bwd_t, T, self, x, t, w, up)
    }

    crate::op::gpu_kernel_methods!();
}

/// The predicted and target coordinates, of equal length.
fn paired<'a, T: Elem>(inp: &CpuInputs<'a, T>) -> Result<(&'a [T], &'a [T])> {
    let (x, t) = (inp.x, inp.t.dense(NAME)?);
    if t.len() != x.len() {
        bail!(
            "{NAME}: internal error, {} vs {} coordinates",
            x.len(),
            t.len()
        )
    }
    Ok((x, t))
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
