//! Criterion: fused sigmoid focal loss vs the same loss composed from candle ops (candle's
//! autograd for the backward) vs a plain pass over the same bytes.

#[path = "../examples/common/composed.rs"]
mod composed;

use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, k) = (20_000usize, 80usize);
    let x = Var::randn(0f32, 3.0, (n, k), &dev).expect("logits");
    let labels: Vec<i64> = (0..n as i64)
        .map(|i| if i % 50 == 0 { i % k as i64 } else { k as i64 })
        .collect();
    let num_pos = labels.iter().filter(|&&l| l < k as i64).count() as f64;
    let labels = Tensor::new(labels, &dev).expect("labels");
    let (one_hot, mask) = composed::one_hot_and_mask(&labels, k, DType::F32).expect("one-hot");
    let f = SigmoidFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let mut g = c.benchmark_group("sigmoid_focal_20000x80_f32");
    g.sample_size(10);
    g.bench_function("fused_fwd", |b| {
        b.iter(|| black_box(f.forward(x.as_tensor(), &labels).unwrap()))
    });
    g.bench_function("fused_fwd_bwd", |b| {
        b.iter(|| {
            black_box(
                f.forward(x.as_tensor(), &labels)
                    .unwrap()
                    .backward()
                    .unwrap(),
            )
        })
    });
    g.bench_function("composed_fwd_bwd", |b| {
        b.iter(|| {
            let l =
                composed::sigmoid_focal(x.as_tensor(), &one_hot, Some(&mask), 0.25, 2.0, num_pos)
                    .unwrap();
            black_box(l.backward().unwrap())
        })
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

criterion_group!(benches, bench);
criterion_main!(benches);
