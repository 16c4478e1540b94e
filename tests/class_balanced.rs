//! class_balanced_weights: hand-computed values, an independent reference (the geometric series
//! (1 - β^n)/(1 - β) = Σ_{i<n} β^i, which has no cancellation near β = 1), and bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{class_balanced_weights, CrossEntropyLoss, Reduction, SigmoidFocalLoss};
use common::*;

fn weights(counts: &[u64], beta: f64) -> Vec<f64> {
    let w = class_balanced_weights(counts, beta, &Device::Cpu).unwrap();
    assert_eq!(w.dtype(), DType::F32);
    assert_eq!(w.dims(), &[counts.len()]);
    to_f64_vec(&w)
}

/// w_c ∝ (1-β)/(1-β^n) = 1 / Σ_{i<n} β^i, normalised to sum to C.
fn reference(counts: &[u64], beta: f64) -> Vec<f64> {
    let raw: Vec<f64> = counts
        .iter()
        .map(|&n| {
            let mut s = 0.0;
            let mut p = 1.0;
            for _ in 0..n {
                s += p;
                p *= beta;
            }
            1.0 / s
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter()
        .map(|v| v * counts.len() as f64 / total)
        .collect()
}

#[test]
fn hand_computed_values() {
    // β = 0.5, counts 1, 2, 4: (1-β)/(1-β^n) = 1, 2/3, 8/15 (sum 11/5), scaled by 3/(11/5).
    let w = weights(&[1, 2, 4], 0.5);
    assert_close(
        "β=0.5",
        &w,
        &[15.0 / 11.0, 10.0 / 11.0, 8.0 / 11.0],
        0.0,
        1e-7,
    );
    // β = 0.9, counts 1, 10: 1 and 0.1/(1 - 0.9^10) = 0.1/0.6513215599; sum to 2.
    let w2 = 0.1 / (1.0 - 0.348_678_440_1);
    let w = weights(&[1, 10], 0.9);
    assert_close(
        "β=0.9",
        &w,
        &[2.0 / (1.0 + w2), 2.0 * w2 / (1.0 + w2)],
        0.0,
        1e-7,
    );
    // β = 0: all ones, whatever the counts.
    assert_eq!(weights(&[1, 7, 1_000_000], 0.0), vec![1.0; 3]);
    // One class: always 1.
    assert_eq!(weights(&[42], 0.999), vec![1.0]);
    // Equal counts: all ones.
    assert_close("equal", &weights(&[5, 5, 5, 5], 0.99), &[1.0; 4], 0.0, 1e-7);
}

#[test]
fn matches_the_geometric_series_reference() {
    let mut rng = Rng::new(21);
    for beta in [0.0, 0.3, 0.9, 0.99, 0.999, 0.9999] {
        let counts: Vec<u64> = (0..20).map(|_| 1 + rng.below(20_000)).collect();
        let w = weights(&counts, beta);
        let r = reference(&counts, beta);
        assert_close(&format!("β={beta}"), &w, &r, 0.0, 2e-7);
        let s: f64 = w.iter().sum();
        assert!((s - 20.0).abs() < 1e-5, "sum {s}");
    }
}

#[test]
fn accurate_for_beta_within_ulps_of_one() {
    // β = 1 - 1e-12: the f32 result within an ulp or two of the reference (which tends to
    // inverse frequency).
    let beta = 1.0 - 1e-12;
    let counts = [1u64, 3, 17, 1000];
    let w = weights(&counts, beta);
    let r = reference(&counts, beta);
    assert_close("β≈1", &w, &r, 0.0, 1.5e-7);
    // The largest β below 1: inverse class frequency, to f32 rounding.
    let beta = 1.0 - f64::EPSILON / 2.0;
    assert!(beta < 1.0);
    let w = weights(&counts, beta);
    let inv: Vec<f64> = counts.iter().map(|&n| 1.0 / n as f64).collect();
    let t: f64 = inv.iter().sum();
    let inv: Vec<f64> = inv.iter().map(|v| v * 4.0 / t).collect();
    assert_close("β=1-2^-53", &w, &inv, 0.0, 1.5e-7);
}

#[test]
fn usable_as_class_weights_of_the_losses() {
    let dev = Device::Cpu;
    let w = class_balanced_weights(&[100, 10, 1], 0.99, &dev).unwrap();
    let x = Tensor::new(&[[1.0f32, 0.0, -1.0], [0.5, 0.5, 0.5]], &dev).unwrap();
    let labels = Tensor::new(&[2i64, 0], &dev).unwrap();
    let ce = CrossEntropyLoss {
        class_weights: Some(w.clone()),
        ..Default::default()
    };
    assert!(ce.forward(&x, &labels).unwrap().to_scalar::<f32>().unwrap() > 0.0);
    let fl = SigmoidFocalLoss {
        class_weights: Some(w),
        ..Default::default()
    };
    assert!(fl.forward(&x, &labels).unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

/// f32 class weights (what `class_balanced_weights` returns) are accepted with f16, bf16 and f64
/// logits. The kernels read the weights in their accumulation dtype (f32 for half logits, f64 for
/// f64 logits), so for weights exactly representable in the logits' dtype the loss and the
/// gradient are bitwise those of the same weights given in the logits' dtype.
#[test]
fn f32_class_weights_with_half_and_f64_logits_equal_weights_in_the_logits_dtype() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(17);
    let (n, c) = (37, 4);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &dev).unwrap();
    // Labels in 0..C (a class for the sigmoid and the softmax losses alike) and -1 (ignored).
    let labels: Vec<i64> = (0..n as i64)
        .map(|i| if i % 7 == 6 { -1 } else { i % 4 })
        .collect();
    let labels = Tensor::new(labels, &dev).unwrap();
    // Exactly representable in f16 and bf16.
    let w32 = Tensor::new(&[0.5f32, 1.25, 2.0, 0.75], &dev).unwrap();
    for dt in [DType::F16, DType::BF16, DType::F64] {
        let xd = x.to_dtype(dt).unwrap();
        let wd = w32.to_dtype(dt).unwrap();
        for name in CLASS_WEIGHTED {
            let f =
                |w, x: &Tensor, l: &Tensor, red| class_weighted_forward(name, red, Some(w), x, l);
            for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                let what = format!("{name} {dt:?} {reduction:?}");
                let shape = if reduction == Reduction::None {
                    xd.dims().to_vec()
                } else {
                    vec![]
                };
                // Reduction::None: [N, C] for the sigmoid loss, [N] for the softmax losses.
                let shape = if name == "SigmoidFocalLoss" {
                    shape
                } else {
                    shape[..shape.len().min(1)].to_vec()
                };
                let up = Tensor::ones(shape, dt, &dev).unwrap();
                let (l32, g32) =
                    loss_and_grad(&xd, &up, |x| f(w32.clone(), x, &labels, reduction)).unwrap();
                let (ld, gd) =
                    loss_and_grad(&xd, &up, |x| f(wd.clone(), x, &labels, reduction)).unwrap();
                assert_eq!(l32.dtype(), dt, "{what}");
                assert_eq!(bits_of(&l32), bits_of(&ld), "{what}: loss");
                assert_eq!(bits_of(&g32), bits_of(&gd), "{what}: gradient");
            }
        }
    }
}

/// The weights of `class_balanced_weights` (f32, not representable in a half type) with f16 /
/// bf16 logits: the f32 values are used, so the loss is the f64-logit loss to half precision.
#[test]
fn class_balanced_weights_work_with_every_logits_dtype() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(5);
    let (n, c) = (64, 3);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 1.5), (n, c), &dev).unwrap();
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let labels = Tensor::new(labels, &dev).unwrap();
    let w = class_balanced_weights(&[1000, 100, 3], 0.999, &dev).unwrap();
    for name in CLASS_WEIGHTED {
        let f = |w, x: &Tensor, l: &Tensor, red| class_weighted_forward(name, red, Some(w), x, l);
        let reference = to_f64_vec(&f(w.clone(), &x, &labels, Reduction::Sum).unwrap());
        for (dt, rtol) in [
            (DType::F32, 1e-5),
            (DType::F64, 1e-6),
            (DType::F16, 1e-2),
            (DType::BF16, 2e-2),
        ] {
            let l = f(w.clone(), &x.to_dtype(dt).unwrap(), &labels, Reduction::Sum).unwrap();
            assert_eq!(l.dtype(), dt);
            assert_close(
                &format!("{name} {dt:?}"),
                &to_f64_vec(&l),
                &reference,
                0.0,
                rtol,
            );
        }
    }
}

#[test]
fn bad_input_returns_errors() {
    let dev = Device::Cpu;
    let check = |r: candle_core::Result<Tensor>, needle: &str| {
        check_error(Named::First("class_balanced_weights:"), r, &[needle])
    };
    check(class_balanced_weights(&[], 0.9, &dev), "empty");
    check(class_balanced_weights(&[3, 0, 2], 0.9, &dev), "class 1");
    check(class_balanced_weights(&[3, 2], -0.1, &dev), "-0.1");
    check(class_balanced_weights(&[3, 2], 1.0, &dev), "beta");
    check(class_balanced_weights(&[3, 2], 1.5, &dev), "1.5");
    check(class_balanced_weights(&[3, 2], f64::NAN, &dev), "NaN");
}
