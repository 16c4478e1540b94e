//! `forward_weighted` of the sigmoid focal loss (dense targets and labels) and
//! `forward_weighted` / `forward_scores_weighted` of QualityFocalLoss and VarifocalLoss: a weight
//! of ones is `forward` bit for bit, per-row and per-element weights against an independent f64
//! reference (loss, logits gradient, targets / scores gradient, every reduction), the weight's
//! gradient against finite differences, a zero weight as an ignored u32 row, a tracked weight
//! next to tracked targets, bad weights, and leading dimensions (also of `forward_scores`).
//! Runs as it is under `--features cuda-emu` (the CUDA kernels then execute).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{QualityFocalLoss, Reduction, SigmoidFocalLoss, VarifocalLoss};
use common::weighted::{check_weight_gradient, check_weight_of_ones, check_zero_weight_ignores};
use common::*;

const N: usize = 7;
const C: usize = 5;
const ALPHA: f64 = 0.25;
const GAMMA: f64 = 1.5;
const BETA: f64 = 2.0;
const V_ALPHA: f64 = 0.75;
const V_GAMMA: f64 = 2.0;

/// The loss forms under test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    FocalDense,
    FocalLabels,
    QflDense,
    QflScores,
    VflDense,
    VflScores,
}

const KINDS: [Kind; 6] = [
    Kind::FocalDense,
    Kind::FocalLabels,
    Kind::QflDense,
    Kind::QflScores,
    Kind::VflDense,
    Kind::VflScores,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::FocalDense | Kind::FocalLabels => "SigmoidFocalLoss",
            Kind::QflDense | Kind::QflScores => "QualityFocalLoss",
            Kind::VflDense | Kind::VflScores => "VarifocalLoss",
        }
    }

    fn dense(self) -> bool {
        matches!(self, Kind::FocalDense | Kind::QflDense | Kind::VflDense)
    }

    fn scores(self) -> bool {
        matches!(self, Kind::QflScores | Kind::VflScores)
    }

    /// Whether the second float input (targets or scores) is differentiable.
    fn has_second(self) -> bool {
        self != Kind::FocalLabels
    }
}

/// One problem: logits `[N, C]`, dense targets (with exact 0s and 1s), i64 labels (a
/// background and an ignored row), scores, and the focal class weights (C + 1).
struct Problem {
    x: Vec<f64>,
    t: Vec<f64>,
    labels: Vec<i64>,
    scores: Vec<f64>,
    class_w: Vec<f64>,
}

fn problem(seed: u64) -> Problem {
    let mut rng = Rng::new(seed);
    let x = rng.vec_normal(N * C, 2.0);
    let t = (0..N * C)
        .map(|e| match e % 7 {
            0 => 0.0,
            3 => 1.0,
            _ => rng.uniform(),
        })
        .collect();
    // Classes, background (C) at row 2, ignored (-1) at row 4.
    let labels = (0..N)
        .map(|i| match i {
            2 => C as i64,
            4 => -1,
            _ => (i % C) as i64,
        })
        .collect();
    let scores = (0..N).map(|_| 0.05 + 0.9 * rng.uniform()).collect();
    let class_w = (0..=C).map(|k| 0.5 + 0.25 * k as f64).collect();
    Problem {
        x,
        t,
        labels,
        scores,
        class_w,
    }
}

fn dev() -> Device {
    Device::Cpu
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &dev())
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

impl Problem {
    fn logits(&self, dtype: DType) -> Tensor {
        tensor(&self.x, &[N, C], dtype)
    }

    /// The second float input of `kind`: targets `[N, C]`, scores `[N]`, or (focal labels)
    /// the targets, unused.
    fn second(&self, kind: Kind, dtype: DType) -> Tensor {
        if kind.scores() {
            tensor(&self.scores, &[N], dtype)
        } else {
            tensor(&self.t, &[N, C], dtype)
        }
    }

    fn labels_i64(&self) -> Tensor {
        Tensor::from_vec(self.labels.clone(), N, &dev()).unwrap()
    }

    /// u32 labels: the ignored row becomes background (u32 cannot say -1).
    fn labels_u32(&self) -> Tensor {
        let l: Vec<u32> = self
            .labels
            .iter()
            .map(|&v| if v < 0 { C as u32 } else { v as u32 })
            .collect();
        Tensor::from_vec(l, N, &dev()).unwrap()
    }
}

