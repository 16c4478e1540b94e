//! `forward_weighted` of the box losses: SmoothL1Loss and BalancedL1Loss (one weight per row or
//! per element), BoxIouLoss (IoU, GIoU, DIoU, CIoU; one weight per box pair) and
//! DistributionFocalLoss (one weight per row). Against an independent f64 reference written
//! here (loss, input gradient, target gradient, weight gradient), a weight of ones against
//! `forward` bit for bit, the weight's gradient against finite differences, a zero weight as a
//! left-out row, bad weights, leading dimensions and the fused training step. Under
//! `--features cuda-emu` the same checks run the CUDA kernels.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{
    BalancedL1Loss, BoxIouLoss, DistributionFocalLoss, IouKind, Reduction, SmoothL1Loss,
};
use common::weighted::{check_weight_gradient, check_weight_of_ones, check_zero_weight_ignores};
use common::*;

/// DFL bins per row.
const K: usize = 8;

#[derive(Clone, Copy, Debug)]
enum Loss {
    Smooth(f64),
    Balanced { alpha: f64, gamma: f64, beta: f64 },
    Iou(IouKind),
    Dfl,
}

const LOSSES: [Loss; 9] = [
    Loss::Smooth(1.0 / 9.0),
    Loss::Smooth(0.0),
    Loss::Balanced {
        alpha: 0.5,
        gamma: 1.5,
        beta: 1.0,
    },
    Loss::Balanced {
        alpha: 0.7,
        gamma: 1.2,
        beta: 0.6,
    },
    Loss::Iou(IouKind::Iou),
    Loss::Iou(IouKind::Giou),
    Loss::Iou(IouKind::Diou),
    Loss::Iou(IouKind::Ciou),
    Loss::Dfl,
];

impl Loss {
    /// Elements of one row of the input (`[N, cols]`).
    fn cols(self) -> usize {
        match self {
            Loss::Dfl => K,
            _ => 4,
        }
    }

    /// Whether the loss is one value per element of the input (the L1 losses).
    fn elementwise(self) -> bool {
        matches!(self, Loss::Smooth(_) | Loss::Balanced { .. })
    }

