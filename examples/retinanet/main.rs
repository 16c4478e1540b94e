//! Trains a small RetinaNet with the losses of candle-detloss and evaluates it with COCO mAP.
//!
//! ```text
//! cargo run --release --example retinanet                      # built-in shapes, focal + smooth L1
//! cargo run --release --example retinanet -- --quick           # < 1 minute smoke run
//! cargo run --release --example retinanet -- --cls-loss ap --box-loss giou
//! cargo run --release --example retinanet -- --compare         # one run per classification loss
//! cargo run --release --example retinanet -- --coco ann.json --images DIR
//! ```
//!
//! Outputs go to `runs/<name>/`: `metrics.json`, `loss.png`, `detections.png`,
//! `detections.json` (COCO results) and `checkpoint.safetensors` (+ `checkpoint.json`).
//! Run with `--help` for every flag.

mod data;
mod model;
mod plot;
mod train;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_detloss::anchors::AnchorGenerator;
use candle_detloss::metrics::{results_json, CocoStats};
use data::{Dataset, Rng, ShapesConfig};
use model::ModelConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;
use train::{BoxLossKind, ClsLossKind, TrainConfig, Trainer};

const HELP: &str = "\
retinanet: train a small RetinaNet with candle-detloss losses, evaluate with COCO mAP

Data (default: built-in procedural shapes, generated from --seed):
  --coco FILE            COCO annotations JSON (with --images DIR); last 10% of images = val
  --images DIR           image folder of --coco
  --train-size N         procedural training images            [default 2000; quick 192]
  --val-size N           procedural validation images          [default 300;  quick 48]
  --image-size S         square input side in pixels           [default 64]
Training:
  --cls-loss L           focal | cb-focal | ap | ce | ghmc      [focal]
  --box-loss L           smooth-l1 | balanced-l1 | giou | diou | ciou   [smooth-l1]
  --epochs N             [default 10; quick 3]
  --batch-size N         [default 8]
  --lr F                 AdamW peak learning rate               [default 2e-3]
  --width N              FPN / head channels                    [default 48]
  --seed N               data, init and shuffling seed          [default 0]
  --device cpu|cuda      [cpu]
  --threads N            CPU threads (else RAYON_NUM_THREADS, else 1: candle's CPU pool
                         spin-waits, so on a busy 2-core machine 1 thread trains ~3x faster
                         than 2; on an idle many-core machine raise it)
  --resume FILE          load weights (and the step, from the .json beside it) and continue
  --quick                tiny run for CI smoke tests (< 1 minute)
  --compare              train once per classification loss, print and write a table
Output:
  --name NAME            run folder runs/NAME                   [<cls>-<box>, quick-..., compare]
  --out DIR              parent of run folders                  [runs]
";

#[derive(Clone, Debug)]
struct Args {
    coco: Option<String>,
    images: Option<String>,
    train_size: usize,
    val_size: usize,
    image_size: usize,
    cls: ClsLossKind,
    reg: BoxLossKind,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    width: usize,
    seed: u64,
    threads: Option<usize>,
    device: String,
    resume: Option<String>,
    quick: bool,
    compare: bool,
    name: Option<String>,
    out: String,
}

fn parse_args() -> Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let quick = argv.iter().any(|a| a == "--quick");
    let mut a = Args {
        coco: None,
        images: None,
        train_size: if quick { 192 } else { 2000 },
        val_size: if quick { 48 } else { 300 },
        image_size: 64,
        cls: ClsLossKind::Focal,
        reg: BoxLossKind::SmoothL1,
        epochs: if quick { 3 } else { 10 },
        batch_size: 8,
        lr: 2e-3,
        width: if quick { 32 } else { 48 },
        seed: 0,
        threads: None,
        device: "cpu".into(),
        resume: None,
        quick,
        compare: false,
        name: None,
        out: "runs".into(),
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--quick" => {}
            "--compare" => a.compare = true,
            "--coco" => a.coco = Some(val()?),
            "--images" => a.images = Some(val()?),
            "--train-size" => a.train_size = val()?.parse()?,
            "--val-size" => a.val_size = val()?.parse()?,
            "--image-size" => a.image_size = val()?.parse()?,
            "--cls-loss" => a.cls = ClsLossKind::parse(&val()?)?,
            "--box-loss" => a.reg = BoxLossKind::parse(&val()?)?,
            "--epochs" => a.epochs = val()?.parse()?,
            "--batch-size" => a.batch_size = val()?.parse()?,
            "--lr" => a.lr = val()?.parse()?,
            "--width" => a.width = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--device" => a.device = val()?,
            "--threads" => a.threads = Some(val()?.parse()?),
            "--resume" => a.resume = Some(val()?),
            "--name" => a.name = Some(val()?),
            "--out" => a.out = val()?,
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    if a.coco.is_some() != a.images.is_some() {
        bail!("--coco and --images go together")
    }
    if a.image_size < 32 || !a.image_size.is_multiple_of(32) {
        bail!("--image-size must be a multiple of 32 (the coarsest level has stride 32)")
    }
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be > 0")
    }
    Ok(a)
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

/// Anchors for `size`-pixel inputs: strides 8/16/32, base sizes 2× the stride (16/32/64 at the
/// default 64-pixel images), 3 ratios × 2 scales.
fn anchor_config() -> AnchorGenerator {
    AnchorGenerator {
        strides: vec![8, 16, 32],
        sizes: vec![16.0, 32.0, 64.0],
        ratios: vec![0.5, 1.0, 2.0],
        scales: vec![1.0, 2f32.powf(0.5)],
        offset: 0.5,
    }
}

