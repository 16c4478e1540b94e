//! Trains a small RetinaNet with the losses of candle-detloss and evaluates it with COCO mAP.
//!
//! ```text
//! cargo run --release --example retinanet                      # built-in shapes, focal + smooth L1
//! cargo run --release --example retinanet -- --quick           # < 1 minute smoke run
//! cargo run --release --example retinanet -- --cls-loss ap --box-loss giou
//! cargo run --release --example retinanet -- --compare         # one run per classification loss
//! cargo run --release --example retinanet -- --coco ann.json --images DIR
//! cargo run --release --example retinanet -- --voc DIR --val-voc DIR2 --crops 256 --image-size 256
//! cargo run --release --example retinanet -- --export-coco DIR # procedural data as PNG + COCO JSON
//! ```
//!
//! Outputs go to `runs/<name>/`: `metrics.json`, `loss.png`, `detections.png`,
//! `detections.json` (COCO results), `val_gt.json` (the validation ground truth as a COCO file,
//! for pycocotools) and `checkpoint.safetensors` (+ `checkpoint.json`).
//! Run with `--help` for every flag.

mod data;
mod model;
mod plot;
mod train;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use candle_detloss::anchors::AnchorGenerator;
use candle_detloss::metrics::{results_json, CocoStats};
use clap::Parser;
use data::{Dataset, Rng, ShapesConfig, SourceSet};
use model::ModelConfig;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;
use train::{BoxLossKind, ClsLossKind, TrainConfig, Trainer};

const DATA: &str = "Data (default: built-in procedural shapes, generated from --seed)";
const TRAINING: &str = "Training";
const OUTPUT: &str = "Output";

fn parse_cls(s: &str) -> std::result::Result<ClsLossKind, String> {
    ClsLossKind::parse(s).map_err(|e| e.to_string())
}

fn parse_box(s: &str) -> std::result::Result<BoxLossKind, String> {
    BoxLossKind::parse(s).map_err(|e| e.to_string())
}

