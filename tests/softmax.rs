//! CrossEntropyLoss and SoftmaxFocalLoss: against an independent f64 reference, PyTorch
//! fixtures, finite differences, extreme logits, half precision, layouts, bad input and
//! determinism.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_detloss::{CrossEntropyLoss, Reduction, SoftmaxFocalLoss};
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: torch's cross_entropy and mmcv's softmax focal formula transcribed in
// plain f64, gradients by the chain rule on those formulas.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Cross-entropy with label smoothing.
    Ce(f64),
    /// Softmax focal loss (alpha, gamma).
    Focal(Option<f64>, f64),
}

/// Row loss and d(row loss)/dx of one row with label `t` and class weights `w`.
fn ref_row(x: &[f64], t: usize, w: &[f64], loss: Loss) -> (f64, Vec<f64>) {
    let k = x.len();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = z.iter().sum();
    let p: Vec<f64> = z.iter().map(|v| v / s).collect();
    let logp: Vec<f64> = x.iter().map(|v| (v - m) - s.ln()).collect();
    // 1 - p_t and -log p_t, kept accurate where p_t rounds to 1.
    let q: f64 = (0..k).filter(|&j| j != t).map(|j| p[j]).sum();
    let nll = if p[t] >= 0.5 {
        (0..k)
            .filter(|&j| j != t)
            .map(|j| (x[j] - x[t]).exp())
            .sum::<f64>()
            .ln_1p()
    } else {
        -logp[t]
    };
    // p_j - δ_jt, with p_t - 1 = -q.
    let pmd = |j: usize| if j == t { -q } else { p[j] };
    match loss {
        Loss::Ce(eps) => {
            let wsum: f64 = w.iter().sum();
            // (torch skips the smoothing term when ε = 0, which matters for -inf logits)
            let smooth = if eps > 0.0 {
                eps / k as f64 * (0..k).map(|j| -w[j] * logp[j]).sum::<f64>()
            } else {
                0.0
            };
            let l = (1.0 - eps) * w[t] * nll + smooth;
            let g = (0..k)
                .map(|j| (1.0 - eps) * w[t] * pmd(j) + eps / k as f64 * (wsum * p[j] - w[j]))
                .collect();
            (l, g)
        }
        Loss::Focal(alpha, gamma) => {
            let a = alpha.unwrap_or(1.0);
            let modulating = if gamma == 0.0 { 1.0 } else { q.powf(gamma) };
            let l = a * w[t] * modulating * nll;
            // d/dx_j [(1-p_t)^γ (-log p_t)] = γ(1-p_t)^{γ-1}(-∂p_t/∂x_j)(-log p_t)
            //   + (1-p_t)^γ (p_j - δ_jt),  -∂p_t/∂x_j = p_t(p_j - δ_jt) (p_t - 1 taken as -q)
            let g = (0..k)
                .map(|j| {
                    let dmod_times_nll = if gamma == 0.0 || q == 0.0 {
                        0.0
                    } else {
                        gamma * q.powf(gamma - 1.0) * (p[t] * pmd(j)) * nll
                    };
                    a * w[t] * (dmod_times_nll + modulating * pmd(j))
                })
                .collect();
            (l, g)
        }
    }
}

/// The case of a reference evaluation: `n` rows of `k` classes, the loss, its reduction and
/// class weights.
#[derive(Clone, Copy)]
struct RefCase<'a> {
    n: usize,
    k: usize,
    loss: Loss,
    red: Reduction,
    cw: Option<&'a [f64]>,
}

/// Reference loss (reduced as `red`) and the gradient of `sum(loss · up)`.
fn reference(x: &[f64], labels: &[i64], case: RefCase, up: &[f64]) -> LossGrad {
    let RefCase {
        n,
        k,
        loss,
        red,
        cw,
    } = case;
    let ones = vec![1.0; k];
    let w = cw.unwrap_or(&ones);
    let mut per = vec![0.0; n];
    let mut dper = vec![0.0; n * k];
    let mut wden = 0.0;
    for i in 0..n {
        if labels[i] < 0 {
            continue;
        }
        let t = labels[i] as usize;
        let (l, g) = ref_row(&x[i * k..(i + 1) * k], t, w, loss);
        per[i] = l;
        dper[i * k..(i + 1) * k].copy_from_slice(&g);
        wden += w[t];
    }
    reduce_reference(per, dper, red, wden, up, k)
}

