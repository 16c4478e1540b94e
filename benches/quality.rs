//! Criterion: the GFL / VFNet / YOLOv8 head cases of `examples/common/cases.rs` (quality focal
//! with labels and scores, varifocal with dense targets, 20,000 × 80; distribution focal on
//! 80,000 × 17): fused vs the same loss composed from candle ops (candle's autograd for the
//! backward) vs the copy floor.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::bench_cases(c, |dev| common::cases::quality(20_000, dev));
}

criterion_group!(benches, bench);
criterion_main!(benches);
