//! Gradients to tracked float targets on CUDA (or the emulated CUDA kernels) against the CPU
//! kernels, for every dtype and reduction: sigmoid focal's and GHM-C's target kernels, smooth L1's
//! negated gradient and the IoU family's swapped backward. Skipped (with a printed notice)
//! where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_detloss::{BoxIouLoss, GhmcLoss, IouKind, Reduction, SigmoidFocalLoss, SmoothL1Loss};
use common::*;

/// A loss of `(x, t)`.
type LossFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;
/// `(x, t, shape)` in f64.
type Inputs<'a> = (&'a [f64], &'a [f64], &'a [usize]);

/// `(∂/∂x, ∂/∂t)` of `sum(f(x, t) · up)` on `dev`, both inputs tracking a gradient.
fn both_grads(
    dev: &Device,
    dtype: DType,
    (x, t, shape): Inputs<'_>,
    up: &[f64],
    red: Reduction,
    f: LossFn<'_>,
) -> (Vec<f64>, Vec<f64>) {
    let on = |v: &[f64], s: &[usize]| {
        Tensor::from_vec(v.to_vec(), s, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let (xt, tt) = (on(x, shape), on(t, shape));
    let loss_shape = f(&xt, &tt).unwrap().dims().to_vec();
    let up = if red == Reduction::None {
        on(&up[..loss_shape.iter().product::<usize>()], &loss_shape)
    } else {
        on(&up[..1], &[])
    };
    let (gx, gt) = grads_of_both(&xt, &tt, &up, f).unwrap();
    assert!(gt.device().same_device(dev));
    (to_f64_vec(&gx), to_f64_vec(&gt))
}

fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F64 => Tol::abs(1e-12, 1e-10),
        DType::F32 => Tol::scaled(2e-5, 1e-3, 2e-5),
        _ => Tol::scaled(2e-2, 1e-3, 2e-2).at_least(grid_step(dtype)),
    }
}

#[test]
fn target_gradients_match_cpu() {
    let Some(gpu) = cuda_device("target_grads cuda") else {
        return;
    };
    let mut rng = Rng::new(17);
    let (n, c) = (300, 7);
    let x = rng.vec_normal(n * c, 3.0);
    let soft: Vec<f64> = (0..n * c).map(|_| rng.uniform()).collect();
    let up = rng.vec_normal(n * c, 1.0);
    let mut boxes = Vec::new();
    for _ in 0..2 * n {
        let (x0, y0) = (10.0 * rng.uniform(), 10.0 * rng.uniform());
        boxes.extend([
            x0,
            y0,
            x0 + 1.0 + 5.0 * rng.uniform(),
            y0 + 1.0 + 5.0 * rng.uniform(),
        ]);
    }
    let (p, tb) = boxes.split_at(n * 4);
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for red in [
            Reduction::None,
            Reduction::Sum,
            Reduction::Mean,
            Reduction::AvgFactor(3.0),
        ] {
            let focal = SigmoidFocalLoss {
                reduction: red,
                ..Default::default()
            };
            let smooth = SmoothL1Loss {
                beta: 0.5,
                reduction: red,
            };
            let giou = BoxIouLoss {
                kind: IouKind::Ciou,
                reduction: red,
                ..Default::default()
            };
            let mut ghm = GhmcLoss::new(10, 0.0);
            ghm.reduction = red;
            let ghm = std::cell::RefCell::new(ghm);
            let cases: [(&str, Inputs<'_>, LossFn<'_>); 4] = [
                ("GHM-C", (&x, &soft, &[n, c]), &|x, t| {
                    ghm.borrow_mut().forward(x, t)
                }),
                ("focal", (&x, &soft, &[n, c]), &|x, t| focal.forward(x, t)),
                ("smooth L1", (&x, &soft, &[n * c / 7, 7]), &|x, t| {
                    smooth.forward(x, t)
                }),
                ("CIoU", (p, tb, &[n, 4]), &|x, t| giou.forward(x, t)),
            ];
            for (name, inputs, f) in cases {
                let cpu = on_cpu_kernels(|| both_grads(&Device::Cpu, dtype, inputs, &up, red, f));
                let cuda = both_grads(&gpu, dtype, inputs, &up, red, f);
                let what = format!("{name} {dtype:?} {red:?}");
                tol(dtype).check(&format!("{what} ∂/∂x"), &cuda.0, &cpu.0);
                tol(dtype).check(&format!("{what} ∂/∂t"), &cuda.1, &cpu.1);
            }
        }
    }
}
