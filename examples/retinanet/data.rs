//! Data for the RetinaNet example: a procedural shapes dataset generated in-process from a seed
//! (exact boxes, no download), and a COCO-format loader (`--coco annotations.json --images DIR`).
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_detloss::metrics::CocoGt;

/// The procedural dataset's classes (index = class id; COCO category id = index + 1).
pub const SHAPE_CLASSES: [&str; 4] = ["rectangle", "ellipse", "triangle", "cross"];

/// One image with its boxes.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `[3, size, size]` RGB in `[0, 1]`, channel-major.
    pub pixels: Vec<f32>,
    /// Boxes `[x1, y1, x2, y2]` in model (resized) pixel coordinates.
    pub boxes: Vec<[f32; 4]>,
    /// Class index `0..C` of each box.
    pub classes: Vec<u32>,
    /// Image id used in COCO evaluation / results.
    pub image_id: u64,
    /// Model coordinates = original coordinates × scale (x, y); 1 for procedural images.
    pub scale: [f32; 2],
    /// Ground truth in original coordinates (COCO area), for evaluation.
    pub gt: Vec<CocoGt>,
}

/// A dataset: samples of a fixed square size and the class names.
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub size: usize,
    pub class_names: Vec<String>,
    /// COCO category id of each class index.
    pub category_ids: Vec<u64>,
}

impl Dataset {
    /// `[B, 3, size, size]` batch of the given sample indices, normalised to ~zero mean.
    pub fn batch_images(&self, idx: &[usize], dev: &Device) -> Result<Tensor> {
        let n = 3 * self.size * self.size;
        let mut v = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            v.extend(self.samples[i].pixels.iter().map(|p| (p - 0.5) * 4.0));
        }
        Ok(Tensor::from_vec(
            v,
            (idx.len(), 3, self.size, self.size),
            dev,
        )?)
    }
}

/// SplitMix64: a tiny deterministic generator (same stream on every platform).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Options of the procedural generator.
#[derive(Clone, Copy, Debug)]
pub struct ShapesConfig {
    /// Image side in pixels.
    pub size: usize,
    /// Object side range as a fraction of the image side.
    pub min_side: f32,
    pub max_side: f32,
    /// Objects per image: 1..=max_objects.
    pub max_objects: usize,
}

impl ShapesConfig {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            min_side: 0.18,
            max_side: 0.55,
            max_objects: 3,
        }
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    candle_detloss::anchors::box_iou(a, b)
}

/// Is the pixel centre `(px, py)` inside shape `cls` with box `b`? (`orient` varies triangles.)
fn inside(cls: u32, b: &[f32; 4], orient: usize, px: f32, py: f32) -> bool {
    let (x1, y1, x2, y2) = (b[0], b[1], b[2], b[3]);
    if px < x1 || px > x2 || py < y1 || py > y2 {
        return false;
    }
    let (w, h) = (x2 - x1, y2 - y1);
    let (u, v) = ((px - x1) / w, (py - y1) / h); // in [0, 1]²
    match cls {
        0 => true,
        1 => {
            let (dx, dy) = (u - 0.5, v - 0.5);
            dx * dx + dy * dy <= 0.25
        }
        2 => {
            // isoceles triangle whose apex is the middle of one side: it touches all four box sides
            let (s, t) = match orient {
                0 => (v, u),       // apex up: at height v the width is v
                1 => (1.0 - v, u), // apex down
                2 => (u, v),       // apex left
                _ => (1.0 - u, v), // apex right
            };
            (t - 0.5).abs() <= 0.5 * s
        }
        _ => {
            // plus sign, arms one third thick
            ((u - 0.5).abs() <= 1.0 / 6.0) || ((v - 0.5).abs() <= 1.0 / 6.0)
        }
    }
}

