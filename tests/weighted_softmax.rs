//! `CrossEntropyLoss::forward_weighted` and `SoftmaxFocalLoss::forward_weighted`: a weight of
//! ones equals `forward` bit for bit, per-row weights against an independent f64 reference
//! (loss and gradient, every reduction), the weight's own gradient against finite differences,
//! a zero weight as an ignored u32 row, tracked weights, bad weights and leading dimensions.
//! Under `--features cuda-emu` the same checks run the CUDA kernels.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{CrossEntropyLoss, Reduction, SoftmaxFocalLoss};
use common::weighted::*;
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: torch's cross_entropy and mmcv's softmax focal formula in plain f64,
// with mmdet's weight multiplying each row loss before the reduction.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Cross-entropy with label smoothing ε.
    Ce(f64),
    /// Softmax focal loss (alpha, gamma).
    Focal(Option<f64>, f64),
}

const LOSSES: [Loss; 4] = [
    Loss::Ce(0.0),
    Loss::Ce(0.1),
    Loss::Focal(Some(0.25), 2.0),
    Loss::Focal(None, 0.5),
];

/// Row loss and d(row loss)/dx of one row with label `t` and class weights `w`, by the plain
/// formulas (log-softmax in f64; the gradient by the chain rule).
fn ref_row(x: &[f64], t: usize, w: &[f64], loss: Loss) -> (f64, Vec<f64>) {
    let k = x.len();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
    let logp: Vec<f64> = x.iter().map(|v| (v - m) - s.ln()).collect();
    let p: Vec<f64> = logp.iter().map(|v| v.exp()).collect();
    let d = |j: usize| if j == t { 1.0 } else { 0.0 };
    match loss {
        Loss::Ce(eps) => {
            let kf = k as f64;
            let wsum: f64 = w.iter().sum();
            let l = (1.0 - eps) * w[t] * -logp[t]
                + eps / kf * (0..k).map(|j| -w[j] * logp[j]).sum::<f64>();
            let g = (0..k)
                .map(|j| (1.0 - eps) * w[t] * (p[j] - d(j)) + eps / kf * (wsum * p[j] - w[j]))
                .collect();
            (l, g)
        }
        Loss::Focal(alpha, gamma) => {
            let a = alpha.unwrap_or(1.0) * w[t];
            let q = 1.0 - p[t];
            let l = a * q.powf(gamma) * -logp[t];
            // d/dx_j: -γ q^{γ-1} ∂p_t/∂x_j (-log p_t) + q^γ (p_j - δ_jt), ∂p_t/∂x_j = p_t(δ_jt - p_j)
            let g = (0..k)
                .map(|j| {
                    let dq = -p[t] * (d(j) - p[j]);
                    let dmod = if gamma == 0.0 {
                        0.0
                    } else {
                        gamma * q.powf(gamma - 1.0) * dq
                    };
                    a * (dmod * -logp[t] + q.powf(gamma) * (p[j] - d(j)))
                })
                .collect();
            (l, g)
        }
    }
}

/// The weighted reference: per row `ew_i · l_i`, `Mean` over `Σ w_{y_i}` (non-ignored rows).
fn reference(
    x: &[f64],
    labels: &[i64],
    ew: &[f64],
    (k, loss, red, cw): (usize, Loss, Reduction, &[f64]),
    up: &[f64],
) -> LossGrad {
    let n = labels.len();
    let mut per = vec![0.0; n];
    let mut dper = vec![0.0; n * k];
    let mut den = 0.0;
    for i in 0..n {
        if labels[i] < 0 {
            continue;
        }
        let t = labels[i] as usize;
        let (l, g) = ref_row(&x[i * k..(i + 1) * k], t, cw, loss);
        per[i] = ew[i] * l;
        for j in 0..k {
            dper[i * k + j] = ew[i] * g[j];
        }
        den += cw[t];
    }
    reduce_reference(per, dper, red, den, up, k)
}

/// The loss of `kind` with reduction `red` and class weights `cw`: `forward` without a weight,
/// `forward_weighted` with one.
fn ours(
    loss: Loss,
    red: Reduction,
    cw: Option<Tensor>,
) -> impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor> {
    move |x, t, w| match loss {
        Loss::Ce(eps) => {
            let l = CrossEntropyLoss {
                reduction: red,
                class_weights: cw.clone(),
                label_smoothing: eps,
            };
            match w {
                None => l.forward(x, t),
                Some(w) => l.forward_weighted(x, t, w),
            }
        }
        Loss::Focal(alpha, gamma) => {
            let l = SoftmaxFocalLoss {
                alpha,
                gamma,
                reduction: red,
                class_weights: cw.clone(),
            };
            match w {
                None => l.forward(x, t),
                Some(w) => l.forward_weighted(x, t, w),
            }
        }
    }
}

fn name(loss: Loss) -> &'static str {
    match loss {
        Loss::Ce(_) => "CrossEntropyLoss",
        Loss::Focal(..) => "SoftmaxFocalLoss",
    }
}

