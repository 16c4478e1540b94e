//! Leading dimensions: logits `[..., C]` (boxes `[..., 4]`) with labels / targets of the
//! matching leading shape are one `[N, C]` problem. For every loss and reduction, a `[2, 3, C]`
//! input gives bit for bit the loss and gradient of its `[6, C]` flattening, and
//! `Reduction::None` keeps the leading shape (plus `C` where the 2-D form has it).

mod common;

use candle_core::{Device, Result, Tensor};
use candle_detloss::{
    ApLoss, BoxIouLoss, CrossEntropyLoss, DistributionFocalLoss, GhmcLoss, IouKind,
    QualityFocalLoss, Reduction, SigmoidFocalLoss, SmoothL1Loss, SoftmaxFocalLoss, VarifocalLoss,
};
use common::*;

const LEAD: [usize; 2] = [2, 3];
const N: usize = 6;

/// `f` on `x` `[2, 3, c]` and `t` (`[2, 3]` or `[2, 3, c]`) against `f` on their flattening.
fn check(
    what: &str,
    red: Reduction,
    (x, c): (&[f64], usize),
    t: Tensor,
    none_dims: &[usize],
    f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) {
    let dev = Device::Cpu;
    let x3 = Tensor::from_vec(x.to_vec(), (2, 3, c), &dev).unwrap();
    let x2 = x3.reshape((N, c)).unwrap();
    let t2 = if t.rank() == 2 && t.dims() == LEAD {
        t.reshape(N).unwrap()
    } else if t.rank() == 3 {
        t.reshape((N, c)).unwrap()
    } else {
        t.clone()
    };
    let up3 = |l: &Tensor| Tensor::ones(l.dims(), l.dtype(), &dev).unwrap();
    let l3 = f(&x3, &t).unwrap();
    let l2 = f(&x2, &t2).unwrap();
    if red == Reduction::None {
        assert_eq!(l3.dims(), none_dims, "{what}: None shape");
    } else {
        assert_eq!(l3.rank(), 0, "{what}: scalar");
    }
    assert_eq!(bits_of(&l3), bits_of(&l2), "{what}: loss");
    let (_, g3) = loss_and_grad(&x3, &up3(&l3), |x| f(x, &t)).unwrap();
    let (_, g2) = loss_and_grad(&x2, &up3(&l2), |x| f(x, &t2)).unwrap();
    assert_eq!(g3.dims(), x3.dims(), "{what}: gradient shape");
    assert_eq!(bits_of(&g3), bits_of(&g2), "{what}: gradient");
}

#[test]
fn every_loss_takes_leading_dims() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(9);
    let c = 5;
    let x = rng.vec_normal(N * c, 2.0);
    let labels: Vec<i64> = (0..N)
        .map(|i| (i % (c + 1)) as i64 - (i == 4) as i64)
        .collect();
    let labels3 = Tensor::from_vec(labels.clone(), (2, 3), &dev).unwrap();
    let soft = Tensor::from_vec(
        (0..N * c).map(|_| rng.uniform()).collect::<Vec<f64>>(),
        (2, 3, c),
        &dev,
    )
    .unwrap();
    let classes = Tensor::from_vec(
        labels
            .iter()
            .map(|v| v.min(&(c as i64 - 1)).to_owned())
            .collect::<Vec<i64>>(),
        (2, 3),
        &dev,
    )
    .unwrap();
    for red in REDUCTIONS {
        let focal = SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        };
        check(
            "focal labels",
            red,
            (&x, c),
            labels3.clone(),
            &[2, 3, c],
            &|x, t| focal.forward(x, t),
        );
        check(
            "focal dense",
            red,
            (&x, c),
            soft.clone(),
            &[2, 3, c],
            &|x, t| focal.forward(x, t),
        );
        let ce = CrossEntropyLoss {
            reduction: red,
            ..Default::default()
        };
        check("CE", red, (&x, c), classes.clone(), &[2, 3], &|x, t| {
            ce.forward(x, t)
        });
        let sf = SoftmaxFocalLoss {
            reduction: red,
            ..Default::default()
        };
        check(
            "softmax focal",
            red,
            (&x, c),
            classes.clone(),
            &[2, 3],
            &|x, t| sf.forward(x, t),
        );
        let mut ghm = GhmcLoss::new(10, 0.0);
        ghm.reduction = red;
        let ghm = std::cell::RefCell::new(ghm);
        check(
            "GHM-C",
            red,
            (&x, c),
            labels3.clone(),
            &[2, 3, c],
            &|x, t| ghm.borrow_mut().forward(x, t),
        );
        let qfl = QualityFocalLoss {
            reduction: red,
            ..Default::default()
        };
        check(
            "QFL dense",
            red,
            (&x, c),
            soft.clone(),
            &[2, 3, c],
            &|x, t| qfl.forward(x, t),
        );
        let vfl = VarifocalLoss {
            reduction: red,
            ..Default::default()
        };
        check(
            "VFL dense",
            red,
            (&x, c),
            soft.clone(),
            &[2, 3, c],
            &|x, t| vfl.forward(x, t),
        );
        let dist = Tensor::from_vec(
            (0..N)
                .map(|i| (i as f64 * 0.7) % (c - 1) as f64)
                .collect::<Vec<f64>>(),
            (2, 3),
            &dev,
        )
        .unwrap();
        let dfl = DistributionFocalLoss { reduction: red };
        check("DFL", red, (&x, c), dist, &[2, 3], &|x, t| {
            dfl.forward(x, t)
        });
        let sl1 = SmoothL1Loss {
            beta: 0.5,
            reduction: red,
        };
        check(
            "smooth L1",
            red,
            (&x, c),
            soft.clone(),
            &[2, 3, c],
            &|x, t| sl1.forward(x, t),
        );
        let mut boxes = Vec::new();
        for _ in 0..2 * N {
            let (x0, y0) = (10.0 * rng.uniform(), 10.0 * rng.uniform());
            boxes.extend([
                x0,
                y0,
                x0 + 1.0 + 4.0 * rng.uniform(),
                y0 + 1.0 + 4.0 * rng.uniform(),
            ]);
        }
        let tb = Tensor::from_vec(boxes[N * 4..].to_vec(), (2, 3, 4), &dev).unwrap();
        let iou = BoxIouLoss {
            kind: IouKind::Ciou,
            reduction: red,
            ..Default::default()
        };
        check("CIoU", red, (&boxes[..N * 4], 4), tb, &[2, 3], &|x, t| {
            iou.forward(x, t)
        });
    }
    let ap = ApLoss::default();
    check("AP-Loss", Reduction::Sum, (&x, c), labels3, &[], &|x, t| {
        ap.forward(x, t)
    });
}

#[test]
fn mismatched_leading_shapes_are_errors_naming_the_loss() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 5), candle_core::DType::F32, &dev).unwrap();
    let bad = Tensor::zeros((3, 2), candle_core::DType::I64, &dev).unwrap();
    let e = err_of(SigmoidFocalLoss::default().forward(&x, &bad));
    assert!(
        e.starts_with("SigmoidFocalLoss: targets must have the leading shape [2, 3]"),
        "{e}"
    );
    let e = err_of(ApLoss::default().forward(&x, &bad));
    assert!(
        e.starts_with("ApLoss: targets must have the leading shape [2, 3]"),
        "{e}"
    );
}
