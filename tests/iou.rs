//! BoxIouLoss (IoU, GIoU, DIoU, CIoU): against an independent f64 reference (with exact
//! forward-mode derivatives), torchvision fixtures, finite differences, geometric cases, degenerate
//! boxes, half precision, layouts, bad input and determinism.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_detloss::{BoxIouLoss, IouKind, Reduction};
use common::*;
use std::ops::{Add, Div, Mul, Sub};

// ---------------------------------------------------------------------------------------------
// Independent reference: torchvision's code transcribed literally, evaluated on dual numbers
// (value, derivative) so that one pass per coordinate gives the exact derivative; torch's
// conventions at ties (max/min split ½/½) are those of the dual `max`/`min` below. `R` selects
// the rounding applied after every operation: 0 none (f64), 1 f16, 2 bf16 — the latter give the
// "naive half" evaluation a user composing half-precision tensor ops would get.
// ---------------------------------------------------------------------------------------------

fn round<const R: u8>(v: f64) -> f64 {
    match R {
        1 => half::f16::from_f64(v).to_f64(),
        2 => half::bf16::from_f64(v).to_f64(),
        _ => v,
    }
}

#[derive(Clone, Copy, Debug)]
struct D<const R: u8> {
    v: f64,
    d: f64,
}

fn c<const R: u8>(v: f64) -> D<R> {
    D {
        v: round::<R>(v),
        d: 0.0,
    }
}

impl<const R: u8> Add for D<R> {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        D {
            v: round::<R>(self.v + o.v),
            d: round::<R>(self.d + o.d),
        }
    }
}
impl<const R: u8> Sub for D<R> {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        D {
            v: round::<R>(self.v - o.v),
            d: round::<R>(self.d - o.d),
        }
    }
}
impl<const R: u8> Mul for D<R> {
    type Output = Self;
    fn mul(self, o: Self) -> Self {
        D {
            v: round::<R>(self.v * o.v),
            d: round::<R>(round::<R>(self.d * o.v) + round::<R>(self.v * o.d)),
        }
    }
}
impl<const R: u8> Div for D<R> {
    type Output = Self;
    fn div(self, o: Self) -> Self {
        let q = round::<R>(self.v / o.v);
        D {
            v: q,
            d: round::<R>(round::<R>(self.d - round::<R>(q * o.d)) / o.v),
        }
    }
}

/// torch.max(a, b): the larger; at a tie each argument gets half the gradient.
fn dmax<const R: u8>(a: D<R>, b: D<R>) -> D<R> {
    if a.v > b.v {
        a
    } else if a.v < b.v {
        b
    } else {
        D {
            v: a.v,
            d: round::<R>(round::<R>(a.d + b.d) * 0.5),
        }
    }
}

fn dmin<const R: u8>(a: D<R>, b: D<R>) -> D<R> {
    if a.v < b.v {
        a
    } else if a.v > b.v {
        b
    } else {
        D {
            v: a.v,
            d: round::<R>(round::<R>(a.d + b.d) * 0.5),
        }
    }
}

fn datan<const R: u8>(a: D<R>) -> D<R> {
    D {
        v: round::<R>(a.v.atan()),
        d: round::<R>(a.d / round::<R>(1.0 + round::<R>(a.v * a.v))),
    }
}

fn sq<const R: u8>(a: D<R>) -> D<R> {
    a * a
}

/// torchvision's loss of one pair, on dual numbers.
fn ref_pair<const R: u8>(kind: IouKind, p: [D<R>; 4], g: [D<R>; 4], eps: f64) -> D<R> {
    let [x1, y1, x2, y2] = p;
    let [x1g, y1g, x2g, y2g] = g;
    let eps = c::<R>(eps);
    let one = c::<R>(1.0);
    // _loss_inter_union
    let xkis1 = dmax(x1, x1g);
    let ykis1 = dmax(y1, y1g);
    let xkis2 = dmin(x2, x2g);
    let ykis2 = dmin(y2, y2g);
    let intsct = if ykis2.v > ykis1.v && xkis2.v > xkis1.v {
        (xkis2 - xkis1) * (ykis2 - ykis1)
    } else {
        c(0.0)
    };
    let union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsct;
    let iou = intsct / (union + eps);
    if kind == IouKind::Iou {
        return one - iou;
    }
    let xc1 = dmin(x1, x1g);
    let yc1 = dmin(y1, y1g);
    let xc2 = dmax(x2, x2g);
    let yc2 = dmax(y2, y2g);
    if kind == IouKind::Giou {
        let area_c = (xc2 - xc1) * (yc2 - yc1);
        return one - (iou - (area_c - union) / (area_c + eps));
    }
    let diag = sq(xc2 - xc1) + sq(yc2 - yc1) + eps;
    let half = c::<R>(0.5);
    let x_p = (x2 + x1) * half;
    let y_p = (y2 + y1) * half;
    let x_g = (x1g + x2g) * half;
    let y_g = (y1g + y2g) * half;
    let cent = sq(x_p - x_g) + sq(y_p - y_g);
    let diou = one - iou + cent / diag;
    if kind == IouKind::Diou {
        return diou;
    }
    let k = c::<R>(4.0 / (std::f64::consts::PI * std::f64::consts::PI));
    let v = k * sq(datan((x2g - x1g) / (y2g - y1g)) - datan((x2 - x1) / (y2 - y1)));
    let alpha = round::<R>(v.v / round::<R>(round::<R>(round::<R>(1.0 - iou.v) + v.v) + eps.v));
    diou + c(alpha) * v
}

