//! QualityFocalLoss and VarifocalLoss: against an independent f64 reference (loss, logits
//! gradient and targets / scores gradient), finite differences in f64 for the logits, targets
//! and scores, hard targets (exactly 0 and 1), extreme logits, half precision, layouts, bad
//! input, empty batches, tracked targets and determinism. (No PyTorch fixtures: torch is not
//! installed on the build machine; the f64 reference and the finite differences are the
//! independent checks.)

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{QualityFocalLoss, Reduction, VarifocalLoss};
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: mmdet's formulas transcribed literally in f64 (powf, plain sigmoid),
// with the derivatives obtained by the chain rule on them (what torch autograd computes).
// ---------------------------------------------------------------------------------------------

/// (loss, ∂l/∂x, ∂l/∂t) of one quality focal element: bce(x, t)·|t - σ(x)|^β.
fn ref_qfl(x: f64, t: f64, beta: f64) -> (f64, f64, f64) {
    let p = 1.0 / (1.0 + (-x).exp());
    let q = 1.0 / (1.0 + x.exp()); // 1 - p, computed on its own (no cancellation near p = 1)
    let bce = t * softplus(-x) + (1.0 - t) * softplus(x);
    let d = p * (1.0 - t) - q * t; // p - t
    let a = d.abs();
    let m = if a == 0.0 {
        if beta == 0.0 {
            1.0
        } else {
            0.0
        }
    } else {
        a.powf(beta)
    };
    // d|d|^β / dd = β·sign(d)·|d|^(β-1) (0 at d = 0: abs's subgradient).
    let dm = if a == 0.0 || beta == 0.0 {
        0.0
    } else {
        beta * d.signum() * a.powf(beta - 1.0)
    };
    let dx = d * m + bce * dm * p * q; // dd/dx = p(1-p)
    let dt = -x * m - bce * dm; // dbce/dt = -x, dd/dt = -1
    (bce * m, dx, dt)
}

/// (loss, ∂l/∂x, ∂l/∂q) of one varifocal element (mmdet, weight not detached).
fn ref_vfl(x: f64, q: f64, alpha: f64, gamma: f64, iou: bool) -> (f64, f64, f64) {
    if q > 0.0 {
        let p = 1.0 / (1.0 + (-x).exp());
        let omp = 1.0 / (1.0 + x.exp()); // 1 - p, on its own
        let bce = q * softplus(-x) + (1.0 - q) * softplus(x);
        let w = if iou { q } else { 1.0 };
        let d = p * (1.0 - q) - omp * q; // p - q
                                         // -x·q + bce, written without the cancellation of its two terms at large |x|
                                         // (softplus(x) = x + softplus(-x)).
        let g_iou = if x >= 0.0 {
            softplus(-x) + x * (1.0 - 2.0 * q)
        } else {
            softplus(x) - 2.0 * q * x
        };
        (bce * w, w * d, if iou { g_iou } else { -x })
    } else {
        let (l, dx, dt) = ref_qfl(x, q, gamma);
        (alpha * l, alpha * dx, alpha * dt)
    }
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Q(QualityFocalLoss),
    V(VarifocalLoss),
}

impl Loss {
    fn red(self, r: Reduction) -> Loss {
        match self {
            Loss::Q(f) => Loss::Q(QualityFocalLoss { reduction: r, ..f }),
            Loss::V(f) => Loss::V(VarifocalLoss { reduction: r, ..f }),
        }
    }
    fn reduction(self) -> Reduction {
        match self {
            Loss::Q(f) => f.reduction,
            Loss::V(f) => f.reduction,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Loss::Q(_) => "QualityFocalLoss",
            Loss::V(_) => "VarifocalLoss",
        }
    }
    fn elem(self, x: f64, t: f64) -> (f64, f64, f64) {
        match self {
            Loss::Q(f) => ref_qfl(x, t, f.beta),
            Loss::V(f) => ref_vfl(x, t, f.alpha, f.gamma, f.iou_weighted),
        }
    }
    fn forward(self, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Loss::Q(f) => f.forward(x, t),
            Loss::V(f) => f.forward(x, t),
        }
    }
    fn forward_scores(self, x: &Tensor, l: &Tensor, s: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Loss::Q(f) => f.forward_scores(x, l, s),
            Loss::V(f) => f.forward_scores(x, l, s),
        }
    }
    /// `forward` (labels None) or `forward_scores`.
    fn run(self, x: &Tensor, labels: Option<&Tensor>, t: &Tensor) -> candle_core::Result<Tensor> {
        match labels {
            None => self.forward(x, t),
            Some(l) => self.forward_scores(x, l, t),
        }
    }
}

fn losses() -> Vec<Loss> {
    vec![
        Loss::Q(QualityFocalLoss::default()),
        Loss::Q(QualityFocalLoss {
            beta: 0.5,
            ..Default::default()
        }),
        Loss::Q(QualityFocalLoss {
            beta: 0.0,
            ..Default::default()
        }),
        Loss::V(VarifocalLoss::default()),
        Loss::V(VarifocalLoss {
            alpha: 0.5,
            gamma: 1.5,
            iou_weighted: false,
            ..Default::default()
        }),
    ]
}

