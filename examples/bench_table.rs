//! Benchmark table: every fused loss against the same loss composed from candle ops (with
//! candle's autograd for the backward) and against a plain pass over the same bytes (the memory
//! floor), on the CPU.
//!
//! `cargo run --release --example bench_table -- [--quick] [--json PATH] [--no-peak] [--device cuda]`
//!
//! With `--device cuda` (build with `--features cuda`) every pass is timed with a device
//! synchronisation, the sizes go up to ~10^8 elements, and the floor is a device-to-device copy
//! of the same bytes.
//! Each case: one warm-up, then ≥ 7 timed runs, median. The fused forward+backward is also timed
//! in a 1-thread pool (the `1-thread ms` column). Peak memory (RSS high-water mark, reset before
//! each measurement) of fused vs composed forward+backward is printed after the table.

#[path = "common/composed.rs"]
mod composed;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use rayon::prelude::*;
use std::time::Instant;

type Job = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// One benchmark case: a loss at one size, its fused passes and its baselines.
struct Case {
    loss: &'static str,
    shape: String,
    dtype: &'static str,
    /// Bytes of the inputs plus a gradient-sized output: what the copy floor moves.
    bytes: usize,
    fused_fwd: Job,
    fused_fwd_bwd: Job,
    composed_fwd: Option<Job>,
    composed_fwd_bwd: Option<Job>,
    copy: Job,
}

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

/// Wraps a job so that it waits for the device to finish (a no-op on the CPU).
fn synced(dev: &Device, f: Job) -> Job {
    let dev = dev.clone();
    Box::new(move || {
        f()?;
        dev.synchronize()?;
        Ok(())
    })
}

fn median_ms(runs: usize, f: &Job) -> Result<f64> {
    f()?; // warm-up
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

/// The memory floor: on the CPU a plain pass reading `inputs` and writing one gradient-sized
/// buffer; on a GPU a device-to-device copy of each input (the logits' copy writes the
/// gradient's bytes).
fn copy_floor(inputs: Vec<Tensor>, out_len: usize) -> Result<Job> {
    if !inputs[0].device().is_cpu() {
        return Ok(Box::new(move || {
            for t in &inputs {
                std::hint::black_box(t.copy()?);
            }
            Ok(())
        }));
    }
    let inputs: Vec<Vec<f32>> = inputs
        .iter()
        .map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()))
        .collect::<candle_core::Result<_>>()?;
    Ok(Box::new(move || {
        let mut out = vec![0f32; out_len];
        let chunk = 16 * 1024;
        out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
            let off = ci * chunk;
            for input in &inputs {
                let src = &input[off.min(input.len())..(off + o.len()).min(input.len())];
                for (d, s) in o.iter_mut().zip(src) {
                    *d += *s;
                }
            }
        });
        std::hint::black_box(&out);
        Ok(())
    }))
}

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * scale
        })
        .collect()
}

