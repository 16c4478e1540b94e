//! Criterion: the AP-Loss case of `examples/common/cases.rs` at a small size (2,000 × 80, 200
//! positives): fused (O((N+P) log P)) vs the literal O(P·(P+N)) definition on host f64 vectors
//! ("naive", loss and update) vs the copy floor.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::bench_cases(c, |dev| Ok(vec![common::cases::ap(2_000, 200, dev)?]));
}

criterion_group!(benches, bench);
criterion_main!(benches);
