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

const REDUCTIONS: [Reduction; 4] = [
    Reduction::None,
    Reduction::Sum,
    Reduction::Mean,
    Reduction::AvgFactor(7.5),
];

/// Per-dtype (atol relative to the largest magnitude, rtol) for CUDA vs CPU: the two differ
/// only in their exp/log implementations and summation order.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-10),
        DType::F32 => (2e-6, 2e-5),
        DType::F16 => (2e-3, 4e-3),
        _ => (1.6e-2, 3e-2),
    }
}

fn compare(what: &str, dtype: DType, cuda: &[f64], cpu: &[f64]) {
    let (a, r) = tol(dtype);
    let scale = cpu.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    assert_close(what, cuda, cpu, a * scale, r);
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
            let xg = xc.to_device(&gpu).unwrap();
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
                let lg = lc.to_device(&gpu).unwrap();
                for red in REDUCTIONS {
                    let upc = if red == Reduction::None {
                        Tensor::from_vec(rng.vec_normal(n, 1.0), n, &cpu).unwrap()
                    } else {
                        Tensor::new(0.7f64, &cpu).unwrap()
                    }
                    .to_dtype(dtype)
                    .unwrap();
                    let upg = upc.to_device(&gpu).unwrap();
                    for weighted in [false, true] {
                        let cw = |d: &Device| weighted.then(|| wc.to_device(d).unwrap());
                        type F = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>>;
                        let losses: Vec<(String, F, F)> = vec![("ce", 0.0), ("ce_ls", 0.1)]
                            .into_iter()
                            .map(|(nm, ls)| {
                                let mk = |d: &Device| {
                                    let f = CrossEntropyLoss {
                                        reduction: red,
                                        class_weights: cw(d),
                                        label_smoothing: ls,
                                    };
                                    Box::new(move |x: &Tensor, l: &Tensor| f.forward(x, l)) as F
                                };
                                (nm.to_string(), mk(&cpu), mk(&gpu))
                            })
                            .chain([(Some(0.25), 2.0), (None, 0.5)].into_iter().map(|(a, g)| {
                                let mk = |d: &Device| {
                                    let f = SoftmaxFocalLoss {
                                        alpha: a,
                                        gamma: g,
                                        reduction: red,
                                        class_weights: cw(d),
                                    };
                                    Box::new(move |x: &Tensor, l: &Tensor| f.forward(x, l)) as F
                                };
                                (format!("focal a={a:?} g={g}"), mk(&cpu), mk(&gpu))
                            }))
                            .collect();
                        for (nm, fc, fg) in &losses {
                            let what = format!(
                                "{nm} {n}x{k} {dtype:?} u32={u32_labels} w={weighted} {red:?}"
                            );
                            let (l1, g1) =
                                on_cpu_kernels(|| loss_and_grad(&xc, &upc, |x| fc(x, &lc)))
                                    .unwrap();
                            let (l2, g2) = loss_and_grad(&xg, &upg, |x| fg(x, &lg)).unwrap();
                            assert_eq!(l1.dims(), l2.dims(), "{what}");
                            compare(
                                &format!("{what} loss"),
                                dtype,
                                &to_f64_vec(&l2),
                                &to_f64_vec(&l1),
                            );
                            compare(
                                &format!("{what} grad"),
                                dtype,
                                &to_f64_vec(&g2),
                                &to_f64_vec(&g1),
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
            for dense in [false, true] {
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
                            let (xg, tg, upg) = (
                                xc.to_device(&gpu).unwrap(),
                                tc.to_device(&gpu).unwrap(),
                                upc.to_device(&gpu).unwrap(),
                            );
                            let (l1, g1) = on_cpu_kernels(|| {
                                loss_and_grad(&xc, &upc, |x| fc.borrow_mut().forward(x, &tc))
                            })
                            .unwrap();
                            let (l2, g2) =
                                loss_and_grad(&xg, &upg, |x| fg.borrow_mut().forward(x, &tg))
                                    .unwrap();
                            let what = format!(
                                "{n}x{c} {dtype:?} dense={dense} bins={bins} m={mom} {red:?} step {step}"
                            );
                            compare(
                                &format!("{what} loss"),
                                dtype,
                                &to_f64_vec(&l2),
                                &to_f64_vec(&l1),
                            );
                            compare(
                                &format!("{what} grad"),
                                dtype,
                                &to_f64_vec(&g2),
                                &to_f64_vec(&g1),
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