/// Either loss behind one `forward`.
#[derive(Clone, Debug)]
enum Ours {
    Ce(CrossEntropyLoss),
    Focal(SoftmaxFocalLoss),
}

impl Ours {
    fn new(loss: Loss, red: Reduction, cw: Option<Tensor>) -> Self {
        match loss {
            Loss::Ce(eps) => Ours::Ce(CrossEntropyLoss {
                reduction: red,
                class_weights: cw,
                label_smoothing: eps,
            }),
            Loss::Focal(alpha, gamma) => Ours::Focal(SoftmaxFocalLoss {
                alpha,
                gamma,
                reduction: red,
                class_weights: cw,
            }),
        }
    }
    fn forward(&self, x: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Ours::Ce(f) => f.forward(x, labels),
            Ours::Focal(f) => f.forward(x, labels),
        }
    }
}

fn run_ours(x: &Tensor, labels: &Tensor, up: &Tensor, f: &Ours) -> LossGrad {
    run_loss(x, up, |x| f.forward(x, labels))
}

const LOSSES: [Loss; 6] = [
    Loss::Ce(0.0),
    Loss::Ce(0.1),
    Loss::Ce(1.0),
    Loss::Focal(Some(0.25), 2.0),
    Loss::Focal(None, 0.5),
    Loss::Focal(Some(0.5), 0.0),
];

/// Labels in 0..k with about 10% ignored rows.
fn make_labels(rng: &mut Rng, n: usize, k: usize) -> Vec<i64> {
    (0..n)
        .map(|_| {
            if rng.below(10) == 0 {
                -1
            } else {
                rng.below(k as u64) as i64
            }
        })
        .collect()
}

/// The upstream gradient of a loss of `[n]` (per row) or a scalar.
fn up_rows_of(up: &[f64], red: Reduction, dev: &Device) -> Tensor {
    up_tensor(up, red, &[up.len()], dev)
}

#[test]
fn matches_f64_reference_over_shapes_reductions_losses_and_weights() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    for &(n, k) in &[(1usize, 1usize), (3, 7), (5, 423), (700, 81), (20, 1000)] {
        for loss in LOSSES {
            for weighted in [false, true] {
                for red in REDUCTIONS {
                    let x = rng.vec_normal(n * k, 3.0);
                    let labels = make_labels(&mut rng, n, k);
                    let cw: Option<Vec<f64>> =
                        weighted.then(|| (0..k).map(|_| 0.2 + 2.0 * rng.uniform()).collect());
                    let up = upstream(&mut rng, red, n);
                    let what = format!("{n}x{k} {loss:?} w={weighted} {red:?}");
                    let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
                    // f64: the kernel's own rounding only; f32 with the crate's fast exp/log,
                    // against the reference at the f32-rounded inputs.
                    let ours = |dtype: DType| {
                        let cwt = cw.as_ref().map(|w| {
                            Tensor::from_vec(w.clone(), k, &dev)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap()
                        });
                        let f = Ours::new(loss, red, cwt);
                        let xt = Tensor::from_vec(x.clone(), (n, k), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        run_ours(&xt, &lt, &up_rows_of(&up, red, &dev), &f)
                    };
                    let reference_at = |dtype: DType| {
                        let cwr = cw.as_deref().map(|w| round_to_dtype(w, dtype));
                        let case = RefCase {
                            n,
                            k,
                            loss,
                            red,
                            cw: cwr.as_deref(),
                        };
                        reference(&round_to_dtype(&x, dtype), &labels, case, &up)
                    };
                    check_against_reference(&what, &CLASSIFICATION_TOLS, ours, reference_at);
                }
            }
        }
    }
}

#[test]
fn focal_with_gamma_zero_and_no_alpha_equals_cross_entropy() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(12);
    let (n, k) = (300, 37);
    let x = Tensor::from_vec(rng.vec_normal(n * k, 4.0), (n, k), &dev).unwrap();
    let labels = Tensor::from_vec(make_labels(&mut rng, n, k), n, &dev).unwrap();
    let w = Tensor::from_vec(
        (0..k).map(|_| 0.1 + rng.uniform()).collect::<Vec<_>>(),
        k,
        &dev,
    )
    .unwrap();
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        for red in REDUCTIONS {
            for cw in [None, Some(w.to_dtype(dtype).unwrap())] {
                let xd = x.to_dtype(dtype).unwrap();
                let up = up_rows_of(&upstream(&mut rng, red, n), red, &dev)
                    .to_dtype(dtype)
                    .unwrap();
                let ce = Ours::new(Loss::Ce(0.0), red, cw.clone());
                let fl = Ours::new(Loss::Focal(None, 0.0), red, cw.clone());
                let (l1, g1) = run_ours(&xd, &labels, &up, &ce);
                let (l2, g2) = run_ours(&xd, &labels, &up, &fl);
                // Same row kernel: equal to rounding (here, bitwise).
                assert_eq!(l1, l2, "{dtype:?} {red:?}");
                assert_eq!(g1, g2, "{dtype:?} {red:?}");
            }
        }
    }
}

