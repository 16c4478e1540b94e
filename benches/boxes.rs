//! Criterion: fused smooth L1, balanced L1, GIoU and CIoU losses on `[N, 4]` vs the same losses
//! composed from candle ops (candle's autograd for the backward) vs a plain pass over the inputs.

#[path = "../examples/common/composed.rs"]
mod composed;

use candle_core::{Device, Result, Tensor, Var};
use candle_detloss::{BalancedL1Loss, BoxIouLoss, IouKind, Reduction, SmoothL1Loss};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

/// The four timings of one loss of `p` against `t`: fused fwd, fused fwd+bwd, composed
/// fwd+bwd, copy floor.
fn group(
    c: &mut Criterion,
    name: &str,
    p: &Var,
    t: &Tensor,
    fused: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    composed: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    let x = p.as_tensor();
    g.bench_function("fused_fwd", |b| b.iter(|| black_box(fused(x, t).unwrap())));
    g.bench_function("fused_fwd_bwd", |b| {
        b.iter(|| black_box(fused(x, t).unwrap().backward().unwrap()))
    });
    g.bench_function("composed_fwd_bwd", |b| {
        b.iter(|| black_box(composed(x, t).unwrap().backward().unwrap()))
    });
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ts: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    g.bench_function("copy_floor", |b| {
        b.iter(|| {
            let out: Vec<f32> = xs.iter().zip(&ts).map(|(a, b)| a + b).collect();
            black_box(out)
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let n = 50_000usize;
    let numel = (n * 4) as f64;
    let p = Var::randn(0f32, 1.0, (n, 4), &dev).expect("pred");
    let t = Tensor::randn(0f32, 1.0, (n, 4), &dev).expect("target");
    let beta = 1.0 / 9.0;
    let sl = SmoothL1Loss {
        beta,
        reduction: Reduction::Mean,
    };
    group(
        c,
        "smooth_l1_50000x4_f32",
        &p,
        &t,
        &|x, t| sl.forward(x, t),
        &|x, t| composed::smooth_l1(x, t, beta, numel),
    );
    let bl = BalancedL1Loss::default();
    group(
        c,
        "balanced_l1_50000x4_f32",
        &p,
        &t,
        &|x, t| bl.forward(x, t),
        &|x, t| composed::balanced_l1(x, t, 0.5, 1.5, 1.0, numel),
    );
    // Boxes: corners in [0, 100), sides in [5, 55); the predictions jittered.
    let corner = Tensor::rand(0f32, 100.0, (n, 2), &dev).expect("xy");
    let side = Tensor::rand(5f32, 55.0, (n, 2), &dev).expect("wh");
    let gt = Tensor::cat(&[&corner, &(&corner + &side).expect("x2y2")], 1).expect("gt");
    let jitter = Tensor::randn(0f32, 3.0, (n, 4), &dev).expect("jitter");
    let pred = Var::from_tensor(&(&gt + jitter).expect("pred")).expect("pred");
    for (name, kind) in [
        ("giou_50000x4_f32", IouKind::Giou),
        ("ciou_50000x4_f32", IouKind::Ciou),
    ] {
        let f = BoxIouLoss {
            kind,
            ..Default::default()
        };
        group(c, name, &pred, &gt, &|x, t| f.forward(x, t), &|x, t| {
            if kind == IouKind::Giou {
                composed::giou(x, t, f.eps, n as f64)
            } else {
                composed::ciou(x, t, f.eps, n as f64)
            }
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