/// One procedural image: textured background, 1..=max_objects shapes (random class, size,
/// aspect, colour; limited overlap), exact boxes.
pub fn shapes_image(cfg: &ShapesConfig, rng: &mut Rng, image_id: u64) -> Sample {
    let s = cfg.size;
    let sf = s as f32;
    let mut px = vec![0f32; 3 * s * s];
    // background: a base colour, two oriented sinusoid gratings per channel and pixel noise
    let base: [f32; 3] = [
        rng.range(0.2, 0.8),
        rng.range(0.2, 0.8),
        rng.range(0.2, 0.8),
    ];
    let mut waves = Vec::new();
    for _ in 0..2 {
        let ang = rng.range(0.0, std::f32::consts::PI);
        let freq = rng.range(0.05, 0.5);
        let ph = rng.range(0.0, std::f32::consts::TAU);
        let amp = [
            rng.range(0.0, 0.12),
            rng.range(0.0, 0.12),
            rng.range(0.0, 0.12),
        ];
        waves.push((ang.cos() * freq, ang.sin() * freq, ph, amp));
    }
    let noise = rng.range(0.02, 0.08);
    for y in 0..s {
        for x in 0..s {
            for c in 0..3 {
                let mut v = base[c];
                for &(fx, fy, ph, amp) in &waves {
                    v += amp[c] * (fx * x as f32 + fy * y as f32 + ph).sin();
                }
                v += noise * (rng.f32() - 0.5) * 2.0;
                px[c * s * s + y * s + x] = v;
            }
        }
    }
    let n_obj = 1 + rng.below(cfg.max_objects);
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut classes = Vec::new();
    let mut tries = 0;
    while boxes.len() < n_obj && tries < 50 {
        tries += 1;
        let side = rng.range(cfg.min_side, cfg.max_side) * sf;
        let aspect = rng.range(0.6, 1.6); // h / w
        let w = (side / aspect.sqrt()).round().clamp(4.0, sf - 2.0);
        let h = (side * aspect.sqrt()).round().clamp(4.0, sf - 2.0);
        let x1 = rng.range(0.0, sf - w).round();
        let y1 = rng.range(0.0, sf - h).round();
        let b = [x1, y1, x1 + w, y1 + h];
        // some overlap allowed, but no object mostly hidden
        if boxes.iter().any(|o| iou(o, &b) > 0.1) {
            continue;
        }
        let cls = rng.below(SHAPE_CLASSES.len()) as u32;
        let orient = rng.below(4);
        // a colour far enough from the background base colour
        let mut col = [0f32; 3];
        for _ in 0..20 {
            col = [rng.f32(), rng.f32(), rng.f32()];
            let d: f32 = (0..3).map(|c| (col[c] - base[c]).abs()).sum();
            if d > 0.6 {
                break;
            }
        }
        let shade = rng.range(-0.1, 0.1);
        for y in (b[1] as usize)..(b[3] as usize).min(s) {
            for x in (b[0] as usize)..(b[2] as usize).min(s) {
                // the shape covers the pixel whose centre is inside; boxes are on pixel edges
                if inside(cls, &b, orient, x as f32 + 0.5, y as f32 + 0.5) {
                    let g = shade * (x as f32 - b[0]) / w; // a soft gradient across the object
                    for c in 0..3 {
                        px[c * s * s + y * s + x] = col[c] + g;
                    }
                }
            }
        }
        boxes.push(b);
        classes.push(cls);
    }
    for v in px.iter_mut() {
        *v = v.clamp(0.0, 1.0);
    }
    let gt = boxes
        .iter()
        .zip(&classes)
        .map(|(b, &c)| {
            CocoGt::from_xywh(
                image_id,
                c as u64 + 1,
                [
                    b[0] as f64,
                    b[1] as f64,
                    (b[2] - b[0]) as f64,
                    (b[3] - b[1]) as f64,
                ],
            )
        })
        .collect();
    Sample {
        pixels: px,
        boxes,
        classes,
        image_id,
        scale: [1.0, 1.0],
        gt,
    }
}

/// `n` procedural images from `seed`; image ids start at `first_id`. The same seed gives the
/// same images, bit for bit.
pub fn shapes_dataset(cfg: &ShapesConfig, n: usize, seed: u64, first_id: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let samples = (0..n)
        .map(|i| shapes_image(cfg, &mut rng, first_id + i as u64))
        .collect();
    Dataset {
        samples,
        size: cfg.size,
        class_names: SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
        category_ids: (1..=SHAPE_CLASSES.len() as u64).collect(),
    }
}