/// retinanet: train a small RetinaNet with candle-detloss losses, evaluate with COCO mAP
#[derive(Parser, Clone, Debug)]
#[command(name = "retinanet", disable_version_flag = true)]
struct Args {
    /// COCO annotations JSON (with --images DIR); last 10% of images = val unless --val-coco
    #[arg(long, value_name = "FILE", help_heading = DATA, requires = "images", conflicts_with = "voc")]
    coco: Option<PathBuf>,
    /// image folder of --coco (and of --val-coco)
    #[arg(long, value_name = "DIR", help_heading = DATA, requires = "coco")]
    images: Option<PathBuf>,
    /// COCO annotations JSON of the validation images (in --images), classes of --coco
    #[arg(long, value_name = "FILE", help_heading = DATA, requires = "coco")]
    val_coco: Option<PathBuf>,
    /// Pascal VOC folder: *.xml annotations with their images (<filename>, else the .xml's
    /// stem with .png/.jpg); last 10% of the files (by name) = val unless --val-voc
    #[arg(long, value_name = "DIR", help_heading = DATA)]
    voc: Option<PathBuf>,
    /// Pascal VOC folder of the validation images (classes of --voc)
    #[arg(long, value_name = "DIR", help_heading = DATA, requires = "voc")]
    val_voc: Option<PathBuf>,
    /// train on N random --image-size crops of the --coco / --voc images per epoch (new crops,
    /// flips and 90° turns every epoch) instead of resizing whole images; validation images
    /// are then evaluated whole at --scale, padded to a multiple of 32   [default 0: resize]
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true, help_heading = DATA)]
    crops: usize,
    /// resample the --coco / --voc images by F before cropping (with --crops)   [default 1]
    #[arg(long, value_name = "F", default_value_t = 1.0, hide_default_value = true, help_heading = DATA)]
    scale: f32,
    /// procedural training images            [default 2000; quick 192]
    #[arg(long, value_name = "N", help_heading = DATA)]
    train_size: Option<usize>,
    /// procedural validation images          [default 300;  quick 48]
    #[arg(long, value_name = "N", help_heading = DATA)]
    val_size: Option<usize>,
    /// square input side in pixels (with --crops: the crop side)   [default 64]
    #[arg(long, value_name = "S", default_value_t = 64, hide_default_value = true, help_heading = DATA)]
    image_size: usize,
    /// write the procedural train / val images as PNG plus COCO JSON (DIR/images,
    /// DIR/train.json, DIR/val.json) and exit; train on them with --coco DIR/train.json
    /// --val-coco DIR/val.json --images DIR/images
    #[arg(long, value_name = "DIR", help_heading = DATA)]
    export_coco: Option<PathBuf>,

    /// focal | cb-focal | ap | ce | ghmc      [focal]
    #[arg(long = "cls-loss", value_name = "L", value_parser = parse_cls, default_value = "focal", hide_default_value = true, help_heading = TRAINING)]
    cls: ClsLossKind,
    /// smooth-l1 | balanced-l1 | giou | diou | ciou   [smooth-l1]
    #[arg(long = "box-loss", value_name = "L", value_parser = parse_box, default_value = "smooth-l1", hide_default_value = true, help_heading = TRAINING)]
    reg: BoxLossKind,
    /// [default 10; quick 3]; 0 evaluates the untrained model (the baseline)
    #[arg(long, value_name = "N", help_heading = TRAINING)]
    epochs: Option<usize>,
    /// [default 8]
    #[arg(long, value_name = "N", default_value_t = 8, hide_default_value = true, help_heading = TRAINING)]
    batch_size: usize,
    /// AdamW peak learning rate               [default 2e-3]
    #[arg(long, value_name = "F", default_value_t = 2e-3, hide_default_value = true, help_heading = TRAINING)]
    lr: f64,
    /// FPN / head channels                    [default 48; quick 32]
    #[arg(long, value_name = "N", help_heading = TRAINING)]
    width: Option<usize>,
    /// anchor base sizes at strides 8, 16, 32 (each × 1 and √2, ratios 0.5 / 1 / 2)
    /// [default 16,32,64]
    #[arg(long, value_name = "A,B,C", value_delimiter = ',', default_value = "16,32,64", hide_default_value = true, help_heading = TRAINING)]
    anchor_sizes: Vec<f32>,
    /// data, init and shuffling seed          [default 0]
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true, help_heading = TRAINING)]
    seed: u64,
    /// cpu | cuda   [cpu]
    #[arg(long, value_name = "cpu|cuda", default_value = "cpu", hide_default_value = true, help_heading = TRAINING)]
    device: String,
    /// CPU threads (else RAYON_NUM_THREADS, else 1: candle's CPU pool spin-waits, so on a busy
    /// 2-core machine 1 thread trains ~3x faster than 2; on an idle many-core machine raise it)
    #[arg(long, value_name = "N", help_heading = TRAINING)]
    threads: Option<usize>,
    /// load weights (and the step, from the .json beside it) and continue
    #[arg(long, value_name = "FILE", help_heading = TRAINING)]
    resume: Option<PathBuf>,
    /// tiny run for CI smoke tests (< 1 minute)
    #[arg(long, help_heading = TRAINING)]
    quick: bool,
    /// train once per classification loss, print and write a table
    #[arg(long, help_heading = TRAINING)]
    compare: bool,

    /// run folder runs/NAME                   [<cls>-<box>, quick-..., compare]
    #[arg(long, value_name = "NAME", help_heading = OUTPUT)]
    name: Option<String>,
    /// parent of run folders                  [runs]
    #[arg(long, value_name = "DIR", default_value = "runs", hide_default_value = true, help_heading = OUTPUT)]
    out: PathBuf,
    /// score threshold of the predictions drawn in detections.png   [0.3]
    #[arg(long, value_name = "F", default_value_t = 0.3, hide_default_value = true, help_heading = OUTPUT)]
    show_score: f32,
}

/// The settings after `--quick` and the defaults are applied.
#[derive(Clone, Debug)]
struct Settings {
    args: Args,
    train_size: usize,
    val_size: usize,
    epochs: usize,
    width: usize,
}

impl std::ops::Deref for Settings {
    type Target = Args;
    fn deref(&self) -> &Args {
        &self.args
    }
}