/// (loss, d loss / d pred[0..4]) of one pair.
fn ref_grad<const R: u8>(kind: IouKind, p: &[f64], g: &[f64], eps: f64) -> (f64, [f64; 4]) {
    let gt = [0, 1, 2, 3].map(|j| c::<R>(g[j]));
    let mut grad = [0.0; 4];
    let mut loss = 0.0;
    for (k, gk) in grad.iter_mut().enumerate() {
        let pd = [0, 1, 2, 3].map(|j| D::<R> {
            v: round::<R>(p[j]),
            d: (j == k) as u8 as f64,
        });
        let l = ref_pair(kind, pd, gt, eps);
        loss = l.v;
        *gk = l.d;
    }
    (loss, grad)
}

/// Reference loss (reduced as `red`) and gradient of `sum(loss · up)` w.r.t. pred.
fn reference(
    kind: IouKind,
    p: &[f64],
    g: &[f64],
    eps: f64,
    red: Reduction,
    up: &[f64],
) -> LossGrad {
    let n = p.len() / 4;
    let (per, dper): (Vec<f64>, Vec<[f64; 4]>) = (0..n)
        .map(|i| ref_grad::<0>(kind, &p[4 * i..4 * i + 4], &g[4 * i..4 * i + 4], eps))
        .unzip();
    let dper = dper.into_iter().flatten().collect();
    reduce_reference(per, dper, red, n as f64, up, 4)
}

const KINDS: [IouKind; 4] = [IouKind::Iou, IouKind::Giou, IouKind::Diou, IouKind::Ciou];
fn loss_fn(kind: IouKind, red: Reduction) -> BoxIouLoss {
    BoxIouLoss {
        kind,
        eps: 1e-7,
        reduction: red,
    }
}

fn run_ours(f: &BoxIouLoss, p: &Tensor, g: &Tensor, up: &Tensor) -> LossGrad {
    let (l, gr) = loss_and_grad(p, up, |p| f.forward(p, g)).expect("forward/backward");
    let n = p.dims()[0];
    if f.reduction == Reduction::None {
        assert_eq!(l.dims(), &[n]);
    } else {
        assert_eq!(l.rank(), 0);
    }
    assert_eq!(gr.dims(), &[n, 4]);
    (to_f64_vec(&l), to_f64_vec(&gr))
}

/// A random box: corner in [0, 60), size in [2, 40).
fn random_box(rng: &mut Rng) -> [f64; 4] {
    let x = rng.uniform() * 60.0;
    let y = rng.uniform() * 60.0;
    let w = 2.0 + rng.uniform() * 38.0;
    let h = 2.0 + rng.uniform() * 38.0;
    [x, y, x + w, y + h]
}

/// Random pairs: mostly overlapping (a jittered copy of the target), some independent
/// (often disjoint), none with exact ties.
fn random_pairs(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut p = Vec::with_capacity(4 * n);
    let mut g = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let t = random_box(rng);
        let b = if rng.below(4) == 0 {
            random_box(rng)
        } else {
            let w = t[2] - t[0];
            let h = t[3] - t[1];
            let j = |s: f64, rng: &mut Rng| rng.normal(0.25 * s);
            let x1 = t[0] + j(w, rng);
            let y1 = t[1] + j(h, rng);
            [
                x1,
                y1,
                x1 + w * (0.5 + rng.uniform()),
                y1 + h * (0.5 + rng.uniform()),
            ]
        };
        g.extend_from_slice(&t);
        p.extend_from_slice(&b);
    }
    (p, g)
}