/// `kind`'s loss of `x` and `second` (targets or scores; labels from `labels`), weighted by `w`
/// when given.
fn run(
    p: &Problem,
    kind: Kind,
    red: Reduction,
    (x, second, labels): (&Tensor, &Tensor, &Tensor),
    w: Option<&Tensor>,
) -> Result<Tensor> {
    let focal = |class_weights| SigmoidFocalLoss {
        alpha: Some(ALPHA),
        gamma: GAMMA,
        reduction: red,
        class_weights,
    };
    let qfl = QualityFocalLoss {
        beta: BETA,
        reduction: red,
    };
    let vfl = VarifocalLoss {
        alpha: V_ALPHA,
        gamma: V_GAMMA,
        iou_weighted: true,
        reduction: red,
    };
    match (kind, w) {
        (Kind::FocalDense, None) => focal(None).forward(x, second),
        (Kind::FocalDense, Some(w)) => focal(None).forward_weighted(x, second, w),
        (Kind::FocalLabels, w) => {
            let cw = Tensor::from_vec(p.class_w.clone(), C + 1, x.device())?.to_dtype(x.dtype())?;
            let f = focal(Some(cw));
            match w {
                None => f.forward(x, labels),
                Some(w) => f.forward_weighted(x, labels, w),
            }
        }
        (Kind::QflDense, None) => qfl.forward(x, second),
        (Kind::QflDense, Some(w)) => qfl.forward_weighted(x, second, w),
        (Kind::QflScores, None) => qfl.forward_scores(x, labels, second),
        (Kind::QflScores, Some(w)) => qfl.forward_scores_weighted(x, labels, second, w),
        (Kind::VflDense, None) => vfl.forward(x, second),
        (Kind::VflDense, Some(w)) => vfl.forward_weighted(x, second, w),
        (Kind::VflScores, None) => vfl.forward_scores(x, labels, second),
        (Kind::VflScores, Some(w)) => vfl.forward_scores_weighted(x, labels, second, w),
    }
}

// ---------------------------------------------------------------------------------------------
// Independent reference: the papers' (torchvision's, mmdet's) formulas in plain f64, the
// derivatives by central differences of those formulas.
// ---------------------------------------------------------------------------------------------

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The unweighted element loss of `kind` at logit `x`, target `t`; `pos`: VarifocalNet's
/// positive mask (t > 0), a constant of the formula.
fn ref_elem(kind: Kind, x: f64, t: f64, pos: bool) -> f64 {
    let p = sigmoid(x);
    let bce = t * softplus(-x) + (1.0 - t) * softplus(x);
    match kind {
        Kind::FocalDense | Kind::FocalLabels => {
            let p_t = p * t + (1.0 - p) * (1.0 - t);
            let a_t = ALPHA * t + (1.0 - ALPHA) * (1.0 - t);
            a_t * (1.0 - p_t).powf(GAMMA) * bce
        }
        Kind::QflDense | Kind::QflScores => bce * (t - p).abs().powf(BETA),
        Kind::VflDense | Kind::VflScores => {
            let w = if pos {
                t
            } else {
                V_ALPHA * (p - t).abs().powf(V_GAMMA)
            };
            bce * w
        }
    }
}

/// `(l, ∂l/∂x, ∂l/∂t)` of one element.
fn ref_elem_grads(kind: Kind, x: f64, t: f64) -> (f64, f64, f64) {
    let pos = t > 0.0;
    let h = 1e-5;
    let f = |x, t| ref_elem(kind, x, t, pos);
    let dx = (f(x + h, t) - f(x - h, t)) / (2.0 * h);
    let dt = (f(x, t + h) - f(x, t - h)) / (2.0 * h);
    (f(x, t), dx, dt)
}

/// The reference of the weighted loss: the loss, `∂/∂logits` and `∂/∂second` (targets
/// `[N, C]` or scores `[N]`) of `sum(loss · up)`, the weight `w` `[N]` (`per_elem` false) or
/// `[N, C]`; with the unweighted element losses (the weight's gradient).
struct RefOut {
    loss: Vec<f64>,
    gx: Vec<f64>,
    gs: Vec<f64>,
    /// ∂/∂w of `sum(loss · up)`, in w's shape.
    gw: Vec<f64>,
}

