//! Data for the RetinaNet example: a procedural shapes dataset generated in-process from a seed
//! (exact boxes, no download), loaders for COCO JSON (`--coco annotations.json --images DIR`) and
//! Pascal VOC XML (`--voc DIR`), the three ways a loaded image becomes a model input (resized
//! whole, padded whole at a scale, or random crops with flips), and COCO JSON writers (the
//! validation ground truth of every run, `--export-coco`).
#![allow(dead_code)]

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_detloss::metrics::CocoGt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    /// Original image file name (COCO `file_name`; procedural images: `<id>.png`).
    pub file_name: String,
    /// Original image `[width, height]` in pixels (detections are clipped to it).
    pub orig_size: [u32; 2],
}

/// A dataset: samples of a fixed square size and the class names.
#[derive(Clone)]
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
        file_name: format!("{image_id:07}.png"),
        orig_size: [s as u32, s as u32],
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

/// A progress bar over `len` items with a label, drawn only on a terminal (hidden in CI / pipes).
pub fn progress(len: usize, label: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    pb
}

/// One annotated image as listed by an annotation file, not decoded yet.
#[derive(Clone, Debug)]
pub struct RawImage {
    /// Where the image is on disk.
    pub path: PathBuf,
    /// COCO `file_name` (the image's name inside its folder).
    pub file_name: String,
    /// COCO image id (VOC: position in file-name order, from 1).
    pub image_id: u64,
    /// `(category id, [x1, y1, x2, y2] in original pixels, area)` of each object.
    pub objects: Vec<(u64, [f64; 4], f64)>,
    /// `[width, height]` the annotation file states, checked against the decoded image.
    pub stated_size: Option<[u32; 2]>,
}

/// The images and categories `(id, name)` of an annotation file (COCO JSON or a VOC folder).
#[derive(Clone, Debug)]
pub struct Annotations {
    pub images: Vec<RawImage>,
    pub categories: Vec<(u64, String)>,
}

