//! CUDA kernels of CrossEntropyLoss, SoftmaxFocalLoss and GhmcLoss against the CPU kernels on
//! the same inputs (every dtype, reduction, label type, warp- and block-per-row shapes), label
//! errors raised through the device flag, and class_balanced_weights on the device. Skipped,
//! with a printed notice, where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{
    class_balanced_weights, CrossEntropyLoss, GhmcLoss, Reduction, SoftmaxFocalLoss,
};
use common::*;

/// Per-dtype tolerance (atol relative to the largest magnitude, rtol) for CUDA vs CPU: the two
/// differ only in their exp/log implementations and summation order.
fn tol(dtype: DType) -> Tol {
    let (a, r) = match dtype {
        DType::F64 => (1e-12, 1e-10),
        DType::F32 => (2e-6, 2e-5),
        DType::F16 => (2e-3, 4e-3),
        _ => (1.6e-2, 3e-2),
    };
    Tol::scaled(a, 1e-6, r)
}

/// `v` rounded to `dtype`.
fn round_to(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F32 => v as f32 as f64,
        _ => v,
    }
}

fn labels(rng: &mut Rng, n: usize, hi: u64, ignore: bool) -> Vec<i64> {
    (0..n)
        .map(|_| {
            if ignore && rng.below(8) == 0 {
                -1
            } else {
                rng.below(hi) as i64
            }
        })
        .collect()
}

/// The softmax losses compared: cross-entropy (label smoothing) and softmax focal (alpha, gamma).
#[derive(Clone, Copy, Debug)]
enum Softmax {
    Ce(&'static str, f64),
    Focal(Option<f64>, f64),
}

impl Softmax {
    fn name(self) -> String {
        match self {
            Softmax::Ce(name, _) => name.to_string(),
            Softmax::Focal(a, g) => format!("focal a={a:?} g={g}"),
        }
    }

