//! SigmoidFocalLoss on CUDA against the CPU kernel, for every dtype, target kind, reduction and
//! option; skipped (with a printed notice) where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use common::*;

fn run(x: &Tensor, t: &Tensor, up: &Tensor, f: &SigmoidFocalLoss) -> LossGrad {
    run_loss(x, up, |x| f.forward(x, t))
}

#[test]
fn cuda_matches_cpu() {
    let Some(gpu) = cuda_device("focal cuda_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(11);
    for &(n, c) in &[(1usize, 1usize), (3, 423), (1000, 80), (20000, 81)] {
        let x64 = rng.vec_normal(n * c, 3.0);
        let labels: Vec<i64> = (0..n).map(|_| rng.below(c as u64 + 2) as i64 - 1).collect();
        let soft: Vec<f64> = (0..n * c).map(|_| rng.uniform()).collect();
        let cw: Vec<f64> = (0..c + 1).map(|_| 0.5 + rng.uniform()).collect();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 2e-5,
                _ => 1e-2,
            };
            for red in [
                Reduction::None,
                Reduction::Sum,
                Reduction::Mean,
                Reduction::AvgFactor(9.0),
            ] {
                for (kind, alpha, weighted) in [
                    ("i64", Some(0.25), true),
                    ("u32", None, false),
                    ("dense", Some(0.25), false),
                ] {
                    let soft_on = |dev: &Device| {
                        Tensor::from_vec(soft.clone(), (n, c), dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    };
                    let inputs = |dev: &Device| {
                        let x = Tensor::from_vec(x64.clone(), (n, c), dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let t = match kind {
                            "i64" => Tensor::from_vec(labels.clone(), n, dev).unwrap(),
                            "u32" => Tensor::from_vec(
                                labels
                                    .iter()
                                    .map(|v| (*v).max(0) as u32)
                                    .collect::<Vec<_>>(),
                                n,
                                dev,
                            )
                            .unwrap(),
                            _ => soft_on(dev),
                        };
                        let up = if red == Reduction::None {
                            soft_on(dev)
                        } else {
                            Tensor::new(0.7f64, dev).unwrap().to_dtype(dtype).unwrap()
                        };
                        [x, t, up]
                    };
                    let forward = |side: Side, x: &Tensor, t: &Tensor| {
                        SigmoidFocalLoss {
                            alpha,
                            gamma: 2.0,
                            reduction: red,
                            class_weights: weighted.then(|| {
                                Tensor::from_vec(cw.clone(), c + 1, side.dev)
                                    .unwrap()
                                    .to_dtype(dtype)
                                    .unwrap()
                            }),
                        }
                        .forward(x, t)
                    };
                    let what = format!("{n}x{c} {dtype:?} {red:?} {kind}");
                    cuda_and_cpu(&gpu, inputs, forward).assert_close(
                        &what,
                        Tol::scaled(tol, 1e-3, tol),
                        Tol::scaled(tol, 1e-6, tol).at_least(grid_step(dtype)),
                    );
                }
            }
        }
    }
}

#[test]
fn cuda_label_out_of_range_is_an_error_and_mixed_devices_are_rejected() {
    let Some(gpu) = cuda_device("focal cuda errors") else {
        return;
    };
    let x = Tensor::zeros((4, 80), DType::F32, &gpu).unwrap();
    for red in [Reduction::None, Reduction::Sum] {
        let f = SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        };
        let e = f
            .forward(&x, &Tensor::new(&[0i64, 83, 1, 2], &gpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SigmoidFocalLoss") && e.contains("label 83"),
            "{e}"
        );
        let e = f
            .forward(&x, &Tensor::new(&[0u32, 1, 81, 2], &gpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 81"), "{e}");
    }
    if emulated(&gpu) {
        return; // one device: nothing to mix
    }
    let cpu_labels = Tensor::new(&[0i64, 1, 2, 3], &Device::Cpu).unwrap();
    let e = SigmoidFocalLoss::default()
        .forward(&x, &cpu_labels)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SigmoidFocalLoss") && e.contains("targets"),
        "{e}"
    );
}

#[test]
fn cuda_extreme_logits_finite_and_nan_propagates() {
    let Some(gpu) = cuda_device("focal cuda extremes") else {
        return;
    };
    for (dtype, big) in [(DType::F32, 100.0), (DType::F16, 30.0), (DType::BF16, 30.0)] {
        for gamma in [0.0, 0.5, 2.0, 5.0] {
            let x = Tensor::new(&[big, -big, big, -big, 0.0, f64::NAN], &gpu)
                .unwrap()
                .reshape((3, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let labels = Tensor::new(&[0i64, 1, 2], &gpu).unwrap();
            let f = SigmoidFocalLoss {
                gamma,
                reduction: Reduction::None,
                ..Default::default()
            };
            let up = Tensor::ones((3, 2), dtype, &gpu).unwrap();
            let (l, g) = run(&x, &labels, &up, &f);
            assert!(
                l[..5].iter().chain(&g[..5]).all(|v| v.is_finite()),
                "{dtype:?} {gamma}: {l:?} {g:?}"
            );
            assert!(l[5].is_nan() && g[5].is_nan(), "{dtype:?} {gamma}");
        }
    }
}