fn has_tie(p: &[f64], g: &[f64]) -> bool {
    // Any pair of coordinates meeting in a max/min, or an overlap width exactly 0.
    p.chunks(4).zip(g.chunks(4)).any(|(a, b)| {
        (0..4).any(|j| a[j] == b[j]) || a[2] == b[0] || a[0] == b[2] || a[3] == b[1] || a[1] == b[3]
    })
}

/// The upstream gradient: per pair for `None`, else a negative scalar.
fn up_vec(rng: &mut Rng, red: Reduction, n: usize) -> Vec<f64> {
    upstream_or(rng, red, n, -1.3)
}

fn boxes(v: &[f64], dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), (v.len() / 4, 4), dev).unwrap()
}

#[test]
fn matches_f64_reference_over_kinds_reductions_and_sizes() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(21);
    // f32 (CIoU's atan by the crate's polynomial), against the reference at the f32-rounded
    // inputs. Losses are O(1), gradients O(1/box size).
    let tols = RefTols {
        f64_loss: Tol::abs(1e-12, 1e-10),
        f64_grad: Tol::abs(1e-14, 1e-9),
        f32_loss: Tol::scaled(2e-6, 1.0, 1e-5),
        f32_grad: Tol::scaled(1e-5, 0.0, 1e-4),
    };
    for n in [1usize, 9, 1000, 10_007] {
        for kind in KINDS {
            for red in REDUCTIONS {
                let (p, g) = random_pairs(&mut rng, n);
                assert!(!has_tie(&p, &g));
                let up = up_vec(&mut rng, red, n);
                let f = loss_fn(kind, red);
                let what = format!("n={n} {kind:?} {red:?}");
                let ours = |dtype: DType| {
                    let bx = |v: &[f64]| boxes(v, &dev).to_dtype(dtype).unwrap();
                    let upt = up_tensor(&up, red, &[n], &dev).to_dtype(dtype).unwrap();
                    run_ours(&f, &bx(&p), &bx(&g), &upt)
                };
                let reference_at = |dtype: DType| {
                    let r = |v: &[f64]| round_to_dtype(v, dtype);
                    reference(kind, &r(&p), &r(&g), 1e-7, red, &r(&up))
                };
                check_against_reference(&what, &tols, ours, reference_at);
            }
        }
    }
}

fn fixture_kind(s: &str) -> IouKind {
    match s {
        "iou" => IouKind::Iou,
        "giou" => IouKind::Giou,
        "diou" => IouKind::Diou,
        "ciou" => IouKind::Ciou,
        k => panic!("unknown loss_type {k}"),
    }
}

#[test]
fn matches_torchvision_fixtures_including_tie_gradients() {
    let dev = Device::Cpu;
    let cases = fixture_cases("box_iou.json");
    assert_eq!(cases.len(), 91);
    let (mut grads_checked, mut ties_checked) = (0, 0);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let kind = fixture_kind(case["loss_type"].as_str().unwrap());
        let red = fx_reduction(&case["reduction"], &case["avg_factor"]);
        let f = BoxIouLoss {
            kind,
            eps: case["eps"].as_f64().unwrap(),
            reduction: red,
        };
        let p = fx_to_tensor(&case["pred"], DType::F64, &dev);
        let g = fx_to_tensor(&case["target"], DType::F64, &dev);
        let up = fx_to_tensor(&case["upstream"], DType::F64, &dev);
        let got = run_ours(&f, &p, &g, &up);
        // Our gradient follows torch's conventions at ties (½/½ split, strict mask), so the
        // non-differentiable points compare too; count them separately.
        let (lshape, gshape) = check_fixture(
            name,
            &got,
            case,
            Tol::abs(1e-12, 1e-10),
            Tol::abs(1e-12, 1e-9),
        );
        assert_eq!(
            lshape.len(),
            if red == Reduction::None { 1 } else { 0 },
            "{name}"
        );
        assert_eq!(gshape, p.dims(), "{name}");
        grads_checked += 1;
        if case["nondifferentiable_point"].as_bool().unwrap() {
            ties_checked += 1;
        }
    }
    assert_eq!(grads_checked, 91);
    assert!(ties_checked >= 20, "{ties_checked}");
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(22);
    let n = 7;
    for kind in KINDS {
        for red in REDUCTIONS {
            let (p, g) = random_pairs(&mut rng, n);
            let up = up_vec(&mut rng, red, n);
            let upt = up_tensor(&up, red, &[n], &dev);
            let f = loss_fn(kind, red);
            let gt = boxes(&g, &dev);
            let (_, gr) = run_ours(&f, &boxes(&p, &dev), &gt, &upt);
            // CIoU: alpha is a constant for the gradient (torchvision's no_grad), so plain finite
            // differences of the loss do not apply; the dual-number reference freezes alpha, and
            // `ciou_gradient_is_finite_differences_with_alpha_frozen` checks it numerically.
            if kind == IouKind::Ciou {
                let (_, rg) = reference(kind, &p, &g, 1e-7, red, &up);
                assert_close(&format!("ref {kind:?} {red:?}"), &gr, &rg, 1e-12, 1e-9);
                continue;
            }
            let fd = FdCheck {
                tol: Tol::abs(1e-8, 1e-6),
                ..FD
            };
            check_finite_differences(&format!("fd {kind:?} {red:?}"), &gr, &p, fd, |ps| {
                let l = f.forward(&boxes(ps, &dev), &gt).unwrap();
                let l = if red == Reduction::None {
                    (l * &upt).unwrap().sum_all().unwrap()
                } else {
                    (l * up[0]).unwrap()
                };
                l.to_scalar::<f64>().unwrap()
            });
        }
    }
}

