//! DistributionFocalLoss: against an independent f64 reference (loss, gradient to the logits and
//! to the targets), finite differences for both inputs (and the one-sided derivative at integer
//! targets), K = 1 and K = 2, extreme logits, half precision, layouts, bad input, empty batches,
//! determinism, the fused training pass and tracked targets. (No PyTorch fixtures: torch is not
//! installed on the build machine; the f64 reference and finite differences are the independent
//! checks.)

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{DistributionFocalLoss, Reduction};
use common::*;

// ---------------------------------------------------------------------------------------------
// Independent reference: mmdet's distribution_focal_loss transcribed in plain f64 (with the
// left bin clamped to K - 2), gradients by the chain rule on that formula.
// ---------------------------------------------------------------------------------------------

/// Loss, d(loss)/dx and d(loss)/dy of one row.
fn ref_row(x: &[f64], y: f64) -> (f64, Vec<f64>, f64) {
    let k = x.len();
    // Relative to the max (lse - x_j = (m - x_j) + log s): no digits lost to a large lse.
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = z.iter().sum();
    let p: Vec<f64> = z.iter().map(|v| v / s).collect();
    let ce = |j: usize| (m - x[j]) + s.ln();
    if k == 1 {
        return (ce(0), vec![p[0] - 1.0], 0.0);
    }
    let i = (y.floor() as usize).min(k - 2);
    let (wl, wr) = ((i + 1) as f64 - y, y - i as f64);
    let l = wl * ce(i) + wr * ce(i + 1);
    let gx = (0..k)
        .map(|j| {
            let w = if j == i {
                wl
            } else if j == i + 1 {
                wr
            } else {
                0.0
            };
            // p_j - 1 as -Σ_{k≠j} p_k: no cancellation as p_j → 1.
            if w == 1.0 {
                -(0..k).filter(|&o| o != j).map(|o| p[o]).sum::<f64>()
            } else {
                p[j] - w
            }
        })
        .collect();
    (l, gx, ce(i + 1) - ce(i))
}

/// Reference loss reduced as `red` (Mean = sum / N), the gradient of `sum(loss · up)` to the
/// logits and to the targets.
fn reference(x: &[f64], y: &[f64], k: usize, red: Reduction, up: &[f64]) -> (LossGrad, Vec<f64>) {
    let n = y.len();
    let (mut per, mut dx, mut dy) = (vec![0.0; n], vec![0.0; n * k], vec![0.0; n]);
    for i in 0..n {
        let (l, g, gy) = ref_row(&x[i * k..(i + 1) * k], y[i]);
        per[i] = l;
        dx[i * k..(i + 1) * k].copy_from_slice(&g);
        dy[i] = gy;
    }
    let (_, gy) = reduce_reference(per.clone(), dy, red, n as f64, up, 1);
    (reduce_reference(per, dx, red, n as f64, up, k), gy)
}

