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

/// (loss, d loss / d pred) of one element.
fn ref_elem(loss: Loss, x: f64, t: f64) -> (f64, f64) {
    let d = x - t;
    let ad = d.abs();
    // torch: d|d|/dd = sign(d), 0 at d = 0.
    let sgn = if d > 0.0 {
        1.0
    } else if d < 0.0 {
        -1.0
    } else {
        0.0
    };
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
fn reference(loss: Loss, x: &[f64], t: &[f64], red: Reduction, up: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let per: Vec<(f64, f64)> = x
        .iter()
        .zip(t)
        .map(|(a, b)| ref_elem(loss, *a, *b))
        .collect();
    let sum: f64 = per.iter().map(|p| p.0).sum();
    let n = x.len();
    let scale = match red {
        Reduction::None | Reduction::Sum => 1.0,
        Reduction::Mean => {
            if n > 0 {
                1.0 / n as f64
            } else {
                0.0
            }
        }
        Reduction::AvgFactor(f) => 1.0 / f,
    };
    match red {
        Reduction::None => (
            per.iter().map(|p| p.0).collect(),
            per.iter().zip(up).map(|(p, u)| p.1 * u).collect(),
        ),
        _ => (
            vec![sum * scale],
            per.iter().map(|p| p.1 * scale * up[0]).collect(),
        ),
    }
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

fn run_ours(
    loss: Loss,
    red: Reduction,
    x: &Tensor,
    t: &Tensor,
    up: &Tensor,
) -> (Vec<f64>, Vec<f64>) {
    let (l, g) = loss_and_grad(x, up, |x| forward(loss, red, x, t)).expect("forward/backward");
    assert_eq!(g.dims(), x.dims());
    if red == Reduction::None {
        assert_eq!(l.dims(), x.dims());
    } else {
        assert_eq!(l.rank(), 0);
    }
    (to_f64_vec(&l), to_f64_vec(&g))
}

const REDUCTIONS: [Reduction; 4] = [
    Reduction::None,
    Reduction::Sum,
    Reduction::Mean,
    Reduction::AvgFactor(7.5),
];

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

fn upstream(rng: &mut Rng, red: Reduction, n: usize) -> Vec<f64> {
    if red == Reduction::None {
        rng.vec_normal(n, 1.0)
    } else {
        vec![0.7]
    }
}

fn up_tensor(up: &[f64], red: Reduction, shape: &[usize], dev: &Device) -> Tensor {
    if red == Reduction::None {
        Tensor::from_vec(up.to_vec(), shape, dev).unwrap()
    } else {
        Tensor::new(up[0], dev).unwrap()
    }
}

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

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0f64, |m, x| m.max(x.abs()))
}

#[test]
fn matches_f64_reference_over_shapes_reductions_and_parameters() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
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
                let (rl, rg) = reference(loss, &x, &t, red, &up);
                let xt = Tensor::from_vec(x.clone(), shape.as_slice(), &dev).unwrap();
                let tt = Tensor::from_vec(t.clone(), shape.as_slice(), &dev).unwrap();
                let upt = up_tensor(&up, red, &shape, &dev);
                let (l, g) = run_ours(loss, red, &xt, &tt, &upt);
                assert_close(&format!("loss f64 {what}"), &l, &rl, 1e-12, 1e-10);
                assert_close(&format!("grad f64 {what}"), &g, &rg, 1e-14, 1e-10);
                // f32: reference evaluated at the f32-rounded inputs.
                let x32 = xt.to_dtype(DType::F32).unwrap();
                let t32 = tt.to_dtype(DType::F32).unwrap();
                let (l, g) = run_ours(loss, red, &x32, &t32, &upt.to_dtype(DType::F32).unwrap());
                let xr = to_f64_vec(&x32);
                let tr = to_f64_vec(&t32);
                let upr = to_f64_vec(&upt.to_dtype(DType::F32).unwrap());
                let (rl, rg) = reference(loss, &xr, &tr, red, &upr);
                // The loss of an element is ~|d|; f32 rounding of d costs ~1e-7 of the inputs.
                let lscale = max_abs(&rl).max(1e-3);
                assert_close(&format!("loss f32 {what}"), &l, &rl, 1e-6 * lscale, 2e-6);
                let gscale = max_abs(&rg).max(1e-9);
                assert_close(&format!("grad f32 {what}"), &g, &rg, 1e-6 * gscale, 2e-6);
            }
        }
    }
}

fn fixture_reduction(case: &serde_json::Value) -> Reduction {
    match case["reduction"].as_str().unwrap() {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        r => panic!("unknown reduction {r}"),
    }
}

fn check_fixture_case(case: &serde_json::Value, loss: Loss) {
    let dev = Device::Cpu;
    let name = case["name"].as_str().unwrap();
    let x = fx_to_tensor(&case["pred"], DType::F64, &dev);
    let t = fx_to_tensor(&case["target"], DType::F64, &dev);
    let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
    let red = fixture_reduction(case);
    let (l, g) = run_ours(loss, red, &x, &t, &up);
    let (lshape, lexp) = fx_tensor(&case["loss"]);
    if red == Reduction::None {
        assert_eq!(lshape, x.dims(), "{name}");
    } else {
        assert!(lshape.is_empty(), "{name}");
    }
    assert_close(&format!("{name} loss"), &l, &lexp, 1e-13, 1e-11);
    let (gshape, gexp) = fx_tensor(&case["grad"]);
    assert_eq!(gshape, x.dims(), "{name}");
    assert_close(&format!("{name} grad"), &g, &gexp, 1e-14, 1e-11);
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
            let (_, g) = run_ours(
                loss,
                red,
                &Tensor::from_vec(x.clone(), &shape, &dev).unwrap(),
                &tt,
                &upt,
            );
            let fd = finite_diff(&x, 1e-6, |xs| {
                let xt = Tensor::from_vec(xs.to_vec(), &shape, &dev).unwrap();
                let l = forward(loss, red, &xt, &tt).unwrap();
                (l * &upt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            });
            assert_close(&format!("fd {loss:?} {red:?}"), &g, &fd, 1e-7, 1e-6);
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
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
    for loss in LOSSES {
        for red in REDUCTIONS {
            let (l, g) = loss_and_grad(&x, &Tensor::new(1f32, &dev).unwrap(), |x| {
                let l = forward(loss, red, x, &x.zeros_like()?)?;
                if red == Reduction::None {
                    assert_eq!(l.dims(), &[0, 4]);
                    l.sum_all()
                } else {
                    Ok(l)
                }
            })
            .unwrap();
            assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0, "{loss:?} {red:?}");
            assert_eq!(g.dims(), &[0, 4]);
        }
    }
}

