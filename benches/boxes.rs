//! Criterion: the box regression cases of `examples/common/cases.rs` (smooth L1, balanced L1,
//! GIoU and CIoU on 50,000 × 4): fused vs the same losses composed from candle ops (candle's
//! autograd for the backward) vs the copy floor.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::bench_cases(c, |dev| common::cases::boxes(50_000, dev));
}

criterion_group!(benches, bench);
criterion_main!(benches);
