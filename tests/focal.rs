//! SigmoidFocalLoss: against an independent f64 reference, PyTorch fixtures, finite
//! differences, extreme logits, half precision, layouts, bad input and determinism.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: torchvision's formula transcribed literally in f64, with its
// derivative obtained by the chain rule on that formula.
// ---------------------------------------------------------------------------------------------

/// (loss, d loss / d x) of one element.
fn ref_elem(x: f64, t: f64, alpha: Option<f64>, gamma: f64) -> (f64, f64) {
    let p = 1.0 / (1.0 + (-x).exp());
    let one_minus_p = 1.0 / (1.0 + x.exp());
    let ce = t * softplus(-x) + (1.0 - t) * softplus(x); // -[t log p + (1-t) log(1-p)]
    let p_t = p * t + one_minus_p * (1.0 - t);
    let q = 1.0 - p_t; // computed below without cancellation
    let q = if q < 1e-3 {
        p * (1.0 - t) + one_minus_p * t
    } else {
        q
    };
    let modulating = q.powf(gamma);
    let a_t = alpha.map_or(1.0, |a| a * t + (1.0 - a) * (1.0 - t));
    let loss = a_t * modulating * ce;
    let dce = p * (1.0 - t) - one_minus_p * t; // p - t, kept accurate where p rounds to 1
    let dq = p * one_minus_p * (1.0 - 2.0 * t);
    let dmod = if gamma == 0.0 {
        0.0
    } else {
        gamma * q.powf(gamma - 1.0) * dq
    };
    (loss, a_t * (dce * modulating + ce * dmod))
}

#[derive(Clone)]
enum Tg {
    Dense(Vec<f64>),
    Labels(Vec<i64>),
}

/// Reference loss (reduced as `red`) and the gradient of `sum(loss · up)`.
#[derive(Clone, Copy)]
struct RefCase<'a> {
    n: usize,
    c: usize,
    alpha: Option<f64>,
    gamma: f64,
    red: Reduction,
    cw: Option<&'a [f64]>,
}

fn reference(x: &[f64], tg: &Tg, case: RefCase, up: &[f64]) -> LossGrad {
    let RefCase {
        n,
        c,
        alpha,
        gamma,
        red,
        cw,
    } = case;
    let mut per = vec![0.0; n * c];
    let mut dper = vec![0.0; n * c];
    let mut valid_rows = 0usize;
    for i in 0..n {
        let (w, ts): (f64, Vec<f64>) = match tg {
            Tg::Dense(t) => (1.0, t[i * c..(i + 1) * c].to_vec()),
            Tg::Labels(l) => {
                let k = l[i];
                if k < 0 {
                    continue;
                }
                let k = k as usize;
                let w = match cw {
                    Some(w) if k < w.len() => w[k],
                    _ => 1.0,
                };
                (w, (0..c).map(|j| if j == k { 1.0 } else { 0.0 }).collect())
            }
        };
        valid_rows += 1;
        for j in 0..c {
            let (l, d) = ref_elem(x[i * c + j], ts[j], alpha, gamma);
            per[i * c + j] = w * l;
            dper[i * c + j] = w * d;
        }
    }
    reduce_reference(per, dper, red, (valid_rows * c) as f64, up, 1)
}

fn make_targets(rng: &mut Rng, n: usize, c: usize, dense: bool, soft: bool) -> Tg {
    if dense {
        Tg::Dense(
            (0..n * c)
                .map(|_| {
                    if soft {
                        rng.uniform()
                    } else {
                        (rng.below(7) == 0) as u8 as f64
                    }
                })
                .collect(),
        )
    } else {
        // Classes, background (c) and ignored (-1) rows.
        Tg::Labels(
            (0..n)
                .map(|_| match rng.below(10) {
                    0 => -1,
                    1..=4 => c as i64,
                    _ => rng.below(c as u64) as i64,
                })
                .collect(),
        )
    }
}