    /// The struct name that starts the loss's errors.
    fn name(self) -> &'static str {
        match self {
            Loss::Smooth(_) => "SmoothL1Loss",
            Loss::Balanced { .. } => "BalancedL1Loss",
            Loss::Iou(_) => "BoxIouLoss",
            Loss::Dfl => "DistributionFocalLoss",
        }
    }

    /// `forward` (`w = None`) or `forward_weighted`.
    fn run(self, red: Reduction, x: &Tensor, t: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Loss::Smooth(beta) => {
                let f = SmoothL1Loss {
                    beta,
                    reduction: red,
                };
                match w {
                    Some(w) => f.forward_weighted(x, t, w),
                    None => f.forward(x, t),
                }
            }
            Loss::Balanced { alpha, gamma, beta } => {
                let f = BalancedL1Loss {
                    alpha,
                    gamma,
                    beta,
                    reduction: red,
                };
                match w {
                    Some(w) => f.forward_weighted(x, t, w),
                    None => f.forward(x, t),
                }
            }
            Loss::Iou(kind) => {
                let f = BoxIouLoss {
                    kind,
                    reduction: red,
                    ..Default::default()
                };
                match w {
                    Some(w) => f.forward_weighted(x, t, w),
                    None => f.forward(x, t),
                }
            }
            Loss::Dfl => {
                let f = DistributionFocalLoss { reduction: red };
                match w {
                    Some(w) => f.forward_weighted(x, t, w),
                    None => f.forward(x, t),
                }
            }
        }
    }

    /// Random inputs of `n` rows: `(x, x shape, t, t shape)` (f64 values).
    fn inputs(self, rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<usize>, Vec<f64>, Vec<usize>) {
        match self {
            Loss::Smooth(_) | Loss::Balanced { .. } => {
                let x = rng.vec_normal(4 * n, 1.0);
                // Mostly near the prediction (the quadratic / log branch), some far.
                let t = x
                    .iter()
                    .map(|v| {
                        let s = if rng.below(3) == 0 { 2.0 } else { 0.2 };
                        v + rng.normal(s)
                    })
                    .collect();
                (x, vec![n, 4], t, vec![n, 4])
            }
            Loss::Iou(_) => {
                let (p, g) = random_pairs(rng, n);
                (p, vec![n, 4], g, vec![n, 4])
            }
            Loss::Dfl => {
                let x = rng.vec_normal(K * n, 2.0);
                let t = (0..n)
                    .map(|_| 0.01 + rng.uniform() * (K as f64 - 1.02))
                    .collect();
                (x, vec![n, K], t, vec![n])
            }
        }
    }

    /// Per item (element for the L1 losses, row otherwise): the unweighted loss, its gradient
    /// with respect to the item's inputs and to its targets, from the f64 reference.
    fn reference_items(self, x: &[f64], t: &[f64]) -> Items {
        let mut it = Items::default();
        match self {
            Loss::Smooth(_) | Loss::Balanced { .. } => {
                for (a, b) in x.iter().zip(t) {
                    let (l, d) = ref_l1(self, a - b);
                    it.l.push(l);
                    it.dx.push(d);
                    it.dt.push(-d);
                }
                it.gx = 1;
                it.gt = 1;
            }
            Loss::Iou(kind) => {
                for (p, g) in x.chunks(4).zip(t.chunks(4)) {
                    let (l, dp, dg) = ref_iou_grad(kind, p, g);
                    it.l.push(l);
                    it.dx.extend(dp);
                    it.dt.extend(dg);
                }
                it.gx = 4;
                it.gt = 4;
            }
            Loss::Dfl => {
                for (xr, y) in x.chunks(K).zip(t) {
                    let (l, dx, dy) = ref_dfl(xr, *y);
                    it.l.push(l);
                    it.dx.extend(dx);
                    it.dt.push(dy);
                }
                it.gx = K;
                it.gt = 1;
            }
        }
        it
    }
}

/// The reference's per-item values: losses `l`, input gradients `dx` (`gx` per item), target
/// gradients `dt` (`gt` per item).
#[derive(Default)]
struct Items {
    l: Vec<f64>,
    dx: Vec<f64>,
    dt: Vec<f64>,
    gx: usize,
    gt: usize,
}

/// The reference result: loss, gradients of `sum(loss · up)` w.r.t. the input, the targets and
/// the weight (in the weight's shape).
struct Reference {
    loss: Vec<f64>,
    gx: Vec<f64>,
    gt: Vec<f64>,
    gw: Vec<f64>,
}

