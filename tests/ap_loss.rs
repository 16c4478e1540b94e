//! ApLoss: against a literal O(P·(P+N)) f64 reference of the official implementation's
//! semantics (loss and error-driven update), ties and window edges, both target forms, half
//! precision, layouts, bad input, determinism and the sharded (pooled) API.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_detloss::{ApLoss, ApStats};
use common::*;

// ---------------------------------------------------------------------------------------------
// Reference: the definition transcribed literally (every pair evaluated), f64.
// ---------------------------------------------------------------------------------------------

fn h(x: f64, delta: f64) -> f64 {
    (x / (2.0 * delta) + 0.5).clamp(0.0, 1.0)
}

/// (loss, update) for scores `s` with roles 1 positive, 0 negative, -1 ignored.
fn reference(s: &[f64], roles: &[i8], delta: f64, interpolate: bool) -> (f64, Vec<f64>) {
    let pos: Vec<usize> = (0..s.len()).filter(|&i| roles[i] == 1).collect();
    let neg: Vec<usize> = (0..s.len()).filter(|&i| roles[i] == 0).collect();
    let mut upd = vec![0.0; s.len()];
    if pos.is_empty() {
        return (0.0, upd);
    }
    let mut order = pos.clone();
    order.sort_by(|a, b| s[*a].total_cmp(&s[*b]));
    let mut prec = vec![0.0; s.len()];
    let mut max_prec = 0.0f64;
    for &i in &order {
        let a = 1.0
            + pos
                .iter()
                .filter(|&&k| k != i)
                .map(|&k| h(s[k] - s[i], delta))
                .sum::<f64>();
        let b: f64 = neg.iter().map(|&j| h(s[j] - s[i], delta)).sum();
        let cur = a / (a + b);
        let f = if !interpolate {
            prec[i] = cur;
            1.0
        } else if max_prec <= cur {
            max_prec = cur;
            prec[i] = cur;
            1.0
        } else {
            prec[i] = max_prec;
            (1.0 - max_prec) / (1.0 - cur)
        };
        for &j in &neg {
            upd[j] += f * h(s[j] - s[i], delta) / (a + b);
        }
    }
    let p = pos.len() as f64;
    for &j in &neg {
        upd[j] /= p;
    }
    for &i in &pos {
        upd[i] = -(1.0 - prec[i]) / p;
    }
    let loss = 1.0 - pos.iter().map(|&i| prec[i]).sum::<f64>() / p;
    (loss, upd)
}

#[derive(Clone, Debug)]
enum Tg {
    /// Labels [N]: class, C background, -1 ignored.
    Labels(Vec<i64>),
    /// Dense [N, C] in {-1, 0, 1}.
    Dense(Vec<i64>),
}

fn roles(tg: &Tg, n: usize, c: usize) -> Vec<i8> {
    match tg {
        Tg::Labels(l) => (0..n * c)
            .map(|e| {
                let k = l[e / c];
                if k < 0 {
                    -1
                } else {
                    (k as usize == e % c) as i8
                }
            })
            .collect(),
        Tg::Dense(d) => d.iter().map(|v| *v as i8).collect(),
    }
}

/// The target forms of `tg` as tensors: labels as i64 and u32 (u32 only without -1), dense as
/// i64 and in `dtype`.
fn target_tensors(tg: &Tg, n: usize, c: usize, dtype: DType, dev: &Device) -> Vec<Tensor> {
    match tg {
        Tg::Labels(l) => {
            let mut v = vec![Tensor::from_vec(l.clone(), n, dev).unwrap()];
            if l.iter().all(|k| *k >= 0) {
                let u: Vec<u32> = l.iter().map(|k| *k as u32).collect();
                v.push(Tensor::from_vec(u, n, dev).unwrap());
            }
            v
        }
        Tg::Dense(d) => {
            let t = Tensor::from_vec(d.clone(), (n, c), dev).unwrap();
            vec![t.clone(), t.to_dtype(dtype).unwrap()]
        }
    }
}

