//! CUDA kernels of SmoothL1Loss, BalancedL1Loss and BoxIouLoss against the CPU kernels on the
//! same inputs (loss and gradient, every dtype and reduction). Skipped, with a printed notice,
//! where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{BalancedL1Loss, BoxIouLoss, IouKind, Reduction, SmoothL1Loss};
use common::*;

const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// CUDA and CPU-kernel results of `f` on copies of the CPU tensors `x`, `t`, `up`.
fn run(
    gpu: &Device,
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    t: &Tensor,
    up: &Tensor,
) -> CudaResults {
    let inputs = |d: &Device| [x, t, up].map(|v| v.to_device(d).unwrap());
    cuda_and_cpu(gpu, inputs, |_, x, t| f(x, t))
}

/// Tolerance (relative to the largest magnitude) by dtype: CUDA may contract to FMA and uses
/// libdevice's atan/log1p, the CPU the crate's polynomials.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

/// The smallest gradient scale a comparison may assume: a term of the per-pair gradient is
/// O(1/box side) ≥ 1e-2 for the boxes here (O(1) for the L1 losses), times the reduction's
/// factor and the upstream gradient. Where terms cancel (identical boxes) each backend keeps
/// its own rounding residue of them, so results below this scale are compared against it.
fn term_scale(red: Reduction, items: usize, up: &Tensor) -> f64 {
    let factor = match red {
        Reduction::Mean => 1.0 / items.max(1) as f64,
        Reduction::AvgFactor(f) => 1.0 / f,
        _ => 1.0,
    };
    let up_max = to_f64_vec(up).iter().fold(0f64, |m, v| m.max(v.abs()));
    1e-2 * factor * up_max
}

/// The CUDA result within [`tol`] of the CPU kernels', the gradient's absolute tolerance at
/// least `tol` of `grad_floor` (see [`term_scale`]) and one step of the dtype's grid.
fn compare(what: &str, r: &CudaResults, dtype: DType, grad_floor: f64) {
    let t = tol(dtype);
    r.assert_close(
        what,
        Tol::scaled(t, 1e-30, t),
        Tol::scaled(t, grad_floor.max(1e-30), t).at_least(grid_step(dtype)),
    );
}

fn up_for(red: Reduction, shape: &[usize], rng: &mut Rng, dtype: DType) -> Tensor {
    let cpu = Device::Cpu;
    let t = if red == Reduction::None {
        let n = shape.iter().product();
        Tensor::from_vec(rng.vec_normal(n, 1.0), shape, &cpu).unwrap()
    } else {
        Tensor::new(0.7f64, &cpu).unwrap()
    };
    t.to_dtype(dtype).unwrap()
}

