//! CrossEntropyLoss with class-probability targets `[N, K]` (torch's float-target form): against
//! an independent f64 reference (loss, gradients to the logits and to the targets, every
//! reduction, class weights, label smoothing, row weights), one-hot targets against the label
//! form, finite differences, extreme logits, half precision, wide rows (the block kernels),
//! strided inputs, thread-count determinism, leading dimensions, bad input and tracked targets.
//! Under `--features cuda-emu` the same checks run the CUDA kernels.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{CrossEntropyLoss, Reduction, SoftmaxFocalLoss};
use common::weighted::*;
use common::*;

const NAME: &str = "CrossEntropyLoss";

// ---------------------------------------------------------------------------------------------
// Independent reference: plain log-softmax in f64, l = -Σ_k w_k t'_k log p_k.
// ---------------------------------------------------------------------------------------------

/// A reference case: `k` classes, smoothing, class weights, row weights.
#[derive(Clone, Copy)]
struct Case<'a> {
    k: usize,
    eps: f64,
    cw: Option<&'a [f64]>,
    ew: Option<&'a [f64]>,
}

/// Per-row losses and their derivatives w.r.t. the logits and the targets.
fn ref_rows(x: &[f64], t: &[f64], c: Case) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let k = c.k;
    let n = x.len() / k;
    let (mut per, mut dx, mut dt) = (vec![0.0; n], vec![0.0; n * k], vec![0.0; n * k]);
    for i in 0..n {
        let xr = &x[i * k..(i + 1) * k];
        let m = xr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + xr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let logp: Vec<f64> = xr.iter().map(|v| v - lse).collect();
        let w = |j: usize| c.cw.map_or(1.0, |w| w[j]);
        let tp = |j: usize| (1.0 - c.eps) * t[i * k + j] + c.eps / k as f64;
        let ew = c.ew.map_or(1.0, |e| e[i]);
        let su: f64 = (0..k).map(|j| w(j) * tp(j)).sum();
        per[i] = ew * -(0..k).map(|j| w(j) * tp(j) * logp[j]).sum::<f64>();
        for j in 0..k {
            dx[i * k + j] = ew * (logp[j].exp() * su - w(j) * tp(j));
            dt[i * k + j] = ew * -(1.0 - c.eps) * w(j) * logp[j];
        }
    }
    (per, dx, dt)
}

/// Reference loss (reduced, `Mean` = sum / N) and the gradients of `sum(loss · up)`.
fn reference(x: &[f64], t: &[f64], c: Case, red: Reduction, up: &[f64]) -> (LossGrad, Vec<f64>) {
    let n = x.len() / c.k;
    let (per, dx, dt) = ref_rows(x, t, c);
    let (l, gx) = reduce_reference(per.clone(), dx, red, n as f64, up, c.k);
    let (_, gt) = reduce_reference(per, dt, red, n as f64, up, c.k);
    ((l, gx), gt)
}

fn ce(red: Reduction, eps: f64, cw: Option<Tensor>) -> CrossEntropyLoss {
    CrossEntropyLoss {
        reduction: red,
        class_weights: cw,
        label_smoothing: eps,
    }
}

/// `forward`, or `forward_weighted` with `ew`.
fn run(l: &CrossEntropyLoss, x: &Tensor, t: &Tensor, ew: Option<&Tensor>) -> Result<Tensor> {
    match ew {
        None => l.forward(x, t),
        Some(w) => l.forward_weighted(x, t, w),
    }
}