/// Scores with many ties and many window-edge hits: half on a grid of step δ_min/2, half
/// continuous.
fn scores(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| {
            if rng.below(2) == 0 {
                (rng.below(33) as f64 - 16.0) * 0.125
            } else {
                rng.normal(1.5)
            }
        })
        .collect()
}

fn labels(rng: &mut Rng, n: usize, c: usize, ignore: bool) -> Tg {
    Tg::Labels(
        (0..n)
            .map(|_| match rng.below(10) {
                0 if ignore => -1,
                0..=5 => c as i64,
                _ => rng.below(c as u64) as i64,
            })
            .collect(),
    )
}

fn dense(rng: &mut Rng, n: usize, c: usize) -> Tg {
    Tg::Dense(
        (0..n * c)
            .map(|_| match rng.below(12) {
                0 => -1,
                1 | 2 => 1,
                _ => 0,
            })
            .collect(),
    )
}

/// Loss and update (gradient of `loss · up`) of ours.
fn run(ap: &ApLoss, x: &Tensor, t: &Tensor, up: f64) -> LossGrad {
    let upt = Tensor::new(up, x.device()).unwrap();
    let (l, g) = loss_and_grad(x, &upt, |x| ap.forward(x, t)).expect("forward/backward");
    assert_eq!(l.rank(), 0);
    assert_eq!(l.dtype(), x.dtype());
    assert_eq!(g.dims(), x.dims());
    (to_f64_vec(&l), to_f64_vec(&g))
}

/// Compares with the reference: loss to 1e-12 relative; each update to 1e-12 relative plus
/// 1e-14 of the largest update (the per-bucket affine form `α + β·(x - centre)` cancels at a
/// few ulp of the largest term). Measured: about 1e-14 relative at worst, so the 1e-9 asked of
/// the fast path holds with a wide margin.
fn check(what: &str, got: (Vec<f64>, Vec<f64>), want: (f64, Vec<f64>), up: f64) {
    let (l, g) = got;
    assert_close(&format!("{what} loss"), &l, &[want.0], 0.0, 1e-12);
    let want_g: Vec<f64> = want.1.iter().map(|v| v * up).collect();
    let scale = want_g.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert_close(&format!("{what} update"), &g, &want_g, 1e-14 * scale, 1e-12);
}

const DELTAS: [f64; 3] = [1.0, 0.5, 0.25];