/// The second input: dense targets `[N, C]`, or labels `[N]` with scores `[N]`.
#[derive(Clone, Debug)]
enum Tg {
    Dense(Vec<f64>),
    Scores(Vec<i64>, Vec<f64>),
}

impl Tg {
    /// The second input's values (targets or scores).
    fn values(&self) -> &[f64] {
        match self {
            Tg::Dense(t) => t,
            Tg::Scores(_, s) => s,
        }
    }
    fn with_values(&self, v: Vec<f64>) -> Tg {
        match self {
            Tg::Dense(_) => Tg::Dense(v),
            Tg::Scores(l, _) => Tg::Scores(l.clone(), v),
        }
    }
    fn shape(&self, n: usize, c: usize) -> Vec<usize> {
        match self {
            Tg::Dense(_) => vec![n, c],
            Tg::Scores(..) => vec![n],
        }
    }
    /// (labels tensor, values tensor of `dtype`); `u32` labels when asked (no -1 then).
    fn tensors(
        &self,
        n: usize,
        c: usize,
        dtype: DType,
        u32_labels: bool,
    ) -> (Option<Tensor>, Tensor) {
        let dev = Device::Cpu;
        let v = Tensor::from_vec(self.values().to_vec(), self.shape(n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let l = match self {
            Tg::Dense(_) => None,
            Tg::Scores(l, _) if u32_labels => Some(
                Tensor::from_vec(
                    l.iter().map(|v| (*v).max(0) as u32).collect::<Vec<_>>(),
                    n,
                    &dev,
                )
                .unwrap(),
            ),
            Tg::Scores(l, _) => Some(Tensor::from_vec(l.clone(), n, &dev).unwrap()),
        };
        (l, v)
    }
}

/// Reference loss (reduced as the loss says) and the gradients of `sum(loss · up)` with respect
/// to the logits and to the second input (targets `[N, C]` or scores `[N]`).
fn reference(
    f: Loss,
    x: &[f64],
    tg: &Tg,
    n: usize,
    c: usize,
    up: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut per = vec![0.0; n * c];
    let mut dx = vec![0.0; n * c];
    let mut dt = vec![0.0; n * c];
    let mut rows = 0usize;
    for i in 0..n {
        let ts: Vec<f64> = match tg {
            Tg::Dense(t) => t[i * c..(i + 1) * c].to_vec(),
            Tg::Scores(l, s) => {
                if l[i] < 0 {
                    continue;
                }
                (0..c)
                    .map(|j| if j as i64 == l[i] { s[i] } else { 0.0 })
                    .collect()
            }
        };
        rows += 1;
        for j in 0..c {
            let (l, gx, gt) = f.elem(x[i * c + j], ts[j]);
            per[i * c + j] = l;
            dx[i * c + j] = gx;
            dt[i * c + j] = gt;
        }
    }
    let red = f.reduction();
    let scale = match red {
        Reduction::None | Reduction::Sum => 1.0,
        Reduction::Mean => {
            if rows > 0 {
                1.0 / (rows * c) as f64
            } else {
                0.0
            }
        }
        Reduction::AvgFactor(a) => 1.0 / a,
    };
    let u = |e: usize| {
        if red == Reduction::None {
            up[e]
        } else {
            up[0] * scale
        }
    };
    let loss = if red == Reduction::None {
        per
    } else {
        vec![per.iter().sum::<f64>() * scale]
    };
    let gx = (0..n * c).map(|e| dx[e] * u(e)).collect();
    let gt = match tg {
        Tg::Dense(_) => (0..n * c).map(|e| dt[e] * u(e)).collect(),
        Tg::Scores(l, _) => (0..n)
            .map(|i| {
                let k = l[i];
                if k >= 0 && (k as usize) < c {
                    let e = i * c + k as usize;
                    dt[e] * u(e)
                } else {
                    0.0
                }
            })
            .collect(),
    };
    (loss, gx, gt)
}

/// Ours: the loss and the gradients of `sum(loss · up)` for the logits and the second input
/// (both `Var`s), as f64 vectors.
fn ours(
    f: Loss,
    x: &Tensor,
    labels: Option<&Tensor>,
    t: &Tensor,
    up: &Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let xv = Var::from_tensor(x).unwrap();
    let tv = Var::from_tensor(t).unwrap();
    let loss = f.run(xv.as_tensor(), labels, tv.as_tensor()).unwrap();
    let obj = (&loss * up.to_dtype(loss.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = obj.backward().unwrap();
    let gx = grads.get(&xv).expect("logits gradient");
    let gt = grads.get(&tv).expect("targets gradient");
    assert_eq!(gx.dims(), x.dims());
    assert_eq!(gt.dims(), t.dims());
    (to_f64_vec(&loss), to_f64_vec(gx), to_f64_vec(gt))
}

/// (loss, logits gradient ++ second-input gradient): one `LossGrad` for the battery.
fn joined((l, gx, gt): (Vec<f64>, Vec<f64>, Vec<f64>)) -> LossGrad {
    (l, gx.into_iter().chain(gt).collect())
}

/// Soft targets with exact zeros (most elements, as in detection) and a few exact ones.
fn dense_targets(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| match rng.below(10) {
            0..=5 => 0.0,
            6 => 1.0,
            _ => rng.uniform(),
        })
        .collect()
}

/// Labels (classes, background `c`, ignored -1) and scores (some exactly 0 or 1).
fn scores_targets(rng: &mut Rng, n: usize, c: usize, ignore: bool) -> Tg {
    let labels = (0..n)
        .map(|_| match rng.below(10) {
            0 if ignore => -1,
            0..=3 => c as i64,
            _ => rng.below(c as u64) as i64,
        })
        .collect();
    let scores = (0..n)
        .map(|_| match rng.below(8) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.uniform(),
        })
        .collect();
    Tg::Scores(labels, scores)
}

fn up_for(up: &[f64], red: Reduction, n: usize, c: usize, dtype: DType) -> Tensor {
    up_tensor(up, red, &[n, c], &Device::Cpu)
        .to_dtype(dtype)
        .unwrap()
}

/// The classification tolerances; for 0 < β < 1 the f32 gradient to 5e-4 relative: its term
/// `|t-p|^(β-1)` is ill-conditioned where `p ≈ t` (an ulp of `σ(x)` moves it by
/// `(1-β)·ulp/|t-p|` relative), which no f32 evaluation avoids.
fn tols(f: Loss) -> RefTols {
    match f {
        Loss::Q(q) if q.beta > 0.0 && q.beta < 1.0 => RefTols {
            f32_grad: Tol::scaled(2e-6, 1e-6, 5e-4),
            ..CLASSIFICATION_TOLS
        },
        _ => CLASSIFICATION_TOLS,
    }
}

#[test]
fn matches_f64_reference_over_shapes_reductions_forms_and_parameters() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    for &(n, c) in &[(1usize, 1usize), (3, 423), (700, 80)] {
        for base in losses() {
            for form in 0..3 {
                for red in REDUCTIONS {
                    let f = base.red(red);
                    let x = rng.vec_normal(n * c, 3.0);
                    let tg = match form {
                        0 => Tg::Dense(dense_targets(&mut rng, n * c)),
                        _ => scores_targets(&mut rng, n, c, form == 2),
                    };
                    let up = upstream(&mut rng, red, n * c);
                    let what = format!("{n}x{c} {f:?} form={form}");
                    let ours_at = |dtype: DType| {
                        let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let (l, t) = tg.tensors(n, c, dtype, form == 1);
                        joined(ours(f, &xt, l.as_ref(), &t, &up_for(&up, red, n, c, dtype)))
                    };
                    let reference_at = |dtype: DType| {
                        let tr = tg.with_values(round_to_dtype(tg.values(), dtype));
                        let upr = round_to_dtype(&up, dtype);
                        joined(reference(f, &round_to_dtype(&x, dtype), &tr, n, c, &upr))
                    };
                    check_against_reference(&what, &tols(base), ours_at, reference_at);
                }
            }
        }
    }
}

#[test]
fn forward_scores_equals_forward_with_the_equivalent_dense_targets() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(2);
    let (n, c) = (60, 7);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &dev).unwrap();
    let Tg::Scores(labels, scores) = scores_targets(&mut rng, n, c, false) else {
        unreachable!()
    };
    let dense: Vec<f64> = (0..n * c)
        .map(|e| {
            if labels[e / c] == (e % c) as i64 {
                scores[e / c]
            } else {
                0.0
            }
        })
        .collect();
    let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
    let st = Tensor::from_vec(scores, n, &dev).unwrap();
    let dt = Tensor::from_vec(dense, (n, c), &dev).unwrap();
    for base in losses() {
        for red in REDUCTIONS {
            let f = base.red(red);
            let up = up_for(&upstream(&mut rng, red, n * c), red, n, c, DType::F64);
            let (l1, gx1, _) = ours(f, &x, Some(&lt), &st, &up);
            let (l2, gx2, gt2) = ours(f, &x, None, &dt, &up);
            assert_close(&format!("{f:?} loss"), &l1, &l2, 1e-14, 1e-12);
            assert_close(&format!("{f:?} grad"), &gx1, &gx2, 1e-14, 1e-12);
            // The score gradient is the label column's target gradient.
            let (_, _, gs) = ours(f, &x, Some(&lt), &st, &up);
            for i in 0..n {
                let k = labels[i];
                let want = if (k as usize) < c {
                    gt2[i * c + k as usize]
                } else {
                    0.0
                };
                assert_close(
                    &format!("{f:?} score grad {i}"),
                    &[gs[i]],
                    &[want],
                    1e-14,
                    1e-12,
                );
            }
        }
    }
}