/// Random probability rows (a softmax of normals, some exact zeros) `[n, k]`.
fn probs(rng: &mut Rng, n: usize, k: usize) -> Vec<f64> {
    let mut t = Vec::with_capacity(n * k);
    for _ in 0..n {
        let z: Vec<f64> = (0..k)
            .map(|j| {
                if j % 5 == 3 {
                    0.0
                } else {
                    rng.normal(1.5).exp()
                }
            })
            .collect();
        let s: f64 = z.iter().sum();
        t.extend(z.iter().map(|v| v / s));
    }
    t
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Loss, logits' gradient and targets' gradient of `sum(f(x, t) · up)`, both tracking one.
fn all_grads(
    x: &Tensor,
    t: &Tensor,
    up: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let loss = f(x, t).unwrap();
    let (gx, gt) = grads_of_both(x, t, up, f).unwrap();
    (to_f64_vec(&loss), to_f64_vec(&gx), to_f64_vec(&gt))
}

const N: usize = 11;
const K: usize = 9;

// ---------------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------------

#[test]
fn matches_the_reference_with_both_gradients() {
    let mut rng = Rng::new(1);
    let x = rng.vec_normal(N * K, 2.0);
    let t = probs(&mut rng, N, K);
    let cw: Vec<f64> = (0..K).map(|_| 0.3 + rng.uniform()).collect();
    let ew: Vec<f64> = (0..N).map(|_| 2.0 * rng.uniform()).collect();
    for dtype in [DType::F64, DType::F32] {
        for eps in [0.0, 0.2] {
            for with_cw in [false, true] {
                for with_ew in [false, true] {
                    for red in REDUCTIONS {
                        let c = Case {
                            k: K,
                            eps,
                            cw: with_cw.then_some(cw.as_slice()),
                            ew: with_ew.then_some(ew.as_slice()),
                        };
                        let up = upstream(&mut rng, red, N);
                        let ((wl, wgx), wgt) = reference(&x, &t, c, red, &up);
                        let loss = ce(red, eps, c.cw.map(|w| tensor(w, &[K], dtype)));
                        let ewt = c.ew.map(|w| tensor(w, &[N], dtype));
                        let upt = up_tensor(&up, red, &[N], &Device::Cpu);
                        let (xt, tt) = (tensor(&x, &[N, K], dtype), tensor(&t, &[N, K], dtype));
                        let (l, gx, gt) =
                            all_grads(&xt, &tt, &upt, |x, t| run(&loss, x, t, ewt.as_ref()));
                        let tol = if dtype == DType::F64 {
                            Tol::abs(1e-12, 1e-10)
                        } else {
                            Tol::scaled(3e-6, 1e-2, 3e-5)
                        };
                        let what = format!("{dtype:?} eps {eps} cw {with_cw} ew {with_ew} {red:?}");
                        tol.check(&format!("{what} loss"), &l, &wl);
                        tol.check(&format!("{what} logits grad"), &gx, &wgx);
                        tol.check(&format!("{what} targets grad"), &gt, &wgt);
                    }
                }
            }
        }
    }
}

#[test]
fn one_hot_targets_equal_the_label_form() {
    let mut rng = Rng::new(2);
    let x = rng.vec_normal(N * K, 3.0);
    let labels: Vec<i64> = (0..N).map(|_| rng.below(K as u64) as i64).collect();
    let mut onehot = vec![0.0; N * K];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * K + l as usize] = 1.0;
    }
    let cw: Vec<f64> = (0..K).map(|_| 0.3 + rng.uniform()).collect();
    let wsum: f64 = labels.iter().map(|&l| cw[l as usize]).sum();
    let (xt, tt) = (
        tensor(&x, &[N, K], DType::F64),
        tensor(&onehot, &[N, K], DType::F64),
    );
    let lt = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let cwt = tensor(&cw, &[K], DType::F64);
    for eps in [0.0, 0.1] {
        for red in REDUCTIONS {
            let loss = ce(red, eps, Some(cwt.clone()));
            let up = unit_upstream(red, &[N], DType::F64, &Device::Cpu);
            let (lp, gp) = loss_and_grad(&xt, &up, |x| loss.forward(x, &tt)).unwrap();
            let (ll, gl) = loss_and_grad(&xt, &up, |x| loss.forward(x, &lt)).unwrap();
            let (mut lp, mut gp) = (to_f64_vec(&lp), to_f64_vec(&gp));
            if red == Reduction::Mean {
                // torch: the label form divides by Σ w_label, the probability form by N.
                let f = N as f64 / wsum;
                lp.iter_mut().for_each(|v| *v *= f);
                gp.iter_mut().for_each(|v| *v *= f);
            }
            let what = format!("eps {eps} {red:?}");
            Tol::abs(1e-12, 1e-12).check(&format!("{what} loss"), &lp, &to_f64_vec(&ll));
            Tol::abs(1e-12, 1e-12).check(&format!("{what} grad"), &gp, &to_f64_vec(&gl));
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    let (n, k) = (5, 6);
    let x = rng.vec_normal(n * k, 1.5);
    let t = probs(&mut rng, n, k);
    let cw: Vec<f64> = (0..k).map(|_| 0.3 + rng.uniform()).collect();
    let ew: Vec<f64> = (0..n).map(|_| 0.2 + rng.uniform()).collect();
    let dev = Device::Cpu;
    for red in REDUCTIONS {
        let loss = ce(red, 0.15, Some(tensor(&cw, &[k], DType::F64)));
        let ewt = tensor(&ew, &[n], DType::F64);
        let up = up_tensor(&upstream(&mut rng, red, n), red, &[n], &dev);
        let (xt, tt) = (
            tensor(&x, &[n, k], DType::F64),
            tensor(&t, &[n, k], DType::F64),
        );
        let (_, gx, gt) = all_grads(&xt, &tt, &up, |x, t| loss.forward_weighted(x, t, &ewt));
        let check = FdCheck {
            nonzero: true,
            ..FD
        };
        check_finite_differences(&format!("{red:?} logits"), &gx, &x, check, |xv| {
            weighted_sum(
                loss.forward_weighted(&tensor(xv, &[n, k], DType::F64), &tt, &ewt)
                    .unwrap(),
                &up,
            )
        });
        check_finite_differences(&format!("{red:?} targets"), &gt, &t, check, |tv| {
            weighted_sum(
                loss.forward_weighted(&xt, &tensor(tv, &[n, k], DType::F64), &ewt)
                    .unwrap(),
                &up,
            )
        });
        check_weight_gradient(&format!("probability targets {red:?}"), &[n], 31, |r, w| {
            ce(r, 0.15, Some(tensor(&cw, &[k], DType::F64))).forward_weighted(&xt, &tt, w)
        });
    }
}

#[test]
fn weight_of_ones_is_forward_bit_for_bit() {
    let mut rng = Rng::new(4);
    let x = rng.vec_normal(N * K, 2.0);
    let t = probs(&mut rng, N, K);
    for dtype in [DType::F32, DType::F64, DType::F16] {
        let (xt, tt) = (tensor(&x, &[N, K], dtype), tensor(&t, &[N, K], dtype));
        for eps in [0.0, 0.1] {
            check_weight_of_ones(
                &format!("{dtype:?} eps {eps}"),
                &xt,
                &[&[N]],
                |x, red, w| run(&ce(red, eps, None), x, &tt, w),
            );
        }
    }
}

#[test]
fn extreme_logits_stay_finite_and_accurate() {
    let (n, k) = (4, 5);
    // Saturated rows: ±100 logits, targets on the winning, the losing and mixed columns.
    let x = vec![
        100.0, -100.0, 0.0, -100.0, 100.0, //
        -100.0, -100.0, -100.0, -100.0, 100.0, //
        100.0, 99.0, -100.0, 50.0, -50.0, //
        -100.0, 100.0, -100.0, 100.0, -100.0,
    ];
    let t = vec![
        0.5, 0.0, 0.0, 0.0, 0.5, //
        1.0, 0.0, 0.0, 0.0, 0.0, //
        0.0, 0.25, 0.25, 0.5, 0.0, //
        0.2, 0.2, 0.2, 0.2, 0.2,
    ];
    let mut rng = Rng::new(5);
    for red in REDUCTIONS {
        for eps in [0.0, 0.1] {
            let up = upstream(&mut rng, red, n);
            let c = Case {
                k,
                eps,
                cw: None,
                ew: None,
            };
            let ((wl, wgx), wgt) = reference(&x, &t, c, red, &up);
            let upt = up_tensor(&up, red, &[n], &Device::Cpu);
            let loss = ce(red, eps, None);
            let (xt, tt) = (
                tensor(&x, &[n, k], DType::F32),
                tensor(&t, &[n, k], DType::F32),
            );
            let (l, gx, gt) = all_grads(&xt, &tt, &upt, |x, t| loss.forward(x, t));
            assert!(
                l.iter().chain(&gx).chain(&gt).all(|v| v.is_finite()),
                "{red:?}: {l:?} {gx:?} {gt:?}"
            );
            let what = format!("±100 eps {eps} {red:?}");
            let tol = Tol::scaled(1e-6, 1.0, 1e-6);
            tol.check(&format!("{what} loss"), &l, &wl);
            tol.check(&format!("{what} logits grad"), &gx, &wgx);
            tol.check(&format!("{what} targets grad"), &gt, &wgt);
        }
    }
}

/// The naive half evaluation: log-softmax composed of half ops, every intermediate rounded.
fn naive_half(x: &[f64], t: &[f64], k: usize, dtype: DType) -> (Vec<f64>, Vec<f64>) {
    let r = |v: f64| round_half(v, dtype);
    let n = x.len() / k;
    let (mut per, mut g) = (vec![0.0; n], vec![0.0; n * k]);
    for i in 0..n {
        let xr = &x[i * k..(i + 1) * k];
        let tr = &t[i * k..(i + 1) * k];
        let m = xr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: Vec<f64> = xr.iter().map(|v| r(v - m)).collect();
        let e: Vec<f64> = z.iter().map(|v| r(v.exp())).collect();
        let s = e.iter().fold(0.0, |a, v| r(a + v));
        let ls = r(s.ln());
        let mut l = 0.0;
        let su = tr.iter().fold(0.0, |a, v| r(a + v));
        for j in 0..k {
            let logp = r(z[j] - ls);
            l = r(l - r(tr[j] * logp));
            g[i * k + j] = r(r(r(e[j] / s) * su) - tr[j]);
        }
        per[i] = l;
    }
    (per, g)
}

#[test]
fn half_dtypes_within_twice_the_naive_error() {
    let (n, k) = (64, 12);
    for dtype in [DType::F16, DType::BF16] {
        let mut rng = Rng::new(6);
        let x = half_logits(&mut rng, n * k, dtype);
        let t = round_to_dtype(&probs(&mut rng, n, k), dtype);
        let c = Case {
            k,
            eps: 0.0,
            cw: None,
            ew: None,
        };
        let (per, dx, _) = ref_rows(&x, &t, c);
        let (naive_l, naive_g) = naive_half(&x, &t, k, dtype);
        let loss = ce(Reduction::None, 0.0, None);
        let (xt, tt) = (tensor(&x, &[n, k], dtype), tensor(&t, &[n, k], dtype));
        let up = Tensor::ones(n, dtype, &Device::Cpu).unwrap();
        let (l, gx, gt) = all_grads(&xt, &tt, &up, |x, t| loss.forward(x, t));
        let mut errs = HalfErrors::default();
        for i in 0..n {
            errs.loss(l[i], naive_l[i], per[i]);
        }
        for j in 0..n * k {
            errs.grad(gx[j], naive_g[j], dx[j]);
        }
        errs.check(&format!("{dtype:?}"));
        assert!(gt.iter().all(|v| v.is_finite()), "{dtype:?} targets grad");
        // The scalar reductions accumulate in f32.
        for red in [Reduction::Sum, Reduction::Mean] {
            let s = ce(red, 0.0, None).forward(&xt, &tt).unwrap();
            let s = s.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let want = per.iter().sum::<f64>()
                / if red == Reduction::Mean {
                    n as f64
                } else {
                    1.0
                };
            check_accumulated(&format!("{dtype:?}"), &format!("{red:?}"), s, want);
        }
    }
}

#[test]
fn wide_rows_in_every_dtype() {
    // K > 1024: one block per row on CUDA.
    let (n, k) = (3, 1500);
    let mut rng = Rng::new(7);
    let x = rng.vec_normal(n * k, 2.0);
    let t = probs(&mut rng, n, k);
    let cw: Vec<f64> = (0..k).map(|_| 0.5 + rng.uniform()).collect();
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let xr = round_to_dtype(&x, dtype);
        let tr = round_to_dtype(&t, dtype);
        let cwr = round_to_dtype(&cw, dtype);
        for red in [Reduction::None, Reduction::Mean] {
            let up = upstream(&mut rng, red, n);
            let c = Case {
                k,
                eps: 0.1,
                cw: Some(&cwr),
                ew: None,
            };
            let ((wl, wgx), wgt) = reference(&xr, &tr, c, red, &up);
            let loss = ce(red, 0.1, Some(tensor(&cwr, &[k], dtype)));
            let upt = up_tensor(&up, red, &[n], &Device::Cpu);
            let (xt, tt) = (tensor(&xr, &[n, k], dtype), tensor(&tr, &[n, k], dtype));
            let (l, gx, gt) = all_grads(&xt, &tt, &upt, |x, t| loss.forward(x, t));
            let tol = match dtype {
                DType::F64 => Tol::abs(1e-11, 1e-10),
                DType::F32 => Tol::scaled(1e-5, 1e-3, 1e-4),
                DType::F16 => Tol::scaled(2e-3, 1e-3, 2e-3),
                _ => Tol::scaled(1.6e-2, 1e-3, 1.6e-2),
            };
            let what = format!("K {k} {dtype:?} {red:?}");
            tol.check(&format!("{what} loss"), &l, &wl);
            tol.check(&format!("{what} logits grad"), &gx, &wgx);
            tol.check(&format!("{what} targets grad"), &gt, &wgt);
        }
    }
}