/// Loads a COCO-format detection set (`annotations.json` + image folder), resizing every image to
/// `size × size` (boxes scaled alike; evaluation uses the original coordinates and areas). Crowd
/// annotations are skipped. Returns (train, val) with the last `val_fraction` of the images (by
/// id) as validation.
pub fn load_coco(
    ann_path: &str,
    images_dir: &str,
    size: usize,
    val_fraction: f32,
) -> Result<(Dataset, Dataset)> {
    let text = std::fs::read_to_string(ann_path).with_context(|| format!("reading {ann_path}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {ann_path}"))?;
    let mut cats: Vec<(u64, String)> = v["categories"]
        .as_array()
        .context("COCO file has no categories")?
        .iter()
        .map(|c| {
            Ok((
                c["id"].as_u64().context("category id")?,
                c["name"].as_str().unwrap_or("?").to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    cats.sort();
    let mut images: Vec<(u64, String)> = v["images"]
        .as_array()
        .context("COCO file has no images")?
        .iter()
        .map(|im| {
            Ok((
                im["id"].as_u64().context("image id")?,
                im["file_name"].as_str().context("file_name")?.to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    images.sort();
    let mut anns: std::collections::HashMap<u64, Vec<(u64, [f64; 4], f64)>> = Default::default();
    for a in v["annotations"]
        .as_array()
        .context("COCO file has no annotations")?
    {
        if a["iscrowd"].as_u64().unwrap_or(0) != 0 {
            continue;
        }
        let bb: Vec<f64> = a["bbox"]
            .as_array()
            .context("bbox")?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        if bb.len() != 4 {
            bail!("annotation bbox must have 4 numbers: {a}")
        }
        let area = a["area"].as_f64().unwrap_or(bb[2] * bb[3]);
        anns.entry(a["image_id"].as_u64().context("image_id")?)
            .or_default()
            .push((
                a["category_id"].as_u64().context("category_id")?,
                [bb[0], bb[1], bb[2], bb[3]],
                area,
            ));
    }
    let cat_index: std::collections::HashMap<u64, u32> = cats
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i as u32))
        .collect();
    let mut samples = Vec::new();
    for (id, file) in &images {
        let path = std::path::Path::new(images_dir).join(file);
        let img = image::open(&path)
            .with_context(|| format!("decoding {}", path.display()))?
            .to_rgb8();
        let (w0, h0) = img.dimensions();
        let rs = image::imageops::resize(
            &img,
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        );
        let mut px = vec![0f32; 3 * size * size];
        for (x, y, p) in rs.enumerate_pixels() {
            for c in 0..3 {
                px[c * size * size + y as usize * size + x as usize] = p[c] as f32 / 255.0;
            }
        }
        let (sx, sy) = (size as f32 / w0 as f32, size as f32 / h0 as f32);
        let mut boxes = Vec::new();
        let mut classes = Vec::new();
        let mut gt = Vec::new();
        for (cat, bb, area) in anns.get(id).map(|v| v.as_slice()).unwrap_or(&[]) {
            let Some(&ci) = cat_index.get(cat) else {
                bail!("annotation of image {id} has unknown category {cat}")
            };
            let b = [
                bb[0] as f32 * sx,
                bb[1] as f32 * sy,
                (bb[0] + bb[2]) as f32 * sx,
                (bb[1] + bb[3]) as f32 * sy,
            ];
            gt.push(CocoGt {
                image_id: *id,
                category_id: *cat,
                bbox: *bb,
                area: *area,
            });
            if b[2] - b[0] < 1.0 || b[3] - b[1] < 1.0 {
                continue; // too small after resizing to be learnt; still counted by evaluation
            }
            boxes.push(b);
            classes.push(ci);
        }
        samples.push(Sample {
            pixels: px,
            boxes,
            classes,
            image_id: *id,
            scale: [sx, sy],
            gt,
        });
    }
    if samples.len() < 2 {
        bail!("{ann_path}: need at least 2 images for a train/val split")
    }
    let n_val =
        ((samples.len() as f32 * val_fraction).round() as usize).clamp(1, samples.len() - 1);
    let val = samples.split_off(samples.len() - n_val);
    let names: Vec<String> = cats.iter().map(|c| c.1.clone()).collect();
    let ids: Vec<u64> = cats.iter().map(|c| c.0).collect();
    Ok((
        Dataset {
            samples,
            size,
            class_names: names.clone(),
            category_ids: ids.clone(),
        },
        Dataset {
            samples: val,
            size,
            class_names: names,
            category_ids: ids,
        },
    ))
}