fn targets_tensor(tg: &Tg, n: usize, c: usize, dtype: DType, dev: &Device) -> Tensor {
    match tg {
        Tg::Dense(t) => Tensor::from_vec(t.clone(), (n, c), dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        Tg::Labels(l) => Tensor::from_vec(l.clone(), n, dev).unwrap(),
    }
}

fn run_ours(x: &Tensor, targets: &Tensor, up: &Tensor, loss_fn: &SigmoidFocalLoss) -> LossGrad {
    run_loss(x, up, |x| loss_fn.forward(x, targets))
}

/// The upstream gradient of a loss of `[n, c]` (per element) or a scalar.
fn up_nc(up: &[f64], red: Reduction, n: usize, c: usize, dev: &Device) -> Tensor {
    up_tensor(up, red, &[n, c], dev)
}

#[test]
fn matches_f64_reference_over_shapes_reductions_targets_alpha_and_weights() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    for &(n, c) in &[(1usize, 1usize), (3, 423), (1000, 80)] {
        for &(dense, soft) in &[(true, false), (true, true), (false, false)] {
            for alpha in [Some(0.25), None] {
                for cw_len in [0usize, c, c + 1] {
                    if dense && cw_len > 0 {
                        continue;
                    }
                    for red in REDUCTIONS {
                        let gamma = [2.0, 0.5, 0.0, 1.5][rng.below(4) as usize];
                        let x = rng.vec_normal(n * c, 3.0);
                        let tg = make_targets(&mut rng, n, c, dense, soft);
                        let cw: Option<Vec<f64>> = (cw_len > 0)
                            .then(|| (0..cw_len).map(|_| 0.2 + rng.uniform()).collect());
                        let up = upstream(&mut rng, red, n * c);
                        let what = format!("{n}x{c} dense={dense} soft={soft} alpha={alpha:?} cw={cw_len} {red:?} gamma={gamma}");
                        // f64: the kernel's own rounding only; f32 with the crate's fast
                        // exp/log, against the reference at the f32-rounded inputs.
                        let ours = |dtype: DType| {
                            let loss_fn = SigmoidFocalLoss {
                                alpha,
                                gamma,
                                reduction: red,
                                class_weights: cw.as_ref().map(|w| {
                                    Tensor::from_vec(w.clone(), w.len(), &dev)
                                        .unwrap()
                                        .to_dtype(dtype)
                                        .unwrap()
                                }),
                            };
                            let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap();
                            let tt = targets_tensor(&tg, n, c, dtype, &dev);
                            run_ours(&xt, &tt, &up_nc(&up, red, n, c, &dev), &loss_fn)
                        };
                        let reference_at = |dtype: DType| {
                            let tr = match &tg {
                                Tg::Dense(t) => Tg::Dense(round_to_dtype(t, dtype)),
                                l => l.clone(),
                            };
                            let cwr = cw.as_deref().map(|w| round_to_dtype(w, dtype));
                            let case = RefCase {
                                n,
                                c,
                                alpha,
                                gamma,
                                red,
                                cw: cwr.as_deref(),
                            };
                            reference(&round_to_dtype(&x, dtype), &tr, case, &up)
                        };
                        check_against_reference(&what, &CLASSIFICATION_TOLS, ours, reference_at);
                    }
                }
            }
        }
    }
}

#[test]
fn u32_labels_equal_i64_labels() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(2);
    let (n, c) = (50, 9);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &dev).unwrap();
    let labels: Vec<u32> = (0..n).map(|_| rng.below(c as u64 + 1) as u32).collect();
    for red in REDUCTIONS {
        let f = SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        };
        let up = up_nc(&upstream(&mut rng, red, n * c), red, n, c, &dev);
        check_label_types_agree(&format!("{red:?}"), &labels, |l| run_ours(&x, l, &up, &f));
    }
}