#[test]
fn strided_inputs_equal_contiguous_copies() {
    let mut rng = Rng::new(8);
    let x = rng.vec_normal(N * K, 2.0);
    let t = probs(&mut rng, N, K);
    // Transposed storage: [K, N] tensors, transposed back to [N, K] views.
    let xt_data: Vec<f64> = (0..K * N).map(|e| x[(e % N) * K + e / N]).collect();
    let tt_data: Vec<f64> = (0..K * N).map(|e| t[(e % N) * K + e / N]).collect();
    let xv = tensor(&xt_data, &[K, N], DType::F32).t().unwrap();
    let tv = tensor(&tt_data, &[K, N], DType::F32).t().unwrap();
    assert!(!xv.is_contiguous() && !tv.is_contiguous());
    let (xc, tc) = (
        tensor(&x, &[N, K], DType::F32),
        tensor(&t, &[N, K], DType::F32),
    );
    for red in REDUCTIONS {
        let loss = ce(red, 0.1, None);
        let up = unit_upstream(red, &[N], DType::F32, &Device::Cpu);
        let a = all_grads(&xv, &tv, &up, |x, t| loss.forward(x, t));
        let b = all_grads(&xc, &tc, &up, |x, t| loss.forward(x, t));
        assert_eq!(a, b, "{red:?}");
    }
}

