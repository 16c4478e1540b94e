//! Gradients to float targets that track one (a teacher's soft labels, a second prediction):
//! before, `backward()` panicked inside candle ("grad not populated") for these losses. Each
//! gradient is checked against central finite differences of the loss in f64, for every
//! reduction, with the first input tracking a gradient too (its gradient must be unchanged).

mod common;

use candle_core::{Device, Result, Tensor};
use candle_detloss::{
    ApLoss, BalancedL1Loss, BoxIouLoss, GhmcLoss, IouKind, Reduction, SigmoidFocalLoss,
    SmoothL1Loss,
};
use common::*;

/// Checks `∂/∂t` of `sum(f(x, t) · up)` against finite differences in t, and that `∂/∂x` is
/// what the loss gives when only `x` tracks a gradient.
fn check_target_grad(
    what: &str,
    x: &[f64],
    t: &[f64],
    shape: &[usize],
    red: Reduction,
    up_len: usize,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) {
    let dev = Device::Cpu;
    let mut rng = Rng::new(5);
    let up = upstream(&mut rng, red, up_len);
    let loss_shape: Vec<usize> = if red == Reduction::None {
        f(
            &Tensor::from_vec(x.to_vec(), shape, &dev).unwrap(),
            &Tensor::from_vec(t.to_vec(), shape, &dev).unwrap(),
        )
        .unwrap()
        .dims()
        .to_vec()
    } else {
        vec![]
    };
    let up_t = up_tensor(&up, red, &loss_shape, &dev);
    let xt = Tensor::from_vec(x.to_vec(), shape, &dev).unwrap();
    let tt = Tensor::from_vec(t.to_vec(), shape, &dev).unwrap();
    let (gx, gt) = grads_of_both(&xt, &tt, &up_t, &f).unwrap();
    let objective = |tv: &[f64]| {
        let tv = Tensor::from_vec(tv.to_vec(), shape, &dev).unwrap();
        weighted_sum(f(&xt, &tv).unwrap(), &up_t)
    };
    let gt = to_f64_vec(&gt);
    assert!(gt.iter().any(|v| *v != 0.0), "{what}: zero target gradient");
    check_finite_differences(&format!("{what} ∂/∂t"), &gt, t, FD, objective);
    // The first input's gradient does not change when the targets also track one.
    let (_, gx_alone) = loss_and_grad(&xt, &up_t, |x| f(x, &tt)).unwrap();
    assert_eq!(to_f64_vec(&gx), to_f64_vec(&gx_alone), "{what}: ∂/∂x");
}

#[test]
fn sigmoid_focal_dense_targets() {
    let mut rng = Rng::new(1);
    let (n, c) = (7, 5);
    let x = rng.vec_normal(n * c, 2.5);
    // Soft targets inside (0, 1) (torchvision's formula is smooth there).
    let t: Vec<f64> = (0..n * c).map(|_| 0.05 + 0.9 * rng.uniform()).collect();
    for red in REDUCTIONS {
        for (alpha, gamma) in [
            (Some(0.25), 2.0),
            (None, 0.5),
            (Some(0.6), 0.0),
            (None, 1.0),
        ] {
            let f = SigmoidFocalLoss {
                alpha,
                gamma,
                reduction: red,
                class_weights: None,
            };
            let what = format!("focal {red:?} α {alpha:?} γ {gamma}");
            check_target_grad(&what, &x, &t, &[n, c], red, n * c, |x, t| f.forward(x, t));
        }
    }
}

#[test]
fn smooth_and_balanced_l1_targets() {
    let mut rng = Rng::new(2);
    let n = 9;
    let x = rng.vec_normal(n * 4, 2.0);
    // Differences away from the kinks at |d| = β (and 0).
    let t: Vec<f64> = x
        .iter()
        .map(|v| {
            let d = 0.2 + 1.6 * rng.uniform();
            if rng.uniform() < 0.5 {
                v - d
            } else {
                v + d
            }
        })
        .collect();
    for red in REDUCTIONS {
        let s = SmoothL1Loss {
            beta: 1.0,
            reduction: red,
        };
        check_target_grad(
            &format!("smooth L1 {red:?}"),
            &x,
            &t,
            &[n, 4],
            red,
            n * 4,
            |x, t| s.forward(x, t),
        );
        let b = BalancedL1Loss {
            reduction: red,
            ..Default::default()
        };
        check_target_grad(
            &format!("balanced L1 {red:?}"),
            &x,
            &t,
            &[n, 4],
            red,
            n * 4,
            |x, t| b.forward(x, t),
        );
    }
}