#[test]
fn u32_labels_equal_i64_labels() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let (n, k) = (50, 9);
    let x = Tensor::from_vec(rng.vec_normal(n * k, 2.0), (n, k), &dev).unwrap();
    let labels: Vec<u32> = (0..n).map(|_| rng.below(k as u64) as u32).collect();
    for loss in LOSSES {
        for red in REDUCTIONS {
            let f = Ours::new(loss, red, None);
            let up = up_rows_of(&upstream(&mut rng, red, n), red, &dev);
            check_label_types_agree(&format!("{loss:?} {red:?}"), &labels, |l| {
                run_ours(&x, l, &up, &f)
            });
        }
    }
}

fn check_fixture_file(file: &str, min_cases: usize, make: impl Fn(&serde_json::Value) -> Ours) {
    let dev = Device::Cpu;
    let cases = fixture_cases(file);
    assert!(cases.len() >= min_cases, "{file}: {} cases", cases.len());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        assert_eq!(case["ignore_index"].as_i64(), Some(-1), "{name}");
        let x = fx_to_tensor(&case["logits"], DType::F64, &dev);
        let (n, k) = x.dims2().unwrap();
        let labels = Tensor::from_vec(fx_ints(&case["labels"]), n, &dev).unwrap();
        let f = make(case);
        let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
        let got = run_ours(&x, &labels, &up, &f);
        let tol = Tol::abs(1e-12, 1e-9);
        let (lshape, gshape) = check_fixture(name, &got, case, tol, tol);
        let none = fx_red(case) == Reduction::None;
        assert_eq!(lshape, if none { vec![n] } else { vec![] }, "{name}");
        assert_eq!(gshape, vec![n, k], "{name}");
    }
}

fn fx_red(case: &serde_json::Value) -> Reduction {
    fx_reduction(&case["reduction"], &case["avg_factor"])
}

fn fx_weights(case: &serde_json::Value) -> Option<Tensor> {
    (!case["class_weights"].is_null())
        .then(|| fx_to_tensor(&case["class_weights"], DType::F64, &Device::Cpu))
}

#[test]
fn cross_entropy_matches_torch_fixtures() {
    check_fixture_file("cross_entropy.json", 55, |case| {
        Ours::Ce(CrossEntropyLoss {
            reduction: fx_red(case),
            class_weights: fx_weights(case),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        })
    });
}

#[test]
fn softmax_focal_matches_torch_fixtures() {
    check_fixture_file("softmax_focal.json", 40, |case| {
        Ours::Focal(SoftmaxFocalLoss {
            alpha: case["alpha"].as_f64(),
            gamma: case["gamma"].as_f64().unwrap(),
            reduction: fx_red(case),
            class_weights: fx_weights(case),
        })
    });
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(14);
    let (n, k) = (6, 5);
    for (loss, red, weighted) in [
        (Loss::Ce(0.0), Reduction::Sum, false),
        (Loss::Ce(0.2), Reduction::Mean, true),
        (Loss::Ce(0.7), Reduction::None, true),
        (Loss::Focal(Some(0.25), 2.0), Reduction::Mean, true),
        (Loss::Focal(None, 0.5), Reduction::AvgFactor(3.0), false),
        (Loss::Focal(Some(1.0), 5.0), Reduction::None, true),
    ] {
        let x = rng.vec_normal(n * k, 2.0);
        let labels = Tensor::from_vec(make_labels(&mut rng, n, k), n, &dev).unwrap();
        let cw = weighted.then(|| {
            Tensor::from_vec(
                (0..k).map(|_| 0.3 + rng.uniform()).collect::<Vec<_>>(),
                k,
                &dev,
            )
            .unwrap()
        });
        let f = Ours::new(loss, red, cw);
        let up = up_rows_of(&upstream(&mut rng, red, n), red, &dev);
        let logits = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (n, k), &dev).unwrap();
        let (_, g) = run_ours(&logits(&x), &labels, &up, &f);
        let fd = FdCheck {
            nonzero: true,
            ..FD
        };
        check_finite_differences(&format!("fd {loss:?} {red:?}"), &g, &x, fd, |xs| {
            weighted_sum(f.forward(&logits(xs), &labels).unwrap(), &up)
        });
    }
}

