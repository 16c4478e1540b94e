//! Anchor generation, IoU matching, box coding and NMS on hand-built cases.

mod common;

use candle_core::{Device, Tensor};
use candle_detloss::anchors::{
    batched_nms, box_iou, boxes_to_tensor, match_anchors, nms, tensor_to_boxes, AnchorGenerator,
    BoxCoder, MatchConfig,
};

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn generation_layout_and_shapes() {
    let gen = AnchorGenerator {
        strides: vec![4, 8],
        sizes: vec![8.0, 16.0],
        ratios: vec![1.0, 4.0],
        scales: vec![1.0, 2.0],
        offset: 0.5,
    };
    assert_eq!(gen.num_anchors_per_location(), 4);
    assert_eq!(gen.feature_sizes(8, 12), vec![(2, 3), (1, 2)]);
    let a = gen.generate(8, 12).unwrap();
    assert_eq!(a.len(), (2 * 3 + 2) * 4);
    // level 0, location (y=0, x=0), ratio 1, scale 1: a square of side 8 centred at (2, 2)
    assert_eq!(a[0], [-2.0, -2.0, 6.0, 6.0]);
    // same location, ratio 1, scale 2: side 16
    assert_eq!(a[1], [-6.0, -6.0, 10.0, 10.0]);
    // ratio 4 (h / w), scale 1: w = 4, h = 16, area kept at 64
    assert_eq!(a[2], [0.0, -6.0, 4.0, 10.0]);
    // next location along x (x=1): centre (6, 2)
    assert_eq!(a[4], [2.0, -2.0, 10.0, 6.0]);
    // row y=1 starts after 3 locations: centre (2, 6)
    assert_eq!(a[12], [-2.0, 2.0, 6.0, 10.0]);
    // level 1 starts after 6 locations × 4 anchors: stride 8, centre (4, 4), side 16
    assert_eq!(a[24], [-4.0, -4.0, 12.0, 12.0]);
    // offset 0 (torchvision) puts the first centre on the origin
    let g0 = AnchorGenerator {
        offset: 0.0,
        ..gen.clone()
    };
    assert_eq!(g0.generate(8, 12).unwrap()[0], [-4.0, -4.0, 4.0, 4.0]);
    // the paper's configuration
    let r = AnchorGenerator::retinanet();
    assert_eq!(r.num_anchors_per_location(), 9);
    assert_eq!(r.generate(64, 64).unwrap().len(), (64 + 16 + 4 + 1 + 1) * 9);
}

#[test]
fn generation_rejects_bad_config() {
    let bad = AnchorGenerator {
        sizes: vec![8.0],
        ..AnchorGenerator::retinanet()
    };
    assert!(bad
        .generate(32, 32)
        .unwrap_err()
        .to_string()
        .contains("AnchorGenerator"));
    let bad = AnchorGenerator {
        ratios: vec![0.0],
        ..AnchorGenerator::retinanet()
    };
    assert!(bad.generate(32, 32).is_err());
    let bad = AnchorGenerator {
        strides: vec![0, 8, 16, 32, 64],
        ..AnchorGenerator::retinanet()
    };
    assert!(bad.generate(32, 32).is_err());
}

/// Anchors chosen so each lands in a known band against the ground truths below.
fn hand_anchors() -> Vec<[f32; 4]> {
    vec![
        [0.0, 0.0, 10.0, 10.0],       // IoU 1 with gt0 -> positive (class 2)
        [0.0, 0.0, 10.0, 8.0],        // IoU 0.8 with gt0 -> positive
        [5.0, 0.0, 15.0, 10.0],       // IoU 1/3 with gt0 -> background
        [0.0, 0.0, 10.0, 22.0],       // IoU 10/22 = 0.4545 with gt0 -> ignored
        [28.0, 28.0, 40.0, 40.0],     // IoU 16/144 with gt1, its best anchor -> forced positive
        [100.0, 100.0, 110.0, 110.0], // no overlap -> background
    ]
}

#[test]
fn matching_bands_and_best_anchor_rule() {
    let anchors = hand_anchors();
    let gts = [[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 34.0, 34.0]];
    let classes = [2u32, 0];
    assert!((box_iou(&anchors[3], &gts[0]) - 10.0 / 22.0).abs() < 1e-6);
    let m = match_anchors(&anchors, &gts, &classes, 3, &MatchConfig::default()).unwrap();
    assert_eq!(m.labels, vec![2, 2, 3, -1, 0, 3]);
    assert_eq!(m.num_pos, 3);
    assert_eq!(m.boxes[0], gts[0]);
    assert_eq!(m.boxes[1], gts[0]);
    // matched only through the best-anchor rule
    assert_eq!(m.boxes[4], gts[1]);
    assert_eq!(
        m.gt_index,
        vec![Some(0), Some(0), None, None, Some(1), None]
    );
    // without the rule the small object has no positive
    let strict = MatchConfig {
        allow_low_quality: false,
        ..Default::default()
    };
    let m2 = match_anchors(&anchors, &gts, &classes, 3, &strict).unwrap();
    assert_eq!(m2.labels, vec![2, 2, 3, -1, 3, 3]);
    assert_eq!(m2.num_pos, 2);
    // tensors in the losses' convention
    let (l, b) = m.to_tensors(&Device::Cpu).unwrap();
    assert_eq!(l.to_vec1::<i64>().unwrap(), vec![2, 2, 3, -1, 0, 3]);
    assert_eq!(b.dims(), &[6, 4]);
    assert_eq!(tensor_to_boxes(&b).unwrap()[4], gts[1]);
}