/// Reads a COCO detection file (`images`, `annotations` with `bbox` `[x, y, w, h]`,
/// `categories`); images are looked up in `images_dir`. Crowd annotations are skipped.
pub fn read_coco(ann_path: &Path, images_dir: &Path) -> Result<Annotations> {
    let name = ann_path.display();
    let text = std::fs::read_to_string(ann_path).with_context(|| format!("reading {name}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {name} as JSON"))?;
    let mut cats: Vec<(u64, String)> = v["categories"]
        .as_array()
        .with_context(|| format!("{name}: no \"categories\" list"))?
        .iter()
        .map(|c| {
            Ok((
                c["id"]
                    .as_u64()
                    .with_context(|| format!("{name}: category without an integer id: {c}"))?,
                c["name"].as_str().unwrap_or("?").to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    cats.sort();
    let mut images: Vec<RawImage> = v["images"]
        .as_array()
        .with_context(|| format!("{name}: no \"images\" list"))?
        .iter()
        .map(|im| {
            let file = im["file_name"]
                .as_str()
                .with_context(|| format!("{name}: image without file_name: {im}"))?;
            let size = match (im["width"].as_u64(), im["height"].as_u64()) {
                (Some(w), Some(h)) => Some([w as u32, h as u32]),
                _ => None,
            };
            Ok(RawImage {
                path: images_dir.join(file),
                file_name: file.to_string(),
                image_id: im["id"]
                    .as_u64()
                    .with_context(|| format!("{name}: image without an integer id: {im}"))?,
                objects: Vec::new(),
                stated_size: size,
            })
        })
        .collect::<Result<_>>()?;
    images.sort_by_key(|im| im.image_id);
    let index: HashMap<u64, usize> = images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.image_id, i))
        .collect();
    for a in v["annotations"]
        .as_array()
        .with_context(|| format!("{name}: no \"annotations\" list"))?
    {
        if a["iscrowd"].as_u64().unwrap_or(0) != 0 {
            continue;
        }
        let bb: Vec<f64> = a["bbox"]
            .as_array()
            .with_context(|| format!("{name}: annotation without bbox: {a}"))?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        if bb.len() != 4 {
            bail!("{name}: annotation bbox must have 4 numbers: {a}")
        }
        let area = a["area"].as_f64().unwrap_or(bb[2] * bb[3]);
        let id = a["image_id"]
            .as_u64()
            .with_context(|| format!("{name}: annotation without image_id: {a}"))?;
        let &i = index
            .get(&id)
            .with_context(|| format!("{name}: annotation of unknown image {id}"))?;
        let cat = a["category_id"]
            .as_u64()
            .with_context(|| format!("{name}: annotation without category_id: {a}"))?;
        images[i]
            .objects
            .push((cat, [bb[0], bb[1], bb[0] + bb[2], bb[1] + bb[3]], area));
    }
    Ok(Annotations {
        images,
        categories: cats,
    })
}

/// Text of the child element `tag` of `node`, trimmed.
fn child_text<'a>(node: roxmltree::Node<'a, '_>, tag: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(tag))
        .and_then(|c| c.text())
        .map(str::trim)
}

/// The image of a VOC annotation: `<filename>` beside the XML file, else the same stem (of the
/// file name, then of the XML file) with a `.png`, `.jpg` or `.jpeg` extension (DeepForest's
/// `OSBS_029.xml` names a `.tif` and ships the `.png`).
fn voc_image(xml: &Path, filename: Option<&str>) -> Result<PathBuf> {
    let dir = xml.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    let decodable = |p: &Path| {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
    };
    if let Some(f) = filename {
        let p = dir.join(f);
        if p.is_file() && decodable(&p) {
            return Ok(p);
        }
        tried.push(p);
    }
    let mut stems = Vec::new();
    if let Some(s) = filename.and_then(|f| Path::new(f).file_stem()) {
        stems.push(s.to_os_string());
    }
    if let Some(s) = xml.file_stem() {
        stems.push(s.to_os_string());
    }
    for stem in stems {
        for ext in ["png", "jpg", "jpeg", "PNG", "JPG"] {
            let p = dir.join(&stem).with_extension(ext);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p);
        }
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "{}: image not found (tried {})",
        xml.display(),
        tried.join(", ")
    )
}