/// torch's d|d|/dd: sign(d), 0 at d = 0.
fn sign(d: f64) -> f64 {
    if d > 0.0 {
        1.0
    } else if d < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// (loss, d loss / d pred) of one element of the L1 losses at `d = pred − target`.
fn ref_l1(loss: Loss, d: f64) -> (f64, f64) {
    let ad = d.abs();
    match loss {
        Loss::Smooth(beta) => {
            if ad < beta {
                (0.5 * d * d / beta, d / beta)
            } else {
                (ad - 0.5 * beta, sign(d))
            }
        }
        Loss::Balanced { alpha, gamma, beta } => {
            let b = (gamma / alpha).exp() - 1.0;
            if ad < beta {
                let ln = (b * ad / beta + 1.0).ln();
                let l = alpha / b * (b * ad + 1.0) * ln - alpha * ad;
                let dl = alpha * ln + alpha * (b * ad + 1.0) / (b * ad + beta) - alpha;
                (l, sign(d) * dl)
            } else {
                (gamma * ad + gamma / b - alpha * beta, sign(d) * gamma)
            }
        }
        _ => unreachable!(),
    }
}

/// torchvision's IoU-family loss of one pair (eps = 1e-7); CIoU's trade-off α taken as
/// `alpha` when given (held constant for the gradient, as torchvision does).
fn ref_iou(kind: IouKind, p: &[f64], g: &[f64], alpha: Option<f64>) -> (f64, f64) {
    let eps = 1e-7;
    let iw = p[2].min(g[2]) - p[0].max(g[0]);
    let ih = p[3].min(g[3]) - p[1].max(g[1]);
    let inter = if iw > 0.0 && ih > 0.0 { iw * ih } else { 0.0 };
    let (w, h) = (p[2] - p[0], p[3] - p[1]);
    let (wg, hg) = (g[2] - g[0], g[3] - g[1]);
    let union = w * h + wg * hg - inter;
    let iou = inter / (union + eps);
    let cw = p[2].max(g[2]) - p[0].min(g[0]);
    let ch = p[3].max(g[3]) - p[1].min(g[1]);
    let diou = || {
        let dx = (p[0] + p[2]) / 2.0 - (g[0] + g[2]) / 2.0;
        let dy = (p[1] + p[3]) / 2.0 - (g[1] + g[3]) / 2.0;
        1.0 - iou + (dx * dx + dy * dy) / (cw * cw + ch * ch + eps)
    };
    match kind {
        IouKind::Iou => (1.0 - iou, 0.0),
        IouKind::Giou => {
            let c = cw * ch;
            (1.0 - (iou - (c - union) / (c + eps)), 0.0)
        }
        IouKind::Diou => (diou(), 0.0),
        IouKind::Ciou => {
            let pi = std::f64::consts::PI;
            let v = 4.0 / (pi * pi) * ((wg / hg).atan() - (w / h).atan()).powi(2);
            let a = alpha.unwrap_or(v / (1.0 - iou + v + eps));
            (diou() + a * v, a)
        }
    }
}

/// Loss and gradients (w.r.t. both boxes) of one pair: central finite differences of
/// [`ref_iou`] with CIoU's α held at its value at the pair.
fn ref_iou_grad(kind: IouKind, p: &[f64], g: &[f64]) -> (f64, [f64; 4], [f64; 4]) {
    let (l, a) = ref_iou(kind, p, g, None);
    let a = Some(a);
    let h = 1e-6;
    let mut dp = [0.0; 4];
    let mut dg = [0.0; 4];
    for j in 0..4 {
        let (mut pp, mut pm) = (p.to_vec(), p.to_vec());
        pp[j] += h;
        pm[j] -= h;
        dp[j] = (ref_iou(kind, &pp, g, a).0 - ref_iou(kind, &pm, g, a).0) / (2.0 * h);
        let (mut gp, mut gm) = (g.to_vec(), g.to_vec());
        gp[j] += h;
        gm[j] -= h;
        dg[j] = (ref_iou(kind, p, &gp, a).0 - ref_iou(kind, p, &gm, a).0) / (2.0 * h);
    }
    (l, dp, dg)
}

/// DFL of one row: loss, d/dx (softmax minus the two-bin target), d/dy = x_i − x_{i+1}.
fn ref_dfl(x: &[f64], y: f64) -> (f64, Vec<f64>, f64) {
    let k = x.len();
    let i = (y.floor() as usize).min(k - 2);
    let (wi, wj) = (i as f64 + 1.0 - y, y - i as f64);
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
    let lse = m + s.ln();
    let l = wi * (lse - x[i]) + wj * (lse - x[i + 1]);
    let mut dx: Vec<f64> = x.iter().map(|v| (v - lse).exp()).collect();
    dx[i] -= wi;
    dx[i + 1] -= wj;
    (l, dx, x[i] - x[i + 1])
}

/// The weighted reference: `w` of one value per row (`per_elem` false) or per element of the
/// L1 losses, reduced as `red`, gradients of `sum(loss · up)`.
fn reference(
    loss: Loss,
    x: &[f64],
    t: &[f64],
    w: &[f64],
    per_elem: bool,
    red: Reduction,
    up: &[f64],
) -> Reference {
    let it = loss.reference_items(x, t);
    let items = it.l.len();
    // The weight of each item (an L1 row weight is shared by its 4 elements).
    let wi: Vec<f64> = (0..items)
        .map(|i| {
            if loss.elementwise() && !per_elem {
                w[i / 4]
            } else {
                w[i]
            }
        })
        .collect();
    let scale = match red {
        Reduction::None | Reduction::Sum => 1.0,
        Reduction::Mean => 1.0 / items.max(1) as f64,
        Reduction::AvgFactor(f) => 1.0 / f,
    };
    let u = |i: usize| if red == Reduction::None { up[i] } else { up[0] };
    let lw: Vec<f64> = (0..items).map(|i| wi[i] * it.l[i]).collect();
    let loss_v = if red == Reduction::None {
        lw.clone()
    } else {
        vec![lw.iter().sum::<f64>() * scale]
    };
    let gx = (0..it.dx.len())
        .map(|e| scale * u(e / it.gx) * wi[e / it.gx] * it.dx[e])
        .collect();
    let gt = (0..it.dt.len())
        .map(|e| scale * u(e / it.gt) * wi[e / it.gt] * it.dt[e])
        .collect();
    let mut gw = vec![0.0; w.len()];
    for i in 0..items {
        let k = if loss.elementwise() && !per_elem {
            i / 4
        } else {
            i
        };
        gw[k] += scale * u(i) * it.l[i];
    }
    Reference {
        loss: loss_v,
        gx,
        gt,
        gw,
    }
}

fn random_box(rng: &mut Rng) -> [f64; 4] {
    let x = rng.uniform() * 60.0;
    let y = rng.uniform() * 60.0;
    let w = 2.0 + rng.uniform() * 38.0;
    let h = 2.0 + rng.uniform() * 38.0;
    [x, y, x + w, y + h]
}

/// Random pairs: mostly overlapping (a jittered copy of the target), some independent.
fn random_pairs(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut p = Vec::with_capacity(4 * n);
    let mut g = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let t = random_box(rng);
        let b = if rng.below(4) == 0 {
            random_box(rng)
        } else {
            let (w, h) = (t[2] - t[0], t[3] - t[1]);
            let x1 = t[0] + rng.normal(0.25 * w);
            let y1 = t[1] + rng.normal(0.25 * h);
            [
                x1,
                y1,
                x1 + w * (0.5 + rng.uniform()),
                y1 + h * (0.5 + rng.uniform()),
            ]
        };
        g.extend_from_slice(&t);
        p.extend_from_slice(&b);
    }
    (p, g)
}

