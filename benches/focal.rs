//! Criterion: the sigmoid focal loss cases of `examples/common/cases.rs` (integer labels and
//! dense targets, 20,000 × 80): fused vs the same loss composed from candle ops (candle's
//! autograd for the backward) vs the copy floor.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::bench_cases(c, |dev| common::cases::focal(20_000, dev));
}

criterion_group!(benches, bench);
criterion_main!(benches);