#[test]
fn smooth_and_balanced_l1_cuda_match_cpu() {
    let Some(gpu) = cuda_device("smooth_and_balanced_l1_cuda_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(41);
    for shape in [
        vec![1usize],
        vec![7, 4],
        vec![3, 5, 4],
        vec![250_001, 4],
        vec![0, 4],
    ] {
        let n: usize = shape.iter().product();
        let tv = rng.vec_normal(n, 1.0);
        let xv: Vec<f64> = tv
            .iter()
            .map(|v| match rng.below(10) {
                0 => *v,
                1 => v + rng.normal(10.0),
                _ => v + rng.normal(0.7),
            })
            .collect();
        for dtype in DTYPES {
            let x = Tensor::from_vec(xv.clone(), shape.as_slice(), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let t = Tensor::from_vec(tv.clone(), shape.as_slice(), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for red in REDUCTIONS {
                let up = up_for(red, &shape, &mut rng, dtype);
                for beta in [1.0, 1.0 / 9.0, 0.0] {
                    let f = SmoothL1Loss {
                        beta,
                        reduction: red,
                    };
                    let what = format!("smooth {shape:?} {dtype:?} {red:?} beta={beta}");
                    let r = run(&gpu, |x, t| f.forward(x, t), &x, &t, &up);
                    compare(&what, &r, dtype, term_scale(red, n, &up));
                }
                for (alpha, gamma, beta) in [(0.5, 1.5, 1.0), (0.25, 2.0, 0.5)] {
                    let f = BalancedL1Loss {
                        alpha,
                        gamma,
                        beta,
                        reduction: red,
                    };
                    let what = format!("balanced {shape:?} {dtype:?} {red:?} a={alpha} b={beta}");
                    let r = run(&gpu, |x, t| f.forward(x, t), &x, &t, &up);
                    compare(&what, &r, dtype, term_scale(red, n, &up));
                }
            }
        }
    }
}

/// Random boxes plus the geometric special cases (ties, touching, nested, zero-size, inverted).
fn boxes(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let special: [([f64; 4], [f64; 4]); 8] = [
        ([10., 10., 30., 20.], [10., 10., 30., 20.]),
        ([30., 10., 40., 20.], [10., 10., 30., 20.]),
        ([15., 12.5, 25., 17.5], [10., 10., 30., 20.]),
        ([40., 30., 50., 40.], [10., 10., 30., 20.]),
        ([15., 12., 15., 18.], [10., 10., 30., 20.]),
        ([15., 14., 15., 14.], [10., 10., 30., 20.]),
        ([25., 12., 15., 18.], [10., 10., 30., 20.]),
        ([12., 11., 28., 19.], [10., 10., 30., 20.]),
    ];
    let mut p = Vec::new();
    let mut g = Vec::new();
    for i in 0..n {
        if i < special.len() {
            p.extend_from_slice(&special[i].0);
            g.extend_from_slice(&special[i].1);
            continue;
        }
        let x = rng.uniform() * 60.0;
        let y = rng.uniform() * 60.0;
        let (w, h) = (2.0 + rng.uniform() * 30.0, 2.0 + rng.uniform() * 30.0);
        g.extend_from_slice(&[x, y, x + w, y + h]);
        let (dx, dy) = (rng.normal(0.3 * w), rng.normal(0.3 * h));
        let (s, r) = (0.5 + rng.uniform(), 0.5 + rng.uniform());
        p.extend_from_slice(&[x + dx, y + dy, x + dx + w * s, y + dy + h * r]);
    }
    (p, g)
}

#[test]
fn box_iou_cuda_matches_cpu() {
    let Some(gpu) = cuda_device("box_iou_cuda_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(42);
    for n in [1usize, 9, 77, 300_007, 0] {
        let (pv, gv) = boxes(&mut rng, n);
        for dtype in DTYPES {
            let p = Tensor::from_vec(pv.clone(), (n, 4), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::from_vec(gv.clone(), (n, 4), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for kind in [IouKind::Iou, IouKind::Giou, IouKind::Diou, IouKind::Ciou] {
                for red in REDUCTIONS {
                    let up = up_for(red, &[n], &mut rng, dtype);
                    for eps in [1e-7, 0.0] {
                        let f = BoxIouLoss {
                            kind,
                            eps,
                            reduction: red,
                        };
                        let what = format!("n={n} {dtype:?} {kind:?} {red:?} eps={eps}");
                        let r = run(&gpu, |x, t| f.forward(x, t), &p, &g, &up);
                        // Finite wherever the CPU result is (a half-precision Sum of 300k
                        // losses overflows to inf on both).
                        let finite = |v: &(Vec<f64>, Vec<f64>)| {
                            v.0.iter()
                                .chain(&v.1)
                                .map(|x| x.is_finite())
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(finite(&r.cuda), finite(&r.cpu), "{what}");
                        compare(&what, &r, dtype, term_scale(red, n, &up));
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_results_are_deterministic_run_to_run() {
    let Some(gpu) = cuda_device("cuda_results_are_deterministic_run_to_run") else {
        return;
    };
    let mut rng = Rng::new(43);
    let n = 500_000;
    let (pv, gv) = boxes(&mut rng, n);
    let p = Tensor::from_vec(pv, (n, 4), &gpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let g = Tensor::from_vec(gv, (n, 4), &gpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let bits = || {
        let mut out = Vec::new();
        for red in [Reduction::Sum, Reduction::Mean] {
            let l = BoxIouLoss {
                kind: IouKind::Ciou,
                reduction: red,
                ..Default::default()
            }
            .forward(&p, &g)
            .unwrap();
            out.push(to_f64_vec(&l)[0].to_bits());
            let l = SmoothL1Loss {
                beta: 1.0 / 9.0,
                reduction: red,
            }
            .forward(&p, &g)
            .unwrap();
            out.push(to_f64_vec(&l)[0].to_bits());
            let l = BalancedL1Loss {
                reduction: red,
                ..Default::default()
            }
            .forward(&p, &g)
            .unwrap();
            out.push(to_f64_vec(&l)[0].to_bits());
        }
        out
    };
    let a = bits();
    assert_eq!(a, bits());
    assert_eq!(a, bits());
}

#[test]
fn cuda_bad_input_is_an_error_not_a_launch() {
    let Some(gpu) = cuda_device("cuda_bad_input_is_an_error_not_a_launch") else {
        return;
    };
    let p = Tensor::zeros((5, 3), DType::F32, &gpu).unwrap();
    let e = BoxIouLoss::default()
        .forward(&p, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("BoxIouLoss") && e.contains("[5, 3]"), "{e}");
    if emulated(&gpu) {
        return; // one device: nothing to mix
    }
    let cpu_t = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
    let gp = Tensor::zeros((5, 4), DType::F32, &gpu).unwrap();
    let e = SmoothL1Loss::default()
        .forward(&gp, &cpu_t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SmoothL1Loss"), "{e}");
}
