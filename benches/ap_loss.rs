//! Criterion: fused AP-Loss (O((N+P) log P)) vs the literal O(P·(P+N)) definition on host f64
//! vectors ("naive", loss and update) vs a plain pass over the scores, at a small size.

#[path = "../examples/common/composed.rs"]
mod composed;

use candle_core::{Device, Tensor, Var};
use candle_detloss::ApLoss;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // 160,000 scores, 200 positives (one per positive row), the other rows background.
    let (n, k, pos) = (2_000usize, 80usize, 200usize);
    let step = n / pos;
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            if i % step == 0 {
                (i % k) as i64
            } else {
                k as i64
            }
        })
        .collect();
    let x = Var::randn(0f32, 3.0, (n, k), &dev).expect("logits");
    let l = Tensor::new(labels.clone(), &dev).expect("labels");
    let ap = ApLoss::default();
    let xs: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let s: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
    let t: Vec<i8> = (0..n * k)
        .map(|e| (labels[e / k] == (e % k) as i64) as i8)
        .collect();
    let mut g = c.benchmark_group("ap_loss_2000x80_200pos_f32");
    g.sample_size(10);
    g.bench_function("fused_fwd", |b| {
        b.iter(|| black_box(ap.forward(x.as_tensor(), &l).unwrap()))
    });
    g.bench_function("fused_fwd_bwd", |b| {
        b.iter(|| black_box(ap.forward(x.as_tensor(), &l).unwrap().backward().unwrap()))
    });
    g.bench_function("naive_fwd_bwd", |b| {
        b.iter(|| black_box(composed::naive_ap(&s, &t, ap.delta, true)))
    });
    g.bench_function("copy_floor", |b| {
        b.iter(|| {
            let out: Vec<f32> = xs.iter().map(|v| v + 1.0).collect();
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
