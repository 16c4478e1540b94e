//! Smoke tests of the RetinaNet example: the procedural dataset is deterministic and well
//! formed, the targets follow the crate's label convention, and a tiny model's loss falls over a
//! few dozen steps. The example's modules are compiled into this test with `#[path]`, so the
//! test exercises exactly the code `cargo run --example retinanet` runs.

#[path = "../examples/retinanet/data.rs"]
mod data;
#[path = "../examples/retinanet/model.rs"]
mod model;
#[path = "../examples/retinanet/train.rs"]
mod train;

use candle_core::Device;
use candle_detloss::anchors::AnchorGenerator;
use data::{shapes_dataset, ShapesConfig};
use model::ModelConfig;
use train::{BoxLossKind, ClsLossKind, TrainConfig, Trainer};

#[test]
fn shapes_dataset_is_deterministic_and_well_formed() {
    let cfg = ShapesConfig::new(32);
    let a = shapes_dataset(&cfg, 12, 5, 1);
    let b = shapes_dataset(&cfg, 12, 5, 1);
    let c = shapes_dataset(&cfg, 12, 6, 1);
    let mut differs = false;
    for ((sa, sb), sc) in a.samples.iter().zip(&b.samples).zip(&c.samples) {
        assert_eq!(sa.pixels, sb.pixels, "same seed, same pixels");
        assert_eq!(sa.boxes, sb.boxes);
        assert_eq!(sa.classes, sb.classes);
        differs |= sa.pixels != sc.pixels;
        assert_eq!(sa.pixels.len(), 3 * 32 * 32);
        assert!(sa.pixels.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(!sa.boxes.is_empty() && sa.boxes.len() <= cfg.max_objects);
        assert_eq!(sa.boxes.len(), sa.gt.len());
        for (bx, &cl) in sa.boxes.iter().zip(&sa.classes) {
            assert!((cl as usize) < data::SHAPE_CLASSES.len());
            assert!(
                bx[0] >= 0.0 && bx[1] >= 0.0 && bx[2] <= 32.0 && bx[3] <= 32.0,
                "{bx:?}"
            );
            assert!(bx[2] - bx[0] >= 4.0 && bx[3] - bx[1] >= 4.0, "{bx:?}");
        }
    }
    assert!(differs, "another seed gives other images");
    assert_eq!(a.samples[3].image_id, 4);
}

#[test]
fn shapes_boxes_are_exact() {
    // An object drawn alone on a flat background covers pixels touching all four box edges.
    let cfg = ShapesConfig {
        max_objects: 1,
        ..ShapesConfig::new(48)
    };
    let ds = shapes_dataset(&cfg, 20, 9, 1);
    for s in &ds.samples {
        let b = s.boxes[0];
        let (x1, y1, x2, y2) = (b[0] as usize, b[1] as usize, b[2] as usize, b[3] as usize);
        // the background varies smoothly; the object's colour is far from it: find pixels
        // differing from their neighbour outside the box on each edge row / column
        let px = |x: usize, y: usize| -> [f32; 3] {
            let n = 48 * 48;
            [
                s.pixels[y * 48 + x],
                s.pixels[n + y * 48 + x],
                s.pixels[2 * n + y * 48 + x],
            ]
        };
        let inside_row = |y: usize| (x1..x2).any(|x| px(x, y) != px(x1.max(1) - 1, y));
        let inside_col = |x: usize| (y1..y2).any(|y| px(x, y) != px(x, y1.max(1) - 1));
        assert!(inside_row(y1) && inside_row(y2 - 1), "{b:?}");
        assert!(inside_col(x1) && inside_col(x2 - 1), "{b:?}");
    }
}

fn tiny_config(cls: ClsLossKind, steps: usize) -> TrainConfig {
    TrainConfig {
        cls,
        reg: BoxLossKind::SmoothL1,
        model: ModelConfig {
            num_classes: 0,
            num_anchors: 0,
            stem: 8,
            widths: [16, 16, 16],
            fpn: 16,
            head_convs: 1,
            prior: 0.01,
        },
        anchors: AnchorGenerator {
            strides: vec![8, 16, 32],
            sizes: vec![8.0, 16.0, 32.0],
            ratios: vec![0.5, 1.0, 2.0],
            scales: vec![1.0],
            offset: 0.5,
        },
        batch_size: 8,
        lr: 3e-3,
        weight_decay: 1e-4,
        warmup_steps: 3,
        total_steps: steps,
        seed: 1,
    }
}

#[test]
fn targets_follow_the_label_convention() {
    let ds = shapes_dataset(&ShapesConfig::new(32), 8, 2, 1);
    let t = Trainer::new(tiny_config(ClsLossKind::Focal, 10), &ds, &Device::Cpu).unwrap();
    assert_eq!(t.anchors.len(), (16 + 4 + 1) * 3);
    for (s, tg) in ds.samples.iter().zip(&t.targets) {
        assert_eq!(tg.labels.len(), t.anchors.len());
        assert!(tg.labels.iter().all(|&l| (-1..=4).contains(&l)));
        // every object has at least one positive anchor (best-anchor rule)
        assert!(tg.num_pos >= s.boxes.len());
        for (a, &l) in tg.labels.iter().enumerate() {
            if (0..4).contains(&l) {
                // decoding the target deltas gives back the matched box
                let back = t.coder.decode_box(&t.anchors[a], &tg.deltas[a]);
                for (v, w) in back.iter().zip(&tg.boxes[a]) {
                    assert!((v - w).abs() < 1e-3, "{back:?} vs {:?}", tg.boxes[a]);
                }
            }
        }
    }
}

#[test]
fn training_loss_decreases() {
    let ds = shapes_dataset(&ShapesConfig::new(32), 16, 3, 1);
    let steps = 30;
    let mut t = Trainer::new(tiny_config(ClsLossKind::Focal, steps), &ds, &Device::Cpu).unwrap();
    let mut losses = Vec::new();
    for s in 0..steps {
        let idx: Vec<usize> = (0..8).map(|i| (s * 8 + i) % 16).collect();
        let l = t.train_step(&ds, &idx).unwrap();
        assert!(l.total.is_finite() && l.cls.is_finite() && l.reg.is_finite());
        assert!(l.num_pos > 0);
        losses.push(l.total);
    }
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[steps - 5..].iter().sum::<f32>() / 5.0;
    assert!(
        last < 0.7 * first,
        "loss should fall: first 5 steps {first:.4}, last 5 {last:.4} ({losses:?})"
    );
    // inference runs and returns at most 100 detections per image, inside the image
    let (stats, dets, per_image) = train::evaluate(&t, &ds, 8).unwrap();
    assert_eq!(per_image.len(), 16);
    assert!(per_image.iter().all(|d| d.len() <= 100));
    assert!(dets
        .iter()
        .all(|d| d.bbox[0] >= 0.0 && d.bbox[0] + d.bbox[2] <= 32.0 + 1e-3));
    assert!((-1.0..=1.0).contains(&stats.ap));
}

#[test]
fn every_classification_and_box_loss_trains_a_step() {
    // Each --cls-loss / --box-loss choice runs through the fused losses of the crate and gives a
    // finite loss (two steps, so GHM-C's running histogram is used once).
    let ds = shapes_dataset(&ShapesConfig::new(32), 8, 4, 1);
    for kind in [
        ClsLossKind::Focal,
        ClsLossKind::CbFocal,
        ClsLossKind::Ap,
        ClsLossKind::Ce,
        ClsLossKind::Ghmc,
    ] {
        let mut t = Trainer::new(tiny_config(kind, 2), &ds, &Device::Cpu).unwrap();
        for _ in 0..2 {
            let l = t.train_step(&ds, &[0, 1]).unwrap();
            assert!(l.total.is_finite(), "{kind:?}: {}", l.total);
        }
    }
    for reg in [
        BoxLossKind::SmoothL1,
        BoxLossKind::BalancedL1,
        BoxLossKind::Giou,
        BoxLossKind::Diou,
        BoxLossKind::Ciou,
    ] {
        let mut cfg = tiny_config(ClsLossKind::Focal, 2);
        cfg.reg = reg;
        let mut t = Trainer::new(cfg, &ds, &Device::Cpu).unwrap();
        let l = t.train_step(&ds, &[0, 1]).unwrap();
        assert!(l.total.is_finite(), "{reg:?}: {}", l.total);
    }
}
