//! ApLoss on CUDA against the CPU path: positives, bucket statistics (bit for bit: integer
//! sums), loss and update (1e-6 relative), both bucket-accumulation paths (shared memory for
//! P <= 1002, global atomics above), the warp-aggregated case of nearly equal scores, every
//! dtype and target form, NaN, bad input and shards. Skipped (with a notice) without a GPU.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::ApLoss;
use common::*;

/// Labels with `pos_rows` positive rows out of `n` (others background or ignored).
fn labels(rng: &mut Rng, n: usize, c: usize, pos_frac: f64) -> Vec<i64> {
    (0..n)
        .map(|_| {
            let u = rng.uniform();
            if u < pos_frac {
                rng.below(c as u64) as i64
            } else if u < pos_frac + 0.05 {
                -1
            } else {
                c as i64
            }
        })
        .collect()
}

fn dense_of(l: &[i64], c: usize) -> Vec<i64> {
    l.iter()
        .flat_map(|k| {
            (0..c).map(move |j| {
                if *k < 0 {
                    -1
                } else if *k as usize == j {
                    1
                } else {
                    0
                }
            })
        })
        .collect()
}

fn run(ap: &ApLoss, x: &Tensor, t: &Tensor) -> LossGrad {
    run_loss(x, &Tensor::new(0.75f64, x.device()).unwrap(), |x| {
        ap.forward(x, t)
    })
}

fn compare(what: &str, ap: &ApLoss, x_cpu: &Tensor, t_cpu: &Tensor, gpu: &Device) {
    let x_gpu = x_cpu.to_device(gpu).unwrap();
    let t_gpu = t_cpu.to_device(gpu).unwrap();
    let pc = on_cpu_kernels(|| ap.gather_positives(x_cpu, t_cpu)).unwrap();
    let pg = ap.gather_positives(&x_gpu, &t_gpu).unwrap();
    assert_eq!(pc, pg, "{what}: positives");
    let sc = on_cpu_kernels(|| ap.bucket_stats(x_cpu, t_cpu, &pc)).unwrap();
    let sg = ap.bucket_stats(&x_gpu, &t_gpu, &pg).unwrap();
    assert_eq!(sc.to_words(), sg.to_words(), "{what}: bucket statistics");
    let inputs = |d: &Device| {
        let [x, t] = [x_cpu, t_cpu].map(|v| v.to_device(d).unwrap());
        [x, t, Tensor::new(0.75f64, d).unwrap()]
    };
    let r = cuda_and_cpu(gpu, inputs, |_, x, t| ap.forward(x, t));
    let lc = &r.cpu.0;
    assert!(lc[0].is_finite() && lc[0] > 0.0, "{what}: {lc:?}");
    assert!(max_abs(&r.cpu.1) > 0.0, "{what}");
    // The update's absolute tolerance: 1e-9 of the largest.
    r.assert_close(what, Tol::abs(0.0, 1e-6), Tol::scaled(1e-9, 0.0, 1e-6));
}

#[test]
fn cuda_matches_cpu_over_dtypes_targets_and_both_bucket_paths() {
    let Some(gpu) = cuda_device("cuda_matches_cpu_over_dtypes_targets_and_both_bucket_paths")
    else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(21);
    // (rows, classes, positive-row fraction): P ~ 40 (shared-memory buckets), P ~ 3000
    // (global atomics), and a large N.
    for &(n, c, frac) in &[
        (500usize, 8usize, 0.1),
        (6000, 10, 0.5),
        (100_000, 20, 0.01),
    ] {
        let l = labels(&mut rng, n, c, frac);
        // u32 labels have no ignore value: the ignored rows become background.
        let lu: Vec<u32> = l.iter().map(|k| (*k).max(0) as u32).collect();
        let x: Vec<f64> = (0..n * c)
            .map(|_| {
                if rng.below(3) == 0 {
                    (rng.below(17) as f64 - 8.0) * 0.25
                } else {
                    rng.normal(2.0)
                }
            })
            .collect();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let xt = Tensor::from_vec(x.clone(), (n, c), &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let dense = Tensor::from_vec(dense_of(&l, c), (n, c), &cpu).unwrap();
            let targets = [
                Tensor::from_vec(l.clone(), n, &cpu).unwrap(),
                Tensor::from_vec(lu.clone(), n, &cpu).unwrap(),
                dense.clone(),
                dense.to_dtype(dtype).unwrap(),
            ];
            for t in &targets {
                for (delta, interpolate) in [(1.0, true), (0.25, false)] {
                    let ap = ApLoss { delta, interpolate };
                    let what = format!(
                        "{n}x{c} {dtype:?} targets {:?}{:?} delta={delta} interp={interpolate}",
                        t.dtype(),
                        t.dims()
                    );
                    compare(&what, &ap, &xt, t, &gpu);
                }
            }
        }
    }
}