/// Rounds to the half type of `dtype`.
fn rh(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => half::bf16::from_f64(v).to_f64(),
    }
}

/// The formula evaluated naively in the half type (every intermediate rounded), as a user
/// composing half-precision tensor ops would get it.
fn naive_half(loss: Loss, x: f64, t: f64, dt: DType) -> (f64, f64) {
    let r = |v: f64| rh(v, dt);
    let d = r(x - t);
    let ad = d.abs();
    let sgn = if d > 0.0 {
        1.0
    } else if d < 0.0 {
        -1.0
    } else {
        0.0
    };
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
        for loss in [
            Loss::Smooth(1.0),
            Loss::Smooth(1.0 / 9.0),
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
        ] {
            let (x, t) = make_inputs(&mut rng, n);
            let x: Vec<f64> = x.iter().map(|v| rh(*v, dtype)).collect();
            let t: Vec<f64> = t.iter().map(|v| rh(*v, dtype)).collect();
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
            let (mut eol, mut enl, mut eog, mut eng) = (0f64, 0f64, 0f64, 0f64);
            for k in 0..n {
                let (nl, ng) = naive_half(loss, x[k], t[k], dtype);
                eol = eol.max((l[k] - rl[k]).abs());
                enl = enl.max((nl - rl[k]).abs());
                eog = eog.max((g[k] - rg[k]).abs());
                eng = eng.max((ng - rg[k]).abs());
            }
            let what = format!("{dtype:?} {loss:?}");
            assert!(enl > 0.0 && eng > 0.0, "{what}");
            assert!(eol <= 2.0 * enl, "{what} loss: ours {eol} naive {enl}");
            assert!(eog <= 2.0 * eng, "{what} grad: ours {eog} naive {eng}");
            // The scalar sum accumulates in f32 and f64: far better than half would allow.
            let s = to_f64_vec(&forward(loss, Reduction::Sum, &xt, &tt).unwrap())[0];
            let rs: f64 = rl.iter().sum();
            assert!((s - rs).abs() <= 4e-3 * rs.abs(), "{what} sum {s} vs {rs}");
        }
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(14);
    let n = 53;
    // [N, 4] as the t() of a [4, N] buffer.
    let xt = Tensor::from_vec(rng.vec_normal(4 * n, 2.0), (4, n), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let x_strided = xt.t().unwrap();
    assert!(!x_strided.is_contiguous());
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
    for loss in LOSSES {
        for red in REDUCTIONS {
            let up = up_tensor(&upstream(&mut rng, red, 4 * n), red, &[n, 4], &dev)
                .to_dtype(DType::F32)
                .unwrap();
            for t in [&t_narrow, &t_bcast] {
                assert!(!t.is_contiguous());
                assert_eq!(
                    run_ours(loss, red, &x_strided, t, &up),
                    run_ours(loss, red, &x_contig, &t.contiguous().unwrap(), &up),
                    "{loss:?} {red:?}"
                );
            }
            // A row-narrowed (offset) view.
            let xn = x_contig.narrow(0, 5, 20).unwrap();
            let tn = t_narrow.narrow(0, 5, 20).unwrap();
            let upn = if red == Reduction::None {
                up.narrow(0, 5, 20).unwrap()
            } else {
                up.clone()
            };
            assert_eq!(
                run_ours(loss, red, &xn, &tn, &upn),
                run_ours(loss, red, &xn.copy().unwrap(), &tn.copy().unwrap(), &upn)
            );
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
        let e = err_of(r);
        assert!(e.contains(name), "{e}");
        for nd in needles {
            assert!(e.contains(nd), "`{e}` lacks `{nd}`");
        }
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
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut bits = Vec::new();
            for loss in LOSSES {
                for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
                    let up = if red == Reduction::None {
                        Tensor::ones(n, DType::F32, &dev).unwrap()
                    } else {
                        Tensor::new(1f32, &dev).unwrap()
                    };
                    let (l, g) = loss_and_grad(&x, &up, |x| forward(loss, red, x, &t)).unwrap();
                    for v in to_f64_vec(&l).into_iter().chain(to_f64_vec(&g)) {
                        bits.push(v.to_bits());
                    }
                }
            }
            bits
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

/// Training (a Var, scalar reduction): the forward also computes the gradient and the backward
/// only scales it (see `check_fused_equals_recomputed`).
#[test]
fn fused_forward_gradient_equals_the_recomputed_one_bitwise() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(77);
    // 5003 x 4 elements: two rayon chunks and partial blocks.
    let (x, t) = make_inputs(&mut rng, 5003 * 4);
    let losses = [
        Loss::Smooth(1.0 / 9.0),
        Loss::Smooth(0.0),
        Loss::Balanced {
            alpha: 0.5,
            gamma: 1.5,
            beta: 1.0,
        },
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