fn reference(p: &Problem, kind: Kind, red: Reduction, w: &[f64], up: &[f64]) -> RefOut {
    let per_elem = w.len() == N * C;
    let (mut per, mut dx, mut dt, mut plain) = (
        vec![0.0; N * C],
        vec![0.0; N * C],
        vec![0.0; N * C],
        vec![0.0; N * C],
    );
    let mut rows = 0usize;
    for i in 0..N {
        let label = p.labels[i];
        if !kind.dense() && label < 0 {
            continue;
        }
        rows += 1;
        for j in 0..C {
            let e = i * C + j;
            let t = match kind {
                Kind::FocalLabels => (label == j as i64) as i32 as f64,
                Kind::QflScores | Kind::VflScores if label == j as i64 => p.scores[i],
                Kind::QflScores | Kind::VflScores => 0.0,
                _ => p.t[e],
            };
            let cw = if kind == Kind::FocalLabels {
                p.class_w[label as usize]
            } else {
                1.0
            };
            let wt = if per_elem { w[e] } else { w[i] };
            let (l, gx, gt) = ref_elem_grads(kind, p.x[e], t);
            plain[e] = cw * l;
            per[e] = wt * cw * l;
            dx[e] = wt * cw * gx;
            dt[e] = wt * cw * gt;
        }
    }
    let count = (rows * C) as f64;
    let (loss, gx) = reduce_reference(per, dx, red, count, up, 1);
    let (_, gt) = reduce_reference(vec![0.0; N * C], dt, red, count, up, 1);
    let (_, gl) = reduce_reference(vec![0.0; N * C], plain, red, count, up, 1);
    let gs = if kind.scores() {
        (0..N)
            .map(|i| {
                let k = p.labels[i];
                if k >= 0 && (k as usize) < C {
                    gt[i * C + k as usize]
                } else {
                    0.0
                }
            })
            .collect()
    } else {
        gt
    };
    let gw = if per_elem {
        gl
    } else {
        gl.chunks(C).map(|r| r.iter().sum()).collect()
    };
    RefOut { loss, gx, gs, gw }
}

/// The weights of the checks: per row `[N]` or per element `[N, C]`, in [0.2, 2).
fn weights(per_elem: bool, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let len = if per_elem { N * C } else { N };
    (0..len).map(|_| 0.2 + 1.8 * rng.uniform()).collect()
}

fn up_values(red: Reduction, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    upstream(&mut rng, red, N * C)
}

