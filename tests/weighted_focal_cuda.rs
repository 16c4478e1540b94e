//! The weighted forms of the sigmoid focal loss, QualityFocalLoss and VarifocalLoss on CUDA
//! against the CPU kernels: per-row and per-element weights, every target form, reduction and
//! dtype, the gradients of the logits, of the targets / scores and of the weight (all three
//! tracked); skipped (with a printed notice) where there is no CUDA device.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{QualityFocalLoss, Reduction, SigmoidFocalLoss, VarifocalLoss};
use common::*;

/// The loss forms: (name, target form).
const FORMS: [(&str, &str); 9] = [
    ("focal", "dense"),
    ("focal", "u32"),
    ("focal", "i64"),
    ("qfl", "dense"),
    ("qfl", "u32"),
    ("qfl", "i64"),
    ("vfl", "dense"),
    ("vfl", "u32"),
    ("vfl", "i64"),
];

/// The inputs of one side: logits, labels (label forms), the float second input (targets or
/// scores; focal labels: unused), the weight and the upstream gradient.
struct Inputs {
    x: Tensor,
    labels: Option<Tensor>,
    second: Tensor,
    w: Tensor,
    up: Tensor,
}

fn forward(
    (loss, form): (&str, &str),
    red: Reduction,
    x: &Tensor,
    labels: Option<&Tensor>,
    second: &Tensor,
    w: &Tensor,
) -> Result<Tensor> {
    match (loss, labels) {
        ("focal", None) => SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        }
        .forward_weighted(x, second, w),
        ("focal", Some(l)) => {
            let c = x.dim(1)?;
            let cw: Vec<f64> = (0..=c).map(|k| 0.5 + (k % 3) as f64 * 0.25).collect();
            let cw = Tensor::from_vec(cw, c + 1, x.device())?.to_dtype(x.dtype())?;
            SigmoidFocalLoss {
                reduction: red,
                class_weights: Some(cw),
                ..Default::default()
            }
            .forward_weighted(x, l, w)
        }
        ("qfl", l) => {
            let f = QualityFocalLoss {
                reduction: red,
                beta: if form == "i64" { 0.5 } else { 2.0 },
            };
            match l {
                None => f.forward_weighted(x, second, w),
                Some(l) => f.forward_scores_weighted(x, l, second, w),
            }
        }
        (_, l) => {
            let f = VarifocalLoss {
                reduction: red,
                iou_weighted: form != "u32",
                ..Default::default()
            };
            match l {
                None => f.forward_weighted(x, second, w),
                Some(l) => f.forward_scores_weighted(x, l, second, w),
            }
        }
    }
}

/// Loss and the gradients of the logits, the second input (where it has one) and the weight.
fn run(form: (&str, &str), red: Reduction, inp: &Inputs) -> [Vec<f64>; 4] {
    let (xv, sv, wv) = (
        Var::from_tensor(&inp.x).unwrap(),
        Var::from_tensor(&inp.second).unwrap(),
        Var::from_tensor(&inp.w).unwrap(),
    );
    let loss = forward(
        form,
        red,
        xv.as_tensor(),
        inp.labels.as_ref(),
        sv.as_tensor(),
        wv.as_tensor(),
    )
    .unwrap();
    assert!(loss.device().same_device(inp.x.device()));
    let grads = (&loss * &inp.up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = |v: &Var| grads.get(v).map(to_f64_vec).unwrap_or_default();
    [to_f64_vec(&loss), g(&xv), g(&sv), g(&wv)]
}

#[test]
fn weighted_cuda_matches_cpu() {
    let Some(gpu) = cuda_device("weighted focal cuda_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(31);
    for &(n, c, dtypes) in &[
        (
            3usize,
            37usize,
            &[DType::F32, DType::F64, DType::F16, DType::BF16][..],
        ),
        (300, 81, &[DType::F32][..]),
    ] {
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
        let w_row: Vec<f64> = (0..n).map(|_| 2.0 * rng.uniform()).collect();
        let w_elem: Vec<f64> = (0..n * c).map(|_| 2.0 * rng.uniform()).collect();
        let ups = rng.vec_normal(n * c, 1.0);
        for &dtype in dtypes {
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 2e-5,
                _ => 1e-2,
            };
            for red in REDUCTIONS {
                for form in FORMS {
                    for per_elem in [false, true] {
                        let inputs = |dev: &Device| {
                            let fl = |v: &[f64], shape: &[usize]| {
                                Tensor::from_vec(v.to_vec(), shape, dev)
                                    .unwrap()
                                    .to_dtype(dtype)
                                    .unwrap()
                            };
                            let labels = match form.1 {
                                "dense" => None,
                                "u32" => {
                                    let l: Vec<u32> =
                                        labels.iter().map(|v| (*v).max(0) as u32).collect();
                                    Some(Tensor::from_vec(l, n, dev).unwrap())
                                }
                                _ => Some(Tensor::from_vec(labels.clone(), n, dev).unwrap()),
                            };
                            let second = if form.0 != "focal" && labels.is_some() {
                                fl(&scores, &[n])
                            } else {
                                fl(&dense, &[n, c])
                            };
                            Inputs {
                                x: fl(&x64, &[n, c]),
                                labels,
                                second,
                                w: if per_elem {
                                    fl(&w_elem, &[n, c])
                                } else {
                                    fl(&w_row, &[n])
                                },
                                up: if red == Reduction::None {
                                    fl(&ups, &[n, c])
                                } else {
                                    fl(&[0.7], &[])
                                },
                            }
                        };
                        let cpu = on_cpu_kernels(|| run(form, red, &inputs(&Device::Cpu)));
                        let cuda = run(form, red, &inputs(&gpu));
                        let what =
                            format!("{n}x{c} {dtype:?} {red:?} {form:?} per_elem={per_elem}");
                        let lt = Tol::scaled(tol, 1e-3, tol);
                        let gt = Tol::scaled(tol, 1e-6, tol).at_least(grid_step(dtype));
                        lt.check(&format!("{what} loss"), &cuda[0], &cpu[0]);
                        gt.check(&format!("{what} grad x"), &cuda[1], &cpu[1]);
                        gt.check(&format!("{what} grad second"), &cuda[2], &cpu[2]);
                        gt.check(&format!("{what} grad weight"), &cuda[3], &cpu[3]);
                    }
                }
            }
        }
    }
}