#[test]
fn ciou_gradient_is_finite_differences_with_alpha_frozen() {
    // Finite differences of DIoU + alpha0·v with alpha0 computed once at the evaluation point:
    // exactly the gradient torchvision (no_grad alpha) and this crate define.
    let dev = Device::Cpu;
    let mut rng = Rng::new(23);
    let (p, g) = random_pairs(&mut rng, 5);
    let gt = boxes(&g, &dev);
    let up = Tensor::new(1f64, &dev).unwrap();
    let f = loss_fn(IouKind::Ciou, Reduction::Sum);
    let (_, gr) = run_ours(&f, &boxes(&p, &dev), &gt, &up);
    let diou = loss_fn(IouKind::Diou, Reduction::None);
    let iou = loss_fn(IouKind::Iou, Reduction::None);
    let v_of = |b: &[f64], t: &[f64]| {
        let k = 4.0 / std::f64::consts::PI.powi(2);
        k * (((t[2] - t[0]) / (t[3] - t[1])).atan() - ((b[2] - b[0]) / (b[3] - b[1])).atan())
            .powi(2)
    };
    let ious = to_f64_vec(&iou.forward(&boxes(&p, &dev), &gt).unwrap());
    let alpha0: Vec<f64> = (0..5)
        .map(|i| {
            let v = v_of(&p[4 * i..4 * i + 4], &g[4 * i..4 * i + 4]);
            let iou = 1.0 - ious[i];
            v / (1.0 - iou + v + 1e-7)
        })
        .collect();
    let fd = finite_diff(&p, 1e-6, |ps| {
        let d = to_f64_vec(&diou.forward(&boxes(ps, &dev), &gt).unwrap());
        (0..5)
            .map(|i| d[i] + alpha0[i] * v_of(&ps[4 * i..4 * i + 4], &g[4 * i..4 * i + 4]))
            .sum()
    });
    assert_close("ciou fd (alpha frozen)", &gr, &fd, 1e-8, 1e-6);
}

/// Loss and gradient of one pair, f64, reduction None, upstream 1.
fn one_pair(kind: IouKind, eps: f64, p: [f64; 4], g: [f64; 4]) -> (f64, Vec<f64>) {
    let dev = Device::Cpu;
    let f = BoxIouLoss {
        kind,
        eps,
        reduction: Reduction::None,
    };
    let (l, gr) = run_ours(
        &f,
        &boxes(&p, &dev),
        &boxes(&g, &dev),
        &Tensor::ones(1, DType::F64, &dev).unwrap(),
    );
    (l[0], gr)
}