#[test]
fn matches_torchvision_fixtures() {
    let dev = Device::Cpu;
    let cases = fixture_cases("sigmoid_focal.json");
    assert!(cases.len() > 50);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let x = fx_to_tensor(&case["logits"], DType::F64, &dev);
        let (n, c) = x.dims2().unwrap();
        let targets = if case["target_kind"] == "dense" {
            fx_to_tensor(&case["targets"], DType::F64, &dev)
        } else {
            Tensor::from_vec(fx_ints(&case["targets"]), n, &dev).unwrap()
        };
        let reduction = fx_reduction(&case["reduction"], &case["avg_factor"]);
        let loss_fn = SigmoidFocalLoss {
            alpha: case["alpha"].as_f64(),
            gamma: case["gamma"].as_f64().unwrap(),
            reduction,
            class_weights: (!case["class_weights"].is_null())
                .then(|| fx_to_tensor(&case["class_weights"], DType::F64, &dev)),
        };
        let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
        let got = run_ours(&x, &targets, &up, &loss_fn);
        let tol = Tol::abs(1e-12, 1e-9);
        let (lshape, _) = check_fixture(name, &got, case, tol, tol);
        assert_eq!(
            lshape.len(),
            if reduction == Reduction::None { 2 } else { 0 },
            "{name}"
        );
        assert_eq!(got.0.len(), fx_tensor(&case["loss"]).1.len(), "{name}");
        assert_eq!(n * c, got.1.len(), "{name}");
    }
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(3);
    let (n, c) = (6, 5);
    for (dense, gamma, red) in [
        (false, 2.0, Reduction::Sum),
        (false, 0.5, Reduction::Mean),
        (true, 1.5, Reduction::AvgFactor(3.0)),
        (true, 0.0, Reduction::None),
        (false, 5.0, Reduction::None),
    ] {
        let x = rng.vec_normal(n * c, 2.0);
        let tg = make_targets(&mut rng, n, c, dense, dense);
        let tt = targets_tensor(&tg, n, c, DType::F64, &dev);
        let up = upstream(&mut rng, red, n * c);
        let upt = up_nc(&up, red, n, c, &dev);
        let f = SigmoidFocalLoss {
            alpha: Some(0.3),
            gamma,
            reduction: red,
            class_weights: None,
        };
        let logits = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (n, c), &dev).unwrap();
        let (_, g) = run_ours(&logits(&x), &tt, &upt, &f);
        check_finite_differences(
            &format!("fd dense={dense} gamma={gamma} {red:?}"),
            &g,
            &x,
            FD,
            |xs| weighted_sum(f.forward(&logits(xs), &tt).unwrap(), &upt),
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
        for gamma in [0.0, 0.5, 2.0, 5.0] {
            // Every sign of logit against every target: saturated right and saturated wrong.
            let xs = [big, -big, big, -big, 0.0, big / 2.0];
            let x = Tensor::new(&xs, &dev)
                .unwrap()
                .reshape((3, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let xr = to_f64_vec(&x); // the logits as representable in dtype
            for red in [Reduction::None, Reduction::Sum] {
                let labels = Tensor::new(&[0i64, 1, 2], &dev).unwrap(); // 2 = background
                let dense_t = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
                let dense = Tensor::new(&dense_t, &dev)
                    .unwrap()
                    .reshape((3, 2))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for (tt, tg) in [
                    (labels, Tg::Labels(vec![0, 1, 2])),
                    (dense, Tg::Dense(dense_t.to_vec())),
                ] {
                    let f = SigmoidFocalLoss {
                        alpha: Some(0.25),
                        gamma,
                        reduction: red,
                        class_weights: None,
                    };
                    let up = upstream(&mut Rng::new(4), red, 6);
                    let upt = up_nc(&up, red, 3, 2, &dev).to_dtype(dtype).unwrap();
                    let got = run_ours(&x, &tt, &upt, &f);
                    let case = RefCase {
                        n: 3,
                        c: 2,
                        alpha: Some(0.25),
                        gamma,
                        red,
                        cw: None,
                    };
                    let want = reference(&xr, &tg, case, &to_f64_vec(&upt));
                    let extreme = Extreme {
                        dtype,
                        f32_rtol: 1e-6,
                        loss_relative: false,
                    };
                    check_extreme(
                        &format!("{dtype:?} gamma={gamma} {red:?}"),
                        extreme,
                        &got,
                        &want,
                    );
                }
            }
        }
        // NaN in -> NaN out (loss element, sum, and gradient element).
        let x = Tensor::new(&[f64::NAN, 1.0], &dev)
            .unwrap()
            .reshape((1, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let labels = Tensor::new(&[1i64], &dev).unwrap();
        let none = SigmoidFocalLoss {
            reduction: Reduction::None,
            ..Default::default()
        };
        let l = to_f64_vec(&none.forward(&x, &labels).unwrap());
        assert!(l[0].is_nan() && l[1].is_finite(), "{dtype:?} {l:?}");
        let sum = SigmoidFocalLoss {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let up = Tensor::new(1.0f64, &dev).unwrap();
        let (l, g) = run_ours(&x, &labels, &up, &sum);
        assert!(l[0].is_nan(), "{dtype:?}");
        assert!(g[0].is_nan() && g[1].is_finite(), "{dtype:?} {g:?}");
    }
}

/// The formula evaluated naively in the half type (every intermediate rounded), as a user
/// composing half-precision tensor ops would get it.
fn naive_half(x: f64, t: f64, alpha: f64, gamma: f64, d: DType) -> (f64, f64) {
    let rh = round_half;
    let p = rh(1.0 / rh(1.0 + rh((-x).exp(), d), d), d);
    let omp = rh(1.0 - p, d);
    let ce = rh(
        -(rh(t * rh(p.ln(), d), d) + rh((1.0 - t) * rh(omp.ln(), d), d)),
        d,
    );
    let p_t = rh(rh(p * t, d) + rh(omp * (1.0 - t), d), d);
    let q = rh(1.0 - p_t, d);
    let m = rh(q.powf(gamma), d);
    let a_t = rh(alpha * t + (1.0 - alpha) * (1.0 - t), d);
    let loss = rh(a_t * rh(m * ce, d), d);
    let dq = rh(rh(p * omp, d) * (1.0 - 2.0 * t), d);
    let dm = rh(gamma * rh(rh(q.powf(gamma - 1.0), d) * dq, d), d);
    let g = rh(a_t * rh(rh(rh(p - t, d) * m, d) + rh(ce * dm, d), d), d);
    (loss, g)
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(5);
    let (n, c) = (64, 40);
    for dtype in [DType::F16, DType::BF16] {
        let x = half_logits(&mut rng, n * c, dtype);
        let labels: Vec<i64> = (0..n).map(|_| rng.below(c as u64 + 1) as i64).collect();
        let tg = Tg::Labels(labels.clone());
        let up = vec![1.0; n * c];
        let case = RefCase {
            n,
            c,
            alpha: Some(0.25),
            gamma: 2.0,
            red: Reduction::None,
            cw: None,
        };
        let (rl, rg) = reference(&x, &tg, case, &up);
        let f = SigmoidFocalLoss {
            reduction: Reduction::None,
            ..Default::default()
        };
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
        let upt = Tensor::ones((n, c), dtype, &dev).unwrap();
        let (l, g) = run_ours(&xt, &lt, &upt, &f);
        let mut errors = HalfErrors::default();
        for (i, &label) in labels.iter().enumerate() {
            for j in 0..c {
                let k = i * c + j;
                let t = (label == j as i64) as u8 as f64;
                let (nl, ng) = naive_half(x[k], t, 0.25, 2.0, dtype);
                errors.loss(l[k], nl, rl[k]);
                errors.grad(g[k], ng, rg[k]);
            }
        }
        errors.check(&format!("{dtype:?}"));
        let fs = SigmoidFocalLoss {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let s = to_f64_vec(&fs.forward(&xt, &lt).unwrap())[0];
        check_accumulated(&format!("{dtype:?}"), "sum", s, rl.iter().sum());
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(6);
    let (n, c) = (37, 11);
    // Logits as the t() of a transposed buffer, labels as a strided column of [N, 2].
    let (x_strided, lab_strided) = strided_logits_and_labels(&mut rng, n, c, c as u64 + 2);
    let x_contig = x_strided.contiguous().unwrap();
    let lab_contig = lab_strided.contiguous().unwrap();
    // Dense targets from a narrow of a wider buffer, and from a broadcast row.
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
    assert!(!t_narrow.is_contiguous() && !t_bcast.is_contiguous());
    for red in REDUCTIONS {
        let f = SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        };
        let up = up_nc(&upstream(&mut rng, red, n * c), red, n, c, &dev)
            .to_dtype(DType::F32)
            .unwrap();
        // The strided logits with each target form, and a row-narrowed (offset) logits view.
        let cases = [
            Views::contiguous(&[&x_strided, &lab_strided]).and(&up),
            Views::contiguous(&[&x_strided, &t_narrow]).and(&up),
            Views::contiguous(&[&x_strided, &t_bcast]).and(&up),
            Views::offset_rows(&[&x_contig, &lab_contig], 5, 20).and(&up_rows(&up, red, 5, 20)),
        ];
        check_views_equal_copies(&format!("{red:?}"), &cases, |v| {
            run_ours(&v[0], &v[1], &v[2], &f)
        });
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let ok_labels = Tensor::new(&[0i64, 80, -1, 3], &dev).unwrap();
    let f = SigmoidFocalLoss::default();
    let named = Named::Anywhere("SigmoidFocalLoss");
    let check = |r: candle_core::Result<Tensor>, needles: &[&str]| check_error(named, r, needles);
    assert!(f.forward(&x, &ok_labels).is_ok());
    // Label out of range, in both integer types; -2 is not the ignore value.
    check_label_errors(
        named,
        &[
            BadLabels::I64(&[0, 83, 1, 2], "label 83 out of range 0..=80"),
            BadLabels::I64(&[0, -2, 1, 2], "label -2"),
            BadLabels::U32(&[0, 81, 1, 2], "label 81"),
        ],
        |t| f.forward(&x, t),
    );
    // Out-of-range labels are also caught in the None reduction.
    let fnone = SigmoidFocalLoss {
        reduction: Reduction::None,
        ..Default::default()
    };
    check_label_errors(named, &[BadLabels::I64(&[0, 1, 2, 99], "label 99")], |t| {
        fnone.forward(&x, t)
    });
    // Shapes.
    check(
        f.forward(&x, &Tensor::new(&[0i64, 1, 2], &dev).unwrap()),
        &["[4]", "[3]"],
    );
    check(
        f.forward(&x, &Tensor::zeros((4, 79), DType::F32, &dev).unwrap()),
        &["[4, 80]", "[4, 79]"],
    );
    check(
        f.forward(&Tensor::zeros(80, DType::F32, &dev).unwrap(), &ok_labels),
        &["[N, C]"],
    );
    // Dtypes: labels, logits, dense targets.
    check(
        f.forward(&x, &Tensor::new(&[0u8, 1, 2, 3], &dev).unwrap()),
        &["U8"],
    );
    check(
        f.forward(&x.to_dtype(DType::I64).unwrap(), &ok_labels),
        &["I64"],
    );
    check(
        f.forward(&x, &Tensor::zeros((4, 80), DType::F64, &dev).unwrap()),
        &["F64"],
    );
    // Class weights: length, dtype, with dense targets.
    let cw = |len: usize, dt: DType| Some(Tensor::ones(len, dt, &dev).unwrap());
    let fw = |w| SigmoidFocalLoss {
        class_weights: w,
        ..Default::default()
    };
    check(
        fw(cw(79, DType::F32)).forward(&x, &ok_labels),
        &["length 79", "C = 80"],
    );
    check(
        fw(cw(82, DType::F32)).forward(&x, &ok_labels),
        &["length 82"],
    );
    check(
        fw(cw(80, DType::F64)).forward(&x, &ok_labels),
        &["class_weights", "F64"],
    );
    check(
        fw(cw(80, DType::F32)).forward(&x, &Tensor::zeros((4, 80), DType::F32, &dev).unwrap()),
        &["dense"],
    );
    assert!(fw(cw(81, DType::F32)).forward(&x, &ok_labels).is_ok());
    // Hyper-parameters.
    let fg = |g: f64| SigmoidFocalLoss {
        gamma: g,
        ..Default::default()
    };
    check(fg(-1.0).forward(&x, &ok_labels), &["gamma", "-1"]);
    check(fg(f64::NAN).forward(&x, &ok_labels), &["gamma"]);
    check(
        SigmoidFocalLoss {
            alpha: Some(1.5),
            ..Default::default()
        }
        .forward(&x, &ok_labels),
        &["alpha"],
    );
    check(
        SigmoidFocalLoss {
            reduction: Reduction::AvgFactor(0.0),
            ..Default::default()
        }
        .forward(&x, &ok_labels),
        &["AvgFactor"],
    );
}

#[test]
fn empty_and_all_ignored_batches() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
    let labels = Tensor::zeros(0, DType::I64, &dev).unwrap();
    check_empty_batch(&[0, 5], |red| {
        SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        }
        .forward(&x, &labels)
        .unwrap()
    });
    let x = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
    let ignored = Tensor::new(&[-1i64, -1, -1], &dev).unwrap();
    let up = Tensor::new(1f32, &dev).unwrap();
    check_all_ignored(&run_ours(&x, &ignored, &up, &SigmoidFocalLoss::default()));
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    let (n, c) = (5000, 80);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 3.0), (n, c), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let labels = Tensor::from_vec(
        (0..n)
            .map(|_| rng.below(c as u64 + 2) as i64 - 1)
            .collect::<Vec<_>>(),
        n,
        &dev,
    )
    .unwrap();
    let dense = Tensor::from_vec(
        (0..n * c).map(|_| rng.uniform()).collect::<Vec<_>>(),
        (n, c),
        &dev,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
            let f = SigmoidFocalLoss {
                reduction: red,
                ..Default::default()
            };
            let up = unit_upstream(red, &[n, c], DType::F32, &dev);
            for t in [&labels, &dense] {
                let (l, g) = loss_and_grad(&x, &up, |x| f.forward(x, t)).unwrap();
                push_bits(&mut bits, &l, &g);
            }
        }
        bits
    });
}

#[test]
fn fused_training_pass_equals_loss_only_and_recomputed_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(91);
    let (n, c) = (300, 7);
    for dtype in [DType::F32, DType::F16, DType::F64] {
        let xv = rng.vec_normal(n * c, 3.0);
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(xv, (n, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        for dense in [false, true] {
            let tg = make_targets(&mut rng, n, c, dense, false);
            let t = targets_tensor(&tg, n, c, dtype, &dev);
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::AvgFactor(17.0)] {
                let f = SigmoidFocalLoss {
                    reduction,
                    alpha: Some(0.25),
                    ..Default::default()
                };
                let what = format!("{dtype:?} dense={dense} {reduction:?}");
                check_fused_equals_recomputed(&what, &x, |x| f.forward(x, &t));
            }
        }
    }
}
