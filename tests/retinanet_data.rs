//! Data paths of the RetinaNet example: the `--export-coco` / `--coco` round trip gives back the
//! same images (to 8-bit quantisation) and boxes, the Pascal VOC reader (image look-up, classes,
//! errors that name the file), random crops keep boxes on their objects through flips and
//! rotations, padded validation images, the ground-truth COCO JSON, and the two pictures. The
//! example's modules are compiled in with `#[path]`, as in `retinanet_smoke.rs`.

#[path = "../examples/retinanet/data.rs"]
mod data;
#[path = "../examples/retinanet/model.rs"]
mod model;
#[path = "../examples/retinanet/plot.rs"]
mod plot;
#[path = "../examples/retinanet/train.rs"]
mod train;

use data::{shapes_dataset, ShapesConfig};
use std::path::{Path, PathBuf};

/// A fresh, empty folder under the system temp dir for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("detloss-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn export_coco_round_trips_images_and_boxes() {
    let ds = shapes_dataset(&ShapesConfig::new(64), 10, 3, 1_000_001);
    let dir = scratch("export");
    data::export_coco(&ds, &dir, "val.json").unwrap();
    let ann = data::read_coco(&dir.join("val.json"), &dir.join("images")).unwrap();
    let src = data::decode(&ann, &ann.categories, 1.0).unwrap();
    let back = data::resized(&src, 64);
    assert_eq!(back.class_names, ds.class_names);
    assert_eq!(back.category_ids, ds.category_ids);
    assert_eq!(back.samples.len(), ds.samples.len());
    for (a, b) in ds.samples.iter().zip(&back.samples) {
        assert_eq!(a.image_id, b.image_id);
        assert_eq!(a.file_name, b.file_name);
        assert_eq!(a.orig_size, b.orig_size);
        assert_eq!(a.boxes, b.boxes, "image {}", a.image_id);
        assert_eq!(a.classes, b.classes);
        assert_eq!(a.gt, b.gt);
        assert_eq!(b.scale, [1.0, 1.0]);
        // PNG holds 8 bits: the pixels come back as the nearest of 256 levels, exactly
        let quantised: Vec<f32> = a
            .pixels
            .iter()
            .map(|p| (p.clamp(0.0, 1.0) * 255.0).round() / 255.0)
            .collect();
        assert_eq!(b.pixels.len(), quantised.len());
        for (i, (q, p)) in quantised.iter().zip(&b.pixels).enumerate() {
            assert!((q - p).abs() <= 1e-7, "pixel {i}: {q} vs {p}");
        }
        assert!(a
            .pixels
            .iter()
            .zip(&b.pixels)
            .all(|(x, y)| (x - y).abs() <= 0.5 / 255.0 + 1e-7));
    }
    // the ground-truth JSON every run writes is the exported annotation file, field for field
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("val.json")).unwrap()).unwrap();
    assert_eq!(written, data::coco_gt_json(&back));
    assert_eq!(
        written["annotations"].as_array().unwrap().len(),
        ds.samples.iter().map(|s| s.boxes.len()).sum::<usize>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a `w × h` PNG: flat grey with the given filled rectangles in `colour`.
fn write_png(path: &Path, w: u32, h: u32, rects: &[[u32; 4]], colour: [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        if rects
            .iter()
            .any(|r| x >= r[0] && x < r[2] && y >= r[1] && y < r[3])
        {
            image::Rgb(colour)
        } else {
            image::Rgb([100, 100, 100])
        }
    });
    img.save(path).unwrap();
}

fn voc_xml(filename: &str, w: u32, h: u32, objects: &[(&str, [u32; 4])]) -> String {
    let mut s = format!(
        "<annotation>\n  <folder>x</folder>\n  <filename>{filename}</filename>\n  \
         <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
    );
    for (name, b) in objects {
        s += &format!(
            "  <object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{}</xmin>\
             <ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>\n",
            b[0], b[1], b[2], b[3]
        );
    }
    s + "</annotation>\n"
}