#[test]
fn geometric_cases() {
    let t = [10.0, 10.0, 30.0, 20.0]; // 20 x 10, area 200
                                      // Disjoint: IoU 0; GIoU adds the empty share of the enclosing box.
    let p = [40.0, 30.0, 50.0, 40.0]; // enclosing [10,10]-[50,40] = 1200, union 300
    assert_eq!(one_pair(IouKind::Iou, 1e-7, p, t).0, 1.0);
    let (l, g) = one_pair(IouKind::Giou, 1e-7, p, t);
    assert!((l - (1.0 + 900.0 / (1200.0 + 1e-7))).abs() < 1e-12, "{l}");
    assert!(
        g.iter().any(|v| *v != 0.0),
        "GIoU moves disjoint boxes: {g:?}"
    );
    assert_eq!(one_pair(IouKind::Iou, 1e-7, p, t).1, vec![0.0; 4]);
    // DIoU: centres (45,35) vs (20,15): rho² = 625 + 400; diagonal² = 40² + 30² = 2500.
    let (l, _) = one_pair(IouKind::Diou, 1e-7, p, t);
    assert!((l - (1.0 + 1025.0 / (2500.0 + 1e-7))).abs() < 1e-12, "{l}");
    // Nested: pred inside target, same centre: IoU = 50/200, enclosing box = target so
    // GIoU = IoU loss.
    let p = [15.0, 12.5, 25.0, 17.5];
    let (l_iou, _) = one_pair(IouKind::Iou, 1e-7, p, t);
    assert!((l_iou - (1.0 - 50.0 / (200.0 + 1e-7))).abs() < 1e-12);
    let (l_giou, _) = one_pair(IouKind::Giou, 1e-7, p, t);
    assert!((l_giou - l_iou).abs() < 1e-12);
    // Same centre: DIoU = IoU loss.
    let (l_diou, _) = one_pair(IouKind::Diou, 1e-7, p, t);
    assert!((l_diou - l_iou).abs() < 1e-12);
    // Identical: every loss ~0 (eps-sized), finite gradients.
    for kind in KINDS {
        let (l, g) = one_pair(kind, 1e-7, t, t);
        assert!(l.abs() < 1e-8, "{kind:?} {l}");
        assert!(
            g.iter().all(|v| v.is_finite() && v.abs() < 1.0),
            "{kind:?} {g:?}"
        );
    }
    // Touching edge and corner: IoU 0, and the intersection has no gradient (strict mask);
    // GIoU's penalty is 0 for an edge (the enclosing box is the union).
    for p in [[30.0, 10.0, 40.0, 20.0], [30.0, 20.0, 40.0, 30.0]] {
        let (l, g) = one_pair(IouKind::Iou, 1e-7, p, t);
        assert_eq!((l, g), (1.0, vec![0.0; 4]));
    }
    let (l, _) = one_pair(IouKind::Giou, 1e-7, [30.0, 10.0, 40.0, 20.0], t);
    assert!((l - 1.0).abs() < 1e-12, "{l}");
}

#[test]
fn ciou_v_term_matches_its_closed_form_including_45_degree_rotation() {
    // target atan(w/h) = 67.5°, pred the same box rotated 90° (atan = 22.5°): v = 4/π²·(π/4)² = 1/4.
    let t67 = (67.5f64).to_radians().tan();
    let (w, h) = (2.0 * t67.sqrt(), 2.0 / t67.sqrt()); // w/h = tan(67.5°), area 4
    let (cx, cy) = (50.0, 40.0);
    let tgt = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
    let pred = [cx - h / 2.0, cy - w / 2.0, cx + h / 2.0, cy + w / 2.0];
    let mut rng = Rng::new(24);
    let mut cases = vec![(pred, tgt)];
    for _ in 0..20 {
        let (p, g) = random_pairs(&mut rng, 1);
        cases.push(([p[0], p[1], p[2], p[3]], [g[0], g[1], g[2], g[3]]));
    }
    for (i, (p, g)) in cases.into_iter().enumerate() {
        let eps = 1e-7;
        let l_ciou = one_pair(IouKind::Ciou, eps, p, g).0;
        let l_diou = one_pair(IouKind::Diou, eps, p, g).0;
        let iou = 1.0 - one_pair(IouKind::Iou, eps, p, g).0;
        // ciou - diou = alpha·v = v²/(s + v), s = 1 - iou + eps: solve for v.
        let x = l_ciou - l_diou;
        let s = 1.0 - iou + eps;
        let v = (x + (x * x + 4.0 * x * s).sqrt()) / 2.0;
        let k = 4.0 / std::f64::consts::PI.powi(2);
        let closed = k
            * (((g[2] - g[0]) / (g[3] - g[1])).atan() - ((p[2] - p[0]) / (p[3] - p[1])).atan())
                .powi(2);
        assert!(
            (v - closed).abs() < 1e-9,
            "case {i}: v {v} closed form {closed}"
        );
        if i == 0 {
            assert!((closed - 0.25).abs() < 1e-12, "{closed}");
            assert!((v - 0.25).abs() < 1e-9, "{v}");
        }
    }
}

