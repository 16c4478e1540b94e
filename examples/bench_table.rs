//! Benchmark table: every fused loss against the same loss composed from candle ops (with
//! candle's autograd for the backward) and against a plain pass over the same bytes (the memory
//! floor), on the CPU.
//!
//! `cargo run --release --example bench_table -- [--quick] [--json PATH] [--no-peak] [--device cuda] [--only TEXT]`
//!
//! With `--device cuda` (build with `--features cuda`) every pass is timed with a device
//! synchronisation, the sizes go up to ~10^8 elements, and the floor is a device-to-device copy
//! of the same bytes.
//! Each case: the fused and the baseline forward are first checked to agree (a `WARNING` line
//! otherwise), then each pass gets one warm-up and 7 timed runs, median (3 runs for a baseline
//! in `--quick` mode and for the slow naive AP-Loss, which gets no warm-up either). The fused
//! forward+backward is also timed in a 1-thread pool (the `1-thread ms` column). The `fwd` rows
//! time the loss value alone (on detached inputs, as in validation); the `fwd+bwd` rows a
//! training step (`forward` of a `Var`, then `backward`). On the CPU two more rows per case split the training step: `candle grad
//! accumulate` (what candle's autograd does after any custom op's backward: `zeros_like` plus
//! `add` of the returned gradient) and `fwd+bwd − accumulate` (the difference of the two
//! medians: the time the crate's own kernels take). Peak memory (RSS high-water mark, reset
//! before each measurement) of fused vs composed forward+backward is printed after the table.
//!
//! The cases (inputs, fused calls, baselines, agreement checks, copy floor) are those of
//! `common/cases.rs`, which the criterion benches (`benches/`) time too.

#[path = "common/cases.rs"]
mod cases;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use cases::Job;
use std::time::Instant;

/// One printed / JSON row.
struct Row {
    loss: &'static str,
    shape: String,
    dtype: &'static str,
    pass: &'static str,
    fused_ms: f64,
    baseline: &'static str,
    baseline_ms: f64,
    gbps: f64,
    floor_multiple: Option<f64>,
    one_thread_ms: Option<f64>,
}