#[test]
fn cuda_nearly_equal_scores_warp_aggregation() {
    let Some(gpu) = cuda_device("cuda_nearly_equal_scores_warp_aggregation") else {
        return;
    };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(22);
    // RetinaNet-like initialisation: every logit about -4.6, so nearly every score falls into
    // one bucket, exercising the warp-aggregated atomics.
    let (n, c) = (50_000, 16);
    let x: Vec<f64> = (0..n * c).map(|_| -4.6 + rng.normal(1e-3)).collect();
    let l = labels(&mut rng, n, c, 0.02);
    let xt = Tensor::from_vec(x, (n, c), &cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::from_vec(l, n, &cpu).unwrap();
    compare("init-like", &ApLoss::default(), &xt, &t, &gpu);
    // All exactly equal.
    let xt = Tensor::full(-4.6f32, (n, c), &cpu).unwrap();
    compare("all equal", &ApLoss::default(), &xt, &t, &gpu);
}

#[test]
fn cuda_shards_equal_pooled_and_nan_and_errors() {
    let Some(gpu) = cuda_device("cuda_shards_equal_pooled_and_nan_and_errors") else {
        return;
    };
    let mut rng = Rng::new(23);
    let (n, c) = (3000, 9);
    let x = Tensor::from_vec(rng.vec_normal(n * c, 2.0), (n, c), &gpu).unwrap();
    let t = Tensor::from_vec(labels(&mut rng, n, c, 0.2), n, &gpu).unwrap();
    let ap = ApLoss::default();
    let (pl, pg) = run(&ap, &x, &t);
    for k in [2usize, 5] {
        let step = n.div_ceil(k);
        let parts: Vec<(Tensor, Tensor)> = (0..n)
            .step_by(step)
            .map(|s| {
                let len = step.min(n - s);
                (x.narrow(0, s, len).unwrap(), t.narrow(0, s, len).unwrap())
            })
            .collect();
        let mut all = Vec::new();
        for (xs, ts) in &parts {
            all.extend(ap.gather_positives(xs, ts).unwrap());
        }
        all.sort_by(f64::total_cmp);
        let mut stats = ap.bucket_stats(&parts[0].0, &parts[0].1, &all).unwrap();
        for (xs, ts) in &parts[1..] {
            stats.add(&ap.bucket_stats(xs, ts, &all).unwrap()).unwrap();
        }
        let global = ap.finish(&stats).unwrap();
        assert_eq!(global.loss(), pl[0], "k={k}");
        let mut upd = Vec::new();
        for (xs, ts) in &parts {
            upd.extend(to_f64_vec(&ap.shard_update(xs, ts, &global).unwrap()));
        }
        let upd: Vec<f64> = upd.iter().map(|v| v * 0.75).collect();
        assert_close(&format!("k={k}"), &upd, &pg, 0.0, 1e-12);
    }
    // NaN propagates.
    let xn = Tensor::new(&[[0.3f32, f32::NAN], [1.0, -1.0]], &gpu).unwrap();
    let tn = Tensor::new(&[0i64, 2], &gpu).unwrap();
    let (l, g) = run(&ap, &xn, &tn);
    assert!(l[0].is_nan() && g.iter().all(|v| v.is_nan()), "{l:?} {g:?}");
    // Errors.
    let x4 = Tensor::zeros((4, 5), DType::F32, &gpu).unwrap();
    let e = ap
        .forward(&x4, &Tensor::new(&[0i64, 7, 1, 2], &gpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ApLoss") && e.contains("label 7"), "{e}");
    let mut d = vec![0f32; 20];
    d[13] = 0.5;
    let e = ap
        .forward(&x4, &Tensor::from_vec(d, (4, 5), &gpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("target 0.5 at [2, 3]"), "{e}");
}
