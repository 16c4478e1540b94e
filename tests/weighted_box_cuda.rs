//! `forward_weighted` of SmoothL1Loss, BalancedL1Loss, BoxIouLoss and DistributionFocalLoss on
//! the CUDA kernels against the CPU kernels (loss and input gradient, every dtype, reduction
//! and weight form). Skipped, with a printed notice, where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_detloss::{
    BalancedL1Loss, BoxIouLoss, DistributionFocalLoss, IouKind, Reduction, SmoothL1Loss,
};
use common::*;

const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
const K: usize = 16;

/// Tolerance (relative to the largest magnitude) by dtype, as tests/box_cuda.rs and
/// tests/dfl_cuda.rs: FMA contraction and libdevice's functions against the CPU's.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Smooth,
    Balanced,
    Iou(IouKind),
    Dfl,
}

fn run(loss: Loss, red: Reduction, x: &Tensor, t: &Tensor, w: &Tensor) -> Result<Tensor> {
    match loss {
        Loss::Smooth => SmoothL1Loss {
            beta: 1.0 / 9.0,
            reduction: red,
        }
        .forward_weighted(x, t, w),
        Loss::Balanced => BalancedL1Loss {
            reduction: red,
            ..Default::default()
        }
        .forward_weighted(x, t, w),
        Loss::Iou(kind) => BoxIouLoss {
            kind,
            reduction: red,
            ..Default::default()
        }
        .forward_weighted(x, t, w),
        Loss::Dfl => DistributionFocalLoss { reduction: red }.forward_weighted(x, t, w),
    }
}

fn boxes(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n)
        .flat_map(|_| {
            let (x, y) = (rng.uniform() * 40.0, rng.uniform() * 40.0);
            let (w, h) = (4.0 + rng.uniform() * 30.0, 4.0 + rng.uniform() * 30.0);
            [x, y, x + w, y + h]
        })
        .collect()
}

#[test]
fn weighted_box_losses_cuda_match_cpu() {
    let Some(gpu) = cuda_device("weighted_box_losses_cuda_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(77);
    let losses = [
        Loss::Smooth,
        Loss::Balanced,
        Loss::Iou(IouKind::Iou),
        Loss::Iou(IouKind::Giou),
        Loss::Iou(IouKind::Diou),
        Loss::Iou(IouKind::Ciou),
        Loss::Dfl,
    ];
    for loss in losses {
        // More than one CPU chunk: 16384 elements, 4096 IoU rows, 1024 DFL rows of 16.
        let big = if matches!(loss, Loss::Dfl) {
            2100
        } else {
            5000
        };
        for n in [1usize, 300, big] {
            let (x, xs, t, ts) = match loss {
                Loss::Dfl => {
                    let t: Vec<f64> = (0..n).map(|_| rng.uniform() * (K - 1) as f64).collect();
                    (rng.vec_normal(n * K, 2.0), vec![n, K], t, vec![n])
                }
                Loss::Iou(_) => (
                    boxes(&mut rng, n),
                    vec![n, 4],
                    boxes(&mut rng, n),
                    vec![n, 4],
                ),
                _ => (
                    rng.vec_normal(4 * n, 1.0),
                    vec![n, 4],
                    rng.vec_normal(4 * n, 1.0),
                    vec![n, 4],
                ),
            };
            let mut wshapes = vec![vec![n]];
            if matches!(loss, Loss::Smooth | Loss::Balanced) {
                wshapes.push(vec![n, 4]);
            }
            for wshape in wshapes {
                let wlen: usize = wshape.iter().product();
                let w: Vec<f64> = (0..wlen).map(|i| (i % 5) as f64 * 0.4).collect();
                for dtype in DTYPES {
                    let mk = |v: &[f64], s: &[usize]| {
                        Tensor::from_vec(v.to_vec(), s, &cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    };
                    let (xt, tt, wt) = (mk(&x, &xs), mk(&t, &ts), mk(&w, &wshape));
                    for red in REDUCTIONS {
                        let none: Vec<usize> = match loss {
                            Loss::Smooth | Loss::Balanced => vec![n, 4],
                            _ => vec![n],
                        };
                        let up = if red == Reduction::None {
                            mk(&rng.vec_normal(none.iter().product(), 1.0), &none)
                        } else {
                            Tensor::new(0.7f64, &cpu).unwrap().to_dtype(dtype).unwrap()
                        };
                        let inputs = |d: &Device| [&xt, &tt, &up].map(|v| v.to_device(d).unwrap());
                        let r = cuda_and_cpu(&gpu, inputs, |side, x, t| {
                            run(loss, red, x, t, &wt.to_device(side.dev)?)
                        });
                        let factor = match red {
                            Reduction::Mean => 1.0 / none.iter().product::<usize>() as f64,
                            Reduction::AvgFactor(f) => 1.0 / f,
                            _ => 1.0,
                        };
                        let floor = 1e-2 * factor * max_abs(&to_f64_vec(&up));
                        let tl = tol(dtype);
                        r.assert_close(
                            &format!("{loss:?} n={n} w{wshape:?} {dtype:?} {red:?}"),
                            Tol::scaled(tl, 1e-30, tl),
                            Tol::scaled(tl, floor.max(1e-30), tl).at_least(grid_step(dtype)),
                        );
                    }
                }
            }
        }
    }
}