#[test]
fn degenerate_boxes_give_finite_values_and_gradients() {
    let t = [10.0, 10.0, 30.0, 20.0];
    let cases: &[([f64; 4], [f64; 4])] = &[
        ([15.0, 12.0, 15.0, 18.0], t), // zero-width pred inside
        ([40.0, 12.0, 40.0, 18.0], t), // zero-width pred outside
        ([15.0, 14.0, 25.0, 14.0], t), // zero-height pred (atan(w/0) = π/2)
        ([15.0, 14.0, 15.0, 14.0], t), // point pred (0/0 aspect)
        ([15.0, 14.0, 15.0, 14.0], [15.0, 14.0, 15.0, 14.0]), // identical points
        (t, t),                        // identical
        ([25.0, 12.0, 15.0, 18.0], t), // inverted x (x2 < x1)
        ([25.0, 18.0, 15.0, 12.0], t), // inverted x and y
        (t, [30.0, 20.0, 10.0, 10.0]), // inverted target
        ([-1e4, -1e4, 1e4, 1e4], [0.0, 0.0, 1e-3, 1e-3]), // extreme scale ratio
    ];
    for eps in [1e-7, 0.0] {
        for kind in KINDS {
            for (i, (p, g)) in cases.iter().enumerate() {
                for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
                    if dtype != DType::F64 && i == 9 {
                        continue; // 1e-3 boxes below the half types' useful range
                    }
                    let dev = Device::Cpu;
                    let f = BoxIouLoss {
                        kind,
                        eps,
                        reduction: Reduction::Sum,
                    };
                    let pt = boxes(p, &dev).to_dtype(dtype).unwrap();
                    let gt = boxes(g, &dev).to_dtype(dtype).unwrap();
                    let up = Tensor::new(1f64, &dev).unwrap().to_dtype(dtype).unwrap();
                    let (l, gr) = run_ours(&f, &pt, &gt, &up);
                    assert!(
                        l.iter().chain(&gr).all(|v| v.is_finite()),
                        "eps={eps} {kind:?} case {i} {dtype:?}: {l:?} {gr:?}"
                    );
                }
            }
        }
    }
    // Inverted corners follow torchvision's arithmetic: a box inverted in x only has a
    // negative area and no intersection, so IoU = 0 / (200 - 60 + eps).
    let (l, _) = one_pair(IouKind::Iou, 1e-7, [25.0, 12.0, 15.0, 18.0], t);
    assert_eq!(l, 1.0);
    let (l, _) = one_pair(IouKind::Giou, 1e-7, [25.0, 12.0, 15.0, 18.0], t);
    let (union, c) = (200.0 - 60.0, 20.0 * 10.0);
    assert!(
        (l - (1.0 - (0.0 - (c - union) / (c + 1e-7)))).abs() < 1e-12,
        "{l}"
    );
}

#[test]
fn empty_batch_mean_is_zero_and_none_is_empty() {
    let p = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    for kind in KINDS {
        check_empty_batch_gradient(&format!("{kind:?}"), &p, &[0], |x, t, red| {
            loss_fn(kind, red).forward(x, t)
        });
    }
}

/// Both boxes get a gradient when both track one (the second boxes' is checked against finite
/// differences in tests/target_grads.rs); before, only the predicted boxes did.
#[test]
fn both_boxes_get_a_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(25);
    let (p, g) = random_pairs(&mut rng, 6);
    let pv = Var::from_tensor(&boxes(&p, &dev)).unwrap();
    let gv = Var::from_tensor(&boxes(&g, &dev)).unwrap();
    for kind in KINDS {
        let l = loss_fn(kind, Reduction::Mean)
            .forward(pv.as_tensor(), gv.as_tensor())
            .unwrap();
        let grads = l.backward().unwrap();
        assert!(grads.get(&pv).is_some());
        assert!(grads.get(&gv).is_some(), "{kind:?}");
    }
}