#[test]
fn matches_literal_reference_with_ties_deltas_interpolation_and_target_forms() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    let mut cases = 0;
    for &(n, c) in &[(1usize, 1usize), (7, 3), (60, 5), (300, 20), (400, 17)] {
        for dense_t in [false, true] {
            for delta in DELTAS {
                for interpolate in [true, false] {
                    let x = scores(&mut rng, n * c);
                    let tg = if dense_t {
                        dense(&mut rng, n, c)
                    } else {
                        let ignore = rng_bool(&mut rng);
                        labels(&mut rng, n, c, ignore)
                    };
                    let want = reference(&x, &roles(&tg, n, c), delta, interpolate);
                    let ap = ApLoss { delta, interpolate };
                    let xt = Tensor::from_vec(x.clone(), (n, c), &dev).unwrap();
                    for t in target_tensors(&tg, n, c, DType::F64, &dev) {
                        let up = 0.5 + rng.uniform();
                        let what = format!(
                            "{n}x{c} dense={dense_t} {:?} delta={delta} interp={interpolate}",
                            t.dtype()
                        );
                        check(&what, run(&ap, &xt, &t, up), want.clone(), up);
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases >= 100, "{cases}");
}

fn rng_bool(rng: &mut Rng) -> bool {
    rng.below(2) == 0
}

#[test]
fn special_cases_no_positive_all_positive_single_negative_exact_ties() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(12);
    for delta in DELTAS {
        for interpolate in [true, false] {
            let ap = ApLoss { delta, interpolate };
            let mut cases: Vec<(String, Vec<f64>, Tg, usize, usize)> = Vec::new();
            let (n, c) = (40, 4);
            // No positive: all background, some ignored.
            let l: Vec<i64> = (0..n).map(|i| if i % 5 == 0 { -1 } else { 4 }).collect();
            cases.push((
                "no positive".into(),
                scores(&mut rng, n * c),
                Tg::Labels(l),
                n,
                c,
            ));
            // All positives (dense), with ties.
            cases.push((
                "all positive".into(),
                scores(&mut rng, n * c),
                Tg::Dense(vec![1; n * c]),
                n,
                c,
            ));
            // A single negative among positives, at several places of the ranking.
            for s_neg in [-10.0, 0.0, 0.3, 10.0] {
                let mut x = scores(&mut rng, 30);
                x[17] = s_neg;
                let mut d = vec![1i64; 30];
                d[17] = 0;
                cases.push((format!("single negative {s_neg}"), x, Tg::Dense(d), 10, 3));
            }
            // Every score equal (all ties, H = 0.5 everywhere).
            let l: Vec<i64> = (0..n).map(|i| (i % (c + 1)) as i64).collect();
            cases.push(("all tied".into(), vec![0.7; n * c], Tg::Labels(l), n, c));
            // Negatives exactly on window edges s ± δ and positives δ apart.
            let x: Vec<f64> = (0..24).map(|i| (i as f64 - 12.0) * delta / 2.0).collect();
            let d: Vec<i64> = (0..24).map(|i| [1, 0, 0, 1, -1, 0][i % 6]).collect();
            cases.push(("edges".into(), x, Tg::Dense(d), 6, 4));
            // One positive only.
            let mut l = vec![3i64; 9];
            l[4] = 1;
            cases.push((
                "one positive".into(),
                scores(&mut rng, 27),
                Tg::Labels(l),
                9,
                3,
            ));
            for (name, x, tg, n, c) in cases {
                let want = reference(&x, &roles(&tg, n, c), delta, interpolate);
                let xt = Tensor::from_vec(x.clone(), (n, c), &dev).unwrap();
                for t in target_tensors(&tg, n, c, DType::F64, &dev) {
                    let what = format!("{name} delta={delta} interp={interpolate}");
                    let got = run(&ap, &xt, &t, 1.0);
                    if name == "no positive" {
                        assert_eq!(got.0, vec![0.0], "{what}");
                        assert!(got.1.iter().all(|v| *v == 0.0), "{what}");
                    }
                    if name == "all positive" || name == "all tied" {
                        // No negative ranks above any positive: AP = 1 with interpolation
                        // off only when there is no negative at all.
                        assert!(got.0[0].is_finite(), "{what}");
                    }
                    check(&what, got, want.clone(), 1.0);
                }
            }
        }
    }
}

#[test]
fn all_positive_gives_zero_loss_and_zero_update() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let x = Tensor::from_vec(scores(&mut rng, 60), (20, 3), &dev).unwrap();
    let t = Tensor::ones((20, 3), DType::I64, &dev).unwrap();
    for interpolate in [true, false] {
        let (l, g) = run(
            &ApLoss {
                delta: 1.0,
                interpolate,
            },
            &x,
            &t,
            1.0,
        );
        assert_eq!(l, vec![0.0]);
        assert!(g.iter().all(|v| *v == 0.0), "{g:?}");
    }
}

#[test]
fn large_multi_chunk_case_matches_reference() {
    // More elements than one rayon chunk (16K), so the chunked passes are exercised.
    let dev = Device::Cpu;
    let mut rng = Rng::new(14);
    let (n, c) = (1800, 10);
    let x = scores(&mut rng, n * c);
    let tg = labels(&mut rng, n, c, true);
    for interpolate in [true, false] {
        let ap = ApLoss {
            delta: 0.5,
            interpolate,
        };
        let want = reference(&x, &roles(&tg, n, c), 0.5, interpolate);
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev).unwrap();
        let t = &target_tensors(&tg, n, c, DType::F64, &dev)[0];
        check(
            &format!("large interp={interpolate}"),
            run(&ap, &xt, t, 1.0),
            want,
            1.0,
        );
    }
}