fn settings() -> Result<Settings> {
    let a = Args::parse();
    let q = a.quick;
    let s = Settings {
        train_size: a.train_size.unwrap_or(if q { 192 } else { 2000 }),
        val_size: a.val_size.unwrap_or(if q { 48 } else { 300 }),
        epochs: a.epochs.unwrap_or(if q { 3 } else { 10 }),
        width: a.width.unwrap_or(if q { 32 } else { 48 }),
        args: a,
    };
    if s.image_size < 32 || !s.image_size.is_multiple_of(32) {
        bail!("--image-size must be a multiple of 32 (the coarsest level has stride 32)")
    }
    ensure!(s.batch_size > 0, "--batch-size must be > 0");
    ensure!(
        s.anchor_sizes.len() == 3 && s.anchor_sizes.iter().all(|v| v.is_finite() && *v > 0.0),
        "--anchor-sizes needs three positive sizes (strides 8, 16, 32), got {:?}",
        s.anchor_sizes
    );
    ensure!(
        s.scale.is_finite() && s.scale > 0.0,
        "--scale must be > 0, got {}",
        s.scale
    );
    if s.scale != 1.0 && s.crops == 0 {
        bail!("--scale applies to --crops training; without --crops images are resized to --image-size")
    }
    if s.crops > 0 && s.coco.is_none() && s.voc.is_none() {
        bail!("--crops needs --coco or --voc images (the procedural images are already small)")
    }
    if s.crops > 0 && s.crops < s.batch_size {
        bail!(
            "--crops {} is less than one batch ({})",
            s.crops,
            s.batch_size
        )
    }
    if s.epochs == 0 && s.compare {
        bail!("--epochs 0 (evaluate the untrained model) does not go with --compare")
    }
    Ok(s)
}

fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context(
            "--device cuda: build with `--features cuda` on a machine with an NVIDIA GPU",
        )?,
        _ => bail!("--device must be cpu or cuda, got {name:?}"),
    })
}

/// Anchors: strides 8/16/32 with base sizes `sizes` (default 16/32/64, 2× the stride), 3 ratios
/// × 2 scales.
fn anchor_config(sizes: &[f32]) -> AnchorGenerator {
    AnchorGenerator {
        strides: vec![8, 16, 32],
        sizes: sizes.to_vec(),
        ratios: vec![0.5, 1.0, 2.0],
        scales: vec![1.0, 2f32.powf(0.5)],
        offset: 0.5,
    }
}

/// Training images: a fixed set, or new random crops of loaded images every epoch.
enum TrainData {
    Fixed(Dataset),
    Crops {
        src: SourceSet,
        size: usize,
        n: usize,
        seed: u64,
    },
}

impl TrainData {
    /// The training images of `epoch`.
    fn epoch(&self, epoch: usize) -> Result<Cow<'_, Dataset>> {
        Ok(match self {
            TrainData::Fixed(ds) => Cow::Borrowed(ds),
            TrainData::Crops { src, size, n, seed } => Cow::Owned(data::random_crops(
                src,
                *size,
                *n,
                seed.wrapping_mul(7919).wrapping_add(epoch as u64),
            )?),
        })
    }

    fn is_crops(&self) -> bool {
        matches!(self, TrainData::Crops { .. })
    }
}

fn boxes_of(ds: &Dataset) -> usize {
    ds.samples.iter().map(|s| s.gt.len()).sum()
}

/// Loads or generates the training and validation data.
fn load_data(a: &Settings) -> Result<(TrainData, Dataset)> {
    let ann = match (&a.coco, &a.images, &a.voc) {
        (Some(ann), Some(dir), _) => Some(data::read_coco(ann, dir)?),
        (_, _, Some(dir)) => Some(data::read_voc(dir, None)?),
        _ => None,
    };
    let Some(ann) = ann else {
        let cfg = ShapesConfig::new(a.image_size);
        let train = data::shapes_dataset(&cfg, a.train_size, a.seed.wrapping_mul(2) + 1, 1);
        let val = data::shapes_dataset(&cfg, a.val_size, a.seed.wrapping_mul(2) + 2, 1_000_001);
        return Ok((TrainData::Fixed(train), val));
    };
    let cats = ann.categories.clone();
    let val_ann = match (&a.val_coco, &a.images, &a.val_voc) {
        (Some(f), Some(dir), _) => Some(data::read_coco(f, dir)?),
        (_, _, Some(dir)) => Some(data::read_voc(dir, Some(&cats))?),
        _ => None,
    };
    let scale = if a.crops > 0 { a.scale } else { 1.0 };
    let train_src = data::decode(&ann, &cats, scale)?;
    let (train_src, val_src) = match val_ann {
        Some(v) => (train_src, data::decode(&v, &cats, scale)?),
        None => train_src.split_last(0.1)?,
    };
    let n_box = |s: &SourceSet| s.images.iter().map(|i| i.boxes.len()).sum::<usize>();
    println!(
        "data: {} training images ({} boxes), {} validation images ({} boxes), classes {:?}",
        train_src.images.len(),
        n_box(&train_src),
        val_src.images.len(),
        n_box(&val_src),
        train_src.class_names
    );
    if a.crops > 0 {
        let val = data::padded(&val_src);
        println!(
            "training on {} random {}x{} crops per epoch at scale {}; validation images whole, padded to {}x{}",
            a.crops, a.image_size, a.image_size, a.scale, val.size, val.size
        );
        Ok((
            TrainData::Crops {
                src: train_src,
                size: a.image_size,
                n: a.crops,
                seed: a.seed,
            },
            val,
        ))
    } else {
        Ok((
            TrainData::Fixed(data::resized(&train_src, a.image_size)),
            data::resized(&val_src, a.image_size),
        ))
    }
}