/// Weights in [0, 2), about one in six exactly 0.
fn random_weights(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| {
            if rng.below(6) == 0 {
                0.0
            } else {
                2.0 * rng.uniform()
            }
        })
        .collect()
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The weight shapes a loss accepts for `n` rows: per row, and per element for the L1 losses.
fn weight_shapes(loss: Loss, n: usize) -> Vec<(Vec<usize>, bool)> {
    let mut v = vec![(vec![n], false)];
    if loss.elementwise() {
        v.push((vec![n, 4], true));
    }
    v
}

#[test]
fn weight_of_ones_is_forward_bit_for_bit() {
    let mut rng = Rng::new(1);
    // 4500 rows: more than one CPU chunk (16384 elements, 4096 IoU rows, 2048 DFL rows).
    for n in [37, 4500] {
        for loss in LOSSES {
            let (x, xs, t, ts) = loss.inputs(&mut rng, n);
            for dtype in [DType::F32, DType::F64, DType::BF16] {
                if n > 100 && dtype != DType::F32 {
                    continue;
                }
                let (xt, tt) = (tensor(&x, &xs, dtype), tensor(&t, &ts, dtype));
                let shapes: Vec<Vec<usize>> =
                    weight_shapes(loss, n).into_iter().map(|s| s.0).collect();
                let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
                check_weight_of_ones(
                    &format!("{loss:?} {dtype:?} n={n}"),
                    &xt,
                    &shapes,
                    |x, red, w| loss.run(red, x, &tt, w),
                );
            }
        }
    }
}