/// Reads a Pascal VOC folder: every `*.xml` (`<annotation>` with `<filename>`, `<size>` and
/// `<object>`s of `<name>` and `<bndbox>` `xmin ymin xmax ymax`) with its image beside it.
/// Coordinates are taken as pixel edges, as DeepForest writes them (no `-1`); `difficult`
/// objects are ordinary objects. Image ids follow the sorted file names from 1. Categories are
/// `known` (a validation set uses the training set's; another class name is an error) or the
/// sorted class names with ids from 1.
pub fn read_voc(dir: &Path, known: Option<&[(u64, String)]>) -> Result<Annotations> {
    let mut xmls: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("xml")))
        .collect();
    xmls.sort();
    ensure!(
        !xmls.is_empty(),
        "{}: no .xml annotation files",
        dir.display()
    );
    let mut parsed = Vec::new();
    for xml in &xmls {
        let x = xml.display();
        let text = std::fs::read_to_string(xml).with_context(|| format!("reading {x}"))?;
        let doc =
            roxmltree::Document::parse(&text).with_context(|| format!("{x}: malformed XML"))?;
        let root = doc.root_element();
        ensure!(
            root.has_tag_name("annotation"),
            "{x}: root element is <{}>, expected a Pascal VOC <annotation>",
            root.tag_name().name()
        );
        let path = voc_image(xml, child_text(root, "filename"))?;
        let stated_size = root
            .children()
            .find(|c| c.has_tag_name("size"))
            .and_then(|s| {
                let w = child_text(s, "width")?.parse().ok()?;
                let h = child_text(s, "height")?.parse().ok()?;
                Some([w, h])
            });
        let mut objects = Vec::new();
        for (k, obj) in root
            .children()
            .filter(|c| c.has_tag_name("object"))
            .enumerate()
        {
            let name = child_text(obj, "name")
                .with_context(|| format!("{x}: <object> {k} has no <name>"))?;
            let bb = obj
                .children()
                .find(|c| c.has_tag_name("bndbox"))
                .with_context(|| format!("{x}: <object> {k} ({name}) has no <bndbox>"))?;
            let num = |tag: &str| -> Result<f64> {
                let t = child_text(bb, tag)
                    .with_context(|| format!("{x}: <object> {k} has no <{tag}>"))?;
                let v: f64 = t
                    .parse()
                    .with_context(|| format!("{x}: <object> {k}: <{tag}> {t:?} is not a number"))?;
                ensure!(v.is_finite(), "{x}: <object> {k}: <{tag}> is not finite");
                Ok(v)
            };
            let b = [num("xmin")?, num("ymin")?, num("xmax")?, num("ymax")?];
            ensure!(
                b[2] > b[0] && b[3] > b[1],
                "{x}: <object> {k} has an empty box {b:?} (xmax <= xmin or ymax <= ymin)"
            );
            objects.push((name.to_string(), b));
        }
        parsed.push((xml.clone(), path, stated_size, objects));
    }
    let categories: Vec<(u64, String)> = match known {
        Some(k) => k.to_vec(),
        None => {
            let mut names: Vec<String> = parsed
                .iter()
                .flat_map(|p| p.3.iter().map(|o| o.0.clone()))
                .collect();
            names.sort();
            names.dedup();
            ensure!(
                !names.is_empty(),
                "{}: no <object> in any file",
                dir.display()
            );
            names
                .into_iter()
                .enumerate()
                .map(|(i, n)| (i as u64 + 1, n))
                .collect()
        }
    };
    let ids: HashMap<&str, u64> = categories.iter().map(|(i, n)| (n.as_str(), *i)).collect();
    let mut images = Vec::new();
    for (i, (xml, path, stated_size, objects)) in parsed.iter().enumerate() {
        let objects = objects
            .iter()
            .map(|(name, b)| {
                let &id = ids.get(name.as_str()).with_context(|| {
                    format!(
                        "{}: class {name:?} is not among the training classes {:?}",
                        xml.display(),
                        categories.iter().map(|c| &c.1).collect::<Vec<_>>()
                    )
                })?;
                Ok((id, *b, (b[2] - b[0]) * (b[3] - b[1])))
            })
            .collect::<Result<_>>()?;
        images.push(RawImage {
            file_name: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.clone(),
            image_id: i as u64 + 1,
            objects,
            stated_size: *stated_size,
        });
    }
    Ok(Annotations { images, categories })
}

/// One decoded image at the working scale, before it becomes a model input.
#[derive(Clone)]
pub struct SourceImage {
    /// RGB pixels at the working scale.
    pub rgb: image::RgbImage,
    /// Boxes `[x1, y1, x2, y2]` at the working scale.
    pub boxes: Vec<[f32; 4]>,
    /// Class index `0..C` of each box.
    pub classes: Vec<u32>,
    pub image_id: u64,
    pub file_name: String,
    /// Working coordinates = original coordinates × scale (x, y).
    pub scale: [f32; 2],
    /// Original `[width, height]`.
    pub orig_size: [u32; 2],
    /// Ground truth in original coordinates, for evaluation.
    pub gt: Vec<CocoGt>,
}

/// Decoded images with their classes.
#[derive(Clone)]
pub struct SourceSet {
    pub images: Vec<SourceImage>,
    pub class_names: Vec<String>,
    /// COCO category id of each class index.
    pub category_ids: Vec<u64>,
}

impl SourceSet {
    /// Splits off the last `fraction` of the images (at least one, leaving at least one).
    pub fn split_last(mut self, fraction: f32) -> Result<(SourceSet, SourceSet)> {
        let n = self.images.len();
        ensure!(
            n >= 2,
            "need at least 2 images for a train/val split, got {n}"
        );
        let n_val = ((n as f32 * fraction).round() as usize).clamp(1, n - 1);
        let val = self.images.split_off(n - n_val);
        let other = SourceSet {
            images: val,
            class_names: self.class_names.clone(),
            category_ids: self.category_ids.clone(),
        };
        Ok((self, other))
    }
}

