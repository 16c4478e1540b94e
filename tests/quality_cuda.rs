//! QualityFocalLoss and VarifocalLoss on CUDA against the CPU kernels, for every dtype, target
//! form (dense, u32 / i64 labels with scores), reduction and loss, the gradients of the logits
//! and of the targets / scores included; skipped (with a printed notice) where there is no
//! CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{QualityFocalLoss, Reduction, VarifocalLoss};
use common::*;

/// Logits, labels (for `forward_scores`), targets or scores, upstream gradient.
type Inputs = (Tensor, Option<Tensor>, Tensor, Tensor);
/// `forward` (no labels) or `forward_scores`.
type Forward<'a> = &'a dyn Fn(&Tensor, Option<&Tensor>, &Tensor) -> candle_core::Result<Tensor>;

/// Loss, logits gradient and second-input gradient of `sum(loss · up)` on `dev`.
fn run(
    dev: &Device,
    inputs: &dyn Fn(&Device) -> Inputs,
    f: Forward<'_>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (x, l, t, up) = inputs(dev);
    let (xv, tv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&t).unwrap());
    let loss = f(xv.as_tensor(), l.as_ref(), tv.as_tensor()).unwrap();
    assert!(loss.device().same_device(dev));
    let grads = (&loss * &up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (
        to_f64_vec(&loss),
        to_f64_vec(grads.get(&xv).unwrap()),
        to_f64_vec(grads.get(&tv).unwrap()),
    )
}

#[test]
fn cuda_matches_cpu() {
    let Some(gpu) = cuda_device("quality cuda_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(21);
    for &(n, c) in &[(1usize, 1usize), (3, 423), (1000, 80), (9000, 81)] {
        let x64 = rng.vec_normal(n * c, 3.0);
        let labels: Vec<i64> = (0..n).map(|_| rng.below(c as u64 + 2) as i64 - 1).collect();
        let scores: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
        let dense: Vec<f64> = (0..n * c)
            .map(|_| {
                if rng.below(3) == 0 {
                    rng.uniform()
                } else {
                    0.0
                }
            })
            .collect();
        let ups: Vec<f64> = rng.vec_normal(n * c, 1.0);
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 2e-5,
                _ => 1e-2,
            };
            for red in REDUCTIONS {
                for (li, kind) in ["dense", "u32", "i64"].into_iter().enumerate() {
                    let inputs = |dev: &Device| {
                        let fl = |v: &[f64], shape: &[usize]| {
                            Tensor::from_vec(v.to_vec(), shape, dev)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap()
                        };
                        let x = fl(&x64, &[n, c]);
                        let (l, t) = match kind {
                            "dense" => (None, fl(&dense, &[n, c])),
                            "u32" => {
                                let l: Vec<u32> =
                                    labels.iter().map(|v| (*v).max(0) as u32).collect();
                                (
                                    Some(Tensor::from_vec(l, n, dev).unwrap()),
                                    fl(&scores, &[n]),
                                )
                            }
                            _ => (
                                Some(Tensor::from_vec(labels.clone(), n, dev).unwrap()),
                                fl(&scores, &[n]),
                            ),
                        };
                        let up = if red == Reduction::None {
                            fl(&ups, &[n, c])
                        } else {
                            fl(&[0.7], &[])
                        };
                        (x, l, t, up)
                    };
                    for vfl in [false, true] {
                        let f = |x: &Tensor, l: Option<&Tensor>, t: &Tensor| {
                            if vfl {
                                let f = VarifocalLoss {
                                    reduction: red,
                                    iou_weighted: li != 1,
                                    ..Default::default()
                                };
                                match l {
                                    None => f.forward(x, t),
                                    Some(l) => f.forward_scores(x, l, t),
                                }
                            } else {
                                let f = QualityFocalLoss {
                                    reduction: red,
                                    beta: if li == 2 { 0.5 } else { 2.0 },
                                };
                                match l {
                                    None => f.forward(x, t),
                                    Some(l) => f.forward_scores(x, l, t),
                                }
                            }
                        };
                        let cpu = on_cpu_kernels(|| run(&Device::Cpu, &inputs, &f));
                        let cuda = run(&gpu, &inputs, &f);
                        let what = format!("{n}x{c} {dtype:?} {red:?} {kind} vfl={vfl}");
                        let lt = Tol::scaled(tol, 1e-3, tol);
                        let gt = Tol::scaled(tol, 1e-6, tol).at_least(grid_step(dtype));
                        lt.check(&format!("{what} loss"), &cuda.0, &cpu.0);
                        gt.check(&format!("{what} grad x"), &cuda.1, &cpu.1);
                        gt.check(&format!("{what} grad t"), &cuda.2, &cpu.2);
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_errors_name_the_loss_and_the_value() {
    let Some(gpu) = cuda_device("quality cuda errors") else {
        return;
    };
    let x = Tensor::zeros((4, 80), DType::F32, &gpu).unwrap();
    let labels = Tensor::new(&[0i64, 80, -1, 3], &gpu).unwrap();
    for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let q = QualityFocalLoss {
            reduction: red,
            ..Default::default()
        };
        let mut d = vec![0f32; 320];
        d[2 * 80 + 7] = 1.5;
        let t = Tensor::from_vec(d, (4, 80), &gpu).unwrap();
        let e = q.forward(&x, &t).unwrap_err().to_string();
        assert!(
            e.starts_with("QualityFocalLoss: target 1.5 at [2, 7]"),
            "{e}"
        );
        let s = Tensor::new(&[0.5f32, 0.0, 0.0, -1.0], &gpu).unwrap();
        let v = VarifocalLoss {
            reduction: red,
            ..Default::default()
        };
        let e = v.forward_scores(&x, &labels, &s).unwrap_err().to_string();
        assert!(e.starts_with("VarifocalLoss: score -1 at [3]"), "{e}");
        let bad = Tensor::new(&[0u32, 81, 1, 2], &gpu).unwrap();
        let s = Tensor::new(&[0.5f32, 0.5, 0.5, 0.5], &gpu).unwrap();
        let e = v.forward_scores(&x, &bad, &s).unwrap_err().to_string();
        assert!(e.starts_with("VarifocalLoss: label 81"), "{e}");
    }
}

#[test]
fn cuda_extreme_logits_finite_and_nan_propagates() {
    let Some(gpu) = cuda_device("quality cuda extremes") else {
        return;
    };
    for (dtype, big) in [(DType::F32, 100.0), (DType::F16, 30.0), (DType::BF16, 30.0)] {
        let x = Tensor::new(&[big, -big, big, -big, 0.0, f64::NAN], &gpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t = Tensor::new(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], &gpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let inputs = |_: &Device| {
            let up = Tensor::ones((3, 2), dtype, &gpu).unwrap();
            (x.clone(), None, t.clone(), up)
        };
        for beta in [0.0, 0.5, 2.0] {
            let f = |x: &Tensor, _: Option<&Tensor>, t: &Tensor| {
                QualityFocalLoss {
                    beta,
                    reduction: Reduction::None,
                }
                .forward(x, t)
            };
            let (l, gx, gt) = run(&gpu, &inputs, &f);
            assert!(
                l[..5]
                    .iter()
                    .chain(&gx[..5])
                    .chain(&gt[..5])
                    .all(|v| v.is_finite()),
                "{dtype:?} {beta}: {l:?} {gx:?} {gt:?}"
            );
            assert!(
                l[5].is_nan() && gx[5].is_nan() && gt[5].is_nan(),
                "{dtype:?} {beta}"
            );
        }
    }
}