#[test]
fn half_and_single_precision_round_the_f64_result_once() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(15);
    let (n, c) = (200, 8);
    let x = scores(&mut rng, n * c);
    let tg = labels(&mut rng, n, c, true);
    let r = roles(&tg, n, c);
    // (dtype, relative spacing of the dtype, smallest subnormal)
    for (dtype, eps, sub) in [
        (DType::F32, f32::EPSILON as f64, 1.5e-45),
        (DType::F16, 2f64.powi(-10), 6e-8),
        (DType::BF16, 2f64.powi(-7), 1e-40),
    ] {
        let xt = Tensor::from_vec(x.clone(), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xr = to_f64_vec(&xt); // the scores as the dtype holds them
        for (delta, interpolate) in [(1.0, true), (0.25, false)] {
            let ap = ApLoss { delta, interpolate };
            let (rl, rg) = reference(&xr, &r, delta, interpolate);
            for t in target_tensors(&tg, n, c, dtype, &dev) {
                let (l, g) = run(&ap, &xt, &t, 1.0);
                let what = format!("{dtype:?} delta={delta} interp={interpolate}");
                // Computed in f64 and rounded once (through f32 for the half types): within one
                // spacing of the dtype of the exact value.
                assert_close(&format!("{what} loss"), &l, &[rl], sub, eps);
                assert_close(&format!("{what} update"), &g, &rg, 2.0 * sub, eps);
                assert!(g.iter().any(|v| *v != 0.0));
            }
        }
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(16);
    let (n, c) = (50, 7);
    let ap = ApLoss::default();
    let run1 = |v: &[Tensor]| run(&ap, &v[0], &v[1], 1.0);
    // t() of a transposed buffer.
    let x_strided = transposed(scores(&mut rng, n * c), n, c, DType::F32, &dev);
    let x_contig = x_strided.contiguous().unwrap();
    // Labels as a strided column of [N, 2].
    let lab2: Vec<i64> = (0..2 * n)
        .map(|_| rng.below(c as u64 + 2) as i64 - 1)
        .collect();
    let lab_strided = label_column(lab2, n, &dev);
    check_views_equal_copies(
        "labels",
        &[Views::contiguous(&[&x_strided, &lab_strided])],
        run1,
    );
    // Dense targets narrowed out of a wider buffer (f32 and i64), and a broadcast row.
    let wide: Vec<i64> = (0..n * (c + 3))
        .map(|_| [0, 0, 1, -1][rng.below(4) as usize])
        .collect();
    let wide = Tensor::from_vec(wide, (n, c + 3), &dev).unwrap();
    let wide_f32 = wide.to_dtype(DType::F32).unwrap();
    let row = Tensor::from_vec(
        (0..c as i64).map(|j| j % 3 - 1).collect::<Vec<_>>(),
        (1, c),
        &dev,
    )
    .unwrap();
    for t in [
        wide.narrow(1, 2, c).unwrap(),
        wide_f32.narrow(1, 1, c).unwrap(),
        row.broadcast_as((n, c)).unwrap(),
    ] {
        assert!(!t.is_contiguous());
        check_views_equal_copies(
            &format!("dense {:?}", t.dtype()),
            &[Views::contiguous(&[&x_strided, &t])],
            |v| {
                let a = run1(v);
                assert!(a.1.iter().any(|v| *v != 0.0));
                a
            },
        );
    }
    // Row-narrowed (offset) views.
    check_views_equal_copies(
        "offset",
        &[Views::offset_rows(&[&x_contig, &lab_strided], 5, 20)],
        run1,
    );
}

#[test]
fn nan_propagates_to_loss_and_every_valid_update() {
    let dev = Device::Cpu;
    let ap = ApLoss::default();
    for (dtype, nan_at) in [(DType::F32, 1usize), (DType::F64, 0), (DType::F16, 4)] {
        let mut x = vec![0.3, -1.0, 2.0, 0.5, 0.1, -0.2];
        x[nan_at] = f64::NAN;
        let xt = Tensor::from_vec(x, (2, 3), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // Row 0: class 0 (element 0 positive); row 1 ignored unless nan_at is there.
        let lab = if nan_at < 3 { [0i64, -1] } else { [0i64, 3] };
        let t = Tensor::new(&lab, &dev).unwrap();
        let (l, g) = run(&ap, &xt, &t, 1.0);
        assert!(l[0].is_nan(), "{dtype:?}");
        for (e, v) in g.iter().enumerate() {
            let valid = e < 3 || lab[1] != -1;
            assert_eq!(v.is_nan(), valid, "{dtype:?} element {e}: {v}");
            if !valid {
                assert_eq!(*v, 0.0);
            }
        }
    }
    // A NaN in an ignored element changes nothing.
    let x = Tensor::new(&[[0.3f64, -1.0], [f64::NAN, 2.0]], &dev).unwrap();
    let t = Tensor::new(&[0i64, -1], &dev).unwrap();
    let (l, _) = run(&ap, &x, &t, 1.0);
    assert!(l[0].is_finite());
}

fn check_err<T>(r: candle_core::Result<T>, needles: &[&str]) {
    check_error(Named::Anywhere("ApLoss"), r, needles);
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 80), DType::F32, &dev).unwrap();
    let ok_labels = Tensor::new(&[0i64, 80, -1, 3], &dev).unwrap();
    let ap = ApLoss::default();
    assert!(ap.forward(&x, &ok_labels).is_ok());
    // Labels out of range.
    check_label_errors(
        Named::Anywhere("ApLoss"),
        &[
            BadLabels::I64(&[0, 83, 1, 2], "label 83 out of range 0..=80"),
            BadLabels::I64(&[0, -2, 1, 2], "label -2"),
            BadLabels::U32(&[0, 81, 1, 2], "label 81"),
        ],
        |t| ap.forward(&x, t),
    );
    // Dense targets outside {-1, 0, 1}: float, NaN and i64.
    let mut d = vec![0f32; 4 * 80];
    d[85] = 0.5;
    check_err(
        ap.forward(&x, &Tensor::from_vec(d.clone(), (4, 80), &dev).unwrap()),
        &["target 0.5 at [1, 5]", "-1, 0 or 1"],
    );
    d[85] = f32::NAN;
    check_err(
        ap.forward(&x, &Tensor::from_vec(d, (4, 80), &dev).unwrap()),
        &["NaN"],
    );
    let mut di = vec![0i64; 4 * 80];
    di[3 * 80 + 79] = 2;
    check_err(
        ap.forward(&x, &Tensor::from_vec(di, (4, 80), &dev).unwrap()),
        &["target 2 at [3, 79]"],
    );
    // Shapes.
    check_err(
        ap.forward(&x, &Tensor::new(&[0i64, 1, 2], &dev).unwrap()),
        &["[4]", "[3]"],
    );
    check_err(
        ap.forward(&x, &Tensor::zeros((4, 79), DType::F32, &dev).unwrap()),
        &["[4, 80]", "[4, 79]"],
    );
    check_err(
        ap.forward(&x, &Tensor::zeros((4, 79), DType::I64, &dev).unwrap()),
        &["[4, 80]", "[4, 79]"],
    );
    check_err(
        ap.forward(&Tensor::zeros(80, DType::F32, &dev).unwrap(), &ok_labels),
        &["[N, C]"],
    );
    // Dtypes.
    check_err(
        ap.forward(&x, &Tensor::new(&[0u8, 1, 2, 3], &dev).unwrap()),
        &["U8"],
    );
    check_err(
        ap.forward(&x.to_dtype(DType::I64).unwrap(), &ok_labels),
        &["I64"],
    );
    check_err(
        ap.forward(&x, &Tensor::zeros((4, 80), DType::F64, &dev).unwrap()),
        &["F64"],
    );
    // delta.
    for delta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let bad = ApLoss {
            delta,
            interpolate: true,
        };
        check_err(bad.forward(&x, &ok_labels), &["delta"]);
        check_err(bad.gather_positives(&x, &ok_labels), &["delta"]);
    }
}