#[test]
fn u32_labels_equal_i64_labels() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(3);
    let (n, c) = (50, 9);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &dev).unwrap();
    let labels: Vec<u32> = (0..n).map(|_| rng.below(c as u64 + 1) as u32).collect();
    let s = Tensor::from_vec((0..n).map(|_| rng.uniform()).collect::<Vec<_>>(), n, &dev).unwrap();
    for base in losses() {
        for red in REDUCTIONS {
            let f = base.red(red);
            let up = up_for(&upstream(&mut rng, red, n * c), red, n, c, DType::F64);
            check_label_types_agree(&format!("{f:?}"), &labels, |l| {
                ours(f, &x, Some(l), &s, &up)
            });
        }
    }
}

#[test]
fn gradients_match_finite_differences_f64_for_logits_targets_and_scores() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(4);
    let (n, c) = (6, 5);
    let reds = [
        Reduction::Sum,
        Reduction::Mean,
        Reduction::AvgFactor(3.0),
        Reduction::None,
    ];
    for base in losses() {
        for (ri, red) in reds.into_iter().enumerate() {
            let f = base.red(red);
            let x = rng.vec_normal(n * c, 2.0);
            // Interior targets and scores (a central difference stays inside [0, 1]); the hard
            // values 0 and 1 are checked one-sidedly below.
            let tg = if ri % 2 == 0 {
                Tg::Dense((0..n * c).map(|_| 0.05 + 0.9 * rng.uniform()).collect())
            } else {
                let Tg::Scores(l, _) = scores_targets(&mut rng, n, c, true) else {
                    unreachable!()
                };
                Tg::Scores(l, (0..n).map(|_| 0.05 + 0.9 * rng.uniform()).collect())
            };
            let up = upstream(&mut rng, red, n * c);
            let upt = up_for(&up, red, n, c, DType::F64);
            let (lab, t) = tg.tensors(n, c, DType::F64, false);
            let xt = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (n, c), &dev).unwrap();
            let tt = |ts: &[f64]| Tensor::from_vec(ts.to_vec(), tg.shape(n, c), &dev).unwrap();
            let (_, gx, gt) = ours(f, &xt(&x), lab.as_ref(), &t, &upt);
            let what = format!("fd {f:?}");
            check_finite_differences(&format!("{what} logits"), &gx, &x, FD, |xs| {
                weighted_sum(f.run(&xt(xs), lab.as_ref(), &t).unwrap(), &upt)
            });
            let check = FdCheck {
                nonzero: true,
                ..FD
            };
            check_finite_differences(&format!("{what} targets"), &gt, tg.values(), check, |ts| {
                weighted_sum(f.run(&xt(&x), lab.as_ref(), &tt(ts)).unwrap(), &upt)
            });
        }
    }
}