#[test]
fn weighted_loss_and_gradients_match_the_f64_reference() {
    let mut rng = Rng::new(2);
    for n in [1, 29, 4500] {
        for loss in LOSSES {
            let (x, xs, t, ts) = loss.inputs(&mut rng, n);
            for (wshape, per_elem) in weight_shapes(loss, n) {
                let w = random_weights(&mut rng, wshape.iter().product());
                for red in REDUCTIONS {
                    let none_len = if loss.elementwise() { 4 * n } else { n };
                    let none_shape: Vec<usize> = if loss.elementwise() {
                        vec![n, 4]
                    } else {
                        vec![n]
                    };
                    let up = upstream(&mut rng, red, none_len);
                    let want = reference(loss, &x, &t, &w, per_elem, red, &up);
                    for dtype in [DType::F64, DType::F32] {
                        let what = format!("{loss:?} {dtype:?} n={n} w{wshape:?} {red:?}");
                        let (xt, tt) = (tensor(&x, &xs, dtype), tensor(&t, &ts, dtype));
                        let wt = tensor(&w, &wshape, dtype);
                        let upt = up_tensor(&up, red, &none_shape, &Device::Cpu)
                            .to_dtype(dtype)
                            .unwrap();
                        // Input, targets and weight all track a gradient.
                        let (xv, tv, wv) = (
                            Var::from_tensor(&xt).unwrap(),
                            Var::from_tensor(&tt).unwrap(),
                            Var::from_tensor(&wt).unwrap(),
                        );
                        let lt = loss
                            .run(red, xv.as_tensor(), tv.as_tensor(), Some(wv.as_tensor()))
                            .unwrap();
                        let obj = (&lt * &upt).unwrap().sum_all().unwrap();
                        let grads = obj.backward().unwrap();
                        let g = |v: &Var| to_f64_vec(grads.get(v).expect("a gradient"));
                        let (tl, tg) = if dtype == DType::F64 {
                            // The IoU reference gradient is a finite difference.
                            let a = if matches!(loss, Loss::Iou(_)) {
                                1e-7
                            } else {
                                1e-11
                            };
                            (Tol::scaled(1e-12, 1.0, 1e-12), Tol::scaled(a, 1e-3, 1e-6))
                        } else {
                            (Tol::scaled(2e-6, 1.0, 2e-5), Tol::scaled(2e-5, 1e-3, 2e-4))
                        };
                        tl.check(&format!("{what} loss"), &to_f64_vec(&lt), &want.loss);
                        tg.check(&format!("{what} input grad"), &g(&xv), &want.gx);
                        tg.check(&format!("{what} target grad"), &g(&tv), &want.gt);
                        tg.check(&format!("{what} weight grad"), &g(&wv), &want.gw);
                    }
                }
            }
        }
    }
}

#[test]
fn weight_gradient_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let n = 9;
    for (li, loss) in LOSSES.into_iter().enumerate() {
        let (x, xs, t, ts) = loss.inputs(&mut rng, n);
        let (xt, tt) = (tensor(&x, &xs, DType::F64), tensor(&t, &ts, DType::F64));
        for (wshape, _) in weight_shapes(loss, n) {
            check_weight_gradient(
                &format!("{loss:?} w{wshape:?}"),
                &wshape,
                10 + li as u64,
                |red, w| loss.run(red, &xt, &tt, Some(w)),
            );
        }
    }
}

#[test]
fn zero_weight_gives_a_zero_row_gradient_and_the_loss_of_the_other_rows() {
    let mut rng = Rng::new(4);
    let (n, row) = (11, 6);
    let keep: Vec<u32> = (0..n as u32).filter(|i| *i != row as u32).collect();
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
    for loss in LOSSES {
        let (x, xs, t, ts) = loss.inputs(&mut rng, n);
        let (xt, tt) = (tensor(&x, &xs, DType::F64), tensor(&t, &ts, DType::F64));
        for (wshape, per_elem) in weight_shapes(loss, n) {
            let mut w = random_weights(&mut rng, wshape.iter().product());
            let wpr = if per_elem { 4 } else { 1 };
            w.iter_mut()
                .skip(row * wpr)
                .take(wpr)
                .for_each(|v| *v = 0.0);
            // No zero elsewhere: the row is the only one left out.
            for (i, v) in w.iter_mut().enumerate() {
                if *v == 0.0 && i / wpr != row {
                    *v = 0.5;
                }
            }
            let wt = tensor(&w, &wshape, DType::F64);
            let sel = |v: &Tensor| v.index_select(&keep, 0).unwrap();
            check_zero_weight_ignores(
                &format!("{loss:?} w{wshape:?}"),
                &xt,
                row,
                loss.cols(),
                |x| loss.run(Reduction::Sum, x, &tt, Some(&wt)),
                |x| loss.run(Reduction::Sum, &sel(x), &sel(&tt), Some(&sel(&wt))),
            );
        }
    }
}

