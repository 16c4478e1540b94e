//! GhmcLoss: against an independent f64 reference (mmdet's algorithm, bin by bin), the
//! PyTorch port fixtures (momentum over consecutive calls included), finite differences,
//! extreme logits, half precision, layouts, bad input, running-state rules and determinism.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{GhmcLoss, Reduction};
use common::*;
use std::cell::RefCell;

// ---------------------------------------------------------------------------------------------
// Independent reference: mmdet's GHMC written bin by bin in plain f64.
// ---------------------------------------------------------------------------------------------

struct RefGhmc {
    bins: usize,
    momentum: f64,
    acc_sum: Vec<f64>,
}

impl RefGhmc {
    fn new(bins: usize, momentum: f64) -> Self {
        RefGhmc {
            bins,
            momentum,
            acc_sum: vec![0.0; bins],
        }
    }

    /// Loss (reduced) and gradient of sum(loss · up); `t` dense targets, `valid` per element.
    fn call(
        &mut self,
        x: &[f64],
        t: &[f64],
        valid: &[bool],
        red: Reduction,
        up: &[f64],
    ) -> LossGrad {
        let bins = self.bins;
        let mut edges: Vec<f64> = (0..=bins)
            .map(|i| (i as f32 / bins as f32) as f64)
            .collect();
        edges[bins] = (1f32 + 1e-6f32) as f64;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let g: Vec<f64> = x.iter().zip(t).map(|(v, t)| (sig(*v) - t).abs()).collect();
        let tot = (valid.iter().filter(|v| **v).count() as f64).max(1.0);
        let mut w = vec![0.0; x.len()];
        let mut nonempty = 0;
        for b in 0..bins {
            let inds: Vec<usize> = (0..x.len())
                .filter(|&e| valid[e] && g[e] >= edges[b] && g[e] < edges[b + 1])
                .collect();
            if inds.is_empty() {
                continue;
            }
            let num = inds.len() as f64;
            let wb = if self.momentum > 0.0 {
                self.acc_sum[b] = self.momentum * self.acc_sum[b] + (1.0 - self.momentum) * num;
                tot / self.acc_sum[b]
            } else {
                tot / num
            };
            for e in inds {
                w[e] = wb;
            }
            nonempty += 1;
        }
        if nonempty > 0 {
            for v in &mut w {
                *v /= nonempty as f64;
            }
        }
        let per: Vec<f64> = (0..x.len())
            .map(|e| w[e] * (t[e] * softplus(-x[e]) + (1.0 - t[e]) * softplus(x[e])))
            .collect();
        // σ(x) - t, evaluated without cancellation where σ(x) rounds to t = 1.
        let dper: Vec<f64> = (0..x.len())
            .map(|e| w[e] * (sig(x[e]) * (1.0 - t[e]) - sig(-x[e]) * t[e]))
            .collect();
        reduce_reference(per, dper, red, tot, up, 1)
    }
}

/// Labels -> (dense one-hot targets, per-element validity).
fn expand(labels: &[i64], c: usize) -> (Vec<f64>, Vec<bool>) {
    let mut t = vec![0.0; labels.len() * c];
    let mut v = vec![false; labels.len() * c];
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 {
            for j in 0..c {
                v[i * c + j] = true;
            }
            if (l as usize) < c {
                t[i * c + l as usize] = 1.0;
            }
        }
    }
    (t, v)
}

fn make_labels(rng: &mut Rng, n: usize, c: usize) -> Vec<i64> {
    (0..n)
        .map(|_| match rng.below(10) {
            0 => -1,
            1..=4 => c as i64,
            _ => rng.below(c as u64) as i64,
        })
        .collect()
}

/// `GhmcLoss` has private state: built from `default()` with the public fields set.
fn ghmc(bins: usize, momentum: f64, reduction: Reduction) -> GhmcLoss {
    let mut f = GhmcLoss::default();
    f.bins = bins;
    f.momentum = momentum;
    f.reduction = reduction;
    f
}

fn run_ours(x: &Tensor, t: &Tensor, up: &Tensor, f: &mut GhmcLoss) -> LossGrad {
    // run_loss takes an Fn; forward needs &mut for the running histogram.
    let f = RefCell::new(f);
    run_loss(x, up, |x| f.borrow_mut().forward(x, t))
}