#[test]
fn half_precision_error_within_twice_the_naive_half_error() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(26);
    let n = 512;
    for (dtype, r) in [(DType::F16, 1u8), (DType::BF16, 2u8)] {
        for kind in KINDS {
            let (p, g) = random_pairs(&mut rng, n);
            let p: Vec<f64> = p.iter().map(|v| round_half(*v, dtype)).collect();
            let g: Vec<f64> = g.iter().map(|v| round_half(*v, dtype)).collect();
            let ones = vec![1.0; n];
            let (rl, rg) = reference(kind, &p, &g, 1e-7, Reduction::None, &ones);
            let f = loss_fn(kind, Reduction::None);
            let pt = boxes(&p, &dev).to_dtype(dtype).unwrap();
            let gt = boxes(&g, &dev).to_dtype(dtype).unwrap();
            let (l, gr) = run_ours(&f, &pt, &gt, &Tensor::ones(n, dtype, &dev).unwrap());
            let mut errors = HalfErrors::default();
            for i in 0..n {
                let (pi, gi) = (&p[4 * i..4 * i + 4], &g[4 * i..4 * i + 4]);
                let (nl, ng) = if r == 1 {
                    ref_grad::<1>(kind, pi, gi, 1e-7)
                } else {
                    ref_grad::<2>(kind, pi, gi, 1e-7)
                };
                errors.loss(l[i], nl, rl[i]);
                for j in 0..4 {
                    errors.grad(gr[4 * i + j], ng[j], rg[4 * i + j]);
                }
            }
            let what = format!("{dtype:?} {kind:?}");
            errors.check(&what);
            // The scalar mean accumulates in f32/f64.
            let m = to_f64_vec(&loss_fn(kind, Reduction::Mean).forward(&pt, &gt).unwrap())[0];
            check_accumulated(&what, "mean", m, rl.iter().sum::<f64>() / n as f64);
        }
    }
}

#[test]
fn strided_inputs_equal_their_contiguous_copies() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(27);
    let n = 41;
    let (p, g) = random_pairs(&mut rng, n);
    // pred as the t() of a [4, N] buffer.
    let p_t = boxes(&p, &dev)
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let p_strided = p_t.t().unwrap();
    assert!(!p_strided.is_contiguous());
    let p_contig = p_strided.contiguous().unwrap();
    // target as a narrow of a [N, 8] buffer, and one box broadcast to every row.
    let wide = Tensor::cat(&[&boxes(&p, &dev), &boxes(&g, &dev)], 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t_narrow = wide.narrow(1, 4, 4).unwrap();
    let t_bcast = Tensor::new(&[[10f32, 10., 30., 20.]], &dev)
        .unwrap()
        .broadcast_as((n, 4))
        .unwrap();
    assert!(!t_narrow.is_contiguous() && !t_bcast.is_contiguous());
    for kind in KINDS {
        for red in REDUCTIONS {
            let f = loss_fn(kind, red);
            let up = up_tensor(&up_vec(&mut rng, red, n), red, &[n], &dev)
                .to_dtype(DType::F32)
                .unwrap();
            let cases = [
                Views::contiguous(&[&p_strided, &t_narrow]).and(&up),
                Views::contiguous(&[&p_strided, &t_bcast]).and(&up),
                Views::offset_rows(&[&p_contig, &t_narrow], 3, 30).and(&up_rows(&up, red, 3, 30)),
            ];
            check_views_equal_copies(&format!("{kind:?} {red:?}"), &cases, |v| {
                run_ours(&f, &v[0], &v[1], &v[2])
            });
        }
    }
}

#[test]
fn nan_propagates() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for kind in KINDS {
            for (pn, gn) in [(true, false), (false, true)] {
                let mut p = vec![1.0, 1.0, 5.0, 4.0, 0.0, 0.0, 2.0, 2.0];
                let mut g = vec![2.0, 0.0, 6.0, 3.0, 1.0, 1.0, 3.0, 3.0];
                if pn {
                    p[2] = f64::NAN;
                }
                if gn {
                    g[1] = f64::NAN;
                }
                let pt = boxes(&p, &dev).to_dtype(dtype).unwrap();
                let gt = boxes(&g, &dev).to_dtype(dtype).unwrap();
                let f = loss_fn(kind, Reduction::None);
                let (l, gr) = run_ours(&f, &pt, &gt, &Tensor::ones(2, dtype, &dev).unwrap());
                let what = format!("{dtype:?} {kind:?} pred_nan={pn}");
                assert!(l[0].is_nan() && l[1].is_finite(), "{what} {l:?}");
                assert!(gr[..4].iter().any(|v| v.is_nan()), "{what} {gr:?}");
                assert!(gr[4..].iter().all(|v| v.is_finite()), "{what} {gr:?}");
                let s = loss_fn(kind, Reduction::Sum).forward(&pt, &gt).unwrap();
                assert!(to_f64_vec(&s)[0].is_nan(), "{what}");
            }
        }
    }
}

