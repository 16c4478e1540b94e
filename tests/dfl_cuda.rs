//! CUDA kernels of DistributionFocalLoss against the CPU kernels on the same inputs (every
//! dtype and reduction, K = 1, 2, 17 and rows longer than a warp; the gradient to the logits and
//! to the targets), target errors raised through the device flag, and run-to-run determinism.
//! Skipped, with a printed notice, where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{DistributionFocalLoss, Reduction};
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
    Tol::scaled(a, 1e-6, r).at_least(grid_step(dtype))
}

/// Targets in [0, K-1] with 0, integers and K - 1 mixed in.
fn targets(rng: &mut Rng, n: usize, k: usize) -> Vec<f64> {
    let top = (k - 1) as f64;
    (0..n)
        .map(|i| match i % 5 {
            0 => 0.0,
            1 => top,
            2 => rng.below(k as u64) as f64,
            _ => rng.uniform() * top,
        })
        .collect()
}

/// ∂ sum(loss · up) / ∂targets with the targets a `Var` on `dev`.
fn target_grad(x: &Tensor, y: &Tensor, up: &Tensor, red: Reduction) -> Vec<f64> {
    let yv = Var::from_tensor(y).unwrap();
    let loss = DistributionFocalLoss { reduction: red }
        .forward(x, yv.as_tensor())
        .unwrap();
    let obj = (&loss * up.to_dtype(loss.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    to_f64_vec(obj.backward().unwrap().get(&yv).unwrap())
}

#[test]
fn dfl_cuda_matches_cpu() {
    let Some(gpu) = cuda_device("dfl_cuda_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(61);
    // K = 1 and 2, YOLOv8's 16 / 17 bins over enough rows for several blocks, rows longer
    // than a warp.
    for &(n, k) in &[(3usize, 1usize), (50, 2), (2100, 17), (300, 16), (9, 75)] {
        let x64 = rng.vec_normal(n * k, 3.0);
        let y64 = targets(&mut rng, n, k);
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let xc = Tensor::from_vec(x64.clone(), (n, k), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let yc = Tensor::from_vec(y64.clone(), n, &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for red in REDUCTIONS {
                let upc = up_tensor(&upstream(&mut rng, red, n), red, &[n], &cpu)
                    .to_dtype(dtype)
                    .unwrap();
                let what = format!("{n}x{k} {dtype:?} {red:?}");
                let inputs = |d: &Device| [&xc, &yc, &upc].map(|t| t.to_device(d).unwrap());
                let forward = |_: Side, x: &Tensor, y: &Tensor| {
                    DistributionFocalLoss { reduction: red }.forward(x, y)
                };
                cuda_and_cpu(&gpu, inputs, forward).assert_close(&what, tol(dtype), tol(dtype));
                // The gradient to the targets.
                let run = |d: &Device| {
                    let [x, y, up] = inputs(d);
                    target_grad(&x, &y, &up, red)
                };
                let want = on_cpu_kernels(|| run(&cpu));
                tol(dtype).check(&format!("{what} target grad"), &run(&gpu), &want);
            }
        }
    }
}

#[test]
fn dfl_cuda_extremes_and_nan() {
    let Some(gpu) = cuda_device("dfl_cuda_extremes_and_nan") else {
        return;
    };
    let cpu = Device::Cpu;
    for (dtype, big) in [(DType::F32, 100.0), (DType::F16, 30.0), (DType::BF16, 30.0)] {
        let rows: [[f64; 3]; 4] = [
            [big, -big, -big],    // y = 0
            [-big, -big, big],    // y = 0.5
            [-big, -big, -big],   // ties, y = 2
            [f64::NAN, 0.0, 1.0], // NaN row
        ];
        let xs = rows.concat();
        let ys = [0.0, 0.5, 2.0, 1.0];
        let xc = Tensor::from_vec(xs.to_vec(), (4, 3), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let yc = Tensor::from_vec(ys.to_vec(), 4, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let upc = Tensor::ones(4, dtype, &cpu).unwrap();
        let inputs = |d: &Device| [&xc, &yc, &upc].map(|t| t.to_device(d).unwrap());
        let forward = |_: Side, x: &Tensor, y: &Tensor| {
            DistributionFocalLoss {
                reduction: Reduction::None,
            }
            .forward(x, y)
        };
        let r = cuda_and_cpu(&gpu, inputs, forward);
        r.assert_close(&format!("{dtype:?}"), tol(dtype), tol(dtype));
        let (l, g) = &r.cuda;
        assert!(
            l[..3].iter().chain(&g[..9]).all(|v| v.is_finite()),
            "{l:?} {g:?}"
        );
        assert!(
            l[3].is_nan() && g[9..].iter().all(|v| v.is_nan()),
            "{l:?} {g:?}"
        );
        let [x, y, up] = inputs(&gpu);
        let gy = target_grad(&x, &y, &up, Reduction::None);
        assert!(
            gy[..3].iter().all(|v| v.is_finite()) && gy[3].is_nan(),
            "{gy:?}"
        );
    }
}

#[test]
fn dfl_cuda_target_errors_through_the_device_flag() {
    let Some(gpu) = cuda_device("dfl_cuda_target_errors_through_the_device_flag") else {
        return;
    };
    let x = Tensor::zeros((4, 17), DType::F32, &gpu).unwrap();
    for red in REDUCTIONS {
        for (bad, needle) in [
            (-0.5, "target -0.5 at [2]"),
            (16.5, "target 16.5 at [2]"),
            (f64::NAN, "target NaN at [2]"),
        ] {
            let y = Tensor::new(&[0.0f32, 1.0, bad as f32, 2.0], &gpu).unwrap();
            check_error(
                Named::First("DistributionFocalLoss"),
                DistributionFocalLoss { reduction: red }.forward(&x, &y),
                &[needle, "outside [0, 16]"],
            );
        }
    }
    // An empty batch launches nothing.
    let x = Tensor::zeros((0, 16), DType::F32, &gpu).unwrap();
    let y = Tensor::zeros(0, DType::F32, &gpu).unwrap();
    check_empty_batch(&[0], |red| {
        DistributionFocalLoss { reduction: red }
            .forward(&x, &y)
            .unwrap()
    });
}

#[test]
fn dfl_cuda_results_are_deterministic_run_to_run() {
    let Some(gpu) = cuda_device("dfl_cuda_results_are_deterministic_run_to_run") else {
        return;
    };
    let mut rng = Rng::new(62);
    let (n, k) = (3000, 17);
    let x = Tensor::from_vec(rng.vec_normal(n * k, 2.0), (n, k), &gpu).unwrap();
    let y = Tensor::from_vec(targets(&mut rng, n, k), n, &gpu).unwrap();
    let bits = || {
        let mut b = Vec::new();
        for red in [Reduction::Mean, Reduction::None] {
            let up = unit_upstream(red, &[n], DType::F64, &gpu);
            let (l, g) = loss_and_grad(&x, &up, |x| {
                DistributionFocalLoss { reduction: red }.forward(x, &y)
            })
            .unwrap();
            push_bits(&mut b, &l, &g);
            b.extend(target_grad(&x, &y, &up, red).iter().map(|v| v.to_bits()));
        }
        b
    };
    let a = bits();
    assert_eq!(a, bits());
}