/// The upstream gradient of a loss of `[n, c]` (per element) or a scalar.
fn up_nc(up: &[f64], red: Reduction, n: usize, c: usize, dev: &Device) -> Tensor {
    up_tensor(up, red, &[n, c], dev)
}

#[test]
fn matches_f64_reference_over_shapes_reductions_bins_targets_and_momentum() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(31);
    for &(n, c) in &[(1usize, 1usize), (7, 3), (300, 21)] {
        for dense in [false, true] {
            for (bins, mom) in [(1, 0.0), (10, 0.0), (30, 0.0), (10, 0.75), (7, 0.5)] {
                for red in REDUCTIONS {
                    let mut r64 = RefGhmc::new(bins, mom);
                    let mut r32 = RefGhmc::new(bins, mom);
                    let mut f64l = ghmc(bins, mom, red);
                    let mut f32l = f64l.clone();
                    // Three consecutive calls: the running histogram carries over.
                    for step in 0..3 {
                        let x = rng.vec_normal(n * c, 3.0);
                        let (t, valid, tt) = if dense {
                            let t: Vec<f64> = (0..n * c)
                                .map(|_| (rng.below(4) == 0) as u8 as f64)
                                .collect();
                            let tt = Tensor::from_vec(t.clone(), (n, c), &dev).unwrap();
                            (t, vec![true; n * c], tt)
                        } else {
                            let l = make_labels(&mut rng, n, c);
                            let (t, v) = expand(&l, c);
                            (t, v, Tensor::from_vec(l, n, &dev).unwrap())
                        };
                        let up = upstream(&mut rng, red, n * c);
                        let upt = up_nc(&up, red, n, c, &dev);
                        let what = format!(
                            "{n}x{c} dense={dense} bins={bins} m={mom} {red:?} step {step}"
                        );
                        let xt = Tensor::from_vec(x.clone(), (n, c), &dev).unwrap();
                        // Each dtype with its own running state, loss and reference alike.
                        let ours = |dtype: DType| {
                            if dtype == DType::F64 {
                                return run_ours(&xt, &tt, &upt, &mut f64l);
                            }
                            let tt32 = if dense {
                                tt.to_dtype(DType::F32).unwrap()
                            } else {
                                tt.clone()
                            };
                            run_ours(
                                &xt.to_dtype(DType::F32).unwrap(),
                                &tt32,
                                &upt.to_dtype(DType::F32).unwrap(),
                                &mut f32l,
                            )
                        };
                        let reference_at = |dtype: DType| {
                            let r = if dtype == DType::F64 {
                                &mut r64
                            } else {
                                &mut r32
                            };
                            r.call(&round_to_dtype(&x, dtype), &t, &valid, red, &up)
                        };
                        check_against_reference(&what, &CLASSIFICATION_TOLS, ours, reference_at);
                    }
                }
            }
        }
    }
}

#[test]
fn matches_mmdet_port_fixtures_including_momentum_over_two_calls() {
    let dev = Device::Cpu;
    let cases = fixture_cases("ghmc.json");
    assert!(cases.len() >= 35);
    let mut two_call_cases = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut f = ghmc(
            case["bins"].as_u64().unwrap() as usize,
            case["momentum"].as_f64().unwrap(),
            Reduction::Mean,
        );
        let steps = case["steps"].as_array().unwrap();
        two_call_cases += (steps.len() == 2) as usize;
        for (si, step) in steps.iter().enumerate() {
            f.reduction = fx_reduction(&case["reduction"], &step["avg_factor"]);
            let x = fx_to_tensor(&step["logits"], DType::F64, &dev);
            let (n, c) = x.dims2().unwrap();
            let t = if case["target_kind"] == "dense" {
                fx_to_tensor(&step["targets"], DType::F64, &dev)
            } else {
                Tensor::from_vec(fx_ints(&step["targets"]), n, &dev).unwrap()
            };
            let up = fx_to_tensor(&step["upstream"], DType::F64, &dev);
            let got = run_ours(&x, &t, &up, &mut f);
            let tol = Tol::abs(1e-12, 1e-9);
            check_fixture(&format!("{name} step {si}"), &got, step, tol, tol);
            assert_eq!(got.1.len(), n * c);
        }
    }
    assert!(two_call_cases >= 6);
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(32);
    let (n, c) = (6, 5);
    for (dense, bins, mom, red) in [
        (false, 10, 0.0, Reduction::Sum),
        (false, 30, 0.75, Reduction::Mean),
        (true, 3, 0.0, Reduction::AvgFactor(3.0)),
        (true, 10, 0.5, Reduction::None),
    ] {
        let x = rng.vec_normal(n * c, 2.0);
        let tt = if dense {
            Tensor::from_vec(
                (0..n * c)
                    .map(|_| (rng.below(3) == 0) as u8 as f64)
                    .collect::<Vec<_>>(),
                (n, c),
                &dev,
            )
            .unwrap()
        } else {
            Tensor::from_vec(make_labels(&mut rng, n, c), n, &dev).unwrap()
        };
        let upt = up_nc(&upstream(&mut rng, red, n * c), red, n, c, &dev);
        let f = ghmc(bins, mom, red);
        let logits = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (n, c), &dev).unwrap();
        let (_, g) = run_ours(&logits(&x), &tt, &upt, &mut f.clone());
        // Each evaluation from the same (fresh) state; the bin weights are constants.
        let fd = FdCheck {
            nonzero: true,
            ..FD
        };
        check_finite_differences(
            &format!("fd dense={dense} bins={bins} {red:?}"),
            &g,
            &x,
            fd,
            |xs| weighted_sum(f.clone().forward(&logits(xs), &tt).unwrap(), &upt),
        );
    }
}