#[test]
fn bad_input_returns_errors_that_name_the_loss_and_the_problem() {
    let dev = Device::Cpu;
    let b = |shape: &[usize], dt: DType| Tensor::zeros(shape, dt, &dev).unwrap();
    let f = BoxIouLoss::default();
    let check = |r: candle_core::Result<Tensor>, needles: &[&str]| {
        check_error(Named::Anywhere("BoxIouLoss"), r, needles)
    };
    let ok = b(&[5, 4], DType::F32);
    assert!(f.forward(&ok, &ok).is_ok());
    check(
        f.forward(&b(&[5, 3], DType::F32), &b(&[5, 3], DType::F32)),
        &["[N, 4]", "[5, 3]"],
    );
    check(
        f.forward(&b(&[5, 5], DType::F32), &b(&[5, 5], DType::F32)),
        &["[5, 5]"],
    );
    check(
        f.forward(&b(&[4], DType::F32), &b(&[4], DType::F32)),
        &["[N, 4]", "[4]"],
    );
    // Leading dimensions are one [N, 4] problem (tests/leading_dims.rs); a last dimension
    // other than 4 is still an error, as are leading shapes that differ.
    assert!(f
        .forward(&b(&[2, 5, 4], DType::F32), &b(&[2, 5, 4], DType::F32))
        .is_ok());
    check(
        f.forward(&b(&[2, 5, 3], DType::F32), &b(&[2, 5, 3], DType::F32)),
        &["[N, 4]"],
    );
    check(
        f.forward(&b(&[2, 5, 4], DType::F32), &b(&[5, 2, 4], DType::F32)),
        &["[2, 5]", "[5, 2, 4]"],
    );
    check(
        f.forward(&ok, &b(&[6, 4], DType::F32)),
        &["[6, 4]", "[5, 4]"],
    );
    check(f.forward(&ok, &b(&[5, 3], DType::F32)), &["[5, 3]"]);
    check(f.forward(&ok, &b(&[5, 4], DType::F64)), &["F64", "F32"]);
    check(
        f.forward(&b(&[5, 4], DType::I64), &b(&[5, 4], DType::I64)),
        &["I64"],
    );
    check(f.forward(&b(&[5, 4], DType::U32), &ok), &["U32"]);
    for eps in [-1e-7, f64::NAN, f64::INFINITY] {
        check(
            BoxIouLoss {
                eps,
                ..Default::default()
            }
            .forward(&ok, &ok),
            &["eps"],
        );
    }
    check(
        BoxIouLoss {
            reduction: Reduction::AvgFactor(0.0),
            ..Default::default()
        }
        .forward(&ok, &ok),
        &["AvgFactor"],
    );
}

#[test]
fn defaults() {
    assert_eq!(IouKind::default(), IouKind::Giou);
    assert_eq!(
        BoxIouLoss::default(),
        BoxIouLoss {
            kind: IouKind::Giou,
            eps: 1e-7,
            reduction: Reduction::Mean
        }
    );
}

#[test]
fn bitwise_deterministic_for_any_thread_count() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(28);
    let n = 50_003; // several chunks plus a ragged tail
    let (p, g) = random_pairs(&mut rng, n);
    let pt = boxes(&p, &dev).to_dtype(DType::F32).unwrap();
    let gt = boxes(&g, &dev).to_dtype(DType::F32).unwrap();
    check_thread_count_determinism(|| {
        let mut bits = Vec::new();
        for kind in KINDS {
            for red in [Reduction::Sum, Reduction::Mean, Reduction::None] {
                let up = unit_upstream(red, &[n], DType::F32, &dev);
                let f = loss_fn(kind, red);
                let (l, gr) = loss_and_grad(&pt, &up, |x| f.forward(x, &gt)).unwrap();
                push_bits(&mut bits, &l, &gr);
            }
        }
        bits
    });
}

/// Training (a Var, scalar reduction): the forward also computes the gradient and the backward
/// only scales it (see `check_fused_equals_recomputed`).
#[test]
fn fused_forward_gradient_equals_the_recomputed_one_bitwise() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(29);
    // 5003 rows: two rayon chunks and a partial block.
    let (p, g) = random_pairs(&mut rng, 5003);
    for dtype in [DType::F32, DType::F16] {
        let pt = boxes(&p, &dev).to_dtype(dtype).unwrap();
        let gt = boxes(&g, &dev).to_dtype(dtype).unwrap();
        let var = Var::from_tensor(&pt).unwrap();
        for kind in [IouKind::Iou, IouKind::Giou, IouKind::Diou, IouKind::Ciou] {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let what = format!("{kind:?} {reduction:?} {dtype:?}");
                let f = BoxIouLoss {
                    kind,
                    reduction,
                    ..Default::default()
                };
                check_fused_equals_recomputed(&what, &var, |x| f.forward(x, &gt));
            }
        }
    }
}
