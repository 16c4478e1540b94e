//! SmoothL1Loss and BalancedL1Loss: against an independent f64 reference, PyTorch fixtures,
//! finite differences, β = 0, half precision, layouts, bad input and determinism.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{BalancedL1Loss, Reduction, SmoothL1Loss};
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: the formulas of torch's smooth_l1_loss and mmdet's balanced_l1_loss
// transcribed literally in f64, derivatives by the chain rule on those formulas.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Loss {
    Smooth(f64),
    Balanced { alpha: f64, gamma: f64, beta: f64 },
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

/// (loss, d loss / d pred) of one element.
fn ref_elem(loss: Loss, x: f64, t: f64) -> (f64, f64) {
    let d = x - t;
    let ad = d.abs();
    let sgn = sign(d);
    match loss {
        Loss::Smooth(beta) => {
            if beta == 0.0 {
                (ad, sgn)
            } else if ad < beta {
                (0.5 * d * d / beta, d / beta)
            } else {
                (ad - 0.5 * beta, sgn)
            }
        }
        Loss::Balanced { alpha, gamma, beta } => {
            let b = std::f64::consts::E.powf(gamma / alpha) - 1.0;
            if ad < beta {
                let l = alpha / b * (b * ad + 1.0) * (b * ad / beta + 1.0).ln() - alpha * ad;
                // product rule on alpha/b * (b ad + 1) * ln(b ad / beta + 1)
                let dl = alpha / b * b * (b * ad / beta + 1.0).ln()
                    + alpha / b * (b * ad + 1.0) * (b / beta) / (b * ad / beta + 1.0)
                    - alpha;
                (l, sgn * dl)
            } else {
                (gamma * ad + gamma / b - alpha * beta, sgn * gamma)
            }
        }
    }
}

/// Reference loss (reduced as `red`) and the gradient of `sum(loss · up)`.
fn reference(loss: Loss, x: &[f64], t: &[f64], red: Reduction, up: &[f64]) -> LossGrad {
    let (per, dper): (Vec<f64>, Vec<f64>) =
        x.iter().zip(t).map(|(a, b)| ref_elem(loss, *a, *b)).unzip();
    let n = x.len();
    reduce_reference(per, dper, red, n as f64, up, 1)
}

fn forward(loss: Loss, red: Reduction, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    match loss {
        Loss::Smooth(beta) => SmoothL1Loss {
            beta,
            reduction: red,
        }
        .forward(x, t),
        Loss::Balanced { alpha, gamma, beta } => BalancedL1Loss {
            alpha,
            gamma,
            beta,
            reduction: red,
        }
        .forward(x, t),
    }
}

fn run_ours(loss: Loss, red: Reduction, x: &Tensor, t: &Tensor, up: &Tensor) -> LossGrad {
    let (l, g) = loss_and_grad(x, up, |x| forward(loss, red, x, t)).expect("forward/backward");
    assert_eq!(g.dims(), x.dims());
    if red == Reduction::None {
        assert_eq!(l.dims(), x.dims());
    } else {
        assert_eq!(l.rank(), 0);
    }
    (to_f64_vec(&l), to_f64_vec(&g))
}

const LOSSES: [Loss; 6] = [
    Loss::Smooth(1.0),
    Loss::Smooth(1.0 / 9.0),
    Loss::Smooth(0.0),
    Loss::Balanced {
        alpha: 0.5,
        gamma: 1.5,
        beta: 1.0,
    },
    Loss::Balanced {
        alpha: 0.25,
        gamma: 2.0,
        beta: 0.5,
    },
    Loss::Balanced {
        alpha: 1.0,
        gamma: 0.7,
        beta: 2.0,
    },
];

/// Differences spread over both branches, with exact ties (d = 0) and a few large outliers.
fn make_inputs(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let t = rng.vec_normal(n, 1.0);
    let x = t
        .iter()
        .map(|v| match rng.below(12) {
            0 => *v,
            1 => v + rng.normal(20.0),
            _ => v + rng.normal(0.8),
        })
        .collect();
    (x, t)
}