/// `--export-coco DIR`: the procedural train / val sets as PNG files plus COCO JSON.
fn export(a: &Settings, dir: &Path) -> Result<()> {
    let (train, val) = load_data(a)?;
    let TrainData::Fixed(train) = train else {
        bail!("--export-coco writes the procedural data only")
    };
    data::export_coco(&train, dir, "train.json")?;
    data::export_coco(&val, dir, "val.json")?;
    let d = dir.display();
    println!(
        "wrote {} training and {} validation images to {d}/images, annotations {d}/train.json, {d}/val.json\n\
         train on them: cargo run --release --example retinanet -- --coco {d}/train.json --val-coco {d}/val.json --images {d}/images",
        train.samples.len(),
        val.samples.len(),
    );
    Ok(())
}

/// Result of one training run.
struct RunResult {
    stats: CocoStats,
    secs: f64,
    ms_per_iter: f64,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn floats(v: &[f32]) -> String {
    let s: Vec<String> = v.iter().map(|x| format!("{x:.5}")).collect();
    format!("[{}]", s.join(", "))
}

fn run(
    a: &Settings,
    cls: ClsLossKind,
    dir: &Path,
    train_data: &TrainData,
    val_ds: &Dataset,
) -> Result<RunResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dev = device(&a.device)?;
    let first = train_data.epoch(0)?;
    let steps_per_epoch = (first.samples.len() / a.batch_size).max(1);
    let total_steps = steps_per_epoch * a.epochs;
    let cfg = TrainConfig {
        cls,
        reg: a.reg,
        model: ModelConfig {
            num_classes: 0, // set from the data
            num_anchors: 0, // set from the anchors
            stem: if a.quick { 8 } else { 16 },
            widths: if a.quick { [16, 32, 32] } else { [32, 64, 64] },
            fpn: a.width,
            head_convs: 2,
            prior: 0.01,
        },
        anchors: anchor_config(&a.anchor_sizes),
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: 1e-4,
        warmup_steps: (total_steps / 10).clamp(1, 150),
        total_steps,
        seed: a.seed,
    };
    let mut t = Trainer::new(cfg, &first, &dev)?;
    let mut start_epoch = 0;
    if let Some(ck) = &a.resume {
        t.varmap
            .load(ck)
            .with_context(|| format!("loading checkpoint {}", ck.display()))?;
        let meta = ck.with_extension("json");
        if let Ok(text) = std::fs::read_to_string(&meta) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", meta.display()))?;
            t.step = v["step"].as_u64().unwrap_or(0) as usize;
            start_epoch = v["epoch"].as_u64().unwrap_or(0) as usize;
        }
        println!(
            "resumed from {} at epoch {start_epoch}, step {} (AdamW moments restart)",
            ck.display(),
            t.step
        );
    }
    println!(
        "training {} + {} on {} images of {}x{} ({} anchors/image), {} epochs × {} steps, batch {}",
        cls.name(),
        a.reg.name(),
        first.samples.len(),
        first.size,
        first.size,
        t.anchors.len(),
        a.epochs,
        steps_per_epoch,
        a.batch_size
    );
    drop(first);
    let pb = data::progress(
        (a.epochs - start_epoch.min(a.epochs)) * steps_per_epoch,
        "training",
    );
    let (mut h_tot, mut h_cls, mut h_box) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    let mut train_secs = 0.0;
    let mut iters = 0usize;
    let ck_path = dir.join("checkpoint.safetensors");
    for epoch in start_epoch..a.epochs {
        let train_ds = train_data.epoch(epoch)?;
        if train_data.is_crops() {
            t.set_targets(&train_ds)?;
        }
        let mut order: Vec<usize> = (0..train_ds.samples.len()).collect();
        Rng::new(a.seed.wrapping_add(1000 + epoch as u64)).shuffle(&mut order);
        let te = Instant::now();
        let (mut s_tot, mut n) = (0f64, 0usize);
        for b in 0..steps_per_epoch {
            let idx = &order[b * a.batch_size..((b + 1) * a.batch_size).min(order.len())];
            let ts = Instant::now();
            let l = t.train_step(&train_ds, idx).inspect_err(|_| pb.abandon())?;
            train_secs += ts.elapsed().as_secs_f64();
            iters += 1;
            h_tot.push(l.total);
            h_cls.push(l.cls);
            h_box.push(l.reg);
            s_tot += l.total as f64;
            n += 1;
            let ips = (n * a.batch_size) as f64 / te.elapsed().as_secs_f64();
            pb.set_message(format!(
                "ep {}/{} loss {:.4} cls {:.4} box {:.4} pos {} lr {:.1e} {:.0} img/s",
                epoch + 1,
                a.epochs,
                l.total,
                l.cls,
                l.reg,
                l.num_pos,
                l.lr,
                ips
            ));
            pb.inc(1);
        }
        let line = format!(
            "epoch {:>3}: mean loss {:.4} ({:.1}s, {:.1} img/s)",
            epoch + 1,
            s_tot / n.max(1) as f64,
            te.elapsed().as_secs_f64(),
            (n * a.batch_size) as f64 / te.elapsed().as_secs_f64()
        );
        if pb.is_hidden() {
            println!("{line}"); // no terminal (CI, a pipe): plain lines
        } else {
            pb.println(line);
        }
        t.varmap.save(&ck_path)?;
        write(
            &ck_path.with_extension("json"),
            &format!("{{\"epoch\": {}, \"step\": {}}}\n", epoch + 1, t.step),
        )?;
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let te = Instant::now();
    // about as many pixels per evaluation batch as 64 images of 64×64
    let eval_batch = (64 * 64 * 64 / (val_ds.size * val_ds.size)).clamp(1, 64);
    let (stats, dets, per_image) = train::evaluate(&t, val_ds, eval_batch)?;
    let eval_secs = te.elapsed().as_secs_f64();
    print!("{}", stats.summary());
    let ms_per_iter = 1000.0 * train_secs / iters.max(1) as f64;
    println!(
        "{} + {}: AP {:.3} AP50 {:.3} AP75 {:.3} | train {:.1}s ({:.0} ms/iter), eval {:.1}s",
        cls.name(),
        a.reg.name(),
        stats.ap,
        stats.ap50,
        stats.ap75,
        secs,
        ms_per_iter,
        eval_secs
    );
    write(&dir.join("detections.json"), &results_json(&dets))?;
    write(
        &dir.join("val_gt.json"),
        &serde_json::to_string(&data::coco_gt_json(val_ds))?,
    )?;
    let run_name = dir
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    plot::loss_png(
        &dir.join("loss.png"),
        &plot::LossCurves {
            title: format!(
                "{run_name}: training loss, {} + {}, {} epochs",
                cls.name(),
                a.reg.name(),
                a.epochs
            ),
            total: &h_tot,
            cls: &h_cls,
            reg: &h_box,
            cls_name: cls.name(),
            box_name: a.reg.name(),
            steps_per_epoch,
            first_epoch: start_epoch,
            batch_size: a.batch_size,
        },
    )?;
    let cols = val_ds.samples.len().clamp(1, 4);
    plot::detections_png(
        &dir.join("detections.png"),
        &plot::DetectionGrid {
            ds: val_ds,
            dets: &per_image,
            cols,
            rows: 4,
            zoom: (1024 / (cols * val_ds.size)).clamp(1, 4) as u32,
            min_score: a.show_score,
            title: format!("{run_name} (AP {:.3}, AP50 {:.3})", stats.ap, stats.ap50),
        },
    )?;
    let metrics = format!(
        "{{\n\"cls_loss\": \"{}\", \"box_loss\": \"{}\", \"epochs\": {}, \"batch_size\": {}, \"lr\": {},\n\
         \"seed\": {}, \"image_size\": {}, \"train_images\": {}, \"val_images\": {}, \"iterations\": {},\n\
         \"crops\": {}, \"scale\": {}, \"anchor_sizes\": {}, \"val_image_size\": {},\n\
         \"train_seconds\": {:.3}, \"ms_per_iter\": {:.3}, \"images_per_second\": {:.2}, \"eval_seconds\": {:.3},\n\
         \"coco\": {},\n\"loss\": {{\"total\": {}, \"cls\": {}, \"box\": {}}}\n}}\n",
        cls.name(),
        a.reg.name(),
        a.epochs,
        a.batch_size,
        a.lr,
        a.seed,
        a.image_size,
        steps_per_epoch * a.batch_size,
        val_ds.samples.len(),
        iters,
        a.crops,
        a.scale,
        floats(&a.anchor_sizes),
        val_ds.size,
        secs,
        ms_per_iter,
        (iters * a.batch_size) as f64 / train_secs.max(1e-9),
        eval_secs,
        stats.to_json(),
        floats(&h_tot),
        floats(&h_cls),
        floats(&h_box)
    );
    write(&dir.join("metrics.json"), &metrics)?;
    println!(
        "wrote {}/{{metrics.json, loss.png, detections.png, detections.json, val_gt.json, checkpoint.safetensors}}",
        dir.display()
    );
    println!(
        "validation: {} images, {} ground-truth boxes",
        val_ds.samples.len(),
        boxes_of(val_ds)
    );
    Ok(RunResult {
        stats,
        secs,
        ms_per_iter,
    })
}