const N: usize = 13;
const K: usize = 7;

/// Logits `[N, K]`, i64 labels with two ignored rows, class weights and row weights in [0, 2).
fn inputs(seed: u64) -> (Vec<f64>, Vec<i64>, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let x = rng.vec_normal(N * K, 2.0);
    let labels = (0..N)
        .map(|i| {
            if i == 3 || i == 10 {
                -1
            } else {
                rng.below(K as u64) as i64
            }
        })
        .collect();
    let cw = (0..K).map(|_| 0.3 + rng.uniform()).collect();
    let ew = (0..N).map(|_| 2.0 * rng.uniform()).collect();
    (x, labels, cw, ew)
}

// ---------------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------------

#[test]
fn weight_of_ones_is_forward_bit_for_bit() {
    let dev = Device::Cpu;
    let (x, labels, cw, _) = inputs(1);
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let xt = Tensor::new(x.as_slice(), &dev)
            .unwrap()
            .reshape((N, K))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
        for loss in LOSSES {
            for cwt in [None, Some(Tensor::new(cw.as_slice(), &dev).unwrap())] {
                let cwt = cwt.map(|w| w.to_dtype(dtype).unwrap());
                let what = format!("{} {loss:?} {dtype:?} cw {}", name(loss), cwt.is_some());
                check_weight_of_ones(&what, &xt, &[&[N]], |x, red, w| {
                    ours(loss, red, cwt.clone())(x, &lab, w)
                });
            }
        }
    }
}