#[test]
fn matches_f64_reference_over_shapes_reductions_and_parameters() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    // The loss of an element is ~|d|; f32 rounding of d costs ~1e-7 of the inputs.
    let tols = RefTols {
        f64_loss: Tol::abs(1e-12, 1e-10),
        f64_grad: Tol::abs(1e-14, 1e-10),
        f32_loss: Tol::scaled(1e-6, 1e-3, 2e-6),
        f32_grad: Tol::scaled(1e-6, 1e-9, 2e-6),
    };
    for shape in [
        vec![1usize],
        vec![7, 4],
        vec![3, 5, 4],
        vec![20_000, 4],
        vec![33, 1],
    ] {
        let n: usize = shape.iter().product();
        for loss in LOSSES {
            for red in REDUCTIONS {
                let (x, t) = make_inputs(&mut rng, n);
                let up = upstream(&mut rng, red, n);
                let what = format!("{shape:?} {loss:?} {red:?}");
                // f32: the reference evaluated at the f32-rounded inputs.
                let ours = |dtype: DType| {
                    let tensor = |v: &[f64]| {
                        Tensor::from_vec(v.to_vec(), shape.as_slice(), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    };
                    let upt = up_tensor(&up, red, &shape, &dev).to_dtype(dtype).unwrap();
                    run_ours(loss, red, &tensor(&x), &tensor(&t), &upt)
                };
                let reference_at = |dtype: DType| {
                    let r = |v: &[f64]| round_to_dtype(v, dtype);
                    reference(loss, &r(&x), &r(&t), red, &r(&up))
                };
                check_against_reference(&what, &tols, ours, reference_at);
            }
        }
    }
}

fn check_fixture_case(case: &serde_json::Value, loss: Loss) {
    let dev = Device::Cpu;
    let name = case["name"].as_str().unwrap();
    let x = fx_to_tensor(&case["pred"], DType::F64, &dev);
    let t = fx_to_tensor(&case["target"], DType::F64, &dev);
    let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
    let red = fx_reduction(&case["reduction"], &case["avg_factor"]);
    let got = run_ours(loss, red, &x, &t, &up);
    let (lshape, gshape) = check_fixture(
        name,
        &got,
        case,
        Tol::abs(1e-13, 1e-11),
        Tol::abs(1e-14, 1e-11),
    );
    if red == Reduction::None {
        assert_eq!(lshape, x.dims(), "{name}");
    } else {
        assert!(lshape.is_empty(), "{name}");
    }
    assert_eq!(gshape, x.dims(), "{name}");
}

#[test]
fn smooth_l1_matches_torch_fixtures() {
    let cases = fixture_cases("smooth_l1.json");
    assert_eq!(cases.len(), 18);
    for case in &cases {
        check_fixture_case(case, Loss::Smooth(case["beta"].as_f64().unwrap()));
    }
}

#[test]
fn balanced_l1_matches_mmdet_formula_fixtures() {
    let cases = fixture_cases("balanced_l1.json");
    assert_eq!(cases.len(), 12);
    for case in &cases {
        let loss = Loss::Balanced {
            alpha: case["alpha"].as_f64().unwrap(),
            gamma: case["gamma"].as_f64().unwrap(),
            beta: case["beta"].as_f64().unwrap(),
        };
        check_fixture_case(case, loss);
    }
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(12);
    let shape = [6usize, 4];
    let n = 24;
    for loss in LOSSES {
        for red in REDUCTIONS {
            // Away from the kinks: |d| not near 0 and not near β.
            let beta = match loss {
                Loss::Smooth(b) => b,
                Loss::Balanced { beta, .. } => beta,
            };
            let t = rng.vec_normal(n, 1.0);
            let x: Vec<f64> = t
                .iter()
                .map(|v| loop {
                    let d = rng.normal(1.5);
                    if d.abs() > 1e-3 && (d.abs() - beta).abs() > 1e-3 {
                        break v + d;
                    }
                })
                .collect();
            let up = upstream(&mut rng, red, n);
            let upt = up_tensor(&up, red, &shape, &dev);
            let tt = Tensor::from_vec(t.clone(), &shape, &dev).unwrap();
            let pred = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), &shape, &dev).unwrap();
            let (_, g) = run_ours(loss, red, &pred(&x), &tt, &upt);
            check_finite_differences(&format!("fd {loss:?} {red:?}"), &g, &x, FD, |xs| {
                weighted_sum(forward(loss, red, &pred(xs), &tt).unwrap(), &upt)
            });
        }
    }
}

