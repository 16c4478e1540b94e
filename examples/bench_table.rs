//! Benchmark table: every fused loss against the same loss composed from candle ops (with
//! candle's autograd for the backward) and against a plain pass over the same bytes (the memory
//! floor), on the CPU.
//!
//! `cargo run --release --example bench_table -- [--quick] [--json PATH] [--no-peak] [--device cuda] [--only TEXT] [--torch PATH] [--no-baseline]`
//!
//! `--torch PATH` joins the rows of `scripts/bench_torch.py PATH` (PyTorch on the same cases,
//! default and tuned allocator) into a side-by-side table after the main one; the crate's side
//! of the tuned columns is this program again in a child process with the same allocator
//! setting (`--no-baseline`: the fused passes and floors only). A progress bar on
//! stderr shows the case, the pass and the elapsed time.
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
use clap::Parser;
use std::time::Instant;

/// Every fused loss of candle-detloss against the same loss composed from candle ops and
/// against the copy floor (and, with --torch, against PyTorch).
#[derive(Parser)]
#[command(name = "bench_table")]
struct Args {
    /// Small sizes (20,000 anchors, AP-Loss on 1M scores) and 3 runs per baseline.
    #[arg(long)]
    quick: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// Skip the peak-memory measurements.
    #[arg(long)]
    no_peak: bool,
    /// `cpu`, or `cuda` (build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Only the cases whose loss name contains TEXT.
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Join the rows of `scripts/bench_torch.py PATH` into a side-by-side table (the crate's
    /// rows also measured again in a child process with glibc's mmap threshold raised, as
    /// PyTorch's tuned rows are).
    #[arg(long, value_name = "PATH")]
    torch: Option<String>,
    /// Time the fused passes and the floors only: no baseline, no agreement check.
    #[arg(long)]
    no_baseline: bool,
}

/// glibc's allocator with its mmap threshold raised (freed blocks are reused, no page faults
/// for large buffers): `scripts/bench_torch.py`'s tuned setting, read by glibc at start-up.
const TUNED_MALLOC: [(&str, &str); 2] = [
    ("MALLOC_MMAP_MAX_", "0"),
    ("MALLOC_TRIM_THRESHOLD_", "100000000000"),
];

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
    let args = Args::parse();
    let quick = args.quick;
    let json = args.json.clone();
    let cuda = match args.device.as_str() {
        "cpu" => false,
        "cuda" => true,
        d => anyhow::bail!("--device: cpu or cuda, got {d}"),
    };
    let dev = if cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let peak = !cuda && !args.no_peak;
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
    if let Some(only) = &args.only {
        cases.retain(|c| c.loss.contains(only.as_str()));
    }
    if args.no_baseline {
        for c in cases.iter_mut() {
            (c.composed_fwd, c.composed_fwd_bwd, c.check) = (None, None, None);
        }
    }
    let bar = progress(&cases, cuda, peak);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let bw = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    let mut rows = Vec::new();
    let mut mem = Vec::new();
    for case in cases.iter_mut() {
        let step = |pass: &str| {
            bar.set_message(format!("{} {} · {pass}", case.loss, case.shape));
            bar.inc(1);
        };
        step("agreement check");
        if let Some(warning) = case.disagreement()? {
            bar.println(&warning);
            println!("{warning}");
        }
        // The naive AP-Loss takes seconds: no warm-up; in `--quick` mode every baseline gets
        // 3 timed runs.
        let warm = case.baseline != "naive";
        if quick {
            case.baseline_runs = case.baseline_runs.min(3);
        }
        step("fused fwd");
        let fwd = median_ms(runs, true, &case.fused_fwd)?;
        step("fused fwd+bwd");
        let fb = median_ms(runs, true, &case.fused_fwd_bwd)?;
        let fb1 = if cuda {
            None
        } else {
            step("fused fwd+bwd, 1 thread");
            Some(one.install(|| median_ms(runs, true, &case.fused_fwd_bwd))?)
        };
        step("copy floor");
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
            step("baseline fwd");
            let bms = median_ms(case.baseline_runs, warm, cf)?;
            rows.push(row("fwd", fwd, case.baseline, bms, None, None));
        } else {
            rows.push(row("fwd", fwd, "none", f64::NAN, None, None));
        }
        if let Some(cfb) = &case.composed_fwd_bwd {
            step("baseline fwd+bwd");
            let cms = median_ms(case.baseline_runs, warm, cfb)?;
            rows.push(row("fwd+bwd", fb, case.baseline, cms, None, fb1));
            if peak {
                step("peak memory");
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
            step("candle grad accumulate");
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
            if let Some(arith) = &case.arith {
                // The kernel's own time against the same arithmetic over the same bytes.
                step("arithmetic floor");
                let fl = median_ms(runs, true, arith)?;
                rows.push(row(
                    "fwd+bwd − accumulate",
                    own,
                    "arith floor",
                    fl,
                    Some(own / fl),
                    None,
                ));
            }
        }
    }
    bar.finish_and_clear();
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
            if matches!(r.baseline, "copy" | "arith floor" | "none") {
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
    if let Some(path) = &args.torch {
        let tuned = tuned_rows(&args)?;
        torch_table(&rows, &tuned, path)?;
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

/// The progress bar of a run over `cases`: one step per pass of each case.
fn progress(cases: &[cases::Case], cuda: bool, peak: bool) -> indicatif::ProgressBar {
    // agreement, fwd, fwd+bwd, copy; 1 thread and the accumulate on the CPU; the baseline's
    // passes and (with `peak`) the peak memory where the case has a baseline.
    let per_case = |c: &cases::Case| {
        4 + if cuda { 0 } else { 2 }
            + c.arith.is_some() as u64
            + c.composed_fwd.is_some() as u64
            + c.composed_fwd_bwd.is_some() as u64 * (1 + peak as u64)
    };
    let bar = indicatif::ProgressBar::new(cases.iter().map(per_case).sum());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The crate's rows measured again by this program in a child process under
/// [`TUNED_MALLOC`] (fused passes only: `--no-baseline --no-peak`, same `--quick` / `--only`),
/// read back from its `--json` file.
fn tuned_rows(args: &Args) -> Result<Vec<serde_json::Value>> {
    let path = std::env::temp_dir().join(format!("bench_table_tuned_{}.json", std::process::id()));
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--no-baseline", "--no-peak", "--json"])
        .arg(&path);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(only) = &args.only {
        cmd.args(["--only", only]);
    }
    eprintln!("the crate again with the tuned allocator ({TUNED_MALLOC:?}), in a child process");
    let out = cmd
        .envs(TUNED_MALLOC)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(out.success(), "the tuned child run failed: {out}");
    let text = std::fs::read_to_string(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(serde_json::from_str(&text)?)
}

/// The side-by-side table: the crate's training step (and its own time without candle's
/// gradient accumulate), with the default allocator (`rows`) and the tuned one (`tuned`),
/// against PyTorch's rows of `scripts/bench_torch.py` (same loss, shape and pass) under the same
/// allocator, with the ratios torch / crate.
fn torch_table(rows: &[Row], tuned: &[serde_json::Value], path: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--torch {path}: {e}"))?;
    let torch: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let find = |loss: &str, shape: &str, pass: &str| {
        rows.iter()
            .find(|r| r.loss == loss && r.shape == shape && r.pass == pass)
            .map(|r| r.fused_ms)
    };
    let find_tuned = |loss: &str, shape: &str, pass: &str| {
        tuned
            .iter()
            .find(|r| r["loss"] == loss && r["shape"] == shape && r["pass"] == pass)
            .and_then(|r| r["fused_ms"].as_f64())
    };
    let version = torch
        .first()
        .map(|r| {
            let v = |k: &str| r[k].as_str().unwrap_or("?").to_string();
            format!("PyTorch {} / torchvision {}", v("torch"), v("torchvision"))
        })
        .unwrap_or_default();
    println!("\nSide by side with {version} (torch rows from {path}; ratios torch / crate under the same allocator, > 1: the crate is faster; own = without candle's gradient accumulate)\n");
    println!("| loss | shape | pass | crate ms | own ms | torch ms | torch / crate | crate tuned ms | own tuned ms | torch tuned ms | tuned: torch / crate |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
    for t in &torch {
        let (Some(loss), Some(shape), Some(pass)) =
            (t["loss"].as_str(), t["shape"].as_str(), t["pass"].as_str())
        else {
            continue;
        };
        let Some(ours) = find(loss, shape, pass) else {
            continue; // a case this run did not time (--only, another size)
        };
        let ours_tuned = find_tuned(loss, shape, pass).unwrap_or(f64::NAN);
        let step = pass == "fwd+bwd";
        let own = step
            .then(|| find(loss, shape, "fwd+bwd − accumulate"))
            .flatten();
        let own_tuned = step
            .then(|| find_tuned(loss, shape, "fwd+bwd − accumulate"))
            .flatten();
        let (td, tt) = (
            t["torch_default_ms"].as_f64().unwrap_or(f64::NAN),
            t["torch_tuned_ms"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "| {loss} | {shape} | {pass} | {ours:.2} | {} | {td:.2} | {:.2}× | {ours_tuned:.2} | {} | {tt:.2} | {:.2}× |",
            ms(own),
            td / ours,
            ms(own_tuned),
            tt / ours_tuned,
        );
    }
    Ok(())
}
