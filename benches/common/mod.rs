//! What the criterion benches share: the cases of `examples/common/cases.rs` (the ones
//! `bench_table` prints, at the benches' own sizes) and how one case is timed.

#[path = "../../examples/common/cases.rs"]
pub mod cases;

use candle_core::Device;
use criterion::Criterion;

/// Times each case that `cases` builds on the CPU as one criterion group named by its `id`, 10
/// samples: `fused_fwd`, `fused_fwd_bwd`, `<baseline>_fwd_bwd` (`composed` or `naive`) and
/// `copy_floor`. A case whose fused and baseline forward disagree is reported on stderr first,
/// as `bench_table` does.
pub fn bench_cases(
    c: &mut Criterion,
    cases: impl FnOnce(&Device) -> anyhow::Result<Vec<cases::Case>>,
) {
    for case in cases(&Device::Cpu).expect("benchmark cases") {
        if let Some(warning) = case.disagreement().expect("agreement check") {
            eprintln!("{warning}");
        }
        let mut g = c.benchmark_group(&case.id);
        g.sample_size(10);
        let baseline_fwd_bwd = format!("{}_fwd_bwd", case.baseline);
        let passes = [
            ("fused_fwd", Some(&case.fused_fwd)),
            ("fused_fwd_bwd", Some(&case.fused_fwd_bwd)),
            (baseline_fwd_bwd.as_str(), case.composed_fwd_bwd.as_ref()),
            ("copy_floor", Some(&case.copy)),
        ];
        for (name, job) in passes {
            if let Some(job) = job {
                g.bench_function(name, |b| b.iter(|| job().expect(name)));
            }
        }
        g.finish();
    }
}