/// Overlapping boxes in general position (no equal coordinates, so no ties in min / max).
fn boxes(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut p = Vec::new();
    let mut t = Vec::new();
    for _ in 0..n {
        let (x, y) = (10.0 * rng.uniform(), 10.0 * rng.uniform());
        let (w, h) = (2.0 + 5.0 * rng.uniform(), 2.0 + 5.0 * rng.uniform());
        p.extend([x, y, x + w, y + h]);
        let (dx, dy) = (rng.uniform() * 3.0 - 1.5, rng.uniform() * 3.0 - 1.5);
        let (w2, h2) = (2.0 + 5.0 * rng.uniform(), 2.0 + 5.0 * rng.uniform());
        t.extend([x + dx, y + dy, x + dx + w2, y + dy + h2]);
    }
    (p, t)
}

#[test]
fn iou_family_second_boxes() {
    let mut rng = Rng::new(3);
    let n = 8;
    let (p, t) = boxes(&mut rng, n);
    for kind in [IouKind::Iou, IouKind::Giou, IouKind::Diou] {
        for red in REDUCTIONS {
            let l = BoxIouLoss {
                kind,
                reduction: red,
                ..Default::default()
            };
            let what = format!("{kind:?} {red:?}");
            check_target_grad(&what, &p, &t, &[n, 4], red, n, |x, t| l.forward(x, t));
        }
    }
}

#[test]
fn ciou_second_boxes_with_alpha_frozen() {
    // torchvision computes CIoU's α under no_grad: the gradient (w.r.t. either box) is that of
    // DIoU + α₀·v with α₀ fixed at the evaluation point, so the differences are taken of that.
    let dev = Device::Cpu;
    let mut rng = Rng::new(4);
    let n = 6;
    let (p, t) = boxes(&mut rng, n);
    let up_v = rng.vec_normal(n, 1.0);
    let up = Tensor::from_vec(up_v.clone(), n, &dev).unwrap();
    let on = |v: &[f64]| Tensor::from_vec(v.to_vec(), (n, 4), &dev).unwrap();
    let loss = |kind| BoxIouLoss {
        kind,
        reduction: Reduction::None,
        ..Default::default()
    };
    let ciou = loss(IouKind::Ciou);
    let (_, gt) = grads_of_both(&on(&p), &on(&t), &up, |x, t| ciou.forward(x, t)).unwrap();
    let v_of = |b: &[f64], g: &[f64]| {
        let k = 4.0 / std::f64::consts::PI.powi(2);
        k * (((g[2] - g[0]) / (g[3] - g[1])).atan() - ((b[2] - b[0]) / (b[3] - b[1])).atan())
            .powi(2)
    };
    let iou_loss = to_f64_vec(&loss(IouKind::Iou).forward(&on(&p), &on(&t)).unwrap());
    let alpha0: Vec<f64> = (0..n)
        .map(|i| {
            let v = v_of(&p[4 * i..4 * i + 4], &t[4 * i..4 * i + 4]);
            v / (iou_loss[i] + v + 1e-7) // 1 - IoU = the IoU loss
        })
        .collect();
    let diou = loss(IouKind::Diou);
    let fd = finite_diff(&t, 1e-6, |ts| {
        let d = to_f64_vec(&diou.forward(&on(&p), &on(ts)).unwrap());
        (0..n)
            .map(|i| {
                up_v[i] * (d[i] + alpha0[i] * v_of(&p[4 * i..4 * i + 4], &ts[4 * i..4 * i + 4]))
            })
            .sum()
    });
    assert_close(
        "ciou ∂/∂t (alpha frozen)",
        &to_f64_vec(&gt),
        &fd,
        1e-8,
        1e-6,
    );
}

#[test]
fn ap_loss_float_targets_get_a_zero_gradient() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[0.3f64, -1.0], [2.0, 0.5], [-0.2, 1.5]], &dev).unwrap();
    let t = Tensor::new(&[[1.0f64, 0.0], [0.0, -1.0], [0.0, 1.0]], &dev).unwrap();
    let up = Tensor::new(1.0f64, &dev).unwrap();
    let ap = ApLoss::default();
    let (gx, gt) = grads_of_both(&x, &t, &up, |x, t| ap.forward(x, t)).unwrap();
    assert!(to_f64_vec(&gx).iter().any(|v| *v != 0.0));
    assert_eq!(to_f64_vec(&gt), vec![0.0; 6]);
}

#[test]
fn ghmc_dense_targets() {
    // The bin weights are held constant (mmdet); steps of 1e-6 stay inside the bins, so the
    // differences see the same weights.
    let mut rng = Rng::new(6);
    let (n, c) = (6, 5);
    let x = rng.vec_normal(n * c, 2.0);
    let t: Vec<f64> = (0..n * c).map(|_| 0.05 + 0.9 * rng.uniform()).collect();
    for red in REDUCTIONS {
        let mut ghm = GhmcLoss::new(7, 0.0);
        ghm.reduction = red;
        let ghm = std::cell::RefCell::new(ghm);
        check_target_grad(
            &format!("GHM-C {red:?}"),
            &x,
            &t,
            &[n, c],
            red,
            n * c,
            |x, t| ghm.borrow_mut().forward(x, t),
        );
    }
}