fn main() -> Result<()> {
    let a = settings()?;
    // candle asks for the thread count on every op and, when RAYON_NUM_THREADS is unset, parses
    // /proc/cpuinfo each time (~10% of a training step): pin it once, before any pool starts.
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    if let Some(dir) = &a.export_coco {
        return export(&a, dir);
    }
    let (train_data, val_ds) = load_data(&a)?;
    let default_name = if a.compare {
        "compare".to_string()
    } else {
        format!("{}-{}", a.cls.name(), a.reg.name())
    };
    let name = a.name.clone().unwrap_or(if a.quick {
        format!("quick-{default_name}")
    } else {
        default_name
    });
    let dir = a.out.join(name);
    if !a.compare {
        run(&a, a.cls, &dir, &train_data, &val_ds)?;
        return Ok(());
    }
    let mut rows = Vec::new();
    for cls in ClsLossKind::ALL {
        println!("\n=== --cls-loss {} ===", cls.name());
        match run(&a, cls, &dir.join(cls.name()), &train_data, &val_ds) {
            Ok(r) => rows.push((cls, Some(r), String::new())),
            Err(e) => {
                println!("{}: skipped: {e:#}", cls.name());
                rows.push((cls, None, format!("{e:#}")));
            }
        }
    }
    let mut md = String::from(
        "| cls loss | box loss | AP | AP50 | AP75 | time/iter (ms) | train (s) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut js = String::from("[\n");
    for (i, (cls, r, err)) in rows.iter().enumerate() {
        match r {
            Some(r) => {
                md += &format!(
                    "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} |\n",
                    cls.name(),
                    a.reg.name(),
                    r.stats.ap,
                    r.stats.ap50,
                    r.stats.ap75,
                    r.ms_per_iter,
                    r.secs
                );
                js += &format!(
                    "  {{\"cls_loss\": \"{}\", \"box_loss\": \"{}\", \"AP\": {}, \"AP50\": {}, \"AP75\": {}, \"ms_per_iter\": {:.3}, \"train_seconds\": {:.3}}}",
                    cls.name(), a.reg.name(), r.stats.ap, r.stats.ap50, r.stats.ap75, r.ms_per_iter, r.secs
                );
            }
            None => {
                md += &format!(
                    "| {} | {} | n/a | n/a | n/a | n/a | n/a |\n",
                    cls.name(),
                    a.reg.name()
                );
                js += &format!(
                    "  {{\"cls_loss\": \"{}\", \"box_loss\": \"{}\", \"error\": {:?}}}",
                    cls.name(),
                    a.reg.name(),
                    err
                );
            }
        }
        js += if i + 1 < rows.len() { ",\n" } else { "\n" };
    }
    js += "]\n";
    println!("\n{md}");
    std::fs::create_dir_all(&dir)?;
    write(&dir.join("compare.md"), &md)?;
    write(&dir.join("compare.json"), &js)?;
    println!("wrote {}/compare.{{md,json}}", dir.display());
    Ok(())
}