#[test]
fn thread_count_does_not_change_the_bits() {
    let (n, k) = (2500, 21);
    let mut rng = Rng::new(9);
    let x = tensor(&rng.vec_normal(n * k, 2.0), &[n, k], DType::F32);
    let t = tensor(&probs(&mut rng, n, k), &[n, k], DType::F32);
    let ew = tensor(
        &(0..n).map(|i| (i % 7) as f64 / 3.0).collect::<Vec<_>>(),
        &[n],
        DType::F32,
    );
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let loss = ce(red, 0.1, None);
            let up = unit_upstream(red, &[n], DType::F32, &Device::Cpu);
            let l = loss.forward_weighted(&x, &t, &ew).unwrap();
            let (gx, gt) =
                grads_of_both(&x, &t, &up, |x, t| loss.forward_weighted(x, t, &ew)).unwrap();
            push_bits(&mut bits, &l, &gx);
            push_bits(&mut bits, &l, &gt);
        }
        bits
    });
}

#[test]
fn leading_dims_equal_the_flattened_call() {
    let mut rng = Rng::new(10);
    let (b, a, k) = (2, 3, 5);
    let x = rng.vec_normal(b * a * k, 2.0);
    let t = probs(&mut rng, b * a, k);
    let ew: Vec<f64> = (0..b * a).map(|_| rng.uniform()).collect();
    let (x3, t3, w3) = (
        tensor(&x, &[b, a, k], DType::F64),
        tensor(&t, &[b, a, k], DType::F64),
        tensor(&ew, &[b, a], DType::F64),
    );
    let (x2, t2, w2) = (
        tensor(&x, &[b * a, k], DType::F64),
        tensor(&t, &[b * a, k], DType::F64),
        tensor(&ew, &[b * a], DType::F64),
    );
    for red in REDUCTIONS {
        let loss = ce(red, 0.1, None);
        let l3 = loss.forward_weighted(&x3, &t3, &w3).unwrap();
        let l2 = loss.forward_weighted(&x2, &t2, &w2).unwrap();
        if red == Reduction::None {
            assert_eq!(l3.dims(), &[b, a]);
        }
        let (u3, u2) = (l3.ones_like().unwrap(), l2.ones_like().unwrap());
        let r3 = all_grads(&x3, &t3, &u3, |x, t| loss.forward_weighted(x, t, &w3));
        let r2 = all_grads(&x2, &t2, &u2, |x, t| loss.forward_weighted(x, t, &w2));
        assert_eq!(r3, r2, "{red:?}");
    }
}