/// Loss, gradient to the logits and gradient to the targets of `sum(loss · up)`, both inputs
/// tracking gradients (the targets as a tensor computed from a `Var`, as in a graph).
fn run_both(
    x: &Tensor,
    y: &Tensor,
    up: &Tensor,
    f: &DistributionFocalLoss,
) -> (LossGrad, Vec<f64>) {
    let xv = Var::from_tensor(x).unwrap();
    let yv = Var::from_tensor(y).unwrap();
    let yt = yv.as_tensor().affine(1.0, 0.0).unwrap(); // tracked, not a Var itself
    let loss = f.forward(xv.as_tensor(), &yt).unwrap();
    let obj = (&loss * up.to_dtype(loss.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = obj.backward().unwrap();
    let gx = to_f64_vec(grads.get(&xv).expect("logit gradient"));
    let gy = to_f64_vec(grads.get(&yv).expect("target gradient"));
    ((to_f64_vec(&loss), gx), gy)
}

fn dfl(red: Reduction) -> DistributionFocalLoss {
    DistributionFocalLoss { reduction: red }
}

/// Targets in [0, K-1]: continuous, with exact 0, integers and K - 1 mixed in.
fn make_targets(rng: &mut Rng, n: usize, k: usize) -> Vec<f64> {
    let top = (k - 1) as f64;
    (0..n)
        .map(|i| match i % 7 {
            0 => 0.0,
            1 => top,
            2 => rng.below(k as u64) as f64,
            _ => rng.uniform() * top,
        })
        .collect()
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn matches_f64_reference_over_shapes_and_reductions() {
    let mut rng = Rng::new(21);
    for &(n, k) in &[
        (1usize, 1usize),
        (4, 1),
        (3, 2),
        (7, 5),
        (50, 17),
        (9, 300),
        (40, 33),
    ] {
        for red in REDUCTIONS {
            let x = rng.vec_normal(n * k, 3.0);
            let y = make_targets(&mut rng, n, k);
            let up = upstream(&mut rng, red, n);
            let what = format!("{n}x{k} {red:?}");
            let upt = up_tensor(&up, red, &[n], &Device::Cpu);
            let mut gy_ours = Vec::new();
            let mut gy_ref = Vec::new();
            let ours = |dtype: DType| {
                let (lg, gy) = run_both(
                    &tensor(&x, &[n, k], dtype),
                    &tensor(&y, &[n], dtype),
                    &upt,
                    &dfl(red),
                );
                gy_ours.push(gy);
                lg
            };
            let reference_at = |dtype: DType| {
                let (lg, gy) = reference(
                    &round_to_dtype(&x, dtype),
                    &round_to_dtype(&y, dtype),
                    k,
                    red,
                    &up,
                );
                gy_ref.push(gy);
                lg
            };
            check_against_reference(&what, &CLASSIFICATION_TOLS, ours, reference_at);
            // The target gradient x_i - x_{i+1}: f64, then f32.
            CLASSIFICATION_TOLS.f64_grad.check(
                &format!("target grad f64 {what}"),
                &gy_ours[0],
                &gy_ref[0],
            );
            CLASSIFICATION_TOLS.f32_grad.check(
                &format!("target grad f32 {what}"),
                &gy_ours[1],
                &gy_ref[1],
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_f64_away_from_integer_targets() {
    let mut rng = Rng::new(22);
    for (n, k, red) in [
        (6usize, 5usize, Reduction::Sum),
        (5, 8, Reduction::Mean),
        (4, 2, Reduction::None),
        (7, 17, Reduction::AvgFactor(3.0)),
    ] {
        let x = rng.vec_normal(n * k, 2.0);
        // Targets with a fractional part in [0.1, 0.9]: the loss is smooth there.
        let y: Vec<f64> = (0..n)
            .map(|_| rng.below(k as u64 - 1) as f64 + 0.1 + 0.8 * rng.uniform())
            .collect();
        let up = upstream(&mut rng, red, n);
        let upt = up_tensor(&up, red, &[n], &Device::Cpu);
        let f = dfl(red);
        let ((_, gx), gy) = run_both(
            &tensor(&x, &[n, k], DType::F64),
            &tensor(&y, &[n], DType::F64),
            &upt,
            &f,
        );
        let fd = FdCheck {
            nonzero: true,
            ..FD
        };
        let obj = |xs: &[f64], ys: &[f64]| {
            weighted_sum(
                f.forward(
                    &tensor(xs, &[n, k], DType::F64),
                    &tensor(ys, &[n], DType::F64),
                )
                .unwrap(),
                &upt,
            )
        };
        check_finite_differences(&format!("fd logits {red:?}"), &gx, &x, fd, |xs| obj(xs, &y));
        check_finite_differences(&format!("fd targets {red:?}"), &gy, &y, fd, |ys| {
            obj(&x, ys)
        });
    }
}

#[test]
fn target_gradient_at_integers_is_the_one_sided_derivative_of_the_formula() {
    // At an integer y < K - 1 the floor puts y in [y, y + 1): the right derivative; at y = K - 1
    // (bin K - 2 clamped) the left derivative. Both are x_i - x_{i+1} of the chosen i.
    let (n, k) = (1usize, 6usize);
    let mut rng = Rng::new(23);
    let x = rng.vec_normal(k, 2.0);
    let xt = tensor(&x, &[n, k], DType::F64);
    let f = dfl(Reduction::Sum);
    let loss_at = |y: f64| {
        f.forward(&xt, &tensor(&[y], &[1], DType::F64))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for yi in 0..k {
        let y = yi as f64;
        let (_, gy) = run_both(
            &xt,
            &tensor(&[y], &[1], DType::F64),
            &Tensor::new(1f64, &Device::Cpu).unwrap(),
            &f,
        );
        let (want, one_sided) = if yi < k - 1 {
            (x[yi] - x[yi + 1], (loss_at(y + h) - loss_at(y)) / h)
        } else {
            (x[k - 2] - x[k - 1], (loss_at(y) - loss_at(y - h)) / h)
        };
        assert_close(&format!("y = {y}"), &gy, &[want], 1e-12, 1e-12);
        assert_close(&format!("one-sided y = {y}"), &gy, &[one_sided], 1e-5, 1e-5);
        // At y = K - 1 only bin K - 1 counts; at an integer y only bin y.
        let (lse, ce) = {
            let m = x.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            (lse, lse - x[yi])
        };
        assert!(
            (loss_at(y) - ce).abs() <= 1e-12 * lse.abs().max(1.0),
            "loss at y = {y}"
        );
    }
}

#[test]
fn k_equal_one_and_two() {
    let dev = Device::Cpu;
    // K = 1: the only target is 0; loss 0, zero gradients; anything else is an error.
    let x = tensor(&[3.0, -2.0, 0.5], &[3, 1], DType::F32);
    let y = tensor(&[0.0, 0.0, 0.0], &[3], DType::F32);
    for red in REDUCTIONS {
        let up = unit_upstream(red, &[3], DType::F32, &dev);
        let ((l, gx), gy) = run_both(&x, &y, &up, &dfl(red));
        assert!(l.iter().chain(&gx).chain(&gy).all(|v| *v == 0.0), "{red:?}");
    }
    check_error(
        Named::First("DistributionFocalLoss"),
        dfl(Reduction::Sum).forward(&x, &tensor(&[0.0, 0.5, 0.0], &[3], DType::F32)),
        &["target 0.5 at [1]", "[0, 0]"],
    );
    // K = 2: l = (1 - y)·CE(x, 0) + y·CE(x, 1), ∂l/∂y = x_0 - x_1.
    let xs = [1.5, -0.5, 0.0, 0.0, -3.0, 4.0];
    let ys = [0.0, 0.3, 1.0];
    let ((l, _), gy) = run_both(
        &tensor(&xs, &[3, 2], DType::F64),
        &tensor(&ys, &[3], DType::F64),
        &Tensor::ones(3, DType::F64, &dev).unwrap(),
        &dfl(Reduction::None),
    );
    for i in 0..3 {
        let (a, b) = (xs[2 * i], xs[2 * i + 1]);
        let lse = a.max(b) + ((a - a.max(b)).exp() + (b - a.max(b)).exp()).ln();
        let want = (1.0 - ys[i]) * (lse - a) + ys[i] * (lse - b);
        assert!((l[i] - want).abs() < 1e-14, "row {i}: {} vs {want}", l[i]);
        assert!((gy[i] - (a - b)).abs() < 1e-14, "row {i}");
    }
}

#[test]
fn extreme_logits_give_finite_correct_values_and_nan_propagates() {
    for (dtype, big) in [
        (DType::F32, 100.0),
        (DType::F64, 1e4),
        (DType::F16, 30.0),
        (DType::BF16, 30.0),
    ] {
        let (n, k) = (5, 4);
        // Saturated on the target bin, saturated elsewhere, ties, confident (p near 1 but not
        // exactly), and the target between the two largest logits.
        let rows: [[f64; 4]; 5] = [
            [big, -big, -big, -big],      // y = 0: p_0 = 1
            [big, -big, -big, -big],      // y = 3: p_3 = 0
            [-big, -big, -big, -big],     // ties, y = 2.4
            [12.0, 0.0, -3.0, 1.0],       // y = 0: 1 - p_0 ≈ 2e-5
            [-big, big, big - 1.0, -big], // y = 1.5
        ];
        let xs = rows.concat();
        let ys = [0.0, 3.0, 2.4, 0.0, 1.5];
        let x = tensor(&xs, &[n, k], dtype);
        let y = tensor(&ys, &[n], dtype);
        let xr = to_f64_vec(&x);
        let yr = to_f64_vec(&y);
        for red in [Reduction::None, Reduction::Sum] {
            let up = up_tensor(&upstream(&mut Rng::new(4), red, n), red, &[n], &Device::Cpu)
                .to_dtype(dtype)
                .unwrap();
            let (got, gy) = run_both(&x, &y, &up, &dfl(red));
            let (want, want_gy) = reference(&xr, &yr, k, red, &to_f64_vec(&up));
            let extreme = Extreme {
                dtype,
                f32_rtol: 4e-6,
                loss_relative: true,
            };
            let what = format!("{dtype:?} {red:?}");
            check_extreme(&what, extreme, &got, &want);
            assert!(gy.iter().all(|v| v.is_finite()), "{what}: {gy:?}");
            let gtol = Tol::scaled(8e-3, 1.0, 8e-3);
            gtol.check(
                &format!("{what} target grad"),
                &gy,
                &round_to_dtype(&want_gy, dtype),
            );
        }
        // NaN in a logit -> NaN loss and NaN gradients of its row (the target's too); the other
        // row is unaffected. A NaN target is an error (below).
        let x = tensor(&[f64::NAN, 1.0, 0.5, 2.0, 0.0, -1.0], &[2, 3], dtype);
        let y = tensor(&[1.5, 0.5], &[2], dtype);
        let up = Tensor::ones(2, dtype, &Device::Cpu).unwrap();
        let ((l, g), gy) = run_both(&x, &y, &up, &dfl(Reduction::None));
        assert!(l[0].is_nan() && l[1].is_finite(), "{dtype:?} {l:?}");
        assert!(g[..3].iter().all(|v| v.is_nan()), "{dtype:?} {g:?}");
        assert!(g[3..].iter().all(|v| v.is_finite()), "{dtype:?} {g:?}");
        assert!(gy[0].is_nan() && gy[1].is_finite(), "{dtype:?} {gy:?}");
        let s = to_f64_vec(&dfl(Reduction::Sum).forward(&x, &y).unwrap());
        assert!(s[0].is_nan(), "{dtype:?}");
    }
}

/// The loss and logit gradient of one row evaluated naively in the half type (every
/// intermediate rounded), as a user composing half-precision tensor ops would get them.
fn naive_half_row(x: &[f64], y: f64, d: DType) -> (f64, Vec<f64>) {
    let rh = |v: f64| round_half(v, d);
    let k = x.len();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: Vec<f64> = x.iter().map(|v| rh(rh(v - m).exp())).collect();
    let s = z.iter().fold(0.0, |a, v| rh(a + v));
    let lse = rh(m + rh(s.ln()));
    let i = (y.floor() as usize).min(k - 2);
    let (wl, wr) = (rh((i + 1) as f64 - y), rh(y - i as f64));
    let l = rh(rh(wl * rh(lse - x[i])) + rh(wr * rh(lse - x[i + 1])));
    let g = (0..k)
        .map(|j| {
            let w = if j == i {
                wl
            } else if j == i + 1 {
                wr
            } else {
                0.0
            };
            rh(rh(z[j] / s) - w)
        })
        .collect();
    (l, g)
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let mut rng = Rng::new(24);
    let (n, k) = (64, 17);
    for dtype in [DType::F16, DType::BF16] {
        let x = half_logits(&mut rng, n * k, dtype);
        let y = round_to_dtype(&make_targets(&mut rng, n, k), dtype);
        let (rl, rg) = reference(&x, &y, k, Reduction::None, &vec![1.0; n]).0;
        let xt = tensor(&x, &[n, k], dtype);
        let yt = tensor(&y, &[n], dtype);
        let up = Tensor::ones(n, dtype, &Device::Cpu).unwrap();
        let (l, g) = run_loss(&xt, &up, |x| dfl(Reduction::None).forward(x, &yt));
        let mut errors = HalfErrors::default();
        for i in 0..n {
            let (nl, ng) = naive_half_row(&x[i * k..(i + 1) * k], y[i], dtype);
            errors.loss(l[i], nl, rl[i]);
            for (j, ngj) in ng.iter().enumerate() {
                errors.grad(g[i * k + j], *ngj, rg[i * k + j]);
            }
        }
        let what = format!("{dtype:?}");
        errors.check(&what);
        let s = to_f64_vec(&dfl(Reduction::Sum).forward(&xt, &yt).unwrap())[0];
        check_accumulated(&what, "sum", s, rl.iter().sum());
        let mean = to_f64_vec(&dfl(Reduction::Mean).forward(&xt, &yt).unwrap())[0];
        check_accumulated(&what, "mean", mean, rl.iter().sum::<f64>() / n as f64);
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(25);
    let (n, k) = (37, 9);
    let x_strided = transposed(rng.vec_normal(n * k, 2.0), n, k, DType::F32, &dev);
    let x_contig = x_strided.contiguous().unwrap();
    // Targets as the strided column 1 of an [N, 2] tensor.
    let y2: Vec<f64> = (0..2 * n).map(|_| rng.uniform() * (k - 1) as f64).collect();
    let y_strided = Tensor::from_vec(y2, (n, 2), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .narrow(1, 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(!y_strided.is_contiguous());
    let y_contig = y_strided.contiguous().unwrap();
    let row = tensor(&rng.vec_normal(k, 2.0), &[1, k], DType::F32);
    let x_bcast = row.broadcast_as((n, k)).unwrap();
    for red in REDUCTIONS {
        let up = up_tensor(&upstream(&mut rng, red, n), red, &[n], &dev)
            .to_dtype(DType::F32)
            .unwrap();
        let cases = [
            Views::contiguous(&[&x_strided, &y_strided]).and(&up),
            Views::contiguous(&[&x_bcast, &y_strided]).and(&up),
            Views::offset_rows(&[&x_contig, &y_contig], 5, 20).and(&up_rows(&up, red, 5, 20)),
        ];
        check_views_equal_copies(&format!("{red:?}"), &cases, |v| {
            run_both(&v[0], &v[1], &v[2], &dfl(red))
        });
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let named = Named::First("DistributionFocalLoss");
    let check = |r: Result<Tensor>, needles: &[&str]| check_error(named, r, needles);
    let x = Tensor::zeros((4, 17), DType::F32, &dev).unwrap();
    let ok = tensor(&[0.0, 16.0, 3.5, 15.99], &[4], DType::F32);
    for red in REDUCTIONS {
        assert!(dfl(red).forward(&x, &ok).is_ok());
        // Targets outside [0, K-1] or NaN, in every reduction (the forward checks them).
        for (bad, needle) in [
            (-0.5, "target -0.5 at [2]"),
            (16.5, "target 16.5 at [2]"),
            (f64::NAN, "target NaN at [2]"),
            (f64::INFINITY, "target inf at [2]"),
        ] {
            let y = tensor(&[0.0, 1.0, bad, 2.0], &[4], DType::F32);
            check(dfl(red).forward(&x, &y), &[needle, "outside [0, 16]"]);
        }
    }
    let f = dfl(Reduction::Mean);
    check(
        dfl(Reduction::AvgFactor(0.0)).forward(&x, &ok),
        &["AvgFactor"],
    );
    check(
        f.forward(&x, &tensor(&[0.0, 1.0, 2.0], &[3], DType::F32)),
        &["targets", "[4]", "[3]"],
    );
    check(
        f.forward(&x, &Tensor::zeros((4, 1), DType::F32, &dev).unwrap()),
        &["targets", "[4, 1]"],
    );
    check(
        f.forward(&x, &ok.to_dtype(DType::F64).unwrap()),
        &["dtype", "F32", "F64"],
    );
    check(
        f.forward(&x, &Tensor::new(&[0i64, 1, 2, 3], &dev).unwrap()),
        &["dtype", "I64"],
    );
    check(
        f.forward(&Tensor::zeros(17, DType::F32, &dev).unwrap(), &ok),
        &["[N, C]"],
    );
    check(
        f.forward(&Tensor::zeros((4, 0), DType::F32, &dev).unwrap(), &ok),
        &["at least one bin"],
    );
    check(f.forward(&x.to_dtype(DType::U32).unwrap(), &ok), &["U32"]);
}

#[test]
fn empty_batches() {
    let x = Tensor::zeros((0, 16), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    check_empty_batch(&[0], |red| dfl(red).forward(&x, &y).unwrap());
    check_empty_batch_gradient("dfl", &x, &[0], |x, _, red| dfl(red).forward(x, &y));
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(26);
    let (n, k) = (5000, 17);
    let x = tensor(&rng.vec_normal(n * k, 3.0), &[n, k], DType::F32);
    let y = tensor(&make_targets(&mut rng, n, k), &[n], DType::F32);
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
            let up = unit_upstream(red, &[n], DType::F32, &dev);
            let ((l, g), gy) = run_both(&x, &y, &up, &dfl(red));
            bits.extend(l.iter().chain(&g).chain(&gy).map(|v| v.to_bits()));
        }
        bits
    });
}

#[test]
fn fused_training_pass_equals_loss_only_and_recomputed_gradient() {
    let mut rng = Rng::new(27);
    let (n, k) = (300, 17);
    let yv = make_targets(&mut rng, n, k);
    for dtype in [DType::F32, DType::F16, DType::F64] {
        let x = Var::from_tensor(&tensor(&rng.vec_normal(n * k, 3.0), &[n, k], dtype)).unwrap();
        let y = tensor(&yv, &[n], dtype);
        for red in [Reduction::Mean, Reduction::Sum, Reduction::AvgFactor(17.0)] {
            check_fused_equals_recomputed(&format!("{dtype:?} {red:?}"), &x, |x| {
                dfl(red).forward(x, &y)
            });
        }
    }
}

#[test]
fn tracked_targets_get_their_gradient_and_never_panic() {
    // Regression: a target computed from a Var tracks gradients; the backward once returned no
    // gradient for it, and candle panicked with "grad not populated".
    let dev = Device::Cpu;
    let (n, k) = (3, 5);
    let xs = [
        0.3, -1.0, 2.0, 0.5, 0.0, 1.0, 1.0, -2.0, 0.0, 3.0, -0.5, 0.25, 0.0, 1.5, -1.0,
    ];
    let ys = [1.25, 4.0, 0.0];
    for (xv_tracks, red) in [
        (true, Reduction::Mean),
        (false, Reduction::Mean),
        (true, Reduction::None),
        (false, Reduction::AvgFactor(2.0)),
    ] {
        let yv = Var::new(&ys, &dev).unwrap();
        let y = (yv.as_tensor() * 2.0).unwrap().affine(0.5, 0.0).unwrap(); // = ys, tracked
        let xv = Var::new(&xs, &dev).unwrap();
        let x = xv.as_tensor().reshape((n, k)).unwrap();
        let x = if xv_tracks { x } else { x.detach() };
        let loss = dfl(red).forward(&x, &y).unwrap();
        let loss = if red == Reduction::None {
            loss.sum_all().unwrap()
        } else {
            loss
        };
        let grads = loss.backward().unwrap();
        let gy = to_f64_vec(grads.get(&yv).expect("target gradient"));
        let up = vec![1.0; if red == Reduction::None { n } else { 1 }];
        let (want_x, want_y) = reference(&xs, &ys, k, red, &up);
        assert_close(&format!("{red:?} target grad"), &gy, &want_y, 1e-14, 1e-12);
        if xv_tracks {
            let gx = to_f64_vec(grads.get(&xv).expect("logit gradient"));
            assert_close(&format!("{red:?} logit grad"), &gx, &want_x.1, 1e-14, 1e-12);
        } else {
            assert!(grads.get(&xv).is_none());
        }
    }
    // A Var passed directly as the targets gets its gradient too.
    let yv = Var::new(&ys, &dev).unwrap();
    let x = Tensor::new(&xs, &dev).unwrap().reshape((n, k)).unwrap();
    let grads = dfl(Reduction::Sum)
        .forward(&x, yv.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    let want = reference(&xs, &ys, k, Reduction::Sum, &[1.0]).1;
    assert_close(
        "Var targets",
        &to_f64_vec(grads.get(&yv).unwrap()),
        &want,
        1e-14,
        1e-12,
    );
}

#[test]
fn yolov8_head_output_reshaped_to_rows() {
    // [B, A, 4, K] logits and [B, A, 4] targets as [B·A·4, K] and [B·A·4]: the same row losses
    // as the rows taken one by one.
    let (b, a, k) = (2usize, 3usize, 16usize);
    let mut rng = Rng::new(28);
    let x = tensor(
        &rng.vec_normal(b * a * 4 * k, 1.0),
        &[b, a, 4, k],
        DType::F32,
    );
    let y = tensor(
        &make_targets(&mut rng, b * a * 4, k),
        &[b, a, 4],
        DType::F32,
    );
    let rows = dfl(Reduction::None)
        .forward(&x.reshape(((), k)).unwrap(), &y.flatten_all().unwrap())
        .unwrap()
        .reshape((b, a, 4))
        .unwrap();
    let xv = to_f64_vec(&x);
    let yv = to_f64_vec(&y);
    let (want, _) = reference(&xv, &yv, k, Reduction::None, &vec![1.0; b * a * 4]);
    assert_close("rows", &to_f64_vec(&rows), &want.0, 1e-5, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures: tests/fixtures/dfl.json, made by tests/fixtures/generate.py from a port of
// mmdet's distribution_focal_loss in float64 (targets 0, K − 1 and integers included), with
// the gradients of the logits and of the targets from torch's autograd.
// ---------------------------------------------------------------------------------------------

#[test]
fn matches_torch_fixtures() {
    let dev = Device::Cpu;
    let cases = fixture_cases("dfl.json");
    assert!(cases.len() >= 24, "dfl.json has {} cases", cases.len());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let x = fx_to_tensor(&case["logits"], DType::F64, &dev);
        let y = fx_to_tensor(&case["targets"], DType::F64, &dev);
        let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
        let dfl = DistributionFocalLoss {
            reduction: fx_reduction(&case["reduction"], &case["avg_factor"]),
        };
        let w =
            (!case["weight"].is_null()).then(|| fx_to_tensor(&case["weight"], DType::F64, &dev));
        let run = |x: &Tensor, y: &Tensor| match &w {
            Some(w) => dfl.forward_weighted(x, y, w),
            None => dfl.forward(x, y),
        };
        let (gx, gy) = grads_of_both(&x, &y, &up, run).unwrap();
        let loss = run(&x, &y).unwrap();
        let tol = Tol::abs(1e-12, 1e-9);
        let (lshape, _) =
            check_fixture(name, &(to_f64_vec(&loss), to_f64_vec(&gx)), case, tol, tol);
        assert_eq!(loss.dims(), lshape.as_slice(), "{name}: loss shape");
        let (_, want_gy) = fx_tensor(&case["grad_targets"]);
        tol.check(&format!("{name} targets grad"), &to_f64_vec(&gy), &want_gy);
    }
}