#[test]
fn bad_weights_are_errors_naming_the_loss() {
    let mut rng = Rng::new(5);
    let n = 5;
    for loss in LOSSES {
        let (x, xs, t, ts) = loss.inputs(&mut rng, n);
        let (xt, tt) = (tensor(&x, &xs, DType::F64), tensor(&t, &ts, DType::F64));
        let name = Named::First(loss.name());
        let run = |w: &Tensor| loss.run(Reduction::Mean, &xt, &tt, Some(w));
        let mut bad_shapes = vec![vec![n + 1], vec![n, 3], vec![1, n], vec![]];
        if !loss.elementwise() {
            bad_shapes.push(vec![n, loss.cols()]);
        }
        for shape in bad_shapes {
            let w = Tensor::ones(shape.as_slice(), DType::F64, &Device::Cpu).unwrap();
            check_error(name, run(&w), &["weight", "shape"]);
        }
        let w32 = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        check_error(name, run(&w32), &["weight", "dtype"]);
        let wu = Tensor::ones(n, DType::U32, &Device::Cpu).unwrap();
        check_error(name, run(&wu), &["weight", "dtype"]);
    }
}

#[test]
fn leading_dims_equal_the_flattened_call() {
    let mut rng = Rng::new(6);
    let (b, a) = (2, 3);
    for loss in LOSSES {
        // L1 and IoU: [2, 3, 4] with [2, 3] (and [2, 3, 4]) weights; DFL: [2, 3, 4, K]
        // (YOLOv8's sides) with [2, 3, 4] weights.
        let (lead, n): (Vec<usize>, usize) = match loss {
            Loss::Dfl => (vec![b, a, 4], b * a * 4),
            _ => (vec![b, a], b * a),
        };
        let (x, xs, t, ts) = loss.inputs(&mut rng, n);
        let (x2, t2) = (tensor(&x, &xs, DType::F32), tensor(&t, &ts, DType::F32));
        let mut x3s = lead.clone();
        x3s.push(loss.cols());
        let t3s = if matches!(loss, Loss::Dfl) {
            lead.clone()
        } else {
            x3s.clone()
        };
        let (x3, t3) = (
            x2.reshape(x3s.as_slice()).unwrap(),
            t2.reshape(t3s.as_slice()).unwrap(),
        );
        let mut shapes = vec![(lead.clone(), vec![n])];
        if loss.elementwise() {
            shapes.push((x3s.clone(), vec![n, 4]));
        }
        for (w3s, w2s) in shapes {
            let w = random_weights(&mut rng, w2s.iter().product());
            let (w2, w3) = (tensor(&w, &w2s, DType::F32), tensor(&w, &w3s, DType::F32));
            for red in REDUCTIONS {
                let what = format!("{loss:?} w{w3s:?} {red:?}");
                let l3 = loss.run(red, &x3, &t3, Some(&w3)).unwrap();
                let l2 = loss.run(red, &x2, &t2, Some(&w2)).unwrap();
                let none3: Vec<usize> = if loss.elementwise() {
                    x3s.clone()
                } else {
                    lead.clone()
                };
                if red == Reduction::None {
                    assert_eq!(l3.dims(), none3.as_slice(), "{what}: None shape");
                }
                assert_eq!(bits_of(&l3), bits_of(&l2), "{what}: loss");
                let up3 = l3.ones_like().unwrap();
                let up2 = l2.ones_like().unwrap();
                let (_, g3) =
                    loss_and_grad(&x3, &up3, |x| loss.run(red, x, &t3, Some(&w3))).unwrap();
                let (_, g2) =
                    loss_and_grad(&x2, &up2, |x| loss.run(red, x, &t2, Some(&w2))).unwrap();
                assert_eq!(g3.dims(), x3.dims(), "{what}: gradient shape");
                assert_eq!(bits_of(&g3), bits_of(&g2), "{what}: gradient");
            }
        }
    }
}