#[test]
fn bad_input_is_an_error_naming_the_loss() {
    let mut rng = Rng::new(11);
    let x = tensor(&rng.vec_normal(N * K, 1.0), &[N, K], DType::F32);
    let t = probs(&mut rng, N, K);
    let loss = ce(Reduction::Mean, 0.0, None);
    let named = Named::First(NAME);
    let wide = Tensor::ones((N, K + 1), DType::F32, &Device::Cpu).unwrap();
    check_error(named, loss.forward(&x, &wide), &["targets", "shape"]);
    let flat = Tensor::ones(N * K, DType::F32, &Device::Cpu).unwrap();
    check_error(named, loss.forward(&x, &flat), &["targets", "shape"]);
    let f64t = tensor(&t, &[N, K], DType::F64);
    check_error(named, loss.forward(&x, &f64t), &["targets", "dtype"]);
    let x3 = x.reshape((1, N, K)).unwrap();
    let lead_bad = Tensor::ones((1, N, K + 1), DType::F32, &Device::Cpu).unwrap();
    check_error(named, loss.forward(&x3, &lead_bad), &["targets"]);
    let tt = tensor(&t, &[N, K], DType::F32);
    let bad_w = Tensor::ones((N, K), DType::F32, &Device::Cpu).unwrap();
    check_error(
        named,
        loss.forward_weighted(&x, &tt, &bad_w),
        &["weight", "shape"],
    );
    // The focal loss takes labels only.
    let sf = SoftmaxFocalLoss::default();
    check_error(
        Named::First("SoftmaxFocalLoss"),
        sf.forward(&x, &tt),
        &["labels", "CrossEntropyLoss"],
    );
}

