//! Criterion: fused softmax cross-entropy, softmax focal loss and GHM-C vs the same losses
//! composed from candle ops (candle's autograd for the backward) vs a plain pass over the logits.

#[path = "../examples/common/composed.rs"]
mod composed;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{CrossEntropyLoss, GhmcLoss, SoftmaxFocalLoss};
use criterion::{criterion_group, criterion_main, Criterion};
use std::cell::RefCell;
use std::hint::black_box;

/// `n` labels over `c` columns: 1 % ignored, 3 % classes, the rest `bg`.
fn labels(n: usize, c: usize, bg: usize) -> Vec<i64> {
    (0..n as i64)
        .map(|i| match i % 100 {
            0 => -1,
            1..=3 => i % c as i64,
            _ => bg as i64,
        })
        .collect()
}

/// The four timings of one loss on `x`: fused fwd, fused fwd+bwd, composed fwd+bwd, copy floor.
fn group(
    c: &mut Criterion,
    name: &str,
    x: &Var,
    fused: &dyn Fn(&Tensor) -> Result<Tensor>,
    composed: &dyn Fn(&Tensor) -> Result<Tensor>,
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.bench_function("fused_fwd", |b| {
        b.iter(|| black_box(fused(x.as_tensor()).unwrap()))
    });
    g.bench_function("fused_fwd_bwd", |b| {
        b.iter(|| black_box(fused(x.as_tensor()).unwrap().backward().unwrap()))
    });
    g.bench_function("composed_fwd_bwd", |b| {
        b.iter(|| black_box(composed(x.as_tensor()).unwrap().backward().unwrap()))
    });
    let xs: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    g.bench_function("copy_floor", |b| {
        b.iter(|| {
            let out: Vec<f32> = xs.iter().map(|v| v + 1.0).collect();
            black_box(out)
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let n = 20_000usize;
    // Softmax: 81 columns, the last one background.
    let k = 81usize;
    let x = Var::randn(0f32, 3.0, (n, k), &dev).expect("logits");
    let l = Tensor::new(labels(n, k, k - 1), &dev).expect("labels");
    let valid = (n - n / 100) as f64;
    let (one_hot, mask) = composed::one_hot_and_mask(&l, k, DType::F32).expect("one-hot");
    let ce = CrossEntropyLoss::default();
    group(
        c,
        "softmax_ce_20000x81_f32",
        &x,
        &|x| ce.forward(x, &l),
        &|x| composed::cross_entropy(x, &one_hot, &mask, valid),
    );
    let sf = SoftmaxFocalLoss::default();
    group(
        c,
        "softmax_focal_20000x81_f32",
        &x,
        &|x| sf.forward(x, &l),
        &|x| composed::softmax_focal(x, &one_hot, &mask, 0.25, 2.0, valid),
    );
    // GHM-C: 80 sigmoid classes, label 80 background, 30 bins.
    let k = 80usize;
    let x = Var::randn(0f32, 3.0, (n, k), &dev).expect("logits");
    let l = Tensor::new(labels(n, k, k), &dev).expect("labels");
    let (one_hot, mask) = composed::one_hot_and_mask(&l, k, DType::F32).expect("one-hot");
    let mut ghmc = GhmcLoss::default();
    ghmc.bins = 30;
    let ghmc = RefCell::new(ghmc);
    group(
        c,
        "ghmc_30bins_20000x80_f32",
        &x,
        &|x| ghmc.borrow_mut().forward(x, &l),
        &|x| composed::ghmc(x, &one_hot, Some(&mask), 30),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
