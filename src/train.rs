//! The training loop behind `bridge-train train`: memory-mapped data in shuffled batches
//! (from one or several folders of different latent sizes, each batch from one folder),
//! AdamW with warmup + cosine, dropout, optional flip augmentation and weight EMA, a
//! validation pass each epoch (per folder, and pooled over folders), and atomic
//! checkpoints that a resumed run continues from exactly.

use crate::bridge::{Bridge, BridgeOptions, init_weights};
use crate::checkpoint::{self, Checkpoint, SaveParts};
use crate::config::BridgeConfig;
use crate::data::{Dataset, epoch_batches, split};
use crate::error::{Error, ErrorKind, Result};
use crate::loss::LossWeights;
use crate::metrics::{Metrics, evaluate};
use crate::optim::OptimConfig;
use crate::rng::Rng;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainArgs {
    /// Data folders: one latent size each (aspect buckets when several).
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub config: BridgeConfig,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub warmup: i64,
    pub grad_clip: f32,
    pub val_count: usize,
    pub seed: u64,
    pub device: i32,
    pub resume: bool,
    pub freeze_backbone: bool,
    pub init_backbone: Option<PathBuf>,
    pub flip_aug: bool,
    pub ema: Option<f32>,
    /// Retrieval pool of the validation metrics.
    pub pool: usize,
    /// Also save `latest` every this many batches (0: at epoch ends only).
    pub save_every: usize,
    pub loss: LossWeights,
    pub progress: bool,
    /// Stop each epoch after this many batches (smoke tests, benchmarks).
    pub limit_batches: Option<usize>,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            data: Vec::new(),
            out: PathBuf::new(),
            config: BridgeConfig::default(),
            epochs: 10,
            batch: 32,
            lr: 3e-4,
            weight_decay: 0.05,
            warmup: 200,
            grad_clip: 1.0,
            val_count: 500,
            seed: 0,
            device: -1,
            resume: false,
            freeze_backbone: false,
            init_backbone: None,
            flip_aug: false,
            ema: None,
            pool: crate::metrics::DEFAULT_POOL,
            save_every: 200,
            loss: LossWeights::default(),
            progress: true,
            limit_batches: None,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Completed epochs (0: before training).
    pub epoch: usize,
    pub step: i64,
    pub train_loss: Option<f64>,
    pub lr: f32,
    pub samples_per_s: Option<f64>,
    pub seconds: f64,
    /// Steps skipped for a non-finite loss or gradient in this epoch.
    pub skipped_steps: usize,
    /// Data rows left out for non-finite values in this epoch.
    pub dropped_rows: usize,
    /// Validation: of the one folder, or pooled over the folders (weighted by rows; no
    /// retrieval@k, which is per folder).
    pub val: Metrics,
    pub val_ema: Option<Metrics>,
    /// Per folder, when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub val_folders: Vec<FolderMetrics>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub val_ema_folders: Vec<FolderMetrics>,
}

/// One folder's validation metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FolderMetrics {
    pub folder: String,
    /// Latent size `[H, W]` and token grid `[h, w]`.
    pub latent_size: [usize; 2],
    pub grid: [usize; 2],
    pub rows: usize,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// The data folders of a run, each split into training and validation rows.
struct Folders {
    sets: Vec<Dataset>,
    names: Vec<String>,
    train: Vec<Vec<usize>>,
    val: Vec<Vec<usize>>,
}

impl Folders {
    fn open(dirs: &[PathBuf], config: &BridgeConfig, val_count: usize, seed: u64) -> Result<Self> {
        if dirs.is_empty() {
            return Err(Error::invalid("--data: give at least one data folder"));
        }
        let mut f = Folders {
            sets: Vec::new(),
            names: Vec::new(),
            train: Vec::new(),
            val: Vec::new(),
        };
        for dir in dirs {
            let data = Dataset::open(dir, config)?;
            let (train, val) = split(data.len, val_count, seed);
            if train.is_empty() || val.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: {} rows cannot be split into training and {val_count} validation rows",
                    dir.display(),
                    data.len
                )));
            }
            f.names.push(dir.display().to_string());
            f.sets.push(data);
            f.train.push(train);
            f.val.push(val);
        }
        Ok(f)
    }

    /// Validation of `bridge` on every folder: the record's `val` and, with several
    /// folders, each folder's.
    fn evaluate(
        &self,
        bridge: &Bridge,
        batch: usize,
        pool: usize,
        weights: &LossWeights,
    ) -> Result<(Metrics, Vec<FolderMetrics>)> {
        let mut per = Vec::new();
        for (i, data) in self.sets.iter().enumerate() {
            let metrics = evaluate_rows(bridge, data, &self.val[i], batch, pool, weights)?;
            per.push(FolderMetrics {
                folder: self.names[i].clone(),
                latent_size: [data.latent_size.0, data.latent_size.1],
                grid: [data.grid.0, data.grid.1],
                rows: self.val[i].len(),
                metrics,
            });
        }
        if per.len() == 1 {
            return Ok((per.pop().unwrap().metrics, Vec::new()));
        }
        let parts: Vec<(usize, &Metrics)> = per.iter().map(|f| (f.rows, &f.metrics)).collect();
        Ok((Metrics::pooled(&parts), per))
    }
}

