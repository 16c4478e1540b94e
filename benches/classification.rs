//! Criterion: the classification cases of `examples/common/cases.rs` (softmax cross-entropy and
//! softmax focal loss on 20,000 × 81, GHM-C on 20,000 × 80): fused vs the same losses composed
//! from candle ops (candle's autograd for the backward) vs the copy floor.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::bench_cases(c, |dev| common::cases::classification(20_000, dev));
}

criterion_group!(benches, bench);
criterion_main!(benches);