#[test]
fn tracked_targets_get_their_gradient() {
    // The regression: targets that track a gradient (a teacher's soft labels) used to make the
    // backward an error; now they get -(1-ε)·w_k·log p_k, weighted.
    let mut rng = Rng::new(12);
    let (n, k) = (4, 6);
    let x = rng.vec_normal(n * k, 1.0);
    let t = probs(&mut rng, n, k);
    let ew: Vec<f64> = (0..n).map(|_| 0.5 + rng.uniform()).collect();
    let dev = Device::Cpu;
    for red in REDUCTIONS {
        let loss = ce(red, 0.1, None);
        // Only the targets track a gradient.
        let tv = Var::from_vec(t.clone(), (n, k), &dev).unwrap();
        let xt = tensor(&x, &[n, k], DType::F64);
        let l = loss.forward(&xt, tv.as_tensor()).unwrap();
        let g = l
            .sum_all()
            .unwrap()
            .backward()
            .expect("backward with tracked targets");
        let gt = to_f64_vec(g.get(&tv).expect("the targets get a gradient"));
        let up = vec![1.0; if red == Reduction::None { n } else { 1 }];
        let c = Case {
            k,
            eps: 0.1,
            cw: None,
            ew: None,
        };
        let (_, want) = reference(&x, &t, c, red, &up);
        Tol::abs(1e-12, 1e-10).check(&format!("{red:?} targets only"), &gt, &want);
        // Logits, targets and a weight all tracked: three gradients.
        let xv = Var::from_vec(x.clone(), (n, k), &dev).unwrap();
        let wv = Var::from_vec(ew.clone(), n, &dev).unwrap();
        let l = loss
            .forward_weighted(xv.as_tensor(), tv.as_tensor(), wv.as_tensor())
            .unwrap();
        let g = l.sum_all().unwrap().backward().expect("backward");
        let c = Case { ew: Some(&ew), ..c };
        let ((_, wgx), wgt) = reference(&x, &t, c, red, &up);
        let tol = Tol::abs(1e-12, 1e-10);
        tol.check(
            &format!("{red:?} logits"),
            &to_f64_vec(g.get(&xv).unwrap()),
            &wgx,
        );
        tol.check(
            &format!("{red:?} targets"),
            &to_f64_vec(g.get(&tv).unwrap()),
            &wgt,
        );
        let gw = to_f64_vec(g.get(&wv).expect("the weight gets a gradient"));
        let (per, _, _) = ref_rows(&x, &t, Case { ew: None, ..c });
        let f = match red {
            Reduction::Mean => 1.0 / n as f64,
            Reduction::AvgFactor(a) => 1.0 / a,
            _ => 1.0,
        };
        let want_w: Vec<f64> = per.iter().map(|l| l * f).collect();
        tol.check(&format!("{red:?} weight"), &gw, &want_w);
    }
}