/// Decodes the images of `ann` and resamples them by `scale` (1: as they are), mapping
/// category ids to class indices in the order of `categories`.
pub fn decode(ann: &Annotations, categories: &[(u64, String)], scale: f32) -> Result<SourceSet> {
    ensure!(
        scale.is_finite() && scale > 0.0,
        "--scale must be > 0, got {scale}"
    );
    let index: HashMap<u64, u32> = categories
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i as u32))
        .collect();
    let pb = progress(ann.images.len(), "decoding images");
    let mut images = Vec::new();
    for raw in &ann.images {
        let p = raw.path.display();
        let img = image::open(&raw.path)
            .with_context(|| format!("decoding {p}"))?
            .to_rgb8();
        let (w0, h0) = img.dimensions();
        if let Some([w, h]) = raw.stated_size {
            ensure!(
                [w, h] == [w0, h0],
                "{p}: the annotation says {w}x{h} pixels, the image has {w0}x{h0}"
            );
        }
        let (w1, h1) = (
            ((w0 as f32 * scale).round() as u32).max(1),
            ((h0 as f32 * scale).round() as u32).max(1),
        );
        let rgb = if (w1, h1) == (w0, h0) {
            img
        } else {
            image::imageops::resize(&img, w1, h1, image::imageops::FilterType::Triangle)
        };
        let (sx, sy) = (w1 as f32 / w0 as f32, h1 as f32 / h0 as f32);
        let mut boxes = Vec::new();
        let mut classes = Vec::new();
        let mut gt = Vec::new();
        for (cat, b, area) in &raw.objects {
            let &ci = index
                .get(cat)
                .with_context(|| format!("{p}: object of unknown category id {cat}"))?;
            gt.push(CocoGt {
                image_id: raw.image_id,
                category_id: *cat,
                bbox: [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                area: *area,
            });
            boxes.push([
                b[0] as f32 * sx,
                b[1] as f32 * sy,
                b[2] as f32 * sx,
                b[3] as f32 * sy,
            ]);
            classes.push(ci);
        }
        images.push(SourceImage {
            rgb,
            boxes,
            classes,
            image_id: raw.image_id,
            file_name: raw.file_name.clone(),
            scale: [sx, sy],
            orig_size: [w0, h0],
            gt,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(SourceSet {
        images,
        class_names: categories.iter().map(|c| c.1.clone()).collect(),
        category_ids: categories.iter().map(|c| c.0).collect(),
    })
}

/// `[3, h, w]` channel-major floats in `[0, 1]` of an RGB image.
fn planar(img: &image::RgbImage, side: usize, fill: f32) -> Vec<f32> {
    let mut px = vec![fill; 3 * side * side];
    for (x, y, p) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        if x < side && y < side {
            for c in 0..3 {
                px[c * side * side + y * side + x] = p[c] as f32 / 255.0;
            }
        }
    }
    px
}

fn dataset(samples: Vec<Sample>, size: usize, src: &SourceSet) -> Dataset {
    Dataset {
        samples,
        size,
        class_names: src.class_names.clone(),
        category_ids: src.category_ids.clone(),
    }
}

/// Every image resized (aspect not kept) to `size × size`, boxes scaled alike; a box under one
/// pixel after resizing is not trained on but still counts in evaluation. An image already of
/// that size is taken as it is.
pub fn resized(src: &SourceSet, size: usize) -> Dataset {
    let samples = src
        .images
        .iter()
        .map(|im| {
            let (w, h) = im.rgb.dimensions();
            let rgb = if (w, h) == (size as u32, size as u32) {
                im.rgb.clone()
            } else {
                image::imageops::resize(
                    &im.rgb,
                    size as u32,
                    size as u32,
                    image::imageops::FilterType::Triangle,
                )
            };
            let (fx, fy) = (size as f32 / w as f32, size as f32 / h as f32);
            let mut boxes = Vec::new();
            let mut classes = Vec::new();
            for (b, &c) in im.boxes.iter().zip(&im.classes) {
                let b = [b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy];
                if b[2] - b[0] < 1.0 || b[3] - b[1] < 1.0 {
                    continue;
                }
                boxes.push(b);
                classes.push(c);
            }
            Sample {
                pixels: planar(&rgb, size, 0.0),
                boxes,
                classes,
                image_id: im.image_id,
                scale: [im.scale[0] * fx, im.scale[1] * fy],
                gt: im.gt.clone(),
                file_name: im.file_name.clone(),
                orig_size: im.orig_size,
            }
        })
        .collect();
    dataset(samples, size, src)
}

/// Every image whole at its working scale, on a grey (`0.5`) square canvas whose side is the
/// largest image side rounded up to a multiple of 32 (the coarsest stride): evaluation of large
/// images at the resolution the model was trained on with crops.
pub fn padded(src: &SourceSet) -> Dataset {
    let side = src
        .images
        .iter()
        .map(|im| im.rgb.width().max(im.rgb.height()) as usize)
        .max()
        .unwrap_or(32)
        .div_ceil(32)
        * 32;
    let samples = src
        .images
        .iter()
        .map(|im| Sample {
            pixels: planar(&im.rgb, side, 0.5),
            boxes: im.boxes.clone(),
            classes: im.classes.clone(),
            image_id: im.image_id,
            scale: im.scale,
            gt: im.gt.clone(),
            file_name: im.file_name.clone(),
            orig_size: im.orig_size,
        })
        .collect();
    dataset(samples, side, src)
}

/// `n` random `size × size` crops of the images, each image drawn with probability
/// proportional to its area, then one of the 8 flips / 90° rotations at random. A box is kept
/// (clipped to the crop) when at least half of its area is inside; outside the image the crop is
/// grey. Deterministic in `seed`.
pub fn random_crops(src: &SourceSet, size: usize, n: usize, seed: u64) -> Result<Dataset> {
    ensure!(!src.images.is_empty(), "no training images to crop");
    let mut rng = Rng::new(seed);
    let areas: Vec<f64> = src
        .images
        .iter()
        .map(|im| im.rgb.width() as f64 * im.rgb.height() as f64)
        .collect();
    let total: f64 = areas.iter().sum();
    let s = size;
    let sf = s as f32;
    let mut samples = Vec::with_capacity(n);
    for k in 0..n {
        let r = rng.f32() as f64 * total;
        let mut acc = 0.0;
        let mut pick = src.images.len() - 1;
        for (i, a) in areas.iter().enumerate() {
            acc += a;
            if r < acc {
                pick = i;
                break;
            }
        }
        let im = &src.images[pick];
        let (w, h) = (im.rgb.width() as usize, im.rgb.height() as usize);
        let x0 = if w > s { rng.below(w - s + 1) } else { 0 };
        let y0 = if h > s { rng.below(h - s + 1) } else { 0 };
        let t = rng.below(8);
        let (transpose, fx, fy) = (t & 4 != 0, t & 1 != 0, t & 2 != 0);
        // pixel (x, y) of the crop goes to (x', y'): transpose first, then the flips
        let map = |x: usize, y: usize| {
            let (x, y) = if transpose { (y, x) } else { (x, y) };
            (
                if fx { s - 1 - x } else { x },
                if fy { s - 1 - y } else { y },
            )
        };
        let mut px = vec![0.5f32; 3 * s * s];
        for y in 0..s {
            for x in 0..s {
                let (ix, iy) = (x0 + x, y0 + y);
                if ix < w && iy < h {
                    let p = im.rgb.get_pixel(ix as u32, iy as u32);
                    let (xo, yo) = map(x, y);
                    for c in 0..3 {
                        px[c * s * s + yo * s + xo] = p[c] as f32 / 255.0;
                    }
                }
            }
        }
        let mut boxes = Vec::new();
        let mut classes = Vec::new();
        for (b, &c) in im.boxes.iter().zip(&im.classes) {
            let b = [
                b[0] - x0 as f32,
                b[1] - y0 as f32,
                b[2] - x0 as f32,
                b[3] - y0 as f32,
            ];
            let cb = [
                b[0].clamp(0.0, sf),
                b[1].clamp(0.0, sf),
                b[2].clamp(0.0, sf),
                b[3].clamp(0.0, sf),
            ];
            let area = (b[2] - b[0]) * (b[3] - b[1]);
            let inside = (cb[2] - cb[0]).max(0.0) * (cb[3] - cb[1]).max(0.0);
            if inside < 0.5 * area || cb[2] - cb[0] < 2.0 || cb[3] - cb[1] < 2.0 {
                continue;
            }
            let mut o = if transpose {
                [cb[1], cb[0], cb[3], cb[2]]
            } else {
                cb
            };
            if fx {
                o = [sf - o[2], o[1], sf - o[0], o[3]];
            }
            if fy {
                o = [o[0], sf - o[3], o[2], sf - o[1]];
            }
            boxes.push(o);
            classes.push(c);
        }
        let gt = boxes
            .iter()
            .zip(&classes)
            .map(|(b, &c)| {
                CocoGt::from_xywh(k as u64 + 1, src.category_ids[c as usize], xyxy_to_xywh(*b))
            })
            .collect();
        samples.push(Sample {
            pixels: px,
            boxes,
            classes,
            image_id: k as u64 + 1,
            scale: [1.0, 1.0],
            gt,
            file_name: format!("crop{k}-of-{}", im.file_name),
            orig_size: [s as u32, s as u32],
        });
    }
    Ok(dataset(samples, size, src))
}

/// `[x1, y1, x2, y2]` (f32) to COCO `[x, y, w, h]` (f64).
fn xyxy_to_xywh(b: [f32; 4]) -> [f64; 4] {
    candle_detloss::metrics::xyxy_to_xywh(b)
}

/// The ground truth of `ds` as a COCO detection file (`images` with `file_name`, `width`,
/// `height`; `annotations` with `bbox`, `area`, `iscrowd: 0`; `categories`), the file
/// `pycocotools.coco.COCO` reads: the same boxes and areas the crate's evaluator scores.
pub fn coco_gt_json(ds: &Dataset) -> serde_json::Value {
    let images: Vec<serde_json::Value> = ds
        .samples
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.image_id, "file_name": s.file_name,
                "width": s.orig_size[0], "height": s.orig_size[1],
            })
        })
        .collect();
    let mut anns = Vec::new();
    for s in &ds.samples {
        for g in &s.gt {
            anns.push(serde_json::json!({
                "id": anns.len() + 1, "image_id": g.image_id, "category_id": g.category_id,
                "bbox": g.bbox, "area": g.area, "iscrowd": 0,
            }));
        }
    }
    let cats: Vec<serde_json::Value> = ds
        .category_ids
        .iter()
        .zip(&ds.class_names)
        .map(|(id, n)| serde_json::json!({"id": id, "name": n}))
        .collect();
    serde_json::json!({"images": images, "annotations": anns, "categories": cats})
}

/// A sample's pixels as an 8-bit RGB image (each value rounded to the nearest of 256 levels).
pub fn to_rgb8(s: &Sample, size: usize) -> image::RgbImage {
    let n = size * size;
    image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let i = y as usize * size + x as usize;
        let c = |ch: usize| (s.pixels[ch * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([c(0), c(1), c(2)])
    })
}

/// Writes `ds` as a COCO dataset: `dir/images/<file_name>` (PNG) and `dir/<json_name>`.
pub fn export_coco(ds: &Dataset, dir: &Path, json_name: &str) -> Result<()> {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let pb = progress(ds.samples.len(), &format!("writing {json_name} images"));
    for s in &ds.samples {
        let p = img_dir.join(&s.file_name);
        to_rgb8(s, ds.size)
            .save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let p = dir.join(json_name);
    let text = serde_json::to_string(&coco_gt_json(ds))?;
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}