#[test]
fn hard_targets_exactly_0_and_1_match_reference_and_one_sided_differences() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(5);
    let (n, c) = (4, 6);
    for base in losses() {
        let f = base.red(Reduction::Sum);
        let x = rng.vec_normal(n * c, 2.0);
        let t: Vec<f64> = (0..n * c).map(|e| (e % 3 == 0) as u8 as f64).collect();
        let up = [1.0];
        let upt = Tensor::new(1f64, &dev).unwrap();
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev).unwrap();
        let tt = |ts: &[f64]| Tensor::from_vec(ts.to_vec(), (n, c), &dev).unwrap();
        let got = ours(f, &xt, None, &tt(&t), &upt);
        let want = reference(f, &x, &Tg::Dense(t.clone()), n, c, &up);
        assert_close("hard loss", &got.0, &want.0, 1e-13, 1e-12);
        assert_close("hard grad x", &got.1, &want.1, 1e-13, 1e-12);
        assert_close("hard grad t", &got.2, &want.2, 1e-13, 1e-12);
        // One-sided differences into [0, 1] (VarifocalLoss switches branch right of q = 0, so
        // its q = 0 derivative is the negatives' branch: checked against the reference only).
        let h = 1e-7;
        let obj = |ts: &[f64]| weighted_sum(f.forward(&xt, &tt(ts)).unwrap(), &upt);
        let f0 = obj(&t);
        for e in 0..n * c {
            if t[e] == 0.0 && matches!(f, Loss::V(_)) {
                continue;
            }
            let mut ts = t.clone();
            let fd = if t[e] == 0.0 {
                ts[e] = h;
                (obj(&ts) - f0) / h
            } else {
                ts[e] = 1.0 - h;
                (f0 - obj(&ts)) / h
            };
            assert_close(
                &format!("{f:?} one-sided {e}"),
                &[got.2[e]],
                &[fd],
                1e-5,
                1e-4,
            );
        }
    }
}

