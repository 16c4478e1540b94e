//! Class weights given as views (`narrow`, `i(1..)`, a row of a table) must be read where the
//! view starts: the same loss and gradient, bit for bit, as their contiguous copy. On the CPU
//! kernels, on the emulated CUDA kernels (`--features cuda-emu`) and on a CUDA device when
//! there is one. (The CUDA launch code once passed the whole storage and dropped the view's
//! offset: a silently wrong loss.) Named `_cuda` so that the GPU kit (scripts/gpu-build.sh)
//! bundles it.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_detloss::Reduction;
use common::*;

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if let Ok(g) = Device::new_cuda(0) {
        d.push(g);
    }
    d
}

/// The weight views of a `[3, len + 2]` table whose row 1 holds `w` from column 1: three views
/// of the same values, none starting at the storage's first element.
fn views(w: &[f64], dev: &Device, dtype: DType) -> Vec<(String, Tensor)> {
    let len = w.len();
    let mut table = vec![9.0; 3 * (len + 2)];
    table[(len + 2) + 1..(len + 2) + 1 + len].copy_from_slice(w);
    let t = Tensor::from_vec(table, (3, len + 2), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let row = t.get(1).unwrap();
    let flat = t.flatten_all().unwrap();
    vec![
        (
            "row(1).narrow(0, 1, len)".into(),
            row.narrow(0, 1, len).unwrap(),
        ),
        ("row(1).i(1..len+1)".into(), row.i(1..len + 1).unwrap()),
        ("flat.narrow".into(), flat.narrow(0, len + 3, len).unwrap()),
    ]
}

#[test]
fn class_weight_views_give_the_contiguous_result_bit_for_bit() {
    let (n, c) = (37usize, 11usize);
    let mut rng = Rng::new(5);
    let x64 = rng.vec_normal(n * c, 2.0);
    // Labels for the sigmoid loss (C = background, -1 ignored) and the softmax losses.
    let lab_sig: Vec<i64> = (0..n).map(|_| rng.below(c as u64 + 2) as i64 - 1).collect();
    let lab_soft: Vec<i64> = (0..n).map(|_| rng.below(c as u64 + 1) as i64 - 1).collect();
    let wc1: Vec<f64> = (0..=c).map(|_| 0.25 + rng.uniform()).collect();
    let wc: Vec<f64> = wc1[..c].to_vec();
    for dev in devices() {
        for dtype in [DType::F32, DType::F64, DType::F16] {
            let x = Tensor::from_vec(x64.clone(), (n, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                let cases: [(&str, &[f64], &[i64]); 4] = [
                    ("SigmoidFocalLoss C+1", &wc1, &lab_sig),
                    ("SigmoidFocalLoss C", &wc, &lab_sig),
                    ("CrossEntropyLoss", &wc, &lab_soft),
                    ("SoftmaxFocalLoss", &wc, &lab_soft),
                ];
                for (name, w, lab) in cases {
                    let loss = name.split(' ').next().unwrap();
                    let f = |x: &Tensor, t: &Tensor, w| class_weighted_forward(loss, red, w, x, t);
                    let t = Tensor::from_vec(lab.to_vec(), n, &dev).unwrap();
                    let up = if red == Reduction::None {
                        Tensor::ones(
                            if name.starts_with("Sigmoid") {
                                vec![n, c]
                            } else {
                                vec![n]
                            },
                            dtype,
                            &dev,
                        )
                        .unwrap()
                    } else {
                        Tensor::new(1.5f64, &dev).unwrap().to_dtype(dtype).unwrap()
                    };
                    let contiguous = Tensor::from_vec(w.to_vec(), w.len(), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let (l0, g0) =
                        loss_and_grad(&x, &up, |x| f(x, &t, Some(contiguous.clone()))).unwrap();
                    let (l0, g0) = (bits_of(&l0), bits_of(&g0));
                    for (view, wv) in views(w, &dev, dtype) {
                        assert!(!wv.is_contiguous() || wv.layout().start_offset() > 0);
                        let (l, g) =
                            loss_and_grad(&x, &up, |x| f(x, &t, Some(wv.clone()))).unwrap();
                        let what = format!("{name} {dev:?} {dtype:?} {red:?} weights {view}");
                        assert_eq!(bits_of(&l), l0, "{what}: loss");
                        assert_eq!(bits_of(&g), g0, "{what}: gradient");
                    }
                }
            }
        }
    }
}