#[test]
fn extreme_logits_give_finite_correct_values_and_nan_propagates() {
    let dev = Device::Cpu;
    for (dtype, big) in [
        (DType::F32, 1e4),
        (DType::F64, 1e4),
        (DType::F16, 30.0),
        (DType::BF16, 30.0),
    ] {
        // Saturated right, saturated wrong, ties, and a moderately confident row (p_t near 1
        // but not exactly: 1 - p_t must keep its relative accuracy).
        let xs = [
            big, -big, 0.0, // label 0: p_t = 1
            big, -big, 0.0, // label 1: p_t = 0
            -big, -big, -big, // label 2: ties
            12.0, 0.0, -3.0, // label 0: 1 - p_t ≈ 6e-6
            big, big, -big, // label 1: p_t = 1/2
        ];
        let labels = vec![0i64, 1, 2, 0, 1];
        let (n, k) = (5, 3);
        let x = Tensor::new(&xs, &dev)
            .unwrap()
            .reshape((n, k))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xr = to_f64_vec(&x); // the logits as representable in dtype
        let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
        for loss in [
            Loss::Ce(0.0),
            Loss::Ce(0.1),
            Loss::Focal(Some(0.25), 0.0),
            Loss::Focal(Some(0.25), 0.5),
            Loss::Focal(None, 2.0),
            Loss::Focal(None, 5.0),
        ] {
            for red in [Reduction::None, Reduction::Sum] {
                let f = Ours::new(loss, red, None);
                let up = up_rows_of(&upstream(&mut Rng::new(4), red, n), red, &dev)
                    .to_dtype(dtype)
                    .unwrap();
                let got = run_ours(&x, &lt, &up, &f);
                let case = RefCase {
                    n,
                    k,
                    loss,
                    red,
                    cw: None,
                };
                let want = reference(&xr, &labels, case, &to_f64_vec(&up));
                // With label smoothing the (±1e4-sized) smoothing term dominates the sum: the
                // tolerance is relative to the largest row loss.
                let extreme = Extreme {
                    dtype,
                    f32_rtol: 2e-6,
                    loss_relative: matches!(loss, Loss::Ce(e) if e > 0.0),
                };
                check_extreme(&format!("{dtype:?} {loss:?} {red:?}"), extreme, &got, &want);
            }
        }
        // NaN in -> NaN out (row loss, sum and the row's gradient); other rows unaffected.
        let x = Tensor::new(&[f64::NAN, 1.0, 0.5, 2.0], &dev)
            .unwrap()
            .reshape((2, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let lt = Tensor::new(&[1i64, 0], &dev).unwrap();
        for loss in [Loss::Ce(0.0), Loss::Ce(0.1), Loss::Focal(Some(0.25), 2.0)] {
            let f = Ours::new(loss, Reduction::None, None);
            let up = Tensor::ones(2, dtype, &dev).unwrap();
            let (l, g) = run_ours(&x, &lt, &up, &f);
            assert!(
                l[0].is_nan() && l[1].is_finite(),
                "{dtype:?} {loss:?} {l:?}"
            );
            assert!(g[0].is_nan() && g[1].is_nan(), "{dtype:?} {loss:?} {g:?}");
            assert!(g[2].is_finite() && g[3].is_finite(), "{dtype:?} {g:?}");
            let f = Ours::new(loss, Reduction::Sum, None);
            let l = to_f64_vec(&f.forward(&x, &lt).unwrap());
            assert!(l[0].is_nan(), "{dtype:?} {loss:?}");
        }
    }
}

#[test]
fn masked_minus_infinity_logits_behave_as_torch() {
    // A class masked with -inf has p = 0: finite CE without smoothing, +inf with smoothing.
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1.0f32, f32::NEG_INFINITY, 0.5]], &dev).unwrap();
    let lt = Tensor::new(&[0i64], &dev).unwrap();
    let up = Tensor::new(1f32, &dev).unwrap();
    let (l, g) = run_ours(
        &x,
        &lt,
        &up,
        &Ours::new(Loss::Ce(0.0), Reduction::Sum, None),
    );
    let case = RefCase {
        n: 1,
        k: 3,
        loss: Loss::Ce(0.0),
        red: Reduction::Sum,
        cw: None,
    };
    let (rl, rg) = reference(&[1.0, f64::NEG_INFINITY, 0.5], &[0], case, &[1.0]);
    assert_close("masked loss", &l, &rl, 1e-7, 1e-6);
    assert_close("masked grad", &g, &rg, 1e-7, 1e-6);
    let (l, _) = run_ours(
        &x,
        &lt,
        &up,
        &Ours::new(Loss::Ce(0.1), Reduction::Sum, None),
    );
    assert_eq!(l, vec![f64::INFINITY]);
}

