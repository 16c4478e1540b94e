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

#[path = "common/composed.rs"]
mod composed;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{
    ApLoss, BalancedL1Loss, BoxIouLoss, CrossEntropyLoss, GhmcLoss, IouKind, Reduction,
    SigmoidFocalLoss, SmoothL1Loss, SoftmaxFocalLoss,
};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Instant;

type Job = Box<dyn Fn() -> Result<()> + Send + Sync>;
/// Fused and baseline forward values of a case, compared before it is timed.
type Check = Box<dyn Fn() -> Result<(f64, f64)>>;
/// A loss on the (gradient-receiving) first input.
type LossFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// One benchmark case: a loss at one size, its fused passes and its baselines.
struct Case {
    loss: &'static str,
    shape: String,
    dtype: &'static str,
    /// Bytes of the inputs plus a gradient-sized output: what the copy floor moves.
    bytes: usize,
    /// Elements of the gradient w.r.t. the first input.
    grad_len: usize,
    fused_fwd: Job,
    fused_fwd_bwd: Job,
    composed_fwd: Option<Job>,
    composed_fwd_bwd: Option<Job>,
    /// Name of the baseline of `composed_*` ("composed", or "naive" for AP-Loss).
    baseline: &'static str,
    /// Timed runs of the baseline (fewer for a slow naive one).
    baseline_runs: usize,
    /// Fused vs baseline forward value, checked to agree before timing.
    check: Option<Check>,
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
        // Allocated as the fused kernels allocate their outputs (huge pages advised, no fill
        // pass), then written once: the first input copied, the others added chunk by chunk
        // while the chunk is in cache.
        let mut out: Vec<f32> = Vec::with_capacity(out_len);
        advise_huge(&mut out);
        let chunk = 16 * 1024;
        let first = &inputs[0];
        out.spare_capacity_mut()
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(ci, o)| {
                let off = ci * chunk;
                for (k, d) in o.iter_mut().enumerate() {
                    d.write(first.get(off + k).copied().unwrap_or(0.0));
                }
            });
        // SAFETY: every element of the spare capacity was written just above.
        unsafe { out.set_len(out_len) };
        out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
            let off = ci * chunk;
            for input in &inputs[1..] {
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

/// `MADV_HUGEPAGE` on a vector's (untouched) capacity, as the crate does for its gradients.
fn advise_huge(v: &mut Vec<f32>) {
    #[cfg(target_os = "linux")]
    {
        let p = v.as_mut_ptr() as usize;
        let start = p.next_multiple_of(4096);
        let end = (p + v.capacity() * 4) & !4095;
        if end > start {
            // SAFETY: the range lies inside the vector's allocation; the advice changes no
            // contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
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
            grad_len: n * c,
            bytes: n * c * 4 * 2
                + if dense_targets {
                    n * c * 4
                } else {
                    label_bytes
                },
            fused_fwd: synced(
                dev,
                Box::new(move || {
                    // The loss value alone (validation): on a tensor that tracks gradients the
                    // forward also computes the gradient, which the fwd+bwd rows time.
                    f1.forward(&x1.as_tensor().detach(), &t1)?;
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
                    let x = x3.as_tensor().detach();
                    composed::sigmoid_focal(&x, &c1, m1.as_ref(), 0.25, 2.0, num_pos)?;
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
            baseline: "composed",
            baseline_runs: 7,
            check: None,
            copy: synced(dev, copy_floor(inputs, n * c)?),
        });
    }
    // The sanity check of the focal cases (the closures above are timed as they are).
    let (xc, lc, dc, oc, mc) = (
        xt.clone(),
        lt.clone(),
        dt.clone(),
        one_hot.clone(),
        mask.clone(),
    );
    let fc = f.clone();
    cases[0].check = Some(Box::new(move || {
        Ok((
            scalar(&fc.forward(xc.as_tensor(), &lc)?)?,
            scalar(&composed::sigmoid_focal(
                xc.as_tensor(),
                &oc,
                Some(&mc),
                0.25,
                2.0,
                num_pos,
            )?)?,
        ))
    }));
    let (xc, fc) = (xt.clone(), f.clone());
    cases[1].check = Some(Box::new(move || {
        Ok((
            scalar(&fc.forward(xc.as_tensor(), &dc)?)?,
            scalar(&composed::sigmoid_focal(
                xc.as_tensor(),
                &dc,
                None,
                0.25,
                2.0,
                num_pos,
            )?)?,
        ))
    }));
    Ok(cases)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A case whose fused loss and composed baseline are both functions of the input `x` (the
/// one that receives the gradient).
#[allow(clippy::too_many_arguments)]
fn loss_case(
    dev: &Device,
    loss: &'static str,
    shape: String,
    bytes: usize,
    x: &Var,
    fused: LossFn,
    composed: LossFn,
    copy: Job,
) -> Case {
    let fwd = |f: LossFn, bwd: bool| {
        let x = x.clone();
        synced(
            dev,
            Box::new(move || {
                if bwd {
                    f(x.as_tensor())?.backward()?;
                } else {
                    // The loss value alone (validation), for the fused and the composed loss
                    // alike: on a tensor that tracks gradients the fused forward also computes
                    // the gradient, which the fwd+bwd rows time.
                    f(&x.as_tensor().detach())?;
                }
                Ok(())
            }),
        )
    };
    let (xc, fc, cc) = (x.clone(), fused.clone(), composed.clone());
    Case {
        loss,
        shape,
        dtype: "f32",
        bytes,
        grad_len: x.as_tensor().elem_count(),
        fused_fwd: fwd(fused.clone(), false),
        fused_fwd_bwd: fwd(fused, true),
        composed_fwd: Some(fwd(composed.clone(), false)),
        composed_fwd_bwd: Some(fwd(composed, true)),
        baseline: "composed",
        baseline_runs: 7,
        check: Some(Box::new(move || {
            Ok((scalar(&fc(xc.as_tensor())?)?, scalar(&cc(xc.as_tensor())?)?))
        })),
        copy,
    }
}

/// Labels of `n` anchors over `c` classes (RetinaNet-like: 1 % ignored, 3 % positive, the rest
/// the value `bg`) and their count of non-ignored rows and of positives.
fn anchor_labels(n: usize, c: usize, bg: usize) -> (Vec<i64>, f64, f64) {
    let labels: Vec<i64> = (0..n)
        .map(|i| match i % 100 {
            0 => -1,
            1..=3 => (i % c) as i64,
            _ => bg as i64,
        })
        .collect();
    let valid = labels.iter().filter(|&&l| l >= 0).count() as f64;
    let pos = labels
        .iter()
        .filter(|&&l| l >= 0 && (l as usize) < c && l as usize != bg)
        .count() as f64;
    (labels, valid, pos)
}

/// Softmax cross-entropy and softmax focal loss (`c` columns, the last one background) and
/// GHM-C (`c - 1` sigmoid classes, 30 bins).
fn classification_cases(n: usize, c: usize, dev: &Device) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    // Softmax: labels in 0..c, c - 1 the background column.
    let (labels, valid, _) = anchor_labels(n, c, c - 1);
    let x = Var::from_tensor(&Tensor::from_vec(rand_vec(n * c, 5, 4.0), (n, c), dev)?)?;
    let lt = Tensor::new(labels, dev)?;
    let (one_hot, mask) = composed::one_hot_and_mask(&lt, c, DType::F32)?;
    let shape = format!("{n}x{c}");
    let bytes = n * c * 4 * 2 + n * 8;
    let copy =
        || -> Result<Job> { Ok(synced(dev, copy_floor(vec![x.as_tensor().clone()], n * c)?)) };
    let ce = CrossEntropyLoss::default();
    let l1 = lt.clone();
    let (o1, m1) = (one_hot.clone(), mask.clone());
    cases.push(loss_case(
        dev,
        "softmax cross-entropy",
        shape.clone(),
        bytes,
        &x,
        Arc::new(move |x| Ok(ce.forward(x, &l1)?)),
        Arc::new(move |x| Ok(composed::cross_entropy(x, &o1, &m1, valid)?)),
        copy()?,
    ));
    let sf = SoftmaxFocalLoss::default();
    let l2 = lt.clone();
    let (o2, m2) = (one_hot, mask);
    cases.push(loss_case(
        dev,
        "softmax focal",
        shape,
        bytes,
        &x,
        Arc::new(move |x| Ok(sf.forward(x, &l2)?)),
        Arc::new(move |x| Ok(composed::softmax_focal(x, &o2, &m2, 0.25, 2.0, valid)?)),
        copy()?,
    ));
    // GHM-C: sigmoid classes 0..k, k the background label.
    let k = c - 1;
    let (labels, _, _) = anchor_labels(n, k, k);
    let xg = Var::from_tensor(&Tensor::from_vec(rand_vec(n * k, 6, 4.0), (n, k), dev)?)?;
    let lt = Tensor::new(labels, dev)?;
    let (one_hot, mask) = composed::one_hot_and_mask(&lt, k, DType::F32)?;
    let mut g = GhmcLoss::default();
    g.bins = 30;
    let g = Mutex::new(g);
    cases.push(loss_case(
        dev,
        "GHM-C (30 bins)",
        format!("{n}x{k}"),
        n * k * 4 * 2 + n * 8,
        &xg,
        Arc::new(move |x| Ok(g.lock().expect("ghmc").forward(x, &lt)?)),
        Arc::new(move |x| Ok(composed::ghmc(x, &one_hot, Some(&mask), 30)?)),
        synced(dev, copy_floor(vec![xg.as_tensor().clone()], n * k)?),
    ));
    Ok(cases)
}

/// Smooth L1 and balanced L1 on `[n, 4]` deltas, GIoU and CIoU on `[n, 4]` box pairs.
fn box_cases(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let shape = format!("{n}x4");
    let bytes = n * 4 * 4 * 3;
    let mut cases = Vec::new();
    let dp = Var::from_tensor(&Tensor::from_vec(rand_vec(n * 4, 7, 1.0), (n, 4), dev)?)?;
    let dt = Tensor::from_vec(rand_vec(n * 4, 8, 1.0), (n, 4), dev)?;
    let numel = (n * 4) as f64;
    let copy = |p: &Var, t: &Tensor| -> Result<Job> {
        Ok(synced(
            dev,
            copy_floor(vec![p.as_tensor().clone(), t.clone()], n * 4)?,
        ))
    };
    let beta = 1.0 / 9.0;
    let sl = SmoothL1Loss {
        beta,
        reduction: Reduction::Mean,
    };
    let (t1, t2) = (dt.clone(), dt.clone());
    cases.push(loss_case(
        dev,
        "smooth L1 (β = 1/9)",
        shape.clone(),
        bytes,
        &dp,
        Arc::new(move |x| Ok(sl.forward(x, &t1)?)),
        Arc::new(move |x| Ok(composed::smooth_l1(x, &t2, beta, numel)?)),
        copy(&dp, &dt)?,
    ));
    let bl = BalancedL1Loss::default();
    let (t1, t2) = (dt.clone(), dt.clone());
    cases.push(loss_case(
        dev,
        "balanced L1",
        shape.clone(),
        bytes,
        &dp,
        Arc::new(move |x| Ok(bl.forward(x, &t1)?)),
        Arc::new(move |x| Ok(composed::balanced_l1(x, &t2, 0.5, 1.5, 1.0, numel)?)),
        copy(&dp, &dt)?,
    ));
    // Boxes (x1, y1, x2, y2): corners in [0, 600), sides in [8, 200); the targets jittered.
    let boxes = |seed: u64, jitter: Option<&[f32]>| -> Vec<f32> {
        let r = rand_vec(n * 4, seed, 1.0);
        (0..n)
            .flat_map(|i| {
                let u = |k: usize| r[i * 4 + k] * 0.5 + 0.5;
                let mut b = [
                    u(0) * 600.0,
                    u(1) * 600.0,
                    8.0 + u(2) * 192.0,
                    8.0 + u(3) * 192.0,
                ];
                if let Some(j) = jitter {
                    for (k, v) in b.iter_mut().enumerate() {
                        *v = j[i * 4 + k]
                            + r[i * 4 + k] * if k < 2 { 20.0 } else { 0.3 * j[i * 4 + k] };
                    }
                }
                [
                    b[0],
                    b[1],
                    b[0] + b[2].abs().max(1.0),
                    b[1] + b[3].abs().max(1.0),
                ]
            })
            .collect()
    };
    let gt_raw: Vec<f32> = {
        let r = rand_vec(n * 4, 9, 1.0);
        r.iter()
            .enumerate()
            .map(|(i, v)| {
                if i % 4 < 2 {
                    (v * 0.5 + 0.5) * 600.0
                } else {
                    8.0 + (v * 0.5 + 0.5) * 192.0
                }
            })
            .collect()
    };
    let gt = boxes(9, None);
    let pred = boxes(10, Some(&gt_raw));
    let bp = Var::from_tensor(&Tensor::from_vec(pred, (n, 4), dev)?)?;
    let bt = Tensor::from_vec(gt, (n, 4), dev)?;
    for (name, kind) in [("GIoU", IouKind::Giou), ("CIoU", IouKind::Ciou)] {
        let f = BoxIouLoss {
            kind,
            ..Default::default()
        };
        let (t1, t2) = (bt.clone(), bt.clone());
        let eps = f.eps;
        let nf = n as f64;
        cases.push(loss_case(
            dev,
            name,
            shape.clone(),
            bytes,
            &bp,
            Arc::new(move |x| Ok(f.forward(x, &t1)?)),
            Arc::new(move |x| {
                Ok(if kind == IouKind::Giou {
                    composed::giou(x, &t2, eps, nf)?
                } else {
                    composed::ciou(x, &t2, eps, nf)?
                })
            }),
            copy(&bp, &bt)?,
        ));
    }
    Ok(cases)
}

/// AP-Loss on `[n, c]` scores with `pos` positive rows (one positive score each), the rest
/// background, against the literal O(P·(P+N)) definition on the host ("naive"; skipped on a
/// GPU).
fn ap_case(n: usize, c: usize, pos: usize, dev: &Device) -> Result<Case> {
    let step = n / pos;
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            if i % step == 0 && i / step < pos {
                (i % c) as i64
            } else {
                c as i64
            }
        })
        .collect();
    let scores = rand_vec(n * c, 11, 3.0);
    let x = Var::from_tensor(&Tensor::from_vec(scores.clone(), (n, c), dev)?)?;
    let lt = Tensor::new(labels.clone(), dev)?;
    let ap = ApLoss::default();
    let fused: LossFn = {
        let lt = lt.clone();
        Arc::new(move |x| Ok(ap.forward(x, &lt)?))
    };
    let fwd = |bwd: bool| {
        let (x, f) = (x.clone(), fused.clone());
        synced(
            dev,
            Box::new(move || {
                if bwd {
                    f(x.as_tensor())?.backward()?;
                } else {
                    // The loss value alone (validation), for the fused and the composed loss
                    // alike: on a tensor that tracks gradients the fused forward also computes
                    // the gradient, which the fwd+bwd rows time.
                    f(&x.as_tensor().detach())?;
                }
                Ok(())
            }),
        )
    };
    let host = dev.is_cpu().then(|| {
        let s: Arc<Vec<f64>> = Arc::new(scores.iter().map(|&v| v as f64).collect());
        let t: Arc<Vec<i8>> = Arc::new(
            (0..n * c)
                .map(|e| (labels[e / c] == (e % c) as i64) as i8)
                .collect(),
        );
        (s, t)
    });
    let naive = |update: bool| -> Option<Job> {
        let (s, t) = host.clone()?;
        Some(Box::new(move || {
            std::hint::black_box(composed::naive_ap(&s, &t, ap.delta, update));
            Ok(())
        }))
    };
    let check: Option<Check> = host.clone().map(|(s, t)| {
        let (x, f) = (x.clone(), fused.clone());
        Box::new(move || {
            Ok((
                scalar(&f(x.as_tensor())?)?,
                composed::naive_ap(&s, &t, ap.delta, false).0,
            ))
        }) as Check
    });
    Ok(Case {
        loss: "AP-Loss",
        shape: format!("{n}x{c} ({pos} pos)"),
        dtype: "f32",
        bytes: n * c * 4 * 2 + n * 8,
        grad_len: n * c,
        fused_fwd: fwd(false),
        fused_fwd_bwd: fwd(true),
        composed_fwd: naive(false),
        composed_fwd_bwd: naive(true),
        baseline: "naive",
        baseline_runs: 3,
        check,
        copy: synced(dev, copy_floor(vec![x.as_tensor().clone()], n * c)?),
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
        cases.extend(focal_cases(n, 80, &dev)?);
        cases.extend(classification_cases(n, 81, &dev)?);
        cases.extend(box_cases(n, &dev)?);
    }
    // AP-Loss: 1,000 positives among 8M scores (quick: 1M).
    let ap_rows = if quick { 12_500 } else { 100_000 };
    cases.push(ap_case(ap_rows, 80, 1_000, &dev)?);
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
        if let Some(check) = &case.check {
            let (f, b) = check()?;
            if (f - b).abs() > 1e-3 * f.abs().max(b.abs()).max(1e-12) {
                println!(
                    "WARNING: {} {}: fused forward {f} differs from {} {b} (rel {:.2e})",
                    case.loss,
                    case.shape,
                    case.baseline,
                    (f - b).abs() / f.abs().max(b.abs())
                );
            }
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