fn focal_cases(n: usize, c: usize, dev: &Device) -> Result<Vec<Case>> {
    let x = rand_vec(n * c, 1, 4.0);
    let labels: Vec<i64> = (0..n)
        .map(|i| match i % 100 {
            0 => -1,
            1..=3 => (i % c) as i64,
            _ => c as i64,
        })
        .collect();
    let num_pos = labels
        .iter()
        .filter(|&&l| l >= 0 && (l as usize) < c)
        .count() as f64;
    let dense: Vec<f32> = rand_vec(n * c, 2, 0.5)
        .iter()
        .map(|v| (v + 0.5).clamp(0.0, 1.0))
        .collect();
    let xt = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, c), dev)?)?;
    let lt = Tensor::new(labels.clone(), dev)?;
    let dt = Tensor::from_vec(dense.clone(), (n, c), dev)?;
    let (one_hot, mask) = composed::one_hot_and_mask(&lt, c, DType::F32)?;
    let f = SigmoidFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let shape = format!("{n}x{c}");
    let label_bytes = n * 8;
    let mut cases = Vec::new();
    for (name, dense_targets) in [
        ("sigmoid focal (labels)", false),
        ("sigmoid focal (dense)", true),
    ] {
        let (x1, x2, x3, x4) = (xt.clone(), xt.clone(), xt.clone(), xt.clone());
        let t = if dense_targets {
            dt.clone()
        } else {
            lt.clone()
        };
        let (t1, t2) = (t.clone(), t.clone());
        let (f1, f2) = (f.clone(), f.clone());
        let ct = if dense_targets {
            dt.clone()
        } else {
            one_hot.clone()
        };
        let (c1, c2) = (ct.clone(), ct.clone());
        let m = (!dense_targets).then(|| mask.clone());
        let (m1, m2) = (m.clone(), m.clone());
        let mut inputs = vec![xt.as_tensor().clone()];
        if dense_targets {
            inputs.push(dt.clone());
        }
        cases.push(Case {
            loss: name,
            shape: shape.clone(),
            dtype: "f32",
            bytes: n * c * 4 * 2
                + if dense_targets {
                    n * c * 4
                } else {
                    label_bytes
                },
            fused_fwd: synced(
                dev,
                Box::new(move || {
                    f1.forward(x1.as_tensor(), &t1)?;
                    Ok(())
                }),
            ),
            fused_fwd_bwd: synced(
                dev,
                Box::new(move || {
                    f2.forward(x2.as_tensor(), &t2)?.backward()?;
                    Ok(())
                }),
            ),
            composed_fwd: Some(synced(
                dev,
                Box::new(move || {
                    composed::sigmoid_focal(x3.as_tensor(), &c1, m1.as_ref(), 0.25, 2.0, num_pos)?;
                    Ok(())
                }),
            )),
            composed_fwd_bwd: Some(synced(
                dev,
                Box::new(move || {
                    composed::sigmoid_focal(x4.as_tensor(), &c2, m2.as_ref(), 0.25, 2.0, num_pos)?
                        .backward()?;
                    Ok(())
                }),
            )),
            copy: synced(dev, copy_floor(inputs, n * c)?),
        });
    }
    Ok(cases)
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
        cases.extend(focal_cases(n, 80, &dev)?);
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let bw = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    let mut rows = Vec::new();
    let mut mem = Vec::new();
    for case in cases.iter_mut() {
        let fwd = median_ms(runs, &case.fused_fwd)?;
        let fb = median_ms(runs, &case.fused_fwd_bwd)?;
        let fb1 = if cuda {
            None
        } else {
            Some(one.install(|| median_ms(runs, &case.fused_fwd_bwd))?)
        };
        let copy = median_ms(runs, &case.copy)?;
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
            rows.push(row(
                "fwd",
                fwd,
                "composed",
                median_ms(runs, cf)?,
                None,
                None,
            ));
        }
        if let Some(cfb) = &case.composed_fwd_bwd {
            let cms = median_ms(runs.min(7), cfb)?;
            rows.push(row("fwd+bwd", fb, "composed", cms, None, fb1));
            if peak {
                let pf = peak_rss_mib(&case.fused_fwd_bwd)?;
                let pc = peak_rss_mib(cfb)?;
                mem.push((case.loss, case.shape.clone(), case.bytes, pf, pc));
            }
        }
        rows.push(row("fwd+bwd", fb, "copy", copy, Some(fb / copy), fb1));
    }
    println!("| loss | shape | dtype | pass | fused ms | 1-thread ms | baseline | baseline ms | speed-up | GB/s | × copy floor |");
    println!("|---|---|---|---|---:|---:|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.1}× | {:.1} | {} |",
            r.loss,
            r.shape,
            r.dtype,
            r.pass,
            r.fused_ms,
            r.one_thread_ms.map_or("".into(), |v| format!("{v:.2}")),
            r.baseline,
            r.baseline_ms,
            r.baseline_ms / r.fused_ms,
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