#[test]
fn row_weights_match_the_reference() {
    let dev = Device::Cpu;
    let (x, labels, cw, ew) = inputs(2);
    let mut rng = Rng::new(20);
    for loss in LOSSES {
        for red in REDUCTIONS {
            for dtype in [DType::F64, DType::F32] {
                let up = upstream(&mut rng, red, N);
                let want = reference(&x, &labels, &ew, (K, loss, red, &cw), &up);
                let xt = Tensor::new(x.as_slice(), &dev)
                    .unwrap()
                    .reshape((N, K))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
                let cwt = Tensor::new(cw.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ewt = Tensor::new(ew.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let upt = up_tensor(&up, red, &[N], &dev).to_dtype(dtype).unwrap();
                let f = ours(loss, red, Some(cwt));
                let got = run_loss(&xt, &upt, |x| f(x, &lab, Some(&ewt)));
                let tol = if dtype == DType::F64 {
                    Tol::abs(1e-12, 1e-10)
                } else {
                    Tol::scaled(2e-6, 1e-3, 2e-5)
                };
                let what = format!("{} {loss:?} {red:?} {dtype:?}", name(loss));
                tol.check(&format!("{what} loss"), &got.0, &want.0);
                tol.check(&format!("{what} grad"), &got.1, &want.1);
            }
        }
    }
}

#[test]
fn weight_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let (x, labels, cw, _) = inputs(3);
    let xt = Tensor::from_vec(x, (N, K), &dev).unwrap();
    let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
    let cwt = Tensor::new(cw.as_slice(), &dev).unwrap();
    for loss in LOSSES {
        check_weight_gradient(name(loss), &[N], 30, |red, w| {
            ours(loss, red, Some(cwt.clone()))(&xt, &lab, Some(w))
        });
    }
}

#[test]
fn zero_weight_ignores_a_u32_row() {
    let dev = Device::Cpu;
    let (x, labels, cw, _) = inputs(4);
    let xt = Tensor::from_vec(x, (N, K), &dev).unwrap();
    let lab_u32: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
    let row = 5;
    let mut ignored = lab_u32.iter().map(|&l| l as i64).collect::<Vec<_>>();
    ignored[row] = -1;
    let mut ones = vec![1.0f64; N];
    ones[row] = 0.0;
    let (lu, li) = (
        Tensor::new(lab_u32.as_slice(), &dev).unwrap(),
        Tensor::new(ignored.as_slice(), &dev).unwrap(),
    );
    let w = Tensor::new(ones.as_slice(), &dev).unwrap();
    let cwt = Tensor::new(cw.as_slice(), &dev).unwrap();
    for loss in LOSSES {
        let f = ours(loss, Reduction::Sum, Some(cwt.clone()));
        check_zero_weight_ignores(
            name(loss),
            &xt,
            row,
            K,
            |x| f(x, &lu, Some(&w)),
            |x| f(x, &li, None),
        );
    }
}

#[test]
fn tracked_weight_and_logits_both_get_gradients() {
    let dev = Device::Cpu;
    let (x, labels, _, ew) = inputs(5);
    let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
    for loss in LOSSES {
        for red in REDUCTIONS {
            let xv = Var::from_vec(x.clone(), (N, K), &dev).unwrap();
            let wv = Var::new(ew.as_slice(), &dev).unwrap();
            let l = ours(loss, red, None)(xv.as_tensor(), &lab, Some(wv.as_tensor())).unwrap();
            let grads = l.sum_all().unwrap().backward().unwrap();
            let what = format!("{} {red:?}", name(loss));
            let gx = to_f64_vec(grads.get(&xv).expect("logits' gradient"));
            let gw = to_f64_vec(grads.get(&wv).expect("weight's gradient"));
            assert!(
                gx.iter().any(|v| *v != 0.0),
                "{what}: zero logits' gradient"
            );
            assert!(gw.iter().any(|v| *v != 0.0), "{what}: zero weight gradient");
            // The weight's gradient of Sum is the unweighted row loss.
            if red == Reduction::Sum {
                let plain = ours(loss, Reduction::None, None)(xv.as_tensor(), &lab, None).unwrap();
                Tol::abs(1e-12, 1e-12).check(&what, &gw, &to_f64_vec(&plain));
            }
        }
    }
}

#[test]
fn fused_step_with_a_weight_equals_recomputed() {
    let dev = Device::Cpu;
    let (x, labels, cw, ew) = inputs(6);
    let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
    let cwt = Tensor::new(cw.as_slice(), &dev).unwrap();
    let ewt = Tensor::new(ew.as_slice(), &dev).unwrap();
    let xv = Var::from_vec(x, (N, K), &dev).unwrap();
    for loss in LOSSES {
        for red in [Reduction::Sum, Reduction::Mean, Reduction::AvgFactor(3.0)] {
            let f = ours(loss, red, Some(cwt.clone()));
            check_fused_equals_recomputed(&format!("{} {red:?}", name(loss)), &xv, |x| {
                f(x, &lab, Some(&ewt))
            });
        }
    }
}

#[test]
fn bad_weights_are_errors_naming_the_loss() {
    let dev = Device::Cpu;
    let (x, labels, _, _) = inputs(7);
    let xt = Tensor::from_vec(x, (N, K), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let lab = Tensor::new(labels.as_slice(), &dev).unwrap();
    for loss in LOSSES {
        let f = ours(loss, Reduction::Mean, None);
        let named = Named::First(name(loss));
        let long = Tensor::ones(N + 1, DType::F32, &dev).unwrap();
        check_error(named, f(&xt, &lab, Some(&long)), &["weight", "shape"]);
        let per_elem = Tensor::ones((N, K), DType::F32, &dev).unwrap();
        check_error(named, f(&xt, &lab, Some(&per_elem)), &["weight", "shape"]);
        let f64w = Tensor::ones(N, DType::F64, &dev).unwrap();
        check_error(named, f(&xt, &lab, Some(&f64w)), &["weight", "dtype"]);
    }
}

#[test]
fn leading_dims_equal_the_flattened_call() {
    let dev = Device::Cpu;
    let (x, labels, cw, ew) = inputs(8);
    let (b, a) = (2, 6);
    let n = b * a;
    let x3 = Tensor::new(&x[..n * K], &dev)
        .unwrap()
        .reshape((b, a, K))
        .unwrap();
    let x2 = x3.reshape((n, K)).unwrap();
    let l2 = Tensor::new(&labels[..n], &dev).unwrap();
    let l3 = l2.reshape((b, a)).unwrap();
    let w2 = Tensor::new(&ew[..n], &dev).unwrap();
    let w3 = w2.reshape((b, a)).unwrap();
    let cwt = Tensor::new(cw.as_slice(), &dev).unwrap();
    for loss in LOSSES {
        for red in REDUCTIONS {
            let f = ours(loss, red, Some(cwt.clone()));
            let what = format!("{} {red:?}", name(loss));
            let out3 = f(&x3, &l3, Some(&w3)).unwrap();
            let out2 = f(&x2, &l2, Some(&w2)).unwrap();
            if red == Reduction::None {
                assert_eq!(out3.dims(), &[b, a], "{what}");
            }
            let up3 = out3.ones_like().unwrap();
            let up2 = out2.ones_like().unwrap();
            let (g3l, g3) = loss_and_grad(&x3, &up3, |x| f(x, &l3, Some(&w3))).unwrap();
            let (g2l, g2) = loss_and_grad(&x2, &up2, |x| f(x, &l2, Some(&w2))).unwrap();
            assert_eq!(bits_of(&g3l), bits_of(&g2l), "{what}: loss");
            assert_eq!(g3.dims(), &[b, a, K], "{what}");
            assert_eq!(bits_of(&g3), bits_of(&g2), "{what}: gradient");
            // A tracked [B, A] weight gets a [B, A] gradient.
            let wv = Var::from_tensor(&w3).unwrap();
            let lw = f(&x3, &l3, Some(wv.as_tensor())).unwrap();
            let gw = lw.sum_all().unwrap().backward().unwrap();
            assert_eq!(
                gw.get(&wv).expect("weight gradient").dims(),
                &[b, a],
                "{what}"
            );
        }
    }
}