    fn forward(
        self,
        reduction: Reduction,
        class_weights: Option<Tensor>,
        x: &Tensor,
        l: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self {
            Softmax::Ce(_, label_smoothing) => CrossEntropyLoss {
                reduction,
                class_weights,
                label_smoothing,
            }
            .forward(x, l),
            Softmax::Focal(alpha, gamma) => SoftmaxFocalLoss {
                alpha,
                gamma,
                reduction,
                class_weights,
            }
            .forward(x, l),
        }
    }
}

#[test]
fn softmax_losses_cuda_match_cpu() {
    let Some(gpu) = cuda_device("softmax_losses_cuda_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(41);
    // Warp-per-row (K <= 1024) and block-per-row (K > 1024) shapes, and a 1-class row.
    for &(n, k) in &[(1usize, 1usize), (300, 81), (2100, 21), (7, 3000)] {
        let x64 = rng.vec_normal(n * k, 3.0);
        let lab = labels(&mut rng, n, k as u64, true);
        let w: Vec<f64> = (0..k).map(|_| 0.2 + rng.uniform()).collect();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let xc = Tensor::from_vec(x64.clone(), (n, k), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wc = Tensor::from_vec(w.clone(), k, &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for u32_labels in [false, true] {
                let lc = if u32_labels {
                    Tensor::from_vec(
                        lab.iter()
                            .map(|v| v.max(&0).to_owned() as u32)
                            .collect::<Vec<_>>(),
                        n,
                        &cpu,
                    )
                    .unwrap()
                } else {
                    Tensor::from_vec(lab.clone(), n, &cpu).unwrap()
                };
                for red in REDUCTIONS {
                    let upc = if red == Reduction::None {
                        Tensor::from_vec(rng.vec_normal(n, 1.0), n, &cpu).unwrap()
                    } else {
                        Tensor::new(0.7f64, &cpu).unwrap()
                    }
                    .to_dtype(dtype)
                    .unwrap();
                    let inputs = |d: &Device| [&xc, &lc, &upc].map(|t| t.to_device(d).unwrap());
                    for weighted in [false, true] {
                        let cw = |d: &Device| weighted.then(|| wc.to_device(d).unwrap());
                        for loss in [
                            Softmax::Ce("ce", 0.0),
                            Softmax::Ce("ce_ls", 0.1),
                            Softmax::Focal(Some(0.25), 2.0),
                            Softmax::Focal(None, 0.5),
                        ] {
                            let what = format!(
                                "{} {n}x{k} {dtype:?} u32={u32_labels} w={weighted} {red:?}",
                                loss.name()
                            );
                            let forward = |side: Side, x: &Tensor, l: &Tensor| {
                                loss.forward(red, cw(side.dev), x, l)
                            };
                            cuda_and_cpu(&gpu, inputs, forward).assert_close(
                                &what,
                                tol(dtype),
                                tol(dtype),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn ghmc_cuda_matches_cpu_including_the_running_histogram() {
    let Some(gpu) = cuda_device("ghmc_cuda_matches_cpu_including_the_running_histogram") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(42);
    for &(n, c) in &[(1usize, 1usize), (500, 80), (64, 7)] {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            // Targets: i64 labels (with ignored rows), u32 labels, dense {0, 1}.
            for (dense, u32_labels) in [(false, false), (false, true), (true, false)] {
                for (bins, mom) in [(10, 0.0), (30, 0.75), (9000, 0.0)] {
                    for red in REDUCTIONS {
                        let mk = || {
                            let mut f = GhmcLoss::default();
                            f.bins = bins;
                            f.momentum = mom;
                            f.reduction = red;
                            std::cell::RefCell::new(f)
                        };
                        let (fc, fg) = (mk(), mk());
                        for step in 0..2 {
                            // Targets first, then logits whose gradient norm g (in the dtype)
                            // keeps clear of every bin edge: the two devices' exp differ by an
                            // ulp or so, which must not move an element to another bin.
                            let t: Vec<f64> = if dense {
                                (0..n * c)
                                    .map(|_| (rng.below(4) == 0) as u8 as f64)
                                    .collect()
                            } else {
                                vec![]
                            };
                            let lab = labels(&mut rng, n, c as u64 + 1, true);
                            // u32 labels have no ignore value: those rows become background.
                            let lab: Vec<i64> = if u32_labels {
                                lab.iter()
                                    .map(|&k| if k < 0 { c as i64 } else { k })
                                    .collect()
                            } else {
                                lab
                            };
                            let tval = |e: usize| {
                                if dense {
                                    t[e]
                                } else {
                                    (lab[e / c] == (e % c) as i64) as u8 as f64
                                }
                            };
                            let x: Vec<f64> = (0..n * c)
                                .map(|e| loop {
                                    let v = round_to(rng.normal(3.0), dtype);
                                    let g = (1.0 / (1.0 + (-v).exp()) - tval(e)).abs();
                                    let edge = (g * bins as f64).round() / bins as f64;
                                    if (g - edge).abs() > 1e-6 {
                                        break v;
                                    }
                                })
                                .collect();
                            let xc = Tensor::from_vec(x, (n, c), &cpu)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap();
                            let tc = if dense {
                                Tensor::from_vec(t, (n, c), &cpu)
                                    .unwrap()
                                    .to_dtype(dtype)
                                    .unwrap()
                            } else if u32_labels {
                                let lu: Vec<u32> = lab.iter().map(|&k| k as u32).collect();
                                Tensor::from_vec(lu, n, &cpu).unwrap()
                            } else {
                                Tensor::from_vec(lab, n, &cpu).unwrap()
                            };
                            let upc = if red == Reduction::None {
                                Tensor::from_vec(rng.vec_normal(n * c, 1.0), (n, c), &cpu).unwrap()
                            } else {
                                Tensor::new(0.7f64, &cpu).unwrap()
                            }
                            .to_dtype(dtype)
                            .unwrap();
                            let what = format!(
                                "{n}x{c} {dtype:?} dense={dense} u32={u32_labels} bins={bins} m={mom} {red:?} step {step}"
                            );
                            // One running histogram a side.
                            let forward = |side: Side, x: &Tensor, t: &Tensor| {
                                let f = if side.cpu_kernels { &fc } else { &fg };
                                f.borrow_mut().forward(x, t)
                            };
                            let inputs =
                                |d: &Device| [&xc, &tc, &upc].map(|t| t.to_device(d).unwrap());
                            cuda_and_cpu(&gpu, inputs, forward).assert_close(
                                &what,
                                tol(dtype),
                                tol(dtype),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_label_errors_and_class_balanced_weights_on_device() {
    let Some(gpu) = cuda_device("cuda_label_errors_and_class_balanced_weights_on_device") else {
        return;
    };
    let x = Tensor::zeros((4, 5), DType::F32, &gpu).unwrap();
    let bad = Tensor::new(&[0i64, 5, 1, -1], &gpu).unwrap();
    let e = CrossEntropyLoss::default()
        .forward(&x, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CrossEntropyLoss") && e.contains("label 5"),
        "{e}"
    );
    let e = SoftmaxFocalLoss::default()
        .forward(&x, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SoftmaxFocalLoss") && e.contains("label 5"),
        "{e}"
    );
    let bad = Tensor::new(&[0i64, 6, 1, -1], &gpu).unwrap();
    let e = GhmcLoss::default()
        .forward(&x, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("GhmcLoss") && e.contains("label 6"), "{e}");
    let t = Tensor::new(&[[0f32, 1.0, 2.0, 0.0, 0.0]], &gpu)
        .unwrap()
        .broadcast_as((4, 5))
        .unwrap();
    let e = GhmcLoss::default().forward(&x, &t).unwrap_err().to_string();
    assert!(e.contains("GhmcLoss") && e.contains("[0, 1]"), "{e}");
    // Weights made on the device feed the device losses.
    let w = class_balanced_weights(&[10, 20, 30, 40, 50], 0.99, &gpu).unwrap();
    assert!(w.device().same_device(&gpu));
    let ce = CrossEntropyLoss {
        class_weights: Some(w),
        ..Default::default()
    };
    let l = ce
        .forward(&x, &Tensor::new(&[0u32, 1, 2, 3], &gpu).unwrap())
        .unwrap();
    let v = l.to_scalar::<f32>().unwrap();
    assert!((v - 5f32.ln()).abs() < 1e-5, "{v}");
}