#[test]
fn backward_uses_the_weights_of_its_own_forward() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(33);
    let (n, c) = (40, 6);
    let mut f = ghmc(10, 0.75, Reduction::Sum);
    let mut r = RefGhmc::new(10, 0.75);
    let x1 = rng.vec_normal(n * c, 3.0);
    let l1 = make_labels(&mut rng, n, c);
    let var = candle_core::Var::from_tensor(&Tensor::from_vec(x1.clone(), (n, c), &dev).unwrap())
        .unwrap();
    let loss1 = f
        .forward(
            var.as_tensor(),
            &Tensor::from_vec(l1.clone(), n, &dev).unwrap(),
        )
        .unwrap();
    let (t1, v1) = expand(&l1, c);
    let (_, rg1) = r.call(&x1, &t1, &v1, Reduction::Sum, &[1.0]);
    // A second forward moves the running histogram on ...
    let x2 = rng.vec_normal(n * c, 3.0);
    let l2 = make_labels(&mut rng, n, c);
    f.forward(
        &Tensor::from_vec(x2, (n, c), &dev).unwrap(),
        &Tensor::from_vec(l2, n, &dev).unwrap(),
    )
    .unwrap();
    // ... but the first loss still differentiates with its own weights.
    let g1 = loss1.backward().unwrap();
    let g1 = to_f64_vec(g1.get(&var).unwrap());
    assert_close("first backward", &g1, &rg1, 1e-13, 1e-10);
}

#[test]
fn running_histogram_is_resized_when_bins_change() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(34);
    let (n, c) = (30, 4);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 3.0), (n, c), &dev).unwrap();
    let l = Tensor::from_vec(make_labels(&mut rng, n, c), n, &dev).unwrap();
    let mut f = ghmc(10, 0.5, Reduction::Mean);
    let first10 = to_f64_vec(&f.forward(&x, &l).unwrap());
    f.forward(&x, &l).unwrap();
    // Changing bins restarts the running histogram from zeros: same value as a fresh loss.
    f.bins = 7;
    let a = to_f64_vec(&f.forward(&x, &l).unwrap());
    let mut fresh = ghmc(7, 0.5, Reduction::Mean);
    assert_eq!(a, to_f64_vec(&fresh.forward(&x, &l).unwrap()));
    // And with the same inputs a second call differs from the first (the state moved on).
    let mut g = ghmc(10, 0.5, Reduction::Mean);
    assert_eq!(first10, to_f64_vec(&g.forward(&x, &l).unwrap()));
    assert_ne!(first10, to_f64_vec(&g.forward(&x, &l).unwrap()));
}