/// The loss and gradient of one row evaluated naively in the half type (every intermediate
/// rounded), as a user composing half-precision tensor ops would get them.
fn naive_half_row(x: &[f64], t: usize, loss: Loss, d: DType) -> (f64, Vec<f64>) {
    let rh = round_half;
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: Vec<f64> = x.iter().map(|v| rh(rh(v - m, d).exp(), d)).collect();
    let s = z.iter().fold(0.0, |a, v| rh(a + v, d));
    let p: Vec<f64> = z.iter().map(|v| rh(v / s, d)).collect();
    let logpt = rh(rh(x[t] - m, d) - rh(s.ln(), d), d);
    let delta = |j: usize| if j == t { 1.0 } else { 0.0 };
    match loss {
        Loss::Ce(_) => (
            -logpt,
            (0..x.len()).map(|j| rh(p[j] - delta(j), d)).collect(),
        ),
        Loss::Focal(alpha, gamma) => {
            let a = alpha.unwrap_or(1.0);
            let q = rh(1.0 - p[t], d);
            let md = rh(q.powf(gamma), d);
            let l = rh(a * rh(md * -logpt, d), d);
            let f = rh(
                md + rh(
                    gamma * rh(rh(q.powf(gamma - 1.0), d) * rh(p[t] * -logpt, d), d),
                    d,
                ),
                d,
            );
            let g = (0..x.len())
                .map(|j| rh(a * rh(f * rh(p[j] - delta(j), d), d), d))
                .collect();
            (l, g)
        }
    }
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(15);
    let (n, k) = (64, 40);
    for dtype in [DType::F16, DType::BF16] {
        for loss in [Loss::Ce(0.0), Loss::Focal(Some(0.25), 2.0)] {
            let x = half_logits(&mut rng, n * k, dtype);
            let labels: Vec<i64> = (0..n).map(|_| rng.below(k as u64) as i64).collect();
            let up = vec![1.0; n];
            let case = RefCase {
                n,
                k,
                loss,
                red: Reduction::None,
                cw: None,
            };
            let (rl, rg) = reference(&x, &labels, case, &up);
            let f = Ours::new(loss, Reduction::None, None);
            let xt = Tensor::from_vec(x.clone(), (n, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
            let upt = Tensor::ones(n, dtype, &dev).unwrap();
            let (l, g) = run_ours(&xt, &lt, &upt, &f);
            let mut errors = HalfErrors::default();
            for i in 0..n {
                let t = labels[i] as usize;
                let (nl, ng) = naive_half_row(&x[i * k..(i + 1) * k], t, loss, dtype);
                errors.loss(l[i], nl, rl[i]);
                for (j, ngj) in ng.iter().enumerate() {
                    let e = i * k + j;
                    errors.grad(g[e], *ngj, rg[e]);
                }
            }
            let what = format!("{dtype:?} {loss:?}");
            errors.check(&what);
            let fs = Ours::new(loss, Reduction::Sum, None);
            let s = to_f64_vec(&fs.forward(&xt, &lt).unwrap())[0];
            check_accumulated(&what, "sum", s, rl.iter().sum());
        }
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(16);
    let (n, k) = (37, 11);
    // Logits as the t() of a transposed buffer, labels as a strided column of [N, 2].
    let (x_strided, lab_strided) = strided_logits_and_labels(&mut rng, n, k, k as u64 + 1);
    let x_contig = x_strided.contiguous().unwrap();
    let lab_contig = lab_strided.contiguous().unwrap();
    // Class weights from a strided view too.
    let w2 = Tensor::from_vec(
        (0..2 * k).map(|_| 0.5 + rng.uniform()).collect::<Vec<_>>(),
        (k, 2),
        &dev,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap();
    let w_strided = w2.i((.., 0)).unwrap();
    assert!(!w_strided.is_contiguous());
    let w_contig = w_strided.contiguous().unwrap();
    // A broadcast row of logits.
    let row = Tensor::from_vec(rng.vec_normal(k, 2.0), (1, k), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let x_bcast = row.broadcast_as((n, k)).unwrap();
    for loss in LOSSES {
        for red in REDUCTIONS {
            let up = up_rows_of(&upstream(&mut rng, red, n), red, &dev)
                .to_dtype(DType::F32)
                .unwrap();
            // [logits, labels, class weights, upstream]: strided logits, labels and weights; a
            // broadcast row of logits; a row-narrowed (offset) view.
            let cases = [
                Views::contiguous(&[&x_strided, &lab_strided, &w_strided]).and(&up),
                Views::contiguous(&[&x_bcast, &lab_contig, &w_strided]).and(&up),
                Views::offset_rows(&[&x_contig, &lab_contig], 5, 20)
                    .and(&w_contig)
                    .and(&up_rows(&up, red, 5, 20)),
            ];
            check_views_equal_copies(&format!("{loss:?} {red:?}"), &cases, |v| {
                run_ours(
                    &v[0],
                    &v[1],
                    &v[3],
                    &Ours::new(loss, red, Some(v[2].clone())),
                )
            });
        }
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let ok = Tensor::new(&[0i64, 79, -1, 3], &dev).unwrap();
    for (name, f) in [
        ("CrossEntropyLoss", Ours::Ce(CrossEntropyLoss::default())),
        ("SoftmaxFocalLoss", Ours::Focal(SoftmaxFocalLoss::default())),
    ] {
        let named = Named::First(name);
        let check =
            |r: candle_core::Result<Tensor>, needles: &[&str]| check_error(named, r, needles);
        assert!(f.forward(&x, &ok).is_ok());
        // Labels: K is not background for softmax losses; -2 is not the ignore value.
        check_label_errors(
            named,
            &[
                BadLabels::I64(&[0, 80, 1, 2], "label 80 out of range 0..=79"),
                BadLabels::I64(&[0, -2, 1, 2], "label -2"),
                BadLabels::U32(&[0, 1, 2, 99], "label 99"),
            ],
            |t| f.forward(&x, t),
        );
        let with_red = |red| match &f {
            Ours::Ce(c) => Ours::Ce(CrossEntropyLoss {
                reduction: red,
                ..c.clone()
            }),
            Ours::Focal(c) => Ours::Focal(SoftmaxFocalLoss {
                reduction: red,
                ..c.clone()
            }),
        };
        check_label_errors(named, &[BadLabels::I64(&[0, 1, 2, 80], "label 80")], |t| {
            with_red(Reduction::None).forward(&x, t)
        });
        check(
            with_red(Reduction::AvgFactor(-1.0)).forward(&x, &ok),
            &["AvgFactor"],
        );
        // Shapes and dtypes.
        check(
            f.forward(&x, &Tensor::new(&[0i64, 1, 2], &dev).unwrap()),
            &["[4]", "[3]"],
        );
        // (F32 targets [N, K] are CrossEntropyLoss's probability targets: tests/ce_probs.rs.)
        check(
            f.forward(&x, &Tensor::zeros((4, 80), DType::F64, &dev).unwrap()),
            &["F64"],
        );
        check(
            f.forward(&Tensor::zeros(80, DType::F32, &dev).unwrap(), &ok),
            &["[N, C]"],
        );
        check(
            f.forward(&Tensor::zeros((4, 0), DType::F32, &dev).unwrap(), &ok),
            &["at least one class"],
        );
        check(
            f.forward(&x, &Tensor::new(&[0u8, 1, 2, 3], &dev).unwrap()),
            &["U8"],
        );
        check(f.forward(&x.to_dtype(DType::I64).unwrap(), &ok), &["I64"]);
        // Class weights: length, dtype, shape.
        let with_w = |w: Tensor| match &f {
            Ours::Ce(c) => Ours::Ce(CrossEntropyLoss {
                class_weights: Some(w),
                ..c.clone()
            }),
            Ours::Focal(c) => Ours::Focal(SoftmaxFocalLoss {
                class_weights: Some(w),
                ..c.clone()
            }),
        };
        check(
            with_w(Tensor::ones(81, DType::F32, &dev).unwrap()).forward(&x, &ok),
            &["length 81", "K = 80"],
        );
        check(
            with_w(Tensor::ones(80, DType::F64, &dev).unwrap()).forward(&x, &ok),
            &["class_weights", "F64"],
        );
        check(
            with_w(Tensor::ones((80, 1), DType::F32, &dev).unwrap()).forward(&x, &ok),
            &["class_weights", "[80, 1]"],
        );
    }
    let ce = Named::First("CrossEntropyLoss");
    let sf = Named::First("SoftmaxFocalLoss");
    for ls in [-0.1, 1.5, f64::NAN] {
        let f = CrossEntropyLoss {
            label_smoothing: ls,
            ..Default::default()
        };
        check_error(ce, f.forward(&x, &ok), &["label_smoothing"]);
    }
    for g in [-1.0, f64::NAN] {
        let f = SoftmaxFocalLoss {
            gamma: g,
            ..Default::default()
        };
        check_error(sf, f.forward(&x, &ok), &["gamma"]);
    }
    let f = SoftmaxFocalLoss {
        alpha: Some(-0.5),
        ..Default::default()
    };
    check_error(sf, f.forward(&x, &ok), &["alpha", "-0.5"]);
}

#[test]
fn empty_and_all_ignored_batches() {
    let dev = Device::Cpu;
    for loss in LOSSES {
        let x = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
        let labels = Tensor::zeros(0, DType::I64, &dev).unwrap();
        check_empty_batch(&[0], |red| {
            Ours::new(loss, red, None).forward(&x, &labels).unwrap()
        });
        // Every row ignored: Mean is 0 (torch: NaN), and the gradient is 0.
        let x = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        let ignored = Tensor::new(&[-1i64, -1, -1], &dev).unwrap();
        let up = Tensor::new(1f32, &dev).unwrap();
        check_all_ignored(&run_ours(
            &x,
            &ignored,
            &up,
            &Ours::new(loss, Reduction::Mean, None),
        ));
    }
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(17);
    let (n, k) = (5000, 81);
    let x = Tensor::from_vec(rng.vec_normal(n * k, 3.0), (n, k), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let labels = Tensor::from_vec(make_labels(&mut rng, n, k), n, &dev).unwrap();
    let w = Tensor::from_vec(
        (0..k)
            .map(|_| 0.5 + rng.uniform() as f32)
            .collect::<Vec<_>>(),
        k,
        &dev,
    )
    .unwrap();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for loss in [Loss::Ce(0.1), Loss::Focal(Some(0.25), 2.0)] {
            for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
                let f = Ours::new(loss, red, Some(w.clone()));
                let up = unit_upstream(red, &[n], DType::F32, &dev);
                let (l, g) = loss_and_grad(&x, &up, |x| f.forward(x, &labels)).unwrap();
                push_bits(&mut bits, &l, &g);
            }
        }
        bits
    });
}

#[test]
fn fused_training_pass_equals_loss_only_and_recomputed_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(92);
    let (n, k) = (300, 21);
    let labels = Tensor::new(make_labels(&mut rng, n, k), &dev).unwrap();
    let wv: Vec<f64> = (0..k).map(|_| 0.5 + rng.uniform()).collect();
    for dtype in [DType::F32, DType::F16, DType::F64] {
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(rng.vec_normal(n * k, 3.0), (n, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::new(wv.clone(), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::AvgFactor(17.0)] {
            for (smoothing, weights) in [(0.0, None), (0.1, Some(w.clone()))] {
                let ce = CrossEntropyLoss {
                    reduction,
                    class_weights: weights.clone(),
                    label_smoothing: smoothing,
                };
                let what = format!("CE {dtype:?} {reduction:?} eps={smoothing}");
                check_fused_equals_recomputed(&what, &x, |x| ce.forward(x, &labels));
                let sf = SoftmaxFocalLoss {
                    reduction,
                    class_weights: weights,
                    ..Default::default()
                };
                let what = format!("softmax focal {dtype:?} {reduction:?}");
                check_fused_equals_recomputed(&what, &x, |x| sf.forward(x, &labels));
            }
        }
    }
}
