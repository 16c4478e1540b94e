//! The benchmark cases, defined once for `examples/bench_table.rs` and the criterion benches
//! (`benches/`, through `benches/common/mod.rs`): each loss at a size, its seeded inputs, its
//! fused passes, its baseline (the same loss composed from candle ops, `composed.rs`, or for
//! AP-Loss the naive algorithm), the agreement check of fused and baseline, and the copy floor.
//! The including targets pick the sizes; each uses part of what is here.
#![allow(dead_code)]

#[path = "composed.rs"]
pub mod composed;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{
    ApLoss, BalancedL1Loss, BoxIouLoss, CrossEntropyLoss, DistributionFocalLoss, GhmcLoss, IouKind,
    QualityFocalLoss, Reduction, SigmoidFocalLoss, SmoothL1Loss, SoftmaxFocalLoss, VarifocalLoss,
};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// One timed pass of a case; it returns once the device is done.
pub type Job = Box<dyn Fn() -> Result<()> + Send + Sync>;
/// Fused and baseline forward values of a case, compared before it is timed.
pub type Check = Box<dyn Fn() -> Result<(f64, f64)>>;
/// A loss of the input that receives the gradient and of the targets (labels, dense targets or
/// boxes).
type LossFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Object classes of the classification cases (COCO's 80): the sigmoid losses' columns; the
/// softmax losses have one more, the background.
pub const CLASSES: usize = 80;

/// One benchmark case: a loss at one size, its fused passes and its baselines.
pub struct Case {
    /// The table's loss name (`--only` matches it).
    pub loss: &'static str,
    /// The criterion group name.
    pub id: String,
    pub shape: String,
    pub dtype: &'static str,
    /// Bytes of the inputs plus a gradient-sized output: what the copy floor moves.
    pub bytes: usize,
    /// Elements of the gradient w.r.t. the first input.
    pub grad_len: usize,
    /// The loss value alone, on the detached input (as in validation).
    pub fused_fwd: Job,
    /// A training step: `forward` of the `Var`, then `backward`.
    pub fused_fwd_bwd: Job,
    pub composed_fwd: Option<Job>,
    pub composed_fwd_bwd: Option<Job>,
    /// Name of the baseline of `composed_*` ("composed", or "naive" for AP-Loss).
    pub baseline: &'static str,
    /// Timed runs of the baseline (fewer for a slow naive one).
    pub baseline_runs: usize,
    /// Fused vs baseline forward value, checked to agree before timing.
    pub check: Option<Check>,
    /// The copy floor of the case's bytes ([`copy_floor`]).
    pub copy: Job,
    /// The arithmetic floor of the training step where one is defined (the sigmoid focal
    /// loss: [`focal_floor`]): the same bytes and transcendental count, nothing else.
    pub arith: Option<Job>,
}

impl Case {
    /// Runs the agreement check: the warning line where the fused and the baseline forward
    /// differ by more than 1e-3 relative, `None` where they agree or there is no check.
    pub fn disagreement(&self) -> Result<Option<String>> {
        let Some(check) = &self.check else {
            return Ok(None);
        };
        let (f, b) = check()?;
        Ok(
            ((f - b).abs() > 1e-3 * f.abs().max(b.abs()).max(1e-12)).then(|| {
                format!(
                    "WARNING: {} {}: fused forward {f} differs from {} {b} (rel {:.2e})",
                    self.loss,
                    self.shape,
                    self.baseline,
                    (f - b).abs() / f.abs().max(b.abs())
                )
            }),
        )
    }
}

/// A case before its passes are built: its names, its two inputs, the fused loss and the
/// baseline.
struct Spec {
    loss: &'static str,
    id: String,
    shape: String,
    /// The input that receives the gradient (logits, scores, deltas or predicted boxes).
    x: Var,
    /// The other input: labels (not read by the copy floor), dense targets or target boxes.
    targets: Tensor,
    fused: LossFn,
    baseline: Baseline,
}

/// What a fused loss is timed against.
enum Baseline {
    /// The same loss composed from candle ops (`composed.rs`), candle's autograd for the
    /// backward.
    Composed(LossFn),
    /// AP-Loss's literal O(P·(P+N)) definition (`composed::naive_ap`) on the host copy of the
    /// inputs; `None` on a GPU, where it is not run.
    NaiveAp(Option<HostAp>),
    /// The same fused loss without its weight (for a `forward_weighted` case).
    Unweighted(LossFn),
}

impl Baseline {
    /// The composed baseline `f` (a loss of the input and the targets, as [`LossFn`]).
    fn composed(
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        Baseline::Composed(loss(f))
    }
}

/// AP-Loss's inputs on the host, for the naive baseline.
#[derive(Clone)]
struct HostAp {
    scores: Arc<Vec<f64>>,
    /// 1 positive, 0 negative.
    targets: Arc<Vec<i8>>,
    /// The fused loss's δ.
    delta: f64,
}

impl HostAp {
    /// `composed::naive_ap`: the loss and, with `update`, the update of every score.
    fn naive(&self, update: bool) -> (f64, Vec<f64>) {
        composed::naive_ap(&self.scores, &self.targets, self.delta, update)
    }
}

impl Spec {
    /// Builds the case: its fused passes, those of its baseline, their agreement check and the
    /// copy floor of its inputs.
    fn case(self, dev: &Device) -> Result<Case> {
        let Spec {
            loss,
            id,
            shape,
            x,
            targets,
            fused,
            baseline,
        } = self;
        let pass = |f: &LossFn, bwd: bool| -> Job {
            let (f, x, t) = (f.clone(), x.clone(), targets.clone());
            synced(
                dev,
                Box::new(move || {
                    if bwd {
                        f(x.as_tensor(), &t)?.backward()?;
                    } else {
                        // The loss value alone (validation), for the fused and the composed
                        // loss alike: on a tensor that tracks gradients the fused forward also
                        // computes the gradient, which the fwd+bwd rows time.
                        f(&x.as_tensor().detach(), &t)?;
                    }
                    Ok(())
                }),
            )
        };
        // The forward value on the `Var` itself, as the loss is trained.
        let value = |f: &LossFn| {
            let (f, x, t) = (f.clone(), x.clone(), targets.clone());
            move || scalar(&f(x.as_tensor(), &t)?)
        };
        let fused_value = value(&fused);
        enum Kind {
            Unweighted,
            Other,
        }
        let baseline_kind = match &baseline {
            Baseline::Unweighted(_) => Kind::Unweighted,
            _ => Kind::Other,
        };
        let (name, runs, composed_fwd, composed_fwd_bwd, check): (_, _, _, _, Option<Check>) =
            match baseline {
                Baseline::Composed(c) | Baseline::Unweighted(c) => {
                    let name = match baseline_kind {
                        Kind::Unweighted => "unweighted",
                        Kind::Other => "composed",
                    };
                    let composed_value = value(&c);
                    (
                        name,
                        7,
                        Some(pass(&c, false)),
                        Some(pass(&c, true)),
                        Some(Box::new(move || Ok((fused_value()?, composed_value()?)))),
                    )
                }
                Baseline::NaiveAp(host) => {
                    let naive = |update: bool| -> Option<Job> {
                        let h = host.clone()?;
                        Some(Box::new(move || {
                            std::hint::black_box(h.naive(update));
                            Ok(())
                        }))
                    };
                    let check = host
                        .clone()
                        .map(|h| Box::new(move || Ok((fused_value()?, h.naive(false).0))) as Check);
                    ("naive", 3, naive(false), naive(true), check)
                }
            };
        let grad_len = x.as_tensor().elem_count();
        let inputs = [x.as_tensor(), &targets];
        let bytes = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>()
            + grad_len * x.dtype().size_in_bytes();
        // The copy floor reads the float inputs (not the labels) and writes a gradient.
        let floats = inputs
            .into_iter()
            .filter(|t| t.dtype().is_float())
            .cloned()
            .collect();
        let copy = synced(dev, copy_floor(floats, grad_len)?);
        Ok(Case {
            loss,
            id,
            shape,
            dtype: "f32",
            bytes,
            grad_len,
            fused_fwd: pass(&fused, false),
            fused_fwd_bwd: pass(&fused, true),
            composed_fwd,
            composed_fwd_bwd,
            baseline: name,
            baseline_runs: runs,
            check,
            copy,
            arith: None,
        })
    }
}

/// Builds the cases of `specs` in their order.
fn build(dev: &Device, specs: Vec<Spec>) -> Result<Vec<Case>> {
    specs.into_iter().map(|s| s.case(dev)).collect()
}

/// A [`LossFn`] of a loss that returns candle's `Result`.
fn loss(
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> LossFn {
    Arc::new(move |x, t| Ok(f(x, t)?))
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

/// The copy floor, the one definition of the memory floor a case is compared with: on the CPU
/// one parallel pass that reads the float `inputs` and writes one gradient-sized (`out_len`)
/// buffer, allocated as the fused kernels allocate theirs; on a GPU a device-to-device copy of
/// each input (the logits' copy writes the gradient's bytes).
pub fn copy_floor(inputs: Vec<Tensor>, out_len: usize) -> Result<Job> {
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

/// `n` values uniform in `[-scale, scale)` from the xorshift* generator seeded with `seed`: the
/// inputs of every case, the same on every run and device.
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

/// A `[rows, cols]` input that receives the gradient: [`rand_vec`] of `seed` and `scale`.
fn rand_var(rows: usize, cols: usize, seed: u64, scale: f32, dev: &Device) -> Result<Var> {
    let t = Tensor::from_vec(rand_vec(rows * cols, seed, scale), (rows, cols), dev)?;
    Ok(Var::from_tensor(&t)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
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

/// Every case at `n` anchors except AP-Loss (whose size is its own, [`ap`]), in the table's
/// order: [`focal`], [`classification`], [`boxes`], [`quality`].
pub fn anchor_cases(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let mut cases = focal(n, dev)?;
    cases.extend(classification(n, dev)?);
    cases.extend(boxes(n, dev)?);
    cases.extend(quality(n, dev)?);
    cases.extend(weighted(n, dev)?);
    Ok(cases)
}

/// The weighted forms (`forward_weighted`, mmdet's `weight`) against the same fused loss
/// without a weight: sigmoid focal (labels) with one weight per anchor, smooth L1 with one per
/// element, quality focal (labels + scores) with one per anchor and distribution focal with
/// one per box side. The weights are ones (so the two values agree exactly, which the
/// agreement check sees), read like any weight.
pub fn weighted(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let c = CLASSES;
    let (labels, _, num_pos) = anchor_labels(n, c, c);
    let u32_labels: Vec<u32> = labels
        .iter()
        .map(|&l| if l < 0 { c as u32 } else { l as u32 })
        .collect();
    let lt = Tensor::new(labels, dev)?;
    let qt = Tensor::new(u32_labels, dev)?;
    let rows = Tensor::ones(n, DType::F32, dev)?;
    let f = SigmoidFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let sl = SmoothL1Loss {
        beta: 1.0 / 9.0,
        reduction: Reduction::Mean,
    };
    let elems = Tensor::ones((n, 4), DType::F32, dev)?;
    let f2 = f.clone();
    let qfl = QualityFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let scores: Vec<f32> = rand_vec(n, 11, 0.5).iter().map(|v| v + 0.5).collect();
    let dfl = DistributionFocalLoss::default();
    let (k, sides) = (DFL_BINS, 4 * n);
    let yt: Vec<f32> = rand_vec(sides, 13, 0.5)
        .iter()
        .map(|v| ((v + 0.5) * (k - 1) as f32).clamp(0.0, (k - 1) as f32))
        .collect();
    let side_w = Tensor::ones(sides, DType::F32, dev)?;
    let (w1, w2, w3) = (rows.clone(), elems, side_w);
    let q2 = qt.clone();
    build(
        dev,
        vec![
            Spec {
                loss: "weighted sigmoid focal (labels, [N])",
                id: format!("weighted_sigmoid_focal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: rand_var(n, c, 1, 4.0, dev)?,
                targets: lt,
                fused: loss(move |x, t| f.forward_weighted(x, t, &rows)),
                baseline: Baseline::Unweighted(loss(move |x, t| f2.forward(x, t))),
            },
            Spec {
                loss: "weighted smooth L1 ([N, 4])",
                id: format!("weighted_smooth_l1_{n}x4_f32"),
                shape: format!("{n}x4"),
                x: rand_var(n, 4, 7, 1.0, dev)?,
                targets: Tensor::from_vec(rand_vec(n * 4, 8, 1.0), (n, 4), dev)?,
                fused: loss(move |x, t| sl.forward_weighted(x, t, &w2)),
                baseline: Baseline::Unweighted(loss(move |x, t| sl.forward(x, t))),
            },
            Spec {
                loss: "weighted quality focal (labels + scores, [N])",
                id: format!("weighted_quality_focal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: rand_var(n, c, 10, 4.0, dev)?,
                targets: Tensor::new(scores, dev)?,
                fused: loss(move |x, s| qfl.forward_scores_weighted(x, &qt, s, &w1)),
                baseline: Baseline::Unweighted(loss(move |x, s| qfl.forward_scores(x, &q2, s))),
            },
            Spec {
                loss: "weighted distribution focal ([4N])",
                id: format!("weighted_dfl_{sides}x{k}_f32"),
                shape: format!("{sides}x{k}"),
                x: rand_var(sides, k, 14, 4.0, dev)?,
                targets: Tensor::from_vec(yt, sides, dev)?,
                fused: loss(move |x, y| dfl.forward_weighted(x, y, &w3)),
                baseline: Baseline::Unweighted(loss(move |x, y| dfl.forward(x, y))),
            },
        ],
    )
}

/// DFL's bins per box side (YOLOv8 / GFL: `reg_max` 16, so 17 bins).
pub const DFL_BINS: usize = 17;

/// The heads of GFL / VFNet / YOLOv8 at `n` anchors: quality focal loss on `[n, CLASSES]`
/// logits with u32 labels ([`anchor_labels`], ignored rows as background) and IoU scores,
/// varifocal loss with the same IoU-aware targets as a dense `[n, CLASSES]` tensor (both
/// averaged over the positives, as mmdet's heads), and the distribution focal loss on the
/// `[4n, DFL_BINS]` side distributions with targets in `[0, DFL_BINS − 1]` (averaged).
pub fn quality(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let c = CLASSES;
    let (labels, _, num_pos) = anchor_labels(n, c, c);
    let labels: Vec<u32> = labels
        .iter()
        .map(|&l| if l < 0 { c as u32 } else { l as u32 })
        .collect();
    let scores: Vec<f32> = rand_vec(n, 11, 0.5).iter().map(|v| v + 0.5).collect();
    let dense: Vec<f32> = (0..n * c)
        .map(|e| {
            let (i, j) = (e / c, e % c);
            if labels[i] as usize == j {
                scores[i]
            } else {
                0.0
            }
        })
        .collect();
    let lt = Tensor::new(labels, dev)?;
    let st = Tensor::new(scores, dev)?;
    let qt = Tensor::from_vec(dense, (n, c), dev)?;
    let qfl = QualityFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let vfl = VarifocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let dfl = DistributionFocalLoss::default();
    let rows = 4 * n;
    let k = DFL_BINS;
    let yt: Vec<f32> = rand_vec(rows, 13, 0.5)
        .iter()
        .map(|v| ((v + 0.5) * (k - 1) as f32).clamp(0.0, (k - 1) as f32))
        .collect();
    let (qt1, qt2) = (qt.clone(), qt.clone());
    build(
        dev,
        vec![
            Spec {
                loss: "quality focal (labels + scores)",
                id: format!("quality_focal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: rand_var(n, c, 10, 4.0, dev)?,
                targets: st,
                fused: loss(move |x, s| qfl.forward_scores(x, &lt, s)),
                baseline: Baseline::composed(move |x, _| {
                    composed::quality_focal(x, &qt1, 2.0, num_pos)
                }),
            },
            Spec {
                loss: "varifocal (dense)",
                id: format!("varifocal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: rand_var(n, c, 12, 4.0, dev)?,
                targets: qt2,
                fused: loss(move |x, t| vfl.forward(x, t)),
                baseline: Baseline::composed(move |x, t| {
                    composed::varifocal(x, t, 0.75, 2.0, num_pos)
                }),
            },
            Spec {
                loss: "distribution focal",
                id: format!("dfl_{rows}x{k}_f32"),
                shape: format!("{rows}x{k}"),
                x: rand_var(rows, k, 14, 4.0, dev)?,
                targets: Tensor::from_vec(yt, rows, dev)?,
                fused: loss(move |x, y| dfl.forward(x, y)),
                baseline: Baseline::composed(move |x, y| {
                    composed::distribution_focal(x, y, rows as f64)
                }),
            },
        ],
    )
}

/// Sigmoid focal loss on `[n, CLASSES]` logits (uniform in ±4), averaged over the positives:
/// with integer labels ([`anchor_labels`], background `CLASSES`) and with dense targets in
/// `[0, 1]`.
pub fn focal(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let c = CLASSES;
    let x = rand_var(n, c, 1, 4.0, dev)?;
    let (labels, _, num_pos) = anchor_labels(n, c, c);
    let dense: Vec<f32> = rand_vec(n * c, 2, 0.5)
        .iter()
        .map(|v| (v + 0.5).clamp(0.0, 1.0))
        .collect();
    let lt = Tensor::new(labels, dev)?;
    let dt = Tensor::from_vec(dense, (n, c), dev)?;
    let (one_hot, mask) = composed::one_hot_and_mask(&lt, c, DType::F32)?;
    let f = SigmoidFocalLoss {
        reduction: Reduction::AvgFactor(num_pos),
        ..Default::default()
    };
    let fused = loss(move |x, t| f.forward(x, t));
    let floors = [
        focal_floor(x.as_tensor(), None, dev),
        focal_floor(x.as_tensor(), Some(&dt), dev),
    ];
    let mut cases = build(
        dev,
        vec![
            Spec {
                loss: "sigmoid focal (labels)",
                id: format!("sigmoid_focal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: x.clone(),
                targets: lt,
                fused: fused.clone(),
                baseline: Baseline::composed(move |x, _| {
                    composed::sigmoid_focal(x, &one_hot, Some(&mask), 0.25, 2.0, num_pos)
                }),
            },
            Spec {
                loss: "sigmoid focal (dense)",
                id: format!("sigmoid_focal_dense_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x,
                targets: dt,
                fused,
                baseline: Baseline::composed(move |x, t| {
                    composed::sigmoid_focal(x, t, None, 0.25, 2.0, num_pos)
                }),
            },
        ],
    )?;
    for (case, floor) in cases.iter_mut().zip(floors) {
        case.arith = floor;
    }
    Ok(cases)
}

/// The sigmoid focal loss's arithmetic floor on the CPU (`None` on a GPU): a pass over the
/// logits (and dense targets) with the fused training step's transcendental count, writing a
/// gradient-sized output, and nothing else (`candle_detloss::bench_support`).
fn focal_floor(x: &Tensor, t: Option<&Tensor>, dev: &Device) -> Option<Job> {
    if !dev.is_cpu() {
        return None;
    }
    let (x, t) = (x.detach(), t.cloned());
    Some(Box::new(move || {
        let r = candle_detloss::bench_support::focal_arithmetic_floor(&x, t.as_ref())?;
        std::hint::black_box(r);
        Ok(())
    }))
}

/// Softmax cross-entropy and softmax focal loss on `[n, CLASSES + 1]` logits (the last column
/// background) and GHM-C (30 bins) on `[n, CLASSES]` sigmoid logits, all uniform in ±4, with
/// [`anchor_labels`].
pub fn classification(n: usize, dev: &Device) -> Result<Vec<Case>> {
    // Softmax: labels in 0..c, c - 1 the background column.
    let c = CLASSES + 1;
    let (labels, valid, _) = anchor_labels(n, c, c - 1);
    let x = rand_var(n, c, 5, 4.0, dev)?;
    let lt = Tensor::new(labels, dev)?;
    let (one_hot, mask) = composed::one_hot_and_mask(&lt, c, DType::F32)?;
    let (o1, m1) = (one_hot.clone(), mask.clone());
    let ce = CrossEntropyLoss::default();
    let sf = SoftmaxFocalLoss::default();
    // GHM-C: sigmoid classes 0..k, k the background label.
    let k = CLASSES;
    let bins = 30;
    let (labels, _, _) = anchor_labels(n, k, k);
    let gl = Tensor::new(labels, dev)?;
    let (g_one_hot, g_mask) = composed::one_hot_and_mask(&gl, k, DType::F32)?;
    let mut g = GhmcLoss::default();
    g.bins = bins;
    let g = Mutex::new(g);
    build(
        dev,
        vec![
            Spec {
                loss: "softmax cross-entropy",
                id: format!("softmax_ce_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x: x.clone(),
                targets: lt.clone(),
                fused: loss(move |x, t| ce.forward(x, t)),
                baseline: Baseline::composed(move |x, _| {
                    composed::cross_entropy(x, &o1, &m1, valid)
                }),
            },
            Spec {
                loss: "softmax focal",
                id: format!("softmax_focal_{n}x{c}_f32"),
                shape: format!("{n}x{c}"),
                x,
                targets: lt,
                fused: loss(move |x, t| sf.forward(x, t)),
                baseline: Baseline::composed(move |x, _| {
                    composed::softmax_focal(x, &one_hot, &mask, 0.25, 2.0, valid)
                }),
            },
            Spec {
                loss: "GHM-C (30 bins)",
                id: format!("ghmc_{bins}bins_{n}x{k}_f32"),
                shape: format!("{n}x{k}"),
                x: rand_var(n, k, 6, 4.0, dev)?,
                targets: gl,
                fused: loss(move |x, t| g.lock().expect("ghmc").forward(x, t)),
                baseline: Baseline::composed(move |x, _| {
                    composed::ghmc(x, &g_one_hot, Some(&g_mask), bins)
                }),
            },
        ],
    )
}

/// Smooth L1 (β = 1/9) and balanced L1 on `[n, 4]` deltas (uniform in ±1), GIoU and CIoU on
/// `[n, 4]` box pairs (corners in [0, 600), sides in [8, 200), the predictions jittered), all
/// averaged.
pub fn boxes(n: usize, dev: &Device) -> Result<Vec<Case>> {
    let shape = format!("{n}x4");
    let dp = rand_var(n, 4, 7, 1.0, dev)?;
    let dt = Tensor::from_vec(rand_vec(n * 4, 8, 1.0), (n, 4), dev)?;
    let numel = (n * 4) as f64;
    let beta = 1.0 / 9.0;
    let sl = SmoothL1Loss {
        beta,
        reduction: Reduction::Mean,
    };
    let bl = BalancedL1Loss::default();
    let mut specs = vec![
        Spec {
            loss: "smooth L1 (β = 1/9)",
            id: format!("smooth_l1_{n}x4_f32"),
            shape: shape.clone(),
            x: dp.clone(),
            targets: dt.clone(),
            fused: loss(move |x, t| sl.forward(x, t)),
            baseline: Baseline::composed(move |x, t| composed::smooth_l1(x, t, beta, numel)),
        },
        Spec {
            loss: "balanced L1",
            id: format!("balanced_l1_{n}x4_f32"),
            shape: shape.clone(),
            x: dp,
            targets: dt,
            fused: loss(move |x, t| bl.forward(x, t)),
            baseline: Baseline::composed(move |x, t| {
                composed::balanced_l1(x, t, 0.5, 1.5, 1.0, numel)
            }),
        },
    ];
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
    for (name, id, kind) in [
        ("GIoU", "giou", IouKind::Giou),
        ("CIoU", "ciou", IouKind::Ciou),
    ] {
        let f = BoxIouLoss {
            kind,
            ..Default::default()
        };
        let (eps, nf) = (f.eps, n as f64);
        specs.push(Spec {
            loss: name,
            id: format!("{id}_{n}x4_f32"),
            shape: shape.clone(),
            x: bp.clone(),
            targets: bt.clone(),
            fused: loss(move |x, t| f.forward(x, t)),
            baseline: Baseline::composed(move |x, t| {
                if kind == IouKind::Giou {
                    composed::giou(x, t, eps, nf)
                } else {
                    composed::ciou(x, t, eps, nf)
                }
            }),
        });
    }
    build(dev, specs)
}

/// AP-Loss on `[n, CLASSES]` scores (uniform in ±3) with `pos` positive rows (one positive
/// score each), the rest background, against the literal O(P·(P+N)) definition on the host
/// ("naive"; skipped on a GPU).
pub fn ap(n: usize, pos: usize, dev: &Device) -> Result<Case> {
    let c = CLASSES;
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
    let ap = ApLoss::default();
    let host = dev.is_cpu().then(|| HostAp {
        scores: Arc::new(scores.iter().map(|&v| v as f64).collect()),
        targets: Arc::new(
            (0..n * c)
                .map(|e| (labels[e / c] == (e % c) as i64) as i8)
                .collect(),
        ),
        delta: ap.delta,
    });
    Spec {
        loss: "AP-Loss",
        id: format!("ap_loss_{n}x{c}_{pos}pos_f32"),
        shape: format!("{n}x{c} ({pos} pos)"),
        x: Var::from_tensor(&Tensor::from_vec(scores, (n, c), dev)?)?,
        targets: Tensor::new(labels, dev)?,
        fused: loss(move |x, t| ap.forward(x, t)),
        baseline: Baseline::NaiveAp(host),
    }
    .case(dev)
}