#[test]
fn voc_reader_finds_images_classes_and_boxes() {
    let dir = scratch("voc");
    // a.xml names its own png; b.xml names a .tif that is not there (as DeepForest's OSBS_029):
    // the .png of the same stem is used
    write_png(&dir.join("a.png"), 40, 30, &[[2, 3, 12, 20]], [255, 0, 0]);
    write_png(&dir.join("b.png"), 50, 50, &[], [0, 0, 0]);
    std::fs::write(
        dir.join("a.xml"),
        voc_xml(
            "a.png",
            40,
            30,
            &[("Tree", [2, 3, 12, 20]), ("Dead", [20, 5, 30, 9])],
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("b.xml"),
        voc_xml("b.tif", 50, 50, &[("Tree", [1, 1, 49, 49])]),
    )
    .unwrap();
    let ann = data::read_voc(&dir, None).unwrap();
    assert_eq!(
        ann.categories,
        vec![(1, "Dead".to_string()), (2, "Tree".to_string())]
    );
    assert_eq!(ann.images.len(), 2);
    assert_eq!(ann.images[1].path, dir.join("b.png"));
    assert_eq!(ann.images[1].file_name, "b.png");
    assert_eq!(ann.images[0].image_id, 1);
    assert_eq!(
        ann.images[0].objects,
        vec![
            (2, [2.0, 3.0, 12.0, 20.0], 170.0),
            (1, [20.0, 5.0, 30.0, 9.0], 40.0)
        ]
    );
    let src = data::decode(&ann, &ann.categories, 1.0).unwrap();
    assert_eq!(src.class_names, vec!["Dead", "Tree"]);
    assert_eq!(src.images[0].classes, vec![1, 0]);
    assert_eq!(src.images[0].boxes[0], [2.0, 3.0, 12.0, 20.0]);
    assert_eq!(src.images[0].gt[0].bbox, [2.0, 3.0, 10.0, 17.0]);
    assert_eq!(src.images[0].orig_size, [40, 30]);
    // at half scale the boxes halve, the ground truth stays in original pixels
    let half = data::decode(&ann, &ann.categories, 0.5).unwrap();
    assert_eq!(half.images[0].rgb.dimensions(), (20, 15));
    assert_eq!(half.images[0].boxes[0], [1.0, 1.5, 6.0, 10.0]);
    assert_eq!(half.images[0].gt, src.images[0].gt);
    // a validation folder is read with the training classes
    let val = data::read_voc(&dir, Some(&ann.categories)).unwrap();
    assert_eq!(val.categories, ann.categories);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn voc_errors_name_the_file() {
    let err = |dir: &Path, known: Option<&[(u64, String)]>| {
        format!("{:#}", data::read_voc(dir, known).unwrap_err())
    };
    let dir = scratch("voc-bad");
    write_png(&dir.join("a.png"), 10, 10, &[], [0, 0, 0]);
    std::fs::write(
        dir.join("a.xml"),
        "<annotation><filename>a.png</filename><object>",
    )
    .unwrap();
    let e = err(&dir, None);
    assert!(e.contains("a.xml") && e.contains("malformed XML"), "{e}");

    std::fs::write(
        dir.join("a.xml"),
        voc_xml("a.png", 10, 10, &[("Tree", [5, 5, 5, 9])]),
    )
    .unwrap();
    let e = err(&dir, None);
    assert!(e.contains("a.xml") && e.contains("empty box"), "{e}");

    std::fs::write(
        dir.join("a.xml"),
        "<annotation><filename>a.png</filename><object><name>Tree</name><bndbox>\
         <xmin>1</xmin><ymin>x</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object></annotation>",
    )
    .unwrap();
    let e = err(&dir, None);
    assert!(e.contains("a.xml") && e.contains("<ymin>"), "{e}");

    std::fs::write(
        dir.join("a.xml"),
        voc_xml("missing.jpg", 10, 10, &[("Tree", [1, 1, 4, 4])]),
    )
    .unwrap();
    std::fs::remove_file(dir.join("a.png")).unwrap();
    let e = err(&dir, None);
    assert!(e.contains("a.xml") && e.contains("image not found"), "{e}");

    write_png(&dir.join("a.png"), 10, 10, &[], [0, 0, 0]);
    let known = vec![(1, "Alive".to_string())];
    let e = err(&dir, Some(&known));
    assert!(e.contains("a.xml") && e.contains("\"Tree\""), "{e}");

    // the stated size must be the image's
    std::fs::write(
        dir.join("a.xml"),
        voc_xml("a.png", 12, 10, &[("Tree", [1, 1, 4, 4])]),
    )
    .unwrap();
    let ann = data::read_voc(&dir, None).unwrap();
    let e = format!(
        "{:#}",
        data::decode(&ann, &ann.categories, 1.0).err().unwrap()
    );
    assert!(e.contains("a.png") && e.contains("12x10"), "{e}");

    let empty = scratch("voc-empty");
    assert!(err(&empty, None).contains("no .xml"));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn random_crops_keep_boxes_on_their_objects() {
    // solid red rectangles on grey: in every crop, under every flip / rotation, a kept box that
    // was not clipped covers red exactly (red on its border pixels, grey just outside)
    let dir = scratch("crops");
    let rects = [
        [10, 12, 40, 30],
        [60, 50, 75, 90],
        [90, 5, 118, 20],
        [3, 70, 20, 77],
    ];
    write_png(&dir.join("a.png"), 120, 100, &rects, [255, 0, 0]);
    let objects: Vec<(&str, [u32; 4])> = rects.iter().map(|r| ("Tree", *r)).collect();
    std::fs::write(dir.join("a.xml"), voc_xml("a.png", 120, 100, &objects)).unwrap();
    let ann = data::read_voc(&dir, None).unwrap();
    let src = data::decode(&ann, &ann.categories, 1.0).unwrap();
    let crops = data::random_crops(&src, 64, 40, 7).unwrap();
    assert_eq!(crops.size, 64);
    assert_eq!(crops.samples.len(), 40);
    let again = data::random_crops(&src, 64, 40, 7).unwrap();
    let mut checked = 0;
    for (s, t) in crops.samples.iter().zip(&again.samples) {
        assert_eq!(s.pixels, t.pixels, "same seed, same crops");
        assert_eq!(s.boxes, t.boxes);
        let n = 64 * 64;
        let red = |x: usize, y: usize| s.pixels[y * 64 + x] > 0.9 && s.pixels[n + y * 64 + x] < 0.1;
        for b in &s.boxes {
            assert!(
                b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 64.0 && b[3] <= 64.0,
                "{b:?}"
            );
            let sides = [b[2] - b[0], b[3] - b[1]];
            let full = rects.iter().any(|r| {
                let (w, h) = ((r[2] - r[0]) as f32, (r[3] - r[1]) as f32);
                sides == [w, h] || sides == [h, w]
            });
            if !full {
                continue; // clipped by the crop edge
            }
            let (x1, y1, x2, y2) = (b[0] as usize, b[1] as usize, b[2] as usize, b[3] as usize);
            assert!(red(x1, y1) && red(x2 - 1, y2 - 1), "{b:?}");
            if x1 > 0 {
                assert!(!red(x1 - 1, y1), "{b:?}");
            }
            if y2 < 64 {
                assert!(!red(x1, y2), "{b:?}");
            }
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} unclipped boxes checked");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn padded_keeps_whole_images_at_scale() {
    let dir = scratch("pad");
    write_png(&dir.join("a.png"), 70, 40, &[[5, 5, 20, 30]], [0, 255, 0]);
    std::fs::write(
        dir.join("a.xml"),
        voc_xml("a.png", 70, 40, &[("Tree", [5, 5, 20, 30])]),
    )
    .unwrap();
    let ann = data::read_voc(&dir, None).unwrap();
    let src = data::decode(&ann, &ann.categories, 1.0).unwrap();
    let ds = data::padded(&src);
    assert_eq!(ds.size, 96);
    let s = &ds.samples[0];
    assert_eq!(s.boxes, vec![[5.0, 5.0, 20.0, 30.0]]);
    assert_eq!(s.orig_size, [70, 40]);
    let n = 96 * 96;
    assert_eq!(s.pixels[n + 10 * 96 + 10], 1.0, "green inside the box");
    assert_eq!(s.pixels[n + 50 * 96 + 80], 0.5, "grey padding");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pictures_are_drawn() {
    let dir = scratch("plots");
    let ds = shapes_dataset(&ShapesConfig::new(64), 5, 1, 1);
    let dets: Vec<Vec<train::Detection>> = ds
        .samples
        .iter()
        .map(|s| {
            s.boxes
                .iter()
                .zip(&s.classes)
                .map(|(b, &c)| train::Detection {
                    bbox: [b[0] + 1.0, b[1], b[2], b[3] + 1.0],
                    score: 0.8,
                    class: c,
                })
                .collect()
        })
        .collect();
    plot::detections_png(
        &dir.join("det.png"),
        &plot::DetectionGrid {
            ds: &ds,
            dets: &dets,
            cols: 4,
            rows: 4,
            zoom: 4,
            min_score: 0.3,
            title: "test".into(),
        },
    )
    .unwrap();
    let img = image::open(dir.join("det.png")).unwrap().to_rgb8();
    // 2 rows of 4 cells of 256 + 6 px, a 74 px header
    assert_eq!(img.dimensions(), (4 * 262 + 6, 74 + 2 * 262 + 6));
    // the header has dark text pixels on white
    let header_dark = (0..img.width())
        .flat_map(|x| (0..70).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
        .count();
    assert!(header_dark > 200, "{header_dark}");
    let losses: Vec<f32> = (0..40).map(|i| 3.0 / (1.0 + i as f32 * 0.1)).collect();
    plot::loss_png(
        &dir.join("loss.png"),
        &plot::LossCurves {
            title: "test".into(),
            total: &losses,
            cls: &losses[..],
            reg: &losses[..],
            cls_name: "focal",
            box_name: "smooth-l1",
            steps_per_epoch: 10,
            first_epoch: 0,
            batch_size: 8,
        },
    )
    .unwrap();
    let img = image::open(dir.join("loss.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 520));
    let _ = std::fs::remove_dir_all(&dir);
}