#[test]
fn tracked_targets_and_scores_get_their_gradient_without_panicking() {
    // Regression: the op layer used to return no gradient for the second input, and candle
    // panics ("grad not populated") when an input that tracks one gets none.
    let dev = Device::Cpu;
    let (n, c) = (3, 4);
    let x = Tensor::new(
        &[
            [0.5f64, -1.0, 2.0, 0.0],
            [1.0, -2.0, 0.3, 3.0],
            [-0.7, 0.2, 1.5, -3.0],
        ],
        &dev,
    )
    .unwrap();
    let raw = Var::new(&[0.2f64, 0.9, 0.4], &dev).unwrap();
    let labels = Tensor::new(&[1i64, 4, 3], &dev).unwrap();
    for base in losses() {
        let f = base.red(Reduction::Mean);
        // Scores computed from a Var (an IoU head, say), logits detached: only the scores track.
        let scores = (raw.as_tensor() * 1.0).unwrap();
        let loss = f.forward_scores(&x.detach(), &labels, &scores).unwrap();
        let grads = loss.backward().unwrap();
        let g = to_f64_vec(grads.get(&raw).expect("score gradient"));
        let tg = Tg::Scores(vec![1, 4, 3], vec![0.2, 0.9, 0.4]);
        let (_, _, want) = reference(f, &to_f64_vec(&x), &tg, n, c, &[1.0]);
        assert_close(&format!("{f:?} scores"), &g, &want, 1e-14, 1e-12);
        assert_eq!(g[1], 0.0, "background row");
        // Dense targets as a Var, with tracked logits (the fused pass).
        let xv = Var::from_tensor(&x).unwrap();
        let tv = Var::new(
            &[[0.0f64, 0.3, 0.0, 1.0], [0.0; 4], [0.5, 0.0, 0.0, 0.0]],
            &dev,
        )
        .unwrap();
        let loss = f.forward(xv.as_tensor(), tv.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let tvals = to_f64_vec(tv.as_tensor());
        let want = reference(f, &to_f64_vec(&x), &Tg::Dense(tvals), n, c, &[1.0]);
        assert_close(
            "grad x",
            &to_f64_vec(grads.get(&xv).unwrap()),
            &want.1,
            1e-14,
            1e-12,
        );
        assert_close(
            "grad t",
            &to_f64_vec(grads.get(&tv).unwrap()),
            &want.2,
            1e-14,
            1e-12,
        );
    }
}

#[test]
fn extreme_logits_give_finite_correct_values_and_nan_propagates() {
    let dev = Device::Cpu;
    for (dtype, big) in [
        (DType::F32, 100.0),
        (DType::F16, 30.0),
        (DType::BF16, 30.0),
        (DType::F64, 100.0),
    ] {
        for base in losses().into_iter().chain([Loss::Q(QualityFocalLoss {
            beta: 5.0,
            ..Default::default()
        })]) {
            // Every sign of logit against hard and soft targets: saturated right and wrong.
            let xs = [big, -big, big, -big, big, -big, 0.0, big / 2.0];
            let ts = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 1.0];
            let x = Tensor::new(&xs, &dev)
                .unwrap()
                .reshape((4, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let t = Tensor::new(&ts, &dev)
                .unwrap()
                .reshape((4, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (xr, tr) = (to_f64_vec(&x), to_f64_vec(&t));
            for red in [Reduction::None, Reduction::Sum] {
                let f = base.red(red);
                let up = upstream(&mut Rng::new(6), red, 8);
                let upt = up_for(&up, red, 4, 2, dtype);
                let got = joined(ours(f, &x, None, &t, &upt));
                let want = joined(reference(
                    f,
                    &xr,
                    &Tg::Dense(tr.clone()),
                    4,
                    2,
                    &to_f64_vec(&upt),
                ));
                let extreme = Extreme {
                    dtype,
                    f32_rtol: 1e-5,
                    loss_relative: false,
                };
                check_extreme(&format!("{dtype:?} {f:?}"), extreme, &got, &want);
            }
            // NaN in -> NaN out (loss element, sum, gradients).
            let x = Tensor::new(&[[f64::NAN, 1.0]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let t = Tensor::new(&[[0.5f64, 0.0]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let l = to_f64_vec(&base.red(Reduction::None).forward(&x, &t).unwrap());
            assert!(l[0].is_nan() && l[1].is_finite(), "{dtype:?} {l:?}");
            let up = Tensor::new(1f64, &dev).unwrap();
            let (l, gx, gt) = ours(base.red(Reduction::Sum), &x, None, &t, &up);
            assert!(l[0].is_nan(), "{dtype:?}");
            assert!(gx[0].is_nan() && gx[1].is_finite(), "{dtype:?} {gx:?}");
            assert!(gt[0].is_nan() && gt[1].is_finite(), "{dtype:?} {gt:?}");
        }
    }
}

/// The quality focal formula evaluated naively in the half type (every intermediate rounded).
fn naive_half_qfl(x: f64, t: f64, beta: f64, d: DType) -> (f64, f64) {
    let rh = |v: f64| round_half(v, d);
    let p = rh(1.0 / rh(1.0 + rh((-x).exp())));
    let omp = rh(1.0 - p);
    let bce = rh(-(rh(t * rh(p.ln())) + rh((1.0 - t) * rh(omp.ln()))));
    let diff = rh(p - t);
    let a = rh(diff.abs());
    let m = rh(a.powf(beta));
    let loss = rh(bce * m);
    let dm = rh(beta * rh(rh(a.powf(beta - 1.0)) * diff.signum()));
    let g = rh(rh(diff * m) + rh(bce * rh(dm * rh(p * omp))));
    (loss, g)
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    let (n, c) = (64, 40);
    for dtype in [DType::F16, DType::BF16] {
        let x = half_logits(&mut rng, n * c, dtype);
        let t = round_to_dtype(
            &(0..n * c).map(|_| rng.uniform()).collect::<Vec<_>>(),
            dtype,
        );
        let f = Loss::Q(QualityFocalLoss {
            reduction: Reduction::None,
            ..Default::default()
        });
        let (rl, rg, _) = reference(f, &x, &Tg::Dense(t.clone()), n, c, &vec![1.0; n * c]);
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let tt = Tensor::from_vec(t.clone(), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let upt = Tensor::ones((n, c), dtype, &dev).unwrap();
        let (l, g, _) = ours(f, &xt, None, &tt, &upt);
        let mut errors = HalfErrors::default();
        for k in 0..n * c {
            let (nl, ng) = naive_half_qfl(x[k], t[k], 2.0, dtype);
            errors.loss(l[k], nl, rl[k]);
            errors.grad(g[k], ng, rg[k]);
        }
        errors.check(&format!("{dtype:?}"));
        let s = to_f64_vec(&f.red(Reduction::Sum).forward(&xt, &tt).unwrap())[0];
        check_accumulated(&format!("{dtype:?}"), "sum", s, rl.iter().sum());
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(8);
    let (n, c) = (37, 11);
    let (x_strided, lab_strided) = strided_logits_and_labels(&mut rng, n, c, c as u64 + 2);
    let x_contig = x_strided.contiguous().unwrap();
    let lab_contig = lab_strided.contiguous().unwrap();
    let wide = Tensor::from_vec(
        (0..n * (c + 5)).map(|_| rng.uniform()).collect::<Vec<_>>(),
        (n, c + 5),
        &dev,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap();
    let t_narrow = wide.narrow(1, 3, c).unwrap();
    let row = Tensor::from_vec(
        (0..c).map(|_| rng.uniform()).collect::<Vec<_>>(),
        (1, c),
        &dev,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap();
    let t_bcast = row.broadcast_as((n, c)).unwrap();
    let s_strided = wide.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
    assert!(!t_narrow.is_contiguous() && !t_bcast.is_contiguous() && !s_strided.is_contiguous());
    let s_contig = s_strided.contiguous().unwrap();
    for base in [
        Loss::Q(QualityFocalLoss::default()),
        Loss::V(VarifocalLoss::default()),
    ] {
        for red in REDUCTIONS {
            let f = base.red(red);
            let up = up_for(&upstream(&mut rng, red, n * c), red, n, c, DType::F32);
            let dense_cases = [
                Views::contiguous(&[&x_strided, &t_narrow]).and(&up),
                Views::contiguous(&[&x_strided, &t_bcast]).and(&up),
            ];
            check_views_equal_copies(&format!("{f:?} dense"), &dense_cases, |v| {
                ours(f, &v[0], None, &v[1], &v[2])
            });
            let score_cases = [
                Views::contiguous(&[&x_strided, &lab_strided, &s_strided]).and(&up),
                Views::offset_rows(&[&x_contig, &lab_contig, &s_contig], 5, 20)
                    .and(&up_rows(&up, red, 5, 20)),
            ];
            check_views_equal_copies(&format!("{f:?} scores"), &score_cases, |v| {
                ours(f, &v[0], Some(&v[1]), &v[2], &v[3])
            });
        }
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let t = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let labels = Tensor::new(&[0i64, 80, -1, 3], &dev).unwrap();
    let s = Tensor::new(&[0.5f32, 0.0, 0.0, 1.0], &dev).unwrap();
    for base in [
        Loss::Q(QualityFocalLoss::default()),
        Loss::V(VarifocalLoss::default()),
    ] {
        for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let f = base.red(red);
            let named = Named::First(f.name());
            let check =
                |r: candle_core::Result<Tensor>, needles: &[&str]| check_error(named, r, needles);
            assert!(f.forward(&x, &t).is_ok() && f.forward_scores(&x, &labels, &s).is_ok());
            // One bad target or score (outside [0, 1], or NaN), found in the pass that reads it.
            let bad_t = |v: f32| {
                let mut d = vec![0f32; 320];
                d[2 * 80 + 7] = v;
                Tensor::from_vec(d, (4, 80), &dev).unwrap()
            };
            check(
                f.forward(&x, &bad_t(1.5)),
                &["target 1.5 at [2, 7]", "[0, 1]"],
            );
            check(f.forward(&x, &bad_t(-0.25)), &["target -0.25 at [2, 7]"]);
            check(f.forward(&x, &bad_t(f32::NAN)), &["target NaN at [2, 7]"]);
            let bad_s = Tensor::new(&[0.5f32, 0.0, 0.0, 2.0], &dev).unwrap();
            check(
                f.forward_scores(&x, &labels, &bad_s),
                &["score 2 at [3]", "[0, 1]"],
            );
            let nan_s = Tensor::new(&[f32::NAN, 0.0, 0.0, 1.0], &dev).unwrap();
            check(f.forward_scores(&x, &labels, &nan_s), &["score NaN at [0]"]);
            // The scores of background and ignored rows are not read.
            let unused = Tensor::new(&[0.5f32, 7.0, f32::NAN, 1.0], &dev).unwrap();
            assert!(f.forward_scores(&x, &labels, &unused).is_ok());
            // Labels.
            check_label_errors(
                named,
                &[
                    BadLabels::I64(&[0, 83, 1, 2], "label 83 out of range 0..=80"),
                    BadLabels::I64(&[0, -2, 1, 2], "label -2"),
                    BadLabels::U32(&[0, 81, 1, 2], "label 81"),
                ],
                |l| f.forward_scores(&x, l, &s),
            );
            // Shapes and dtypes.
            check(
                f.forward(&x, &Tensor::zeros((4, 79), DType::F32, &dev).unwrap()),
                &["[4, 80]", "[4, 79]"],
            );
            check(f.forward(&x, &labels), &["dense targets", "forward_scores"]);
            check(f.forward(&x, &t.to_dtype(DType::F64).unwrap()), &["F64"]);
            check(
                f.forward(&Tensor::zeros(80, DType::F32, &dev).unwrap(), &t),
                &["[N, C]"],
            );
            check(f.forward(&x.to_dtype(DType::I64).unwrap(), &t), &["I64"]);
            check(
                f.forward_scores(&x, &labels, &Tensor::zeros(3, DType::F32, &dev).unwrap()),
                &["scores", "[3]"],
            );
            check(
                f.forward_scores(&x, &labels, &s.to_dtype(DType::F16).unwrap()),
                &["scores", "F16"],
            );
            check(
                f.forward_scores(&x, &Tensor::new(&[0i64, 1, 2], &dev).unwrap(), &s),
                &["labels", "[3]"],
            );
            check(f.forward_scores(&x, &s, &s), &["labels", "F32"]);
        }
    }
    let named = |n| Named::First(n);
    let q = |beta| QualityFocalLoss {
        beta,
        ..Default::default()
    };
    check_error(
        named("QualityFocalLoss"),
        q(-1.0).forward(&x, &t),
        &["beta", "-1"],
    );
    check_error(
        named("QualityFocalLoss"),
        q(f64::NAN).forward_scores(&x, &labels, &s),
        &["beta"],
    );
    let v = |alpha, gamma| VarifocalLoss {
        alpha,
        gamma,
        ..Default::default()
    };
    check_error(
        named("VarifocalLoss"),
        v(-0.5, 2.0).forward(&x, &t),
        &["alpha", "-0.5"],
    );
    check_error(
        named("VarifocalLoss"),
        v(0.75, f64::INFINITY).forward(&x, &t),
        &["gamma"],
    );
    check_error(
        named("VarifocalLoss"),
        VarifocalLoss {
            reduction: Reduction::AvgFactor(0.0),
            ..Default::default()
        }
        .forward(&x, &t),
        &["AvgFactor"],
    );
}

#[test]
fn empty_and_all_ignored_batches() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
    let t = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
    let labels = Tensor::zeros(0, DType::I64, &dev).unwrap();
    let s = Tensor::zeros(0, DType::F32, &dev).unwrap();
    for base in [
        Loss::Q(QualityFocalLoss::default()),
        Loss::V(VarifocalLoss::default()),
    ] {
        check_empty_batch(&[0, 5], |red| base.red(red).forward(&x, &t).unwrap());
        check_empty_batch(&[0, 5], |red| {
            base.red(red).forward_scores(&x, &labels, &s).unwrap()
        });
        check_empty_batch_gradient(&format!("{base:?}"), &x, &[0, 5], |x, t, red| {
            base.red(red).forward(x, t)
        });
        let x = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        let ignored = Tensor::new(&[-1i64, -1, -1], &dev).unwrap();
        let s = Tensor::new(&[0.5f32, 0.5, 0.5], &dev).unwrap();
        let up = Tensor::new(1f32, &dev).unwrap();
        let (l, gx, gs) = ours(base.red(Reduction::Mean), &x, Some(&ignored), &s, &up);
        check_all_ignored(&(l, gx.into_iter().chain(gs).collect()));
    }
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(9);
    let (n, c) = (5000, 80);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 3.0), (n, c), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let dense = Tg::Dense(dense_targets(&mut rng, n * c));
    let scores = scores_targets(&mut rng, n, c, true);
    let inputs: Vec<(Option<Tensor>, Tensor)> = [dense, scores]
        .iter()
        .map(|tg| tg.tensors(n, c, DType::F32, false))
        .collect();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for base in [
            Loss::Q(QualityFocalLoss::default()),
            Loss::V(VarifocalLoss::default()),
        ] {
            for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
                let up = unit_upstream(red, &[n, c], DType::F32, &dev);
                for (l, t) in &inputs {
                    let (a, b, d) = ours(base.red(red), &x, l.as_ref(), t, &up);
                    bits.extend(a.iter().chain(&b).chain(&d).map(|v| v.to_bits()));
                }
            }
        }
        bits
    });
}

#[test]
fn fused_training_pass_equals_loss_only_and_recomputed_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(10);
    let (n, c) = (300, 7);
    for dtype in [DType::F32, DType::F16, DType::F64] {
        let x = Var::from_tensor(
            &Tensor::from_vec(rng.vec_normal(n * c, 3.0), (n, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let dense = Tg::Dense(dense_targets(&mut rng, n * c));
        let scores = scores_targets(&mut rng, n, c, true);
        for tg in [dense, scores] {
            let (l, t) = tg.tensors(n, c, dtype, false);
            for base in [
                Loss::Q(QualityFocalLoss::default()),
                Loss::V(VarifocalLoss::default()),
            ] {
                for red in [Reduction::Mean, Reduction::Sum, Reduction::AvgFactor(17.0)] {
                    let f = base.red(red);
                    let what = format!("{dtype:?} {f:?} {}", l.is_some());
                    check_fused_equals_recomputed(&what, &x, |x| f.run(x, l.as_ref(), &t));
                }
            }
        }
    }
}

#[test]
fn mean_divides_by_non_ignored_rows_times_classes_and_avg_factor_n_is_mmdets_mean() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    let (n, c) = (20, 6);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &dev).unwrap();
    let Tg::Scores(l, s) = scores_targets(&mut rng, n, c, true) else {
        unreachable!()
    };
    let valid = l.iter().filter(|v| **v >= 0).count();
    let (lt, st) = (
        Tensor::new(l.as_slice(), &dev).unwrap(),
        Tensor::new(s.as_slice(), &dev).unwrap(),
    );
    let f = QualityFocalLoss::default();
    let run = |r| {
        to_f64_vec(
            &QualityFocalLoss { reduction: r, ..f }
                .forward_scores(&x, &lt, &st)
                .unwrap(),
        )[0]
    };
    let sum = run(Reduction::Sum);
    assert_close(
        "mean",
        &[run(Reduction::Mean)],
        &[sum / (valid * c) as f64],
        0.0,
        1e-14,
    );
    // mmdet: loss.sum(dim=1).mean() over the rows.
    let none = QualityFocalLoss {
        reduction: Reduction::None,
        ..f
    }
    .forward_scores(&x, &lt, &st)
    .unwrap();
    let mmdet = to_f64_vec(&none.sum(1).unwrap().mean_all().unwrap())[0];
    assert_close(
        "mmdet",
        &[run(Reduction::AvgFactor(n as f64))],
        &[mmdet],
        0.0,
        1e-14,
    );
}

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures: tests/fixtures/quality.json, made by tests/fixtures/generate.py from ports
// of mmdet's quality_focal_loss (tensor targets) and varifocal_loss in float64, with the
// gradients of the logits and of the targets / scores from torch's autograd.
// ---------------------------------------------------------------------------------------------

/// The loss of a quality fixture case on `x` and its second input `s` (targets or scores).
fn fixture_loss(case: &serde_json::Value, x: &Tensor, s: &Tensor) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    let red = fx_reduction(&case["reduction"], &case["avg_factor"]);
    let w = (!case["weight"].is_null()).then(|| fx_to_tensor(&case["weight"], DType::F64, &dev));
    let labels = (case["form"] == "scores")
        .then(|| Tensor::new(fx_ints(&case["labels"]), &dev))
        .transpose()?;
    let run = |q: &QualityFocalLoss, v: &VarifocalLoss| match (&labels, &w) {
        (None, None) if case["loss_name"] == "qfl" => q.forward(x, s),
        (None, None) => v.forward(x, s),
        (Some(l), None) if case["loss_name"] == "qfl" => q.forward_scores(x, l, s),
        (Some(l), None) => v.forward_scores(x, l, s),
        (None, Some(w)) if case["loss_name"] == "qfl" => q.forward_weighted(x, s, w),
        (None, Some(w)) => v.forward_weighted(x, s, w),
        (Some(l), Some(w)) if case["loss_name"] == "qfl" => q.forward_scores_weighted(x, l, s, w),
        (Some(l), Some(w)) => v.forward_scores_weighted(x, l, s, w),
    };
    let q = QualityFocalLoss {
        beta: case["beta"].as_f64().unwrap_or(2.0),
        reduction: red,
    };
    let v = VarifocalLoss {
        alpha: case["alpha"].as_f64().unwrap_or(0.75),
        gamma: case["gamma"].as_f64().unwrap_or(2.0),
        iou_weighted: case["iou_weighted"].as_bool().unwrap_or(true),
        reduction: red,
    };
    run(&q, &v)
}

#[test]
fn matches_torch_fixtures() {
    let dev = Device::Cpu;
    let cases = fixture_cases("quality.json");
    assert!(cases.len() >= 40, "quality.json has {} cases", cases.len());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let x = fx_to_tensor(&case["logits"], DType::F64, &dev);
        let second = if case["form"] == "scores" {
            &case["scores"]
        } else {
            &case["targets"]
        };
        let s = fx_to_tensor(second, DType::F64, &dev);
        let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
        let (gx, gs) = grads_of_both(&x, &s, &up, |x, s| fixture_loss(case, x, s)).unwrap();
        let loss = fixture_loss(case, &x, &s).unwrap();
        let tol = Tol::abs(1e-12, 1e-9);
        let got = (to_f64_vec(&loss), to_f64_vec(&gx));
        let (lshape, _) = check_fixture(name, &got, case, tol, tol);
        assert_eq!(loss.dims(), lshape.as_slice(), "{name}: loss shape");
        let (_, want_gs) = fx_tensor(&case["grad_second"]);
        tol.check(&format!("{name} targets grad"), &to_f64_vec(&gs), &want_gs);
    }
}