fn load_data(a: &Args) -> Result<(Dataset, Dataset)> {
    if let (Some(ann), Some(dir)) = (&a.coco, &a.images) {
        return data::load_coco(ann, dir, a.image_size, 0.1);
    }
    let cfg = ShapesConfig::new(a.image_size);
    let train = data::shapes_dataset(&cfg, a.train_size, a.seed.wrapping_mul(2) + 1, 1);
    let val = data::shapes_dataset(&cfg, a.val_size, a.seed.wrapping_mul(2) + 2, 1_000_001);
    Ok((train, val))
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
    a: &Args,
    cls: ClsLossKind,
    dir: &Path,
    train_ds: &Dataset,
    val_ds: &Dataset,
) -> Result<RunResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dev = device(&a.device)?;
    let steps_per_epoch = (train_ds.samples.len() / a.batch_size).max(1);
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
        anchors: anchor_config(),
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: 1e-4,
        warmup_steps: (total_steps / 10).clamp(1, 150),
        total_steps,
        seed: a.seed,
    };
    let mut t = Trainer::new(cfg, train_ds, &dev)?;
    let mut start_epoch = 0;
    if let Some(ck) = &a.resume {
        t.varmap
            .load(ck)
            .with_context(|| format!("loading checkpoint {ck}"))?;
        let meta = Path::new(ck).with_extension("json");
        if let Ok(text) = std::fs::read_to_string(&meta) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            t.step = v["step"].as_u64().unwrap_or(0) as usize;
            start_epoch = v["epoch"].as_u64().unwrap_or(0) as usize;
        }
        println!(
            "resumed from {ck} at epoch {start_epoch}, step {} (AdamW moments restart)",
            t.step
        );
    }
    println!(
        "training {} + {} on {} images ({} anchors/image), {} epochs × {} steps, batch {}",
        cls.name(),
        a.reg.name(),
        train_ds.samples.len(),
        t.anchors.len(),
        a.epochs,
        steps_per_epoch,
        a.batch_size
    );
    let pb = indicatif::ProgressBar::new(
        ((a.epochs - start_epoch.min(a.epochs)) * steps_per_epoch) as u64,
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut h_tot, mut h_cls, mut h_box) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    let mut train_secs = 0.0;
    let mut iters = 0usize;
    let ck_path = dir.join("checkpoint.safetensors");
    for epoch in start_epoch..a.epochs {
        let mut order: Vec<usize> = (0..train_ds.samples.len()).collect();
        Rng::new(a.seed.wrapping_add(1000 + epoch as u64)).shuffle(&mut order);
        let te = Instant::now();
        let (mut s_tot, mut n) = (0f64, 0usize);
        for b in 0..steps_per_epoch {
            let idx = &order[b * a.batch_size..((b + 1) * a.batch_size).min(order.len())];
            let ts = Instant::now();
            let l = t.train_step(train_ds, idx).inspect_err(|_| pb.abandon())?;
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
    let (stats, dets, per_image) = train::evaluate(&t, val_ds, 64)?;
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
    plot::loss_png(&h_tot, &h_cls, &h_box)
        .save(dir.join("loss.png"))
        .context("writing loss.png")?;
    plot::detections_png(val_ds, &per_image, 4, 4, 4, 0.3)
        .save(dir.join("detections.png"))
        .context("writing detections.png")?;
    let metrics = format!(
        "{{\n\"cls_loss\": \"{}\", \"box_loss\": \"{}\", \"epochs\": {}, \"batch_size\": {}, \"lr\": {},\n\
         \"seed\": {}, \"image_size\": {}, \"train_images\": {}, \"val_images\": {}, \"iterations\": {},\n\
         \"train_seconds\": {:.3}, \"ms_per_iter\": {:.3}, \"images_per_second\": {:.2}, \"eval_seconds\": {:.3},\n\
         \"coco\": {},\n\"loss\": {{\"total\": {}, \"cls\": {}, \"box\": {}}}\n}}\n",
        cls.name(),
        a.reg.name(),
        a.epochs,
        a.batch_size,
        a.lr,
        a.seed,
        a.image_size,
        train_ds.samples.len(),
        val_ds.samples.len(),
        iters,
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
    println!("wrote {}/{{metrics.json, loss.png, detections.png, detections.json, checkpoint.safetensors}}", dir.display());
    Ok(RunResult {
        stats,
        secs,
        ms_per_iter,
    })
}

fn main() -> Result<()> {
    let a = parse_args()?;
    // candle asks for the thread count on every op and, when RAYON_NUM_THREADS is unset, parses
    // /proc/cpuinfo each time (~10% of a training step): pin it once, before any pool starts.
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let (train_ds, val_ds) = load_data(&a)?;
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
    let dir = PathBuf::from(&a.out).join(name);
    if !a.compare {
        run(&a, a.cls, &dir, &train_ds, &val_ds)?;
        return Ok(());
    }
    let mut rows = Vec::new();
    for cls in ClsLossKind::ALL {
        println!("\n=== --cls-loss {} ===", cls.name());
        match run(&a, cls, &dir.join(cls.name()), &train_ds, &val_ds) {
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