#[test]
fn sharded_api_errors() {
    let dev = Device::Cpu;
    let ap = ApLoss::default();
    let x = Tensor::new(&[[0.3f64, -1.0], [2.0, 0.5]], &dev).unwrap();
    let t = Tensor::new(&[0i64, 1], &dev).unwrap();
    let pos = ap.gather_positives(&x, &t).unwrap();
    assert_eq!(pos, vec![0.3, 0.5]);
    check_err(ap.bucket_stats(&x, &t, &[0.5, 0.3]), &["sorted"]);
    let mut s = ap.bucket_stats(&x, &t, &pos).unwrap();
    let other = ap.bucket_stats(&x, &t, &[0.3, 0.5, 0.9]).unwrap();
    check_err(s.add(&other), &["different positives"]);
    let half = ApLoss {
        delta: 0.5,
        interpolate: true,
    };
    check_err(s.add(&half.bucket_stats(&x, &t, &pos).unwrap()), &["delta"]);
    check_err(half.finish(&s), &["delta"]);
    let w = s.to_words();
    assert_eq!(w.len(), 3 * 5 + 1);
    check_err(s.set_words(&w[1..]), &["15", "16"]);
    // A global that lacks this shard's positives.
    let other_x = Tensor::new(&[[0.31f64, -1.0], [2.0, 0.5]], &dev).unwrap();
    let g = ap.finish(&s).unwrap();
    check_err(ap.shard_update(&other_x, &t, &g), &["0.31", "not among"]);
    // A global of another configuration.
    let no_interp = ApLoss {
        delta: 1.0,
        interpolate: false,
    };
    check_err(no_interp.shard_update(&x, &t, &g), &["interpolate"]);
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(17);
    let (n, c) = (20000, 20);
    let x = Tensor::from_vec(scores(&mut rng, n * c), (n, c), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let lab = labels(&mut rng, n, c, true);
    let dense_t = dense(&mut rng, n, c);
    let targets: Vec<Tensor> = [lab, dense_t]
        .iter()
        .flat_map(|tg| target_tensors(tg, n, c, DType::F32, &dev))
        .collect();
    let one = check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for interpolate in [true, false] {
            let ap = ApLoss {
                delta: 0.5,
                interpolate,
            };
            for t in &targets {
                let (l, g) = run(&ap, &x, t, 1.0);
                bits.extend(l.iter().chain(&g).map(|v| v.to_bits()));
            }
        }
        bits
    });
    assert!(one.iter().any(|b| *b != 0));
}