#[test]
fn beta_zero_is_exactly_l1_with_zero_gradient_at_ties() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let x = Tensor::new(&[[1.5f64, -2.0, 0.25, 3.0], [0.0, 0.0, -1e-3, 8.0]], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t = Tensor::new(&[[1.5f64, 1.0, 0.25, -1.0], [0.0, 0.5, 0.0, 8.0]], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let up = Tensor::ones((2, 4), dtype, &dev).unwrap();
        let (l, g) = run_ours(Loss::Smooth(0.0), Reduction::None, &x, &t, &up);
        let l1 = to_f64_vec(&(&x - &t).unwrap().abs().unwrap());
        assert_eq!(l, l1, "{dtype:?}");
        let expect_g = [0.0, -1.0, 0.0, 1.0, 0.0, -1.0, -1.0, 0.0];
        assert_eq!(g, expect_g, "{dtype:?}");
        // Same through a scalar reduction.
        let (l, g) = run_ours(
            Loss::Smooth(0.0),
            Reduction::Sum,
            &x,
            &t,
            &Tensor::new(1f64, &dev).unwrap().to_dtype(dtype).unwrap(),
        );
        assert!(
            (l[0] - l1.iter().sum::<f64>()).abs() <= 1e-2 * l[0],
            "{dtype:?}"
        );
        assert_eq!(g, expect_g, "{dtype:?}");
    }
}

#[test]
fn empty_input_mean_is_zero_and_none_keeps_the_shape() {
    let x = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    for loss in LOSSES {
        check_empty_batch_gradient(&format!("{loss:?}"), &x, &[0, 4], |x, t, red| {
            forward(loss, red, x, t)
        });
    }
}