#[test]
fn extreme_logits_give_finite_correct_values_and_nan_propagates() {
    let dev = Device::Cpu;
    for (dtype, big) in [
        (DType::F32, 100.0),
        (DType::F64, 100.0),
        (DType::F16, 30.0),
        (DType::BF16, 30.0),
    ] {
        let xs = [big, -big, big, -big, 0.0, big / 2.0];
        let x = Tensor::new(&xs, &dev)
            .unwrap()
            .reshape((3, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xr = to_f64_vec(&x);
        let labels = vec![0i64, 1, 2];
        let (t, v) = expand(&labels, 2);
        for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let mut f = ghmc(10, 0.0, red);
            let up = upstream(&mut Rng::new(4), red, 6);
            let upt = up_nc(&up, red, 3, 2, &dev).to_dtype(dtype).unwrap();
            let got = run_ours(
                &x,
                &Tensor::new(labels.as_slice(), &dev).unwrap(),
                &upt,
                &mut f,
            );
            let want = RefGhmc::new(10, 0.0).call(&xr, &t, &v, red, &to_f64_vec(&upt));
            let extreme = Extreme {
                dtype,
                f32_rtol: 1e-6,
                loss_relative: false,
            };
            check_extreme(&format!("{dtype:?} {red:?}"), extreme, &got, &want);
        }
        // NaN in -> NaN out.
        let x = Tensor::new(&[f64::NAN, 1.0], &dev)
            .unwrap()
            .reshape((1, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let lab = Tensor::new(&[1i64], &dev).unwrap();
        let mut f = ghmc(10, 0.0, Reduction::None);
        let (l, g) = run_ours(
            &x,
            &lab,
            &Tensor::ones((1, 2), dtype, &dev).unwrap(),
            &mut f,
        );
        assert!(l[0].is_nan() && l[1].is_finite(), "{dtype:?} {l:?}");
        assert!(g[0].is_nan() && g[1].is_finite(), "{dtype:?} {g:?}");
        let mut f = GhmcLoss::default();
        assert!(to_f64_vec(&f.forward(&x, &lab).unwrap())[0].is_nan());
    }
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(35);
    let (n, c) = (64, 20);
    for dtype in [DType::F16, DType::BF16] {
        let x = half_logits(&mut rng, n * c, dtype);
        let labels = make_labels(&mut rng, n, c);
        let (t, valid) = expand(&labels, c);
        let up = vec![1.0; n * c];
        let (rl, rg) = RefGhmc::new(10, 0.0).call(&x, &t, &valid, Reduction::None, &up);
        let mut f = ghmc(10, 0.0, Reduction::None);
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let lt = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
        let (l, g) = run_ours(
            &xt,
            &lt,
            &Tensor::ones((n, c), dtype, &dev).unwrap(),
            &mut f,
        );
        let mut errors = HalfErrors::default();
        for e in 0..n * c {
            if !valid[e] {
                continue;
            }
            // Naive half BCE and gradient with the reference's bin weight (β = loss / bce).
            let d = dtype;
            let rh = round_half;
            let p = rh(1.0 / rh(1.0 + rh((-x[e]).exp(), d), d), d);
            let ce = rh(
                -(rh(t[e] * rh(p.ln(), d), d) + rh((1.0 - t[e]) * rh(rh(1.0 - p, d).ln(), d), d)),
                d,
            );
            let bce = t[e] * softplus(-x[e]) + (1.0 - t[e]) * softplus(x[e]);
            let beta = rh(rl[e] / bce, d);
            errors.loss(l[e], rh(beta * ce, d), rl[e]);
            errors.grad(g[e], rh(beta * rh(p - t[e], d), d), rg[e]);
        }
        errors.check(&format!("{dtype:?}"));
        let mut fs = ghmc(10, 0.0, Reduction::Sum);
        let s = to_f64_vec(&fs.forward(&xt, &lt).unwrap())[0];
        check_accumulated(&format!("{dtype:?}"), "sum", s, rl.iter().sum());
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(36);
    let (n, c) = (37, 11);
    // Logits as the t() of a transposed buffer, labels as a strided column of [N, 2].
    let (x_strided, lab_strided) = strided_logits_and_labels(&mut rng, n, c, c as u64 + 2);
    let wide = Tensor::from_vec(
        (0..n * (c + 5))
            .map(|_| (rng.below(3) == 0) as u8 as f32)
            .collect::<Vec<_>>(),
        (n, c + 5),
        &dev,
    )
    .unwrap();
    let t_narrow = wide.narrow(1, 3, c).unwrap();
    assert!(!t_narrow.is_contiguous());
    for red in REDUCTIONS {
        let f = ghmc(10, 0.5, red);
        let up = up_nc(&upstream(&mut rng, red, n * c), red, n, c, &dev)
            .to_dtype(DType::F32)
            .unwrap();
        let cases = [
            Views::contiguous(&[&x_strided, &lab_strided]).and(&up),
            Views::contiguous(&[&x_strided, &t_narrow]).and(&up),
        ];
        check_views_equal_copies(&format!("{red:?}"), &cases, |v| {
            run_ours(&v[0], &v[1], &v[2], &mut f.clone())
        });
    }
}

/// `f`'s forward, asserting that a failed call leaves the running state untouched.
fn guarded(f: &RefCell<GhmcLoss>, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    let acc_before = format!("{:?}", f.borrow());
    let r = f.borrow_mut().forward(x, t);
    if r.is_err() {
        assert_eq!(acc_before, format!("{:?}", f.borrow()));
    }
    r
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let ok = Tensor::new(&[0i64, 80, -1, 3], &dev).unwrap();
    let named = Named::First("GhmcLoss:");
    let check = |f: &RefCell<GhmcLoss>, x: &Tensor, t: &Tensor, needles: &[&str]| {
        check_error(named, guarded(f, x, t), needles)
    };
    let f = RefCell::new(ghmc(10, 0.75, Reduction::Mean));
    assert!(f.borrow_mut().forward(&x, &ok).is_ok());
    check_label_errors(
        named,
        &[
            BadLabels::I64(&[0, 81, 1, 2], "label 81 out of range 0..=80"),
            BadLabels::I64(&[0, -2, 1, 2], "label -2"),
            BadLabels::U32(&[0, 1, 2, 99], "label 99"),
        ],
        |t| guarded(&f, &x, t),
    );
    check(
        &f,
        &x,
        &Tensor::new(&[0i64, 1, 2], &dev).unwrap(),
        &["[4]", "[3]"],
    );
    check(
        &f,
        &x,
        &Tensor::zeros((4, 79), DType::F32, &dev).unwrap(),
        &["[4, 80]", "[4, 79]"],
    );
    check(
        &f,
        &x,
        &Tensor::zeros((4, 80), DType::F64, &dev).unwrap(),
        &["F64"],
    );
    check(&f, &x.to_dtype(DType::I64).unwrap(), &ok, &["I64"]);
    check(
        &f,
        &Tensor::zeros(80, DType::F32, &dev).unwrap(),
        &ok,
        &["[N, C]"],
    );
    let mut bad_t = vec![0f32; 4 * 80];
    bad_t[7] = 1.5;
    check(
        &f,
        &x,
        &Tensor::from_vec(bad_t, (4, 80), &dev).unwrap(),
        &["dense targets", "[0, 1]", "1.5"],
    );
    check(
        &RefCell::new(ghmc(0, 0.0, Reduction::Mean)),
        &x,
        &ok,
        &["bins"],
    );
    for m in [-0.1, 1.0, f64::NAN] {
        check(
            &RefCell::new(ghmc(10, m, Reduction::Mean)),
            &x,
            &ok,
            &["momentum"],
        );
    }
    let fa = RefCell::new(ghmc(10, 0.0, Reduction::AvgFactor(0.0)));
    check(&fa, &x, &ok, &["AvgFactor"]);
}

#[test]
fn empty_and_all_ignored_batches() {
    let dev = Device::Cpu;
    check_empty_batch(&[0, 5], |red| {
        ghmc(10, 0.5, red)
            .forward(
                &Tensor::zeros((0, 5), DType::F32, &dev).unwrap(),
                &Tensor::zeros(0, DType::I64, &dev).unwrap(),
            )
            .unwrap()
    });
    let x = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
    let ignored = Tensor::new(&[-1i64, -1, -1], &dev).unwrap();
    check_all_ignored(&run_ours(
        &x,
        &ignored,
        &Tensor::new(1f32, &dev).unwrap(),
        &mut GhmcLoss::default(),
    ));
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(37);
    let (n, c) = (5000, 80);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 3.0), (n, c), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let labels = Tensor::from_vec(make_labels(&mut rng, n, c), n, &dev).unwrap();
    let dense = Tensor::from_vec(
        (0..n * c)
            .map(|_| (rng.below(5) == 0) as u8 as f32)
            .collect::<Vec<_>>(),
        (n, c),
        &dev,
    )
    .unwrap();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
            let f = RefCell::new(ghmc(30, 0.75, red));
            let up = unit_upstream(red, &[n, c], DType::F32, &dev);
            for t in [&labels, &dense, &labels] {
                let (l, g) = loss_and_grad(&x, &up, |x| f.borrow_mut().forward(x, t)).unwrap();
                push_bits(&mut bits, &l, &g);
            }
        }
        bits
    });
}