fn median_ms(runs: usize, warm_up: bool, f: &Job) -> Result<f64> {
    if warm_up {
        f()?;
    }
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Peak RSS (MiB) above the level before running `f`: the kernel's high-water mark is reset
/// through /proc/self/clear_refs first (Linux); `None` where that is unavailable.
fn peak_rss_mib(f: &Job) -> Result<Option<f64>> {
    fn status_kib(key: &str) -> Option<f64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        f()?;
        return Ok(None);
    }
    let before = status_kib("VmRSS:");
    f()?;
    let peak = status_kib("VmHWM:");
    Ok(match (before, peak) {
        (Some(b), Some(p)) => Some((p - b).max(0.0) / 1024.0),
        _ => None,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let cuda = args
        .windows(2)
        .any(|w| w[0] == "--device" && w[1] == "cuda");
    let dev = if cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let peak = !cuda && !args.iter().any(|a| a == "--no-peak");
    let runs = 7;
    // Anchor counts: RetinaNet scale (200k anchors × 80 classes); on a GPU also ~10^8 elements.
    let sizes: Vec<usize> = match (cuda, quick) {
        (_, true) => vec![20_000],
        (false, false) => vec![200_000],
        (true, false) => vec![200_000, 1_250_000],
    };
    let threads = rayon::current_num_threads();
    println!(
        "candle-detloss benchmark on {} ({} mode, {threads} rayon threads, median of {runs} runs)\n",
        if cuda { "CUDA device 0" } else { "CPU" },
        if quick { "quick" } else { "full" }
    );
    let mut cases = Vec::new();
    for &n in &sizes {
        cases.extend(cases::anchor_cases(n, &dev)?);
    }
    // AP-Loss: 1,000 positives among 8M scores (quick: 1M).
    let ap_rows = if quick { 12_500 } else { 100_000 };
    cases.push(cases::ap(ap_rows, 1_000, &dev)?);
    // `--only TEXT`: the cases whose loss name contains TEXT.
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        cases.retain(|c| c.loss.contains(only.as_str()));
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let bw = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    let mut rows = Vec::new();
    let mut mem = Vec::new();
    for case in cases.iter_mut() {
        if let Some(warning) = case.disagreement()? {
            println!("{warning}");
        }
        // The naive AP-Loss takes seconds: no warm-up; in `--quick` mode every baseline gets
        // 3 timed runs.
        let warm = case.baseline != "naive";
        if quick {
            case.baseline_runs = case.baseline_runs.min(3);
        }
        let fwd = median_ms(runs, true, &case.fused_fwd)?;
        let fb = median_ms(runs, true, &case.fused_fwd_bwd)?;
        let fb1 = if cuda {
            None
        } else {
            Some(one.install(|| median_ms(runs, true, &case.fused_fwd_bwd))?)
        };
        let copy = median_ms(runs, true, &case.copy)?;
        let gbps = |ms: f64| bw(case.bytes, ms);
        let row = |pass, fused_ms, baseline, baseline_ms, floor, one_thread| Row {
            loss: case.loss,
            shape: case.shape.clone(),
            dtype: case.dtype,
            pass,
            fused_ms,
            baseline,
            baseline_ms,
            gbps: gbps(fused_ms),
            floor_multiple: floor,
            one_thread_ms: one_thread,
        };
        if let Some(cf) = &case.composed_fwd {
            let bms = median_ms(case.baseline_runs, warm, cf)?;
            rows.push(row("fwd", fwd, case.baseline, bms, None, None));
        }
        if let Some(cfb) = &case.composed_fwd_bwd {
            let cms = median_ms(case.baseline_runs, warm, cfb)?;
            rows.push(row("fwd+bwd", fb, case.baseline, cms, None, fb1));
            if peak {
                let pf = peak_rss_mib(&case.fused_fwd_bwd)?;
                let pc = peak_rss_mib(cfb)?;
                mem.push((case.loss, case.shape.clone(), case.bytes, pf, pc));
            }
        }
        rows.push(row("fwd+bwd", fb, "copy", copy, Some(fb / copy), fb1));
        if !cuda {
            // What candle's autograd adds after any custom op's backward: `zeros_like` of the
            // logits plus `add` of the returned gradient (single-threaded, a fresh buffer). No
            // op can avoid it; the second row is the fused time without it.
            let g = Tensor::zeros(case.grad_len, DType::F32, &dev)?;
            let acc: Job = Box::new(move || {
                std::hint::black_box(g.zeros_like()?.add(&g)?);
                Ok(())
            });
            let am = median_ms(runs, true, &acc)?;
            rows.push(row(
                "candle grad accumulate",
                am,
                "copy",
                copy,
                Some(am / copy),
                None,
            ));
            let own = (fb - am).max(0.0);
            rows.push(row(
                "fwd+bwd − accumulate",
                own,
                "copy",
                copy,
                Some(own / copy),
                None,
            ));
        }
    }
    println!("| loss | shape | dtype | pass | fused ms | 1-thread ms | baseline | baseline ms | speed-up | GB/s | × copy floor |");
    println!("|---|---|---|---|---:|---:|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {} | {:.1} | {} |",
            r.loss,
            r.shape,
            r.dtype,
            r.pass,
            r.fused_ms,
            r.one_thread_ms.map_or("".into(), |v| format!("{v:.2}")),
            r.baseline,
            r.baseline_ms,
            if r.baseline == "copy" {
                String::new() // the floor is a bound, not a competitor: see the last column
            } else {
                format!("{:.1}×", r.baseline_ms / r.fused_ms)
            },
            r.gbps,
            r.floor_multiple.map_or("".into(), |v| format!("{v:.2}")),
        );
    }
    if !mem.is_empty() {
        println!("\n| loss | shape | inputs + grad MiB | fused peak MiB | composed peak MiB |");
        println!("|---|---|---:|---:|---:|");
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
        for (loss, shape, bytes, pf, pc) in &mem {
            println!(
                "| {loss} | {shape} | {:.0} | {} | {} |",
                *bytes as f64 / 1048576.0,
                f(*pf),
                f(*pc)
            );
        }
    }
    if let Some(path) = json {
        let arr: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "loss": r.loss, "shape": r.shape, "dtype": r.dtype, "pass": r.pass,
                    "fused_ms": r.fused_ms, "baseline": r.baseline, "baseline_ms": r.baseline_ms,
                    "speedup": r.baseline_ms / r.fused_ms, "gbps": r.gbps,
                    "copy_floor_multiple": r.floor_multiple, "one_thread_ms": r.one_thread_ms,
                })
            })
            .collect();
        std::fs::write(&path, serde_json::to_string_pretty(&arr)?)?;
        println!("\nwrote {path}");
    }
    Ok(())
}