const PARAM_GROUP_BODY: [&str; 2] = ["backbone.", "head."];

/// Predictions for `rows` in batches, then the metrics against their targets.
pub fn evaluate_rows(
    bridge: &Bridge,
    data: &Dataset,
    rows: &[usize],
    batch: usize,
    pool: usize,
    weights: &LossWeights,
) -> Result<Metrics> {
    let mut preds = Vec::new();
    let mut targets = Vec::new();
    for chunk in rows.chunks(batch.max(1)) {
        let b = data.batch(chunk, None, bridge.device())?;
        if b.rows.is_empty() {
            continue;
        }
        preds.push(bridge.forward(&b.latents)?);
        targets.push(b.targets);
    }
    if preds.is_empty() {
        return Err(Error::shape("evaluation: no finite rows to evaluate"));
    }
    evaluate(
        &Tensor::cat(&preds, 0)?,
        &Tensor::cat(&targets, 0)?,
        weights,
        pool,
    )
}

fn bridge_options(args: &TrainArgs, config: BridgeConfig, total_steps: i64) -> BridgeOptions {
    BridgeOptions {
        config,
        loss: args.loss,
        optim: OptimConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            warmup_steps: args.warmup,
            total_steps,
            grad_clip: args.grad_clip,
            ..Default::default()
        },
        seed: args.seed,
        device: args.device,
        frozen_prefixes: if args.freeze_backbone {
            PARAM_GROUP_BODY.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

/// Fresh weights, with the body and head taken from `init_backbone` when given.
fn fresh_checkpoint(args: &TrainArgs) -> Result<Checkpoint> {
    let mut weights = init_weights(&args.config, args.seed)?;
    if let Some(path) = &args.init_backbone {
        let donor = checkpoint::load(path, None, None)?;
        let mut taken = 0;
        for (name, t) in donor.weights {
            if PARAM_GROUP_BODY.iter().any(|p| name.starts_with(p)) {
                let mine = weights.get(&name).ok_or_else(|| {
                    Error::invalid(format!(
                        "--init-backbone {}: `{name}` is not in this config",
                        path.display()
                    ))
                })?;
                if mine.dims() != t.dims() {
                    return Err(Error::invalid(format!(
                        "--init-backbone {}: `{name}` has shape {:?}, this config needs {:?}",
                        path.display(),
                        t.dims(),
                        mine.dims()
                    )));
                }
                weights.insert(name, t);
                taken += 1;
            }
        }
        println!(
            "init-backbone: {taken} body and head tensors from {}",
            path.display()
        );
    } else if args.freeze_backbone {
        return Err(Error::invalid(
            "--freeze-backbone needs --init-backbone (a frozen random body learns nothing)",
        ));
    }
    Ok(Checkpoint {
        config: args.config.clone(),
        weights,
        optim: None,
        ema: None,
        train_state: None,
    })
}

/// Keeps the lines of `metrics.jsonl` up to `epoch` (a resumed run rewrites the rest).
fn trim_metrics(path: &Path, epoch: i64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_i64())
                .is_some_and(|e| e <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(path, kept.as_bytes())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Runs the training; returns the per-epoch records (also in `OUT/metrics.jsonl`).
pub fn train(args: &TrainArgs) -> Result<Vec<EpochRecord>> {
    if args.batch == 0 || args.epochs == 0 {
        return Err(Error::invalid("--batch and --epochs must be > 0"));
    }
    if let Some(d) = args.ema
        && !(0.0..1.0).contains(&d)
    {
        return Err(Error::invalid(format!(
            "--ema {d}: the decay must be in [0, 1)"
        )));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    remove_stale_temporaries(&args.out);
    let latest = args.out.join("latest.safetensors");
    let metrics_path = args.out.join("metrics.jsonl");

    // Where we start: a resumed checkpoint or fresh weights.
    let resumed = if args.resume {
        if !latest.is_file() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("--resume: {} not found", latest.display()),
            ));
        }
        Some(checkpoint::load(&latest, None, None)?)
    } else {
        None
    };
    let config = resumed
        .as_ref()
        .map_or_else(|| args.config.clone(), |c| c.config.clone());
    let data = Folders::open(&args.data, &config, args.val_count, args.seed)?;
    let per_epoch = data
        .train
        .iter()
        .map(|rows| rows.len().div_ceil(args.batch))
        .sum::<usize>()
        .min(args.limit_batches.unwrap_or(usize::MAX).max(1));
    let total = (per_epoch * args.epochs) as i64;
    let opts = bridge_options(args, config.clone(), total);
    let (bridge, ema) = match resumed {
        Some(mut ckpt) => {
            let ema = ckpt.ema.take().map(|m| {
                crate::model::param_specs(&config)
                    .unwrap()
                    .iter()
                    .map(|s| m[&s.name].clone())
                    .collect::<Vec<Tensor>>()
            });
            let ts = ckpt.train_state.clone().unwrap_or_default();
            trim_metrics(&metrics_path, ts.epoch)?;
            println!(
                "resuming from {} at epoch {}, batch {}",
                latest.display(),
                ts.epoch,
                ts.position
            );
            (Bridge::from_checkpoint(ckpt, &opts)?, ema)
        }
        None => {
            let _ = std::fs::remove_file(&metrics_path);
            (
                Bridge::from_checkpoint(fresh_checkpoint(args)?, &opts)?,
                None,
            )
        }
    };
    // Empty until the first update when EMA is on (it then starts as a copy).
    let mut ema: Vec<Tensor> = ema.unwrap_or_default();
    let device = bridge.device().clone();
    for (i, d) in data.sets.iter().enumerate() {
        println!(
            "data: {} rows ({} train, {} val) of {}x{} latents, {}x{} tokens: {}",
            d.len,
            data.train[i].len(),
            data.val[i].len(),
            d.latent_size.0,
            d.latent_size.1,
            d.grid.0,
            d.grid.1,
            data.names[i]
        );
    }
    println!(
        "{per_epoch} batches/epoch of {}; model {:.1}M parameters",
        args.batch,
        crate::model::param_count(&config)? as f64 / 1e6
    );

    let eval = |b: &Bridge| data.evaluate(b, args.batch, args.pool, &args.loss);
    let eval_ema = |ema: &[Tensor]| -> Result<Option<(Metrics, Vec<FolderMetrics>)>> {
        if args.ema.is_none() || ema.is_empty() {
            return Ok(None);
        }
        Ok(Some(eval(&ema_bridge(&bridge, ema, &opts)?)?))
    };
    let mut records = Vec::new();
    let start_state = bridge.train_state();
    let mut position = start_state.position as usize;
    if position == 0 && start_state.epoch == 0 {
        let t0 = Instant::now();
        let (val, val_folders) = eval(&bridge)?;
        let rec = EpochRecord {
            epoch: 0,
            step: 0,
            train_loss: None,
            lr: 0.0,
            samples_per_s: None,
            seconds: t0.elapsed().as_secs_f64(),
            skipped_steps: 0,
            dropped_rows: 0,
            val_ema: None,
            val,
            val_folders,
            val_ema_folders: Vec::new(),
        };
        report(&rec);
        append_line(&metrics_path, &serde_json::to_string(&rec).unwrap())?;
        records.push(rec);
    }

    let mut best = start_state.best_metric;
    while position < per_epoch * args.epochs {
        let epoch = position / per_epoch;
        let plan = epoch_batches(&data.train, args.batch, args.seed, epoch);
        let bar = progress_bar(args.progress, per_epoch, epoch + 1, args.epochs);
        bar.set_position((position % per_epoch) as u64);
        let t0 = Instant::now();
        let (mut loss_sum, mut steps, mut samples, mut skipped, mut dropped) =
            (0f64, 0usize, 0usize, 0usize, 0usize);
        let mut lr = 0f32;
        for (folder, rows) in &plan[position % per_epoch..per_epoch] {
            let flips = args.flip_aug.then(|| {
                let mut rng = Rng::new(
                    args.seed ^ 0xf11f_0000 ^ (position as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                );
                rows.iter()
                    .map(|_| rng.uniform() < 0.5)
                    .collect::<Vec<bool>>()
            });
            let batch = data.sets[*folder].batch(rows, flips.as_deref(), &device)?;
            dropped += batch.dropped;
            if !batch.rows.is_empty() {
                let s = bridge.train_step(&batch.latents, &batch.targets)?;
                lr = s.lr;
                if s.skipped {
                    skipped += 1;
                } else {
                    loss_sum += s.loss as f64;
                    steps += 1;
                    samples += batch.rows.len();
                    if let Some(decay) = args.ema {
                        bridge.update_ema(&mut ema, decay)?;
                    }
                }
                bar.set_message(format!(
                    "loss {:.4}  {:.1} samples/s",
                    s.loss,
                    samples as f64 / t0.elapsed().as_secs_f64()
                ));
            }
            position += 1;
            bridge.update_train_state(|ts| {
                ts.position = position as i64;
                ts.dropped_rows += batch.dropped as i64;
            });
            bar.inc(1);
            if args.save_every > 0
                && position.is_multiple_of(args.save_every)
                && !position.is_multiple_of(per_epoch)
            {
                bridge.save_training(&latest, (!ema.is_empty()).then_some(ema.as_slice()))?;
            }
        }
        bar.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        let (val, val_folders) = eval(&bridge)?;
        let (val_ema, val_ema_folders) = match eval_ema(&ema)? {
            Some((m, f)) => (Some(m), f),
            None => (None, Vec::new()),
        };
        let rec = EpochRecord {
            epoch: epoch + 1,
            step: bridge.step(),
            train_loss: (steps > 0).then(|| loss_sum / steps as f64),
            lr,
            samples_per_s: Some(samples as f64 / train_secs),
            seconds: t0.elapsed().as_secs_f64(),
            skipped_steps: skipped,
            dropped_rows: dropped,
            val: val.clone(),
            val_ema: val_ema.clone(),
            val_folders,
            val_ema_folders,
        };
        report(&rec);
        // The model that counts: the moving average when there is one.
        let judged = val_ema.as_ref().unwrap_or(&val).loss;
        let improved = best.is_none_or(|b| judged < b);
        if improved {
            best = Some(judged);
        }
        bridge.update_train_state(|ts| {
            ts.epoch = (epoch + 1) as i64;
            ts.best_metric = best;
        });
        let ema_slice = (!ema.is_empty()).then_some(ema.as_slice());
        let weights_file = |path: &Path| -> Result<()> {
            match ema_slice {
                Some(e) => {
                    let named: Vec<(String, Tensor)> = crate::model::param_specs(&config)?
                        .into_iter()
                        .map(|s| s.name)
                        .zip(e.iter().cloned())
                        .collect();
                    checkpoint::save(path, &SaveParts::weights(&config, &named))
                }
                None => bridge.save_weights(path),
            }
        };
        weights_file(&args.out.join(format!("epoch_{:03}.safetensors", epoch + 1)))?;
        if improved {
            weights_file(&args.out.join("best.safetensors"))?;
        }
        append_line(&metrics_path, &serde_json::to_string(&rec).unwrap())?;
        bridge.save_training(&latest, ema_slice)?;
        records.push(rec);
    }
    if let Err(e) = crate::plot::plot_metrics(&metrics_path, &args.out.join("metrics.png")) {
        eprintln!("warning: no plot: {e}");
    }
    Ok(records)
}

/// Temporary files of saves that a killed run left behind (`.NAME.tmp-PID-N`).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An evaluation-only bridge over the moving-average weights, on the training bridge's
/// device and stream.
fn ema_bridge(bridge: &Bridge, ema: &[Tensor], opts: &BridgeOptions) -> Result<Bridge> {
    let config = bridge.config();
    let weights: HashMap<String, Tensor> = crate::model::param_specs(config)?
        .into_iter()
        .map(|s| s.name)
        .zip(ema.iter().cloned())
        .collect();
    let ckpt = Checkpoint {
        config: config.clone(),
        weights,
        optim: None,
        ema: None,
        train_state: None,
    };
    bridge.derive(ckpt, opts)
}

fn progress_bar(enabled: bool, len: usize, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} batches  {msg}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

fn report(r: &EpochRecord) {
    let (v, folders) = match &r.val_ema {
        Some(m) => (m, &r.val_ema_folders),
        None => (&r.val, &r.val_folders),
    };
    let retrieval = |m: &Metrics| match (m.retrieval_1, m.retrieval_5) {
        (Some(r1), Some(r5)) => format!("  R@1 {r1:.3}  R@5 {r5:.3}"),
        _ => String::new(),
    };
    println!(
        "epoch {:3}  step {:6}  train_loss {}  val_loss {:.4}  cosine {:.4}  nmse {:.4}{}  self_sim {:.3}{}{}{}",
        r.epoch,
        r.step,
        r.train_loss
            .map_or("   -   ".to_string(), |l| format!("{l:.4}")),
        v.loss,
        v.cosine,
        v.nmse,
        retrieval(v),
        v.self_sim,
        r.samples_per_s
            .map_or(String::new(), |s| format!("  {s:.1} samples/s")),
        if r.val_ema.is_some() { "  (EMA)" } else { "" },
        if folders.is_empty() { "" } else { "  (pooled)" },
    );
    for f in folders {
        let m = &f.metrics;
        println!(
            "          {:>3}x{:<3} latents ({:>2}x{:<2} tokens)  val_loss {:.4}  cosine {:.4}  nmse {:.4}{}  self_sim {:.3}",
            f.latent_size[0],
            f.latent_size[1],
            f.grid[0],
            f.grid[1],
            m.loss,
            m.cosine,
            m.nmse,
            retrieval(m),
            m.self_sim
        );
    }
}