fn w_shape(per_elem: bool) -> Vec<usize> {
    if per_elem {
        vec![N, C]
    } else {
        vec![N]
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn weight_of_ones_is_forward_bit_for_bit() {
    let p = problem(1);
    for dtype in [DType::F64, DType::F32] {
        for kind in KINDS {
            let what = format!("{kind:?} {dtype:?}");
            let (x, s, l) = (p.logits(dtype), p.second(kind, dtype), p.labels_i64());
            check_weight_of_ones(&what, &x, &[&[N], &[N, C]], |x, red, w| {
                run(&p, kind, red, (x, &s, &l), w)
            });
            if !kind.has_second() {
                continue;
            }
            // The targets' / scores' gradient too.
            for red in REDUCTIONS {
                let probe = run(&p, kind, red, (&x, &s, &l), None).unwrap();
                let up = probe.ones_like().unwrap();
                let both = |w: Option<&Tensor>| {
                    let (gx, gs) =
                        grads_of_both(&x, &s, &up, |x, s| run(&p, kind, red, (x, s, &l), w))
                            .unwrap();
                    (bits_of(&gx), bits_of(&gs))
                };
                let plain = both(None);
                for shape in [&[N][..], &[N, C]] {
                    let ones = Tensor::ones(shape, dtype, &dev()).unwrap();
                    assert_eq!(
                        plain,
                        both(Some(&ones)),
                        "{what} {red:?}: gradients with tracked targets and a weight of ones {shape:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn weighted_matches_reference() {
    let p = problem(2);
    let tol = Tol::abs(1e-7, 1e-6);
    for kind in KINDS {
        for per_elem in [false, true] {
            let w = weights(per_elem, 3 + per_elem as u64);
            let wt = tensor(&w, &w_shape(per_elem), DType::F64);
            for red in REDUCTIONS {
                let what = format!("{kind:?} per_elem={per_elem} {red:?}");
                let up = up_values(red, 5);
                let want = reference(&p, kind, red, &w, &up);
                let (x, s, l) = (
                    p.logits(DType::F64),
                    p.second(kind, DType::F64),
                    p.labels_i64(),
                );
                let f = |x: &Tensor, s: &Tensor| run(&p, kind, red, (x, s, &l), Some(&wt));
                let loss = f(&x, &s).unwrap();
                if red == Reduction::None {
                    assert_eq!(loss.dims(), [N, C], "{what}: None shape");
                } else {
                    assert_eq!(loss.rank(), 0, "{what}: scalar");
                }
                let upt = up_tensor(&up, red, &[N, C], &dev());
                tol.check(&format!("{what} loss"), &to_f64_vec(&loss), &want.loss);
                if kind.has_second() {
                    let (gx, gs) = grads_of_both(&x, &s, &upt, f).unwrap();
                    tol.check(&format!("{what} logits grad"), &to_f64_vec(&gx), &want.gx);
                    tol.check(&format!("{what} second grad"), &to_f64_vec(&gs), &want.gs);
                } else {
                    let (_, gx) = loss_and_grad(&x, &upt, |x| f(x, &s)).unwrap();
                    tol.check(&format!("{what} logits grad"), &to_f64_vec(&gx), &want.gx);
                }
            }
        }
    }
}

#[test]
fn weight_gradient_matches_finite_differences() {
    let p = problem(6);
    for kind in KINDS {
        let (x, s, l) = (
            p.logits(DType::F64),
            p.second(kind, DType::F64),
            p.labels_i64(),
        );
        for shape in [&[N][..], &[N, C]] {
            let what = format!("{kind:?} weight {shape:?}");
            check_weight_gradient(&what, shape, 7, |red, w| {
                run(&p, kind, red, (&x, &s, &l), Some(w))
            });
        }
    }
}

#[test]
fn zero_weight_ignores_a_u32_row() {
    let p = problem(8);
    let row = 1;
    for kind in [Kind::FocalLabels, Kind::QflScores, Kind::VflScores] {
        let (x, s) = (p.logits(DType::F64), p.second(kind, DType::F64));
        let (u32s, mut ign) = (p.labels_u32(), p.labels.clone());
        // The u32 run's labels with row `row` ignored (the ignored row 4 is background there).
        ign[4] = C as i64;
        ign[row] = -1;
        let ign = Tensor::from_vec(ign, N, &dev()).unwrap();
        let mut w = vec![1.0; N];
        w[row] = 0.0;
        let w = tensor(&w, &[N], DType::F64);
        check_zero_weight_ignores(
            &format!("{kind:?}"),
            &x,
            row,
            C,
            |x| run(&p, kind, Reduction::Sum, (x, &s, &u32s), Some(&w)),
            |x| run(&p, kind, Reduction::Sum, (x, &s, &ign), None),
        );
    }
}

#[test]
fn tracked_weight_and_targets_get_their_gradients() {
    let p = problem(9);
    let tol = Tol::abs(1e-7, 1e-6);
    for kind in KINDS {
        for per_elem in [false, true] {
            let w = weights(per_elem, 10);
            for red in REDUCTIONS {
                let what = format!("{kind:?} per_elem={per_elem} {red:?}");
                let up = up_values(red, 11);
                let want = reference(&p, kind, red, &w, &up);
                let xv = Var::from_tensor(&p.logits(DType::F64)).unwrap();
                let sv = Var::from_tensor(&p.second(kind, DType::F64)).unwrap();
                let wv = Var::from_tensor(&tensor(&w, &w_shape(per_elem), DType::F64)).unwrap();
                let l = p.labels_i64();
                let loss = run(
                    &p,
                    kind,
                    red,
                    (xv.as_tensor(), sv.as_tensor(), &l),
                    Some(wv.as_tensor()),
                )
                .unwrap();
                tol.check(&format!("{what} loss"), &to_f64_vec(&loss), &want.loss);
                let upt = up_tensor(&up, red, &[N, C], &dev());
                let obj = (&loss * &upt).unwrap().sum_all().unwrap();
                let grads = obj.backward().expect("backward");
                let g = |v: &Var| to_f64_vec(grads.get(v).expect("a gradient"));
                tol.check(&format!("{what} logits grad"), &g(&xv), &want.gx);
                tol.check(&format!("{what} weight grad"), &g(&wv), &want.gw);
                if kind.has_second() {
                    tol.check(&format!("{what} second grad"), &g(&sv), &want.gs);
                }
            }
        }
    }
}

#[test]
fn bad_weight_is_an_error_naming_the_loss() {
    let p = problem(12);
    for kind in KINDS {
        let (x, s, l) = (
            p.logits(DType::F64),
            p.second(kind, DType::F64),
            p.labels_i64(),
        );
        let r = |w: &Tensor| run(&p, kind, Reduction::Mean, (&x, &s, &l), Some(w));
        let first = Named::First(kind.name());
        let bad = Tensor::ones(N + 1, DType::F64, &dev()).unwrap();
        check_error(first, r(&bad), &["weight", "shape"]);
        let bad = Tensor::ones((N, C + 1), DType::F64, &dev()).unwrap();
        check_error(first, r(&bad), &["weight", "shape"]);
        let bad = Tensor::ones(N, DType::F32, &dev()).unwrap();
        check_error(first, r(&bad), &["weight", "dtype"]);
    }
}

#[test]
fn leading_dims_equal_the_flattened_call() {
    let p = problem(13);
    let lead = [2usize, 3];
    let n = 6; // rows of the [2, 3] leading shape (the first 6 of the problem)
    let x2 = tensor(&p.x[..n * C], &[n, C], DType::F64);
    let x3 = x2.reshape((2, 3, C)).unwrap();
    let l2 = Tensor::from_vec(p.labels[..n].to_vec(), n, &dev()).unwrap();
    let l3 = l2.reshape((2, 3)).unwrap();
    for kind in KINDS {
        let (s2, s3) = if kind.scores() {
            let s = tensor(&p.scores[..n], &[n], DType::F64);
            (s.clone(), s.reshape((2, 3)).unwrap())
        } else {
            let s = tensor(&p.t[..n * C], &[n, C], DType::F64);
            (s.clone(), s.reshape((2, 3, C)).unwrap())
        };
        let w_row = tensor(&weights(false, 14)[..n], &[n], DType::F64);
        let w_elem = tensor(&weights(true, 15)[..n * C], &[n, C], DType::F64);
        let weights2 = [None, Some(w_row.clone()), Some(w_elem.clone())];
        let weights3 = [
            None,
            Some(w_row.reshape((2, 3)).unwrap()),
            Some(w_elem.reshape((2, 3, C)).unwrap()),
        ];
        for (w2, w3) in weights2.iter().zip(&weights3) {
            for red in REDUCTIONS {
                let what = format!(
                    "{kind:?} weight {:?} {red:?}",
                    w3.as_ref().map(|w| w.dims())
                );
                let f2 = |x: &Tensor, s: &Tensor| run(&p, kind, red, (x, s, &l2), w2.as_ref());
                let f3 = |x: &Tensor, s: &Tensor| run(&p, kind, red, (x, s, &l3), w3.as_ref());
                let (o2, o3) = (f2(&x2, &s2).unwrap(), f3(&x3, &s3).unwrap());
                if red == Reduction::None {
                    assert_eq!(o3.dims(), [lead[0], lead[1], C], "{what}: None shape");
                }
                assert_eq!(bits_of(&o2), bits_of(&o3), "{what}: loss");
                let (up2, up3) = (o2.ones_like().unwrap(), o3.ones_like().unwrap());
                if kind.has_second() {
                    let (gx2, gs2) = grads_of_both(&x2, &s2, &up2, f2).unwrap();
                    let (gx3, gs3) = grads_of_both(&x3, &s3, &up3, f3).unwrap();
                    assert_eq!(gx3.dims(), x3.dims(), "{what}: logits gradient shape");
                    assert_eq!(gs3.dims(), s3.dims(), "{what}: second gradient shape");
                    assert_eq!(bits_of(&gx2), bits_of(&gx3), "{what}: logits gradient");
                    assert_eq!(bits_of(&gs2), bits_of(&gs3), "{what}: second gradient");
                } else {
                    let (_, gx2) = loss_and_grad(&x2, &up2, |x| f2(x, &s2)).unwrap();
                    let (_, gx3) = loss_and_grad(&x3, &up3, |x| f3(x, &s3)).unwrap();
                    assert_eq!(bits_of(&gx2), bits_of(&gx3), "{what}: logits gradient");
                }
            }
        }
    }
}

#[test]
fn forward_scores_rejects_mismatched_leading_dims() {
    let p = problem(16);
    let x3 = tensor(&p.x[..6 * C], &[2, 3, C], DType::F64);
    let l3 = Tensor::from_vec(p.labels[..6].to_vec(), (2, 3), &dev()).unwrap();
    let bad_scores = tensor(&p.scores[..6], &[3, 2], DType::F64);
    let bad_labels = Tensor::from_vec(p.labels[..6].to_vec(), (3, 2), &dev()).unwrap();
    let good_scores = tensor(&p.scores[..6], &[2, 3], DType::F64);
    let qfl = QualityFocalLoss::default();
    check_error(
        Named::First("QualityFocalLoss"),
        qfl.forward_scores(&x3, &l3, &bad_scores),
        &["scores"],
    );
    check_error(
        Named::First("QualityFocalLoss"),
        qfl.forward_scores(&x3, &bad_labels, &good_scores),
        &["[2, 3]"],
    );
    let bad_w = tensor(&[1.0; 6], &[3, 2], DType::F64);
    check_error(
        Named::First("VarifocalLoss"),
        VarifocalLoss::default().forward_scores_weighted(&x3, &l3, &good_scores, &bad_w),
        &["weight"],
    );
}