/// The formula evaluated naively in the half type (every intermediate rounded), as a user
/// composing half-precision tensor ops would get it.
fn naive_half(loss: Loss, x: f64, t: f64, dt: DType) -> (f64, f64) {
    let r = |v: f64| round_half(v, dt);
    let d = r(x - t);
    let ad = d.abs();
    let sgn = sign(d);
    match loss {
        Loss::Smooth(beta) => {
            let beta_h = r(beta);
            if ad < beta_h {
                (r(r(0.5 * r(d * d)) / beta_h), r(d / beta_h))
            } else {
                (r(ad - r(0.5 * beta_h)), sgn)
            }
        }
        Loss::Balanced { alpha, gamma, beta } => {
            let b = r(r(r(gamma / alpha).exp()) - 1.0);
            if ad < beta {
                let ln = r(r(r(r(b * ad) / beta) + 1.0).ln());
                let l = r(r(r(r(alpha / b) * r(r(b * ad) + 1.0)) * ln) - r(alpha * ad));
                let g = r(r(alpha * ln)
                    + r(r(r(alpha / b) * r(r(b * ad) + 1.0))
                        * r(r(b / beta) / r(r(r(b * ad) / beta) + 1.0))))
                    - alpha;
                (l, r(sgn * r(g)))
            } else {
                (
                    r(r(r(gamma * ad) + r(gamma / b)) - r(alpha * beta)),
                    sgn * gamma,
                )
            }
        }
    }
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let n = 4096;
    for dtype in [DType::F16, DType::BF16] {
        // Smooth L1 with β = 1 and 1/9, the first two balanced L1 parameter sets.
        for loss in [0, 1, 3, 4].map(|i| LOSSES[i]) {
            let (x, t) = make_inputs(&mut rng, n);
            let x: Vec<f64> = x.iter().map(|v| round_half(*v, dtype)).collect();
            let t: Vec<f64> = t.iter().map(|v| round_half(*v, dtype)).collect();
            let ones = vec![1.0; n];
            let (rl, rg) = reference(loss, &x, &t, Reduction::None, &ones);
            let xt = Tensor::from_vec(x.clone(), n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let tt = Tensor::from_vec(t.clone(), n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let upt = Tensor::ones(n, dtype, &dev).unwrap();
            let (l, g) = run_ours(loss, Reduction::None, &xt, &tt, &upt);
            let mut errors = HalfErrors::default();
            for k in 0..n {
                let (nl, ng) = naive_half(loss, x[k], t[k], dtype);
                errors.loss(l[k], nl, rl[k]);
                errors.grad(g[k], ng, rg[k]);
            }
            let what = format!("{dtype:?} {loss:?}");
            errors.check(&what);
            // The scalar sum accumulates in f32 and f64: far better than half would allow.
            let s = to_f64_vec(&forward(loss, Reduction::Sum, &xt, &tt).unwrap())[0];
            check_accumulated(&what, "sum", s, rl.iter().sum());
        }
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(14);
    let n = 53;
    // [N, 4] as the t() of a [4, N] buffer.
    let x_strided = transposed(rng.vec_normal(4 * n, 2.0), n, 4, DType::F32, &dev);
    let x_contig = x_strided.contiguous().unwrap();
    // Targets: a narrow of a wider buffer, and a broadcast row.
    let wide = Tensor::from_vec(rng.vec_normal(n * 9, 2.0), (n, 9), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t_narrow = wide.narrow(1, 3, 4).unwrap();
    let t_bcast = Tensor::new(&[[0.5f32, -1.0, 2.0, 0.0]], &dev)
        .unwrap()
        .broadcast_as((n, 4))
        .unwrap();
    assert!(!t_narrow.is_contiguous() && !t_bcast.is_contiguous());
    for loss in LOSSES {
        for red in REDUCTIONS {
            let up = up_tensor(&upstream(&mut rng, red, 4 * n), red, &[n, 4], &dev)
                .to_dtype(DType::F32)
                .unwrap();
            // Strided predictions with each target view, and a row-narrowed (offset) view.
            let cases = [
                Views::contiguous(&[&x_strided, &t_narrow]).and(&up),
                Views::contiguous(&[&x_strided, &t_bcast]).and(&up),
                Views::offset_rows(&[&x_contig, &t_narrow], 5, 20).and(&up_rows(&up, red, 5, 20)),
            ];
            check_views_equal_copies(&format!("{loss:?} {red:?}"), &cases, |v| {
                run_ours(loss, red, &v[0], &v[1], &v[2])
            });
        }
    }
}

#[test]
fn nan_propagates_and_large_inputs_stay_finite() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let x = Tensor::new(&[f64::NAN, 1.0, 3e4, -3e4], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t = Tensor::new(&[0.0f64, 1.0, 0.0, 0.0], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for loss in LOSSES {
            let up = Tensor::ones(4, dtype, &dev).unwrap();
            let (l, g) = run_ours(loss, Reduction::None, &x, &t, &up);
            let what = format!("{dtype:?} {loss:?}");
            assert!(l[0].is_nan() && g[0].is_nan(), "{what} {l:?} {g:?}");
            assert!(
                l[1..].iter().chain(&g[1..]).all(|v| v.is_finite()),
                "{what} {l:?} {g:?}"
            );
            let (l, g) = run_ours(
                loss,
                Reduction::Mean,
                &x,
                &t,
                &Tensor::new(1f64, &dev).unwrap().to_dtype(dtype).unwrap(),
            );
            assert!(l[0].is_nan(), "{what}");
            assert!(
                g[0].is_nan() && g[1..].iter().all(|v| v.is_finite()),
                "{what} {g:?}"
            );
        }
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 4), DType::F32, &dev).unwrap();
    let check = |r: candle_core::Result<Tensor>, name: &str, needles: &[&str]| {
        check_error(Named::Anywhere(name), r, needles)
    };
    for (loss, name) in [
        (Loss::Smooth(1.0), "SmoothL1Loss"),
        (
            Loss::Balanced {
                alpha: 0.5,
                gamma: 1.5,
                beta: 1.0,
            },
            "BalancedL1Loss",
        ),
    ] {
        let f = |x: &Tensor, t: &Tensor| forward(loss, Reduction::Mean, x, t);
        assert!(f(&x, &x).is_ok());
        check(
            f(&x, &Tensor::zeros((4, 3), DType::F32, &dev).unwrap()),
            name,
            &["[4, 3]", "[4, 4]"],
        );
        check(
            f(&x, &Tensor::zeros(16, DType::F32, &dev).unwrap()),
            name,
            &["[16]"],
        );
        check(
            f(&x, &Tensor::zeros((4, 4), DType::F64, &dev).unwrap()),
            name,
            &["F64", "F32"],
        );
        let xi = x.to_dtype(DType::I64).unwrap();
        check(f(&xi, &xi), name, &["I64"]);
        check(
            forward(loss, Reduction::AvgFactor(-2.0), &x, &x),
            name,
            &["AvgFactor"],
        );
    }
    let s = |beta: f64| SmoothL1Loss {
        beta,
        reduction: Reduction::Mean,
    };
    check(s(-1.0).forward(&x, &x), "SmoothL1Loss", &["beta", "-1"]);
    check(
        s(f64::NAN).forward(&x, &x),
        "SmoothL1Loss",
        &["beta", "NaN"],
    );
    check(s(f64::INFINITY).forward(&x, &x), "SmoothL1Loss", &["beta"]);
    let b = |alpha: f64, gamma: f64, beta: f64| BalancedL1Loss {
        alpha,
        gamma,
        beta,
        reduction: Reduction::Mean,
    };
    check(
        b(0.5, 1.5, -0.5).forward(&x, &x),
        "BalancedL1Loss",
        &["beta", "-0.5"],
    );
    check(
        b(0.5, 1.5, f64::NAN).forward(&x, &x),
        "BalancedL1Loss",
        &["beta"],
    );
    check(
        b(0.0, 1.5, 1.0).forward(&x, &x),
        "BalancedL1Loss",
        &["alpha", "0"],
    );
    check(
        b(-0.5, 1.5, 1.0).forward(&x, &x),
        "BalancedL1Loss",
        &["alpha"],
    );
    check(
        b(0.5, -1.0, 1.0).forward(&x, &x),
        "BalancedL1Loss",
        &["gamma", "-1"],
    );
    check(
        b(0.5, 0.0, 1.0).forward(&x, &x),
        "BalancedL1Loss",
        &["gamma"],
    );
    check(
        b(1e-3, 2.0, 1.0).forward(&x, &x),
        "BalancedL1Loss",
        &["gamma / alpha"],
    );
    // β = 0 is allowed for both (smooth: L1; balanced: the linear branch everywhere).
    assert!(s(0.0).forward(&x, &x).is_ok());
    assert!(b(0.5, 1.5, 0.0).forward(&x, &x).is_ok());
}

#[test]
fn defaults_are_the_papers_values() {
    assert_eq!(
        SmoothL1Loss::default(),
        SmoothL1Loss {
            beta: 1.0,
            reduction: Reduction::Mean
        }
    );
    assert_eq!(
        BalancedL1Loss::default(),
        BalancedL1Loss {
            alpha: 0.5,
            gamma: 1.5,
            beta: 1.0,
            reduction: Reduction::Mean
        }
    );
    // Balanced L1 with the defaults: continuous value and gradient at |d| = β = 1.
    let dev = Device::Cpu;
    let x = Tensor::new(&[1.0 - 1e-9, 1.0 + 1e-9], &dev).unwrap();
    let t = x.zeros_like().unwrap();
    let (l, g) = run_ours(
        Loss::Balanced {
            alpha: 0.5,
            gamma: 1.5,
            beta: 1.0,
        },
        Reduction::None,
        &x,
        &t,
        &x.ones_like().unwrap(),
    );
    assert!((l[0] - l[1]).abs() < 1e-8, "{l:?}");
    assert!((g[0] - g[1]).abs() < 1e-8, "{g:?}");
    assert!((g[1] - 1.5).abs() < 1e-15);
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(15);
    let n = 200_003; // several chunks plus a ragged tail
    let (x, t) = make_inputs(&mut rng, n);
    let x = Tensor::from_vec(x, n, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::from_vec(t, n, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for loss in LOSSES {
            for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
                let up = unit_upstream(red, &[n], DType::F32, &dev);
                let (l, g) = loss_and_grad(&x, &up, |x| forward(loss, red, x, &t)).unwrap();
                push_bits(&mut bits, &l, &g);
            }
        }
        bits
    });
}

/// Training (a Var, scalar reduction): the forward also computes the gradient and the backward
/// only scales it (see `check_fused_equals_recomputed`).
#[test]
fn fused_forward_gradient_equals_the_recomputed_one_bitwise() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(77);
    // 5003 x 4 elements: two rayon chunks and partial blocks.
    let (x, t) = make_inputs(&mut rng, 5003 * 4);
    // Smooth L1 with β = 1/9 and 0, balanced L1 with the defaults and with β = 0.7.
    let losses = [
        LOSSES[1],
        LOSSES[2],
        LOSSES[3],
        Loss::Balanced {
            alpha: 0.5,
            gamma: 1.5,
            beta: 0.7,
        },
    ];
    for dtype in [DType::F32, DType::F16] {
        let xt = Tensor::new(x.as_slice(), &dev)
            .unwrap()
            .reshape((5003, 4))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let tt = Tensor::new(t.as_slice(), &dev)
            .unwrap()
            .reshape((5003, 4))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let var = candle_core::Var::from_tensor(&xt).unwrap();
        for loss in losses {
            for red in [Reduction::Mean, Reduction::Sum] {
                let what = format!("{loss:?} {red:?} {dtype:?}");
                check_fused_equals_recomputed(&what, &var, |x| forward(loss, red, x, &tt));
            }
        }
    }
}