#[test]
fn best_anchor_rule_rescues_an_ignored_anchor() {
    // gt0's best anchor has IoU 0.4545 (ignore band): it is forced positive.
    let anchors = vec![[0.0, 0.0, 10.0, 22.0], [50.0, 50.0, 60.0, 60.0]];
    let m = match_anchors(
        &anchors,
        &[[0.0, 0.0, 10.0, 10.0]],
        &[1],
        2,
        &MatchConfig::default(),
    )
    .unwrap();
    assert_eq!(m.labels, vec![1, 2]);
}

#[test]
fn matching_without_ground_truth_and_errors() {
    let anchors = hand_anchors();
    let m = match_anchors(&anchors, &[], &[], 4, &MatchConfig::default()).unwrap();
    assert_eq!(m.labels, vec![4; 6]);
    assert_eq!(m.num_pos, 0);
    let e = match_anchors(
        &anchors,
        &[[0.0, 0.0, 1.0, 1.0]],
        &[4],
        4,
        &MatchConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("class 4 out of range"), "{e}");
    assert!(match_anchors(
        &anchors,
        &[[0.0, 0.0, 1.0, 1.0]],
        &[],
        4,
        &MatchConfig::default()
    )
    .is_err());
    let bad = MatchConfig {
        pos_iou: 0.3,
        neg_iou: 0.4,
        allow_low_quality: true,
    };
    assert!(match_anchors(&anchors, &[], &[], 4, &bad).is_err());
}

#[test]
fn encode_known_values_and_round_trip() {
    let coder = BoxCoder::default();
    // centre moves by 1 px on a 10 px anchor -> 0.1 / 0.1 = 1; size doubles -> ln 2 / 0.2
    let d = coder.encode_box(&[0.0, 0.0, 10.0, 10.0], &[1.0, -4.0, 11.0, 16.0]);
    assert!(close(&d, &[1.0, 1.0, 0.0, 2f32.ln() / 0.2], 1e-5), "{d:?}");
    let mut rng = common::Rng::new(3);
    let mut anchors = Vec::new();
    let mut gts = Vec::new();
    for _ in 0..50 {
        let (x, y) = (rng.uniform() as f32 * 100.0, rng.uniform() as f32 * 100.0);
        let (w, h) = (
            4.0 + rng.uniform() as f32 * 60.0,
            4.0 + rng.uniform() as f32 * 60.0,
        );
        anchors.push([x, y, x + w, y + h]);
        let (gx, gy) = (x + rng.normal(5.0) as f32, y + rng.normal(5.0) as f32);
        let (gw, gh) = (
            w * (0.5 + rng.uniform() as f32),
            h * (0.5 + rng.uniform() as f32),
        );
        gts.push([gx, gy, gx + gw, gy + gh]);
    }
    let dev = Device::Cpu;
    let a = boxes_to_tensor(&anchors, &dev).unwrap();
    let g = boxes_to_tensor(&gts, &dev).unwrap();
    let deltas = coder.encode(&a, &g).unwrap();
    let back = tensor_to_boxes(&coder.decode(&a, &deltas).unwrap()).unwrap();
    let deltas_v = tensor_to_boxes(&deltas).unwrap();
    for i in 0..anchors.len() {
        assert!(
            close(&back[i], &gts[i], 1e-3),
            "{i}: {:?} vs {:?}",
            back[i],
            gts[i]
        );
        // the tensor and per-box paths agree
        let d1 = coder.encode_box(&anchors[i], &gts[i]);
        assert!(close(&d1, &deltas_v[i], 1e-4), "{i}");
        let b1 = coder.decode_box(&anchors[i], &d1);
        assert!(close(&b1, &gts[i], 1e-3), "{i}");
    }
    // batched [B, A, 4] deltas broadcast against [A, 4] anchors
    let d3 = Tensor::stack(&[&deltas, &deltas], 0).unwrap();
    let b3 = coder.decode(&a, &d3).unwrap();
    assert_eq!(b3.dims(), &[2, 50, 4]);
    // a wild size delta is clamped, not infinite
    let wild = coder.decode_box(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 1e4, 1e4]);
    assert!(wild.iter().all(|v| v.is_finite()));
}

#[test]
fn nms_greedy_and_per_class() {
    let boxes = [
        [0.0, 0.0, 10.0, 10.0],
        [1.0, 0.0, 11.0, 10.0], // IoU 0.818 with box 0
        [20.0, 20.0, 30.0, 30.0],
        [0.0, 0.0, 10.0, 10.0], // duplicate of box 0, other class
        [5.0, 0.0, 15.0, 10.0], // IoU 1/3 with box 0
    ];
    let scores = [0.9, 0.95, 0.3, 0.8, 0.5];
    // single class: box 1 (best) suppresses 0 and 3; box 4 has IoU 60/140 = 0.43 with box 1
    assert_eq!(nms(&boxes, &scores, 0.5, 100).unwrap(), vec![1, 4, 2]);
    assert_eq!(nms(&boxes, &scores, 0.4, 100).unwrap(), vec![1, 2]);
    assert_eq!(nms(&boxes, &scores, 0.5, 1).unwrap(), vec![1]);
    // per class: box 3 is in class 1 and survives
    let classes = [0, 0, 0, 1, 0];
    assert_eq!(
        batched_nms(&boxes, &scores, &classes, 0.5, 100).unwrap(),
        vec![1, 3, 4, 2]
    );
    // equal scores keep input order
    assert_eq!(
        nms(
            &[[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]],
            &[0.5, 0.5],
            0.5,
            10
        )
        .unwrap(),
        vec![0, 1]
    );
    assert!(nms(&boxes, &scores[..2], 0.5, 10).is_err());
    assert!(nms(&boxes[..1], &[f32::NAN], 0.5, 10).is_err());
}
