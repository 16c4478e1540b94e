//! COCO bbox evaluation against pycocotools (fixture `tests/fixtures/coco_eval.json`, generated
//! by `tests/fixtures/gen_coco.py`), plus hand-computable cases and error handling.

mod common;

use candle_detloss::metrics::{evaluate_bbox, results_json, CocoDet, CocoGt};
use serde_json::Value;

fn load() -> Vec<Value> {
    common::fixture_cases("coco_eval.json")
}

fn bbox(v: &Value) -> [f64; 4] {
    let a: Vec<f64> = v
        .as_array()
        .expect("bbox")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect();
    [a[0], a[1], a[2], a[3]]
}

#[test]
fn matches_pycocotools_stats() {
    let cases = load();
    assert!(cases.len() >= 4, "fixture has the expected cases");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let imgs: Vec<u64> = case["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| i["id"].as_u64().expect("id"))
            .collect();
        let cats: Vec<u64> = case["categories"]
            .as_array()
            .expect("categories")
            .iter()
            .map(|c| c["id"].as_u64().expect("id"))
            .collect();
        let gts: Vec<CocoGt> = case["annotations"]
            .as_array()
            .expect("annotations")
            .iter()
            .map(|a| CocoGt {
                image_id: a["image_id"].as_u64().expect("image_id"),
                category_id: a["category_id"].as_u64().expect("category_id"),
                bbox: bbox(&a["bbox"]),
                area: a["area"].as_f64().expect("area"),
            })
            .collect();
        let dets: Vec<CocoDet> = case["detections"]
            .as_array()
            .expect("detections")
            .iter()
            .map(|d| CocoDet {
                image_id: d["image_id"].as_u64().expect("image_id"),
                category_id: d["category_id"].as_u64().expect("category_id"),
                bbox: bbox(&d["bbox"]),
                score: d["score"].as_f64().expect("score"),
            })
            .collect();
        let want: Vec<f64> = case["stats"]
            .as_array()
            .expect("stats")
            .iter()
            .map(|s| s.as_f64().expect("stat"))
            .collect();
        let got = evaluate_bbox(&imgs, &cats, &gts, &dets).expect("evaluate");
        common::assert_close(
            &format!("coco stats of case {name}"),
            &got.to_array(),
            &want,
            1e-4,
            0.0,
        );
    }
}

#[test]
fn perfect_detections_score_one_and_misses_zero() {
    let gts = vec![
        CocoGt::from_xywh(1, 1, [0.0, 0.0, 10.0, 10.0]), // small
        CocoGt::from_xywh(1, 2, [20.0, 20.0, 50.0, 50.0]), // medium
        CocoGt::from_xywh(2, 1, [0.0, 0.0, 120.0, 100.0]), // large
    ];
    let dets: Vec<CocoDet> = gts
        .iter()
        .map(|g| CocoDet {
            image_id: g.image_id,
            category_id: g.category_id,
            bbox: g.bbox,
            score: 0.5,
        })
        .collect();
    let s = evaluate_bbox(&[1, 2, 3], &[1, 2], &gts, &dets).unwrap();
    for (i, v) in s.to_array().iter().enumerate() {
        assert!((v - 1.0).abs() < 1e-12, "stat {i} = {v}");
    }
    let none = evaluate_bbox(&[1, 2, 3], &[1, 2], &gts, &[]).unwrap();
    assert_eq!(none.ap, 0.0);
    assert_eq!(none.ar100, 0.0);
}

#[test]
fn missing_area_range_gives_minus_one() {
    // Only small objects: the medium and large numbers are -1, as in pycocotools.
    let gts = vec![CocoGt::from_xywh(1, 1, [0.0, 0.0, 10.0, 10.0])];
    let s = evaluate_bbox(&[1], &[1], &gts, &[]).unwrap();
    assert_eq!(s.ap_medium, -1.0);
    assert_eq!(s.ap_large, -1.0);
    assert_eq!(s.ar_large, -1.0);
    assert_eq!(s.ap_small, 0.0);
}

#[test]
fn half_of_the_objects_found() {
    // 2 gts, 1 perfect detection: recall 0.5, precision 1 up to recall 0.5 -> 51/101.
    let gts = vec![
        CocoGt::from_xywh(1, 1, [0.0, 0.0, 40.0, 40.0]),
        CocoGt::from_xywh(2, 1, [0.0, 0.0, 40.0, 40.0]),
    ];
    let dets = vec![CocoDet {
        image_id: 1,
        category_id: 1,
        bbox: [0.0, 0.0, 40.0, 40.0],
        score: 0.9,
    }];
    let s = evaluate_bbox(&[1, 2], &[1], &gts, &dets).unwrap();
    assert!((s.ap - 51.0 / 101.0).abs() < 1e-12, "{}", s.ap);
    assert!((s.ar100 - 0.5).abs() < 1e-12);
}

#[test]
fn unknown_ids_and_bad_values_are_errors() {
    let gts = vec![CocoGt::from_xywh(1, 1, [0.0, 0.0, 4.0, 4.0])];
    let det = |image_id, category_id, score| CocoDet {
        image_id,
        category_id,
        bbox: [0.0, 0.0, 4.0, 4.0],
        score,
    };
    let e = evaluate_bbox(&[1], &[1], &gts, &[det(2, 1, 0.5)]).unwrap_err();
    assert!(e.to_string().contains("image 2"), "{e}");
    let e = evaluate_bbox(&[1], &[1], &gts, &[det(1, 5, 0.5)]).unwrap_err();
    assert!(e.to_string().contains("category 5"), "{e}");
    let e = evaluate_bbox(&[1], &[1], &gts, &[det(1, 1, f64::NAN)]).unwrap_err();
    assert!(e.to_string().contains("score"), "{e}");
}

#[test]
fn results_and_stats_json_parse() {
    let dets = vec![
        CocoDet {
            image_id: 4,
            category_id: 2,
            bbox: [1.5, 2.0, 3.25, 4.0],
            score: 0.75,
        },
        CocoDet {
            image_id: 5,
            category_id: 1,
            bbox: [0.0, 0.0, 1.0, 1.0],
            score: 0.1,
        },
    ];
    let v: Value = serde_json::from_str(&results_json(&dets)).expect("valid JSON");
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["image_id"], 4);
    assert_eq!(arr[0]["bbox"][2].as_f64(), Some(3.25));
    assert_eq!(arr[1]["score"].as_f64(), Some(0.1));
    let gts = vec![CocoGt::from_xywh(4, 2, [1.5, 2.0, 3.25, 4.0])];
    let s = evaluate_bbox(&[4, 5], &[1, 2], &gts, &dets).unwrap();
    let j: Value = serde_json::from_str(&s.to_json()).expect("valid JSON");
    assert_eq!(j["stats"].as_array().unwrap().len(), 12);
    // serde_json's default float parser may be 1 ulp off the shortest round-trip text
    assert!((j["AP50"].as_f64().unwrap() - s.ap50).abs() < 1e-12);
    assert_eq!(s.summary().lines().count(), 12);
}