/// Splits rows `0..n` into `k` uneven contiguous ranges.
fn splits(n: usize, k: usize) -> Vec<(usize, usize)> {
    let mut cuts: Vec<usize> = (1..k).map(|i| (i * i * n) / (k * k)).collect();
    cuts.insert(0, 0);
    cuts.push(n);
    cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

#[test]
fn shards_1_2_5_equal_the_pooled_call_bit_for_bit() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(18);
    let (n, c) = (900, 12);
    for (dtype, dense_t) in [
        (DType::F64, false),
        (DType::F32, true),
        (DType::BF16, false),
    ] {
        let x = Tensor::from_vec(scores(&mut rng, n * c), (n, c), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let tg = if dense_t {
            dense(&mut rng, n, c)
        } else {
            labels(&mut rng, n, c, true)
        };
        let t = target_tensors(&tg, n, c, dtype, &dev).pop().unwrap();
        for (delta, interpolate) in [(1.0, true), (0.25, false)] {
            let ap = ApLoss { delta, interpolate };
            let (pl, pg) = run(&ap, &x, &t, 1.0);
            let pooled_update = to_f64_vec(
                &ap.shard_update(&x, &t, &ap.global(&x, &t).unwrap())
                    .unwrap(),
            );
            assert_eq!(pooled_update, pg);
            for k in [1usize, 2, 5] {
                let parts: Vec<(Tensor, Tensor)> = splits(n, k)
                    .into_iter()
                    .map(|(s, len)| (x.narrow(0, s, len).unwrap(), t.narrow(0, s, len).unwrap()))
                    .collect();
                // Phase 1: all-gather of the positives.
                let mut all = Vec::new();
                for (xs, ts) in &parts {
                    all.extend(ap.gather_positives(xs, ts).unwrap());
                }
                all.sort_by(f64::total_cmp);
                // Phase 2: per-shard statistics, summed in process (add) and through the wire
                // format with a wrapping u64 sum (what an all-reduce does).
                let stats: Vec<ApStats> = parts
                    .iter()
                    .map(|(xs, ts)| ap.bucket_stats(xs, ts, &all).unwrap())
                    .collect();
                let mut summed = stats[0].clone();
                for s in &stats[1..] {
                    summed.add(s).unwrap();
                }
                let mut words = vec![0u64; summed.to_words().len()];
                for s in stats.iter().rev() {
                    for (w, v) in words.iter_mut().zip(s.to_words()) {
                        *w = w.wrapping_add(v);
                    }
                }
                let mut wired = stats[k - 1].clone();
                wired.set_words(&words).unwrap();
                assert_eq!(wired.to_words(), summed.to_words());
                // Phase 3 and the shard updates.
                let global = ap.finish(&summed).unwrap();
                assert_eq!(global.num_positives(), all.len());
                let what = format!("{dtype:?} k={k} delta={delta} interp={interpolate}");
                let gl = Tensor::new(global.loss(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_eq!(to_f64_vec(&gl), pl, "{what}");
                if dtype == DType::F64 {
                    assert_eq!(global.loss().to_bits(), pl[0].to_bits(), "{what}");
                }
                let mut upd = Vec::new();
                for (xs, ts) in &parts {
                    // The shard's loss tensor carries the pooled loss; its backward is the
                    // shard's part of the update.
                    let (l, g) = loss_and_grad(xs, &Tensor::new(1f64, &dev).unwrap(), |xv| {
                        ap.forward_shard(xv, ts, &global)
                    })
                    .unwrap();
                    assert_eq!(to_f64_vec(&l), pl, "{what}");
                    let direct = to_f64_vec(&ap.shard_update(xs, ts, &global).unwrap());
                    assert_eq!(to_f64_vec(&g), direct, "{what}");
                    upd.extend(direct);
                }
                assert_eq!(upd, pg, "{what}");
                assert_eq!(ap.finish(&wired).unwrap().precisions(), global.precisions());
            }
        }
    }
}

#[test]
fn fused_training_step_equals_the_phases_and_the_recomputed_update() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(93);
    let (n, c) = (400, 9);
    for dtype in [DType::F32, DType::F16, DType::F64] {
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(scores(&mut rng, n * c), (n, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        for (form, tg) in [
            ("labels", labels(&mut rng, n, c, true)),
            ("dense", dense(&mut rng, n, c)),
        ] {
            for t in target_tensors(&tg, n, c, dtype, &dev) {
                for interpolate in [true, false] {
                    let ap = ApLoss {
                        interpolate,
                        ..Default::default()
                    };
                    let what =
                        format!("{dtype:?} {form} {:?} interpolate={interpolate}", t.dtype());
                    check_fused_equals_recomputed(&what, &x, |x| ap.forward(x, &t));
                }
            }
        }
    }
}