#[test]
fn fused_training_step_with_a_weight_equals_the_recomputed_gradient() {
    let mut rng = Rng::new(7);
    let n = 300;
    for loss in LOSSES {
        let (x, xs, t, ts) = loss.inputs(&mut rng, n);
        let (xt, tt) = (tensor(&x, &xs, DType::F32), tensor(&t, &ts, DType::F32));
        let xv = Var::from_tensor(&xt).unwrap();
        for (wshape, _) in weight_shapes(loss, n) {
            let w = random_weights(&mut rng, wshape.iter().product());
            let wt = tensor(&w, &wshape, DType::F32);
            for red in [Reduction::Sum, Reduction::Mean, Reduction::AvgFactor(7.5)] {
                check_fused_equals_recomputed(&format!("{loss:?} w{wshape:?} {red:?}"), &xv, |x| {
                    loss.run(red, x, &tt, Some(&wt))
                });
            }
        }
    }
}

#[test]
fn yolov8_dfl_weighting_by_anchor_score() {
    // [B, A] scores broadcast over the 4 sides: the same as weighting each side's row.
    let mut rng = Rng::new(8);
    let (b, a) = (2, 5);
    let (x, _, t, _) = Loss::Dfl.inputs(&mut rng, b * a * 4);
    let x = tensor(&x, &[b, a, 4, K], DType::F32);
    let t = tensor(&t, &[b, a, 4], DType::F32);
    let score = tensor(&random_weights(&mut rng, b * a), &[b, a], DType::F32);
    let w = score
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((b, a, 4))
        .unwrap()
        .contiguous()
        .unwrap();
    let dfl = DistributionFocalLoss {
        reduction: Reduction::None,
    };
    let weighted = dfl.forward_weighted(&x, &t, &w).unwrap();
    let plain = dfl.forward(&x, &t).unwrap();
    let want = (plain * &w).unwrap();
    assert_eq!(weighted.dims(), &[b, a, 4]);
    Tol::abs(1e-6, 1e-6).check("per side", &to_f64_vec(&weighted), &to_f64_vec(&want));
}

#[test]
fn empty_inputs_with_a_weight() {
    let dev = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    for loss in LOSSES {
        // (input, targets, weight, `None` output) shapes.
        type Shapes = (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>);
        let mut cases: Vec<Shapes> = match loss {
            Loss::Dfl => vec![(vec![0, K], vec![0], vec![0], vec![0])],
            Loss::Iou(_) => vec![(vec![0, 4], vec![0, 4], vec![0], vec![0])],
            _ => vec![(vec![0, 4], vec![0, 4], vec![0], vec![0, 4])],
        };
        if loss.elementwise() {
            cases.push((vec![0, 4], vec![0, 4], vec![0, 4], vec![0, 4]));
            // Rows of no element: nothing to weight.
            cases.push((vec![5, 0], vec![5, 0], vec![5], vec![5, 0]));
        }
        for (xs, ts, ws, none) in cases {
            for red in REDUCTIONS {
                let l = loss.run(red, &z(&xs), &z(&ts), Some(&z(&ws))).unwrap();
                if red == Reduction::None {
                    assert_eq!(l.dims(), none.as_slice(), "{loss:?} {xs:?}");
                } else {
                    assert_eq!(
                        l.to_scalar::<f32>().unwrap(),
                        0.0,
                        "{loss:?} {xs:?} {red:?}"
                    );
                }
                let (_, g) = loss_and_grad(&z(&xs), &l.ones_like().unwrap(), |x| {
                    loss.run(red, x, &z(&ts), Some(&z(&ws)))
                })
                .unwrap();
                assert_eq!(g.dims(), xs.as_slice());
            }
        }
    }
}
