//! A training run's state and its parts: the arguments, the start (fresh weights or the
//! run's `latest`), one step on a batch, and the end of an epoch (validation and the
//! checkpoints). The loop that strings them together is `train::train`.

use super::ema::Ema;
use super::folders::Folders;
use super::records::{EpochRecord, EpochStats, Validation, trim_metrics};
use crate::bridge::{Bridge, BridgeOptions, init_weights};
use crate::checkpoint::{self, Checkpoint};
use crate::config::BridgeConfig;
use crate::data::{Batch, epoch_batches};
use crate::error::{Error, ErrorKind, Result};
use crate::loss::LossWeights;
use crate::optim::OptimConfig;
use crate::rng::Rng;
use std::path::{Path, PathBuf};

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

const PARAM_GROUP_BODY: [&str; 2] = ["backbone.", "head."];

/// A run in progress.
pub struct Run<'a> {
    args: &'a TrainArgs,
    pub data: Folders,
    pub bridge: Bridge,
    /// Settings of the bridge and of its EMA copy.
    opts: BridgeOptions,
    ema: Option<Ema>,
    /// Batches consumed so far, over all epochs (skipped ones included).
    pub position: usize,
    pub per_epoch: usize,
    best: Option<f64>,
    latest: PathBuf,
    metrics: PathBuf,
}

impl<'a> Run<'a> {
    /// Fresh weights, or with `--resume` the run's `latest`: weights, optimiser, EMA, data
    /// position and best loss (and `metrics.jsonl` cut back to its epoch).
    pub fn start(args: &'a TrainArgs) -> Result<Self> {
        if args.batch == 0 || args.epochs == 0 {
            return Err(Error::invalid("--batch and --epochs must be > 0"));
        }
        if let Some(d) = args.ema {
            Ema::check_decay(d)?;
        }
        std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
        remove_stale_temporaries(&args.out);
        let latest = args.out.join("latest.safetensors");
        let metrics = args.out.join("metrics.jsonl");
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
        let opts = bridge_options(args, config.clone(), (per_epoch * args.epochs) as i64);
        let (bridge, ema) = match resumed {
            Some(mut ckpt) => {
                let ema = args
                    .ema
                    .map(|d| Ema::new(d, &config, ckpt.ema.take()))
                    .transpose()?;
                let ts = ckpt.train_state.clone().unwrap_or_default();
                trim_metrics(&metrics, ts.epoch)?;
                println!(
                    "resuming from {} at epoch {}, batch {}",
                    latest.display(),
                    ts.epoch,
                    ts.position
                );
                (Bridge::from_checkpoint(ckpt, &opts)?, ema)
            }
            None => {
                let _ = std::fs::remove_file(&metrics);
                let ema = args.ema.map(|d| Ema::new(d, &config, None)).transpose()?;
                (
                    Bridge::from_checkpoint(fresh_checkpoint(args)?, &opts)?,
                    ema,
                )
            }
        };
        data.describe();
        println!(
            "{per_epoch} batches/epoch of {}; model {:.1}M parameters",
            args.batch,
            bridge.param_count() as f64 / 1e6
        );
        let state = bridge.train_state();
        Ok(Run {
            args,
            data,
            bridge,
            opts,
            ema,
            position: state.position as usize,
            per_epoch,
            best: state.best_metric,
            latest,
            metrics,
        })
    }

    /// Whether nothing has been trained yet (not even by a run this one resumes).
    pub fn at_start(&self) -> bool {
        self.position == 0 && self.bridge.train_state().epoch == 0
    }

    /// Batches of the whole run.
    pub fn total_batches(&self) -> usize {
        self.per_epoch * self.args.epochs
    }

    /// The batches of `epoch` still to train: (folder, rows), from where the run stands.
    pub fn batches_left(&self, epoch: usize) -> Vec<(usize, Vec<usize>)> {
        let mut plan = epoch_batches(&self.data.train, self.args.batch, self.args.seed, epoch);
        plan.truncate(self.per_epoch); // `--limit-batches` cuts an epoch short
        plan.drain(..self.position % self.per_epoch);
        plan
    }

    /// The rows of `folder` as a batch on the bridge's device, mirrored at random with
    /// `--flip-aug` (the draws a function of the run's seed and position).
    pub fn batch(&self, folder: usize, rows: &[usize]) -> Result<Batch> {
        let flips = self.args.flip_aug.then(|| {
            let mut rng = Rng::new(
                self.args.seed
                    ^ 0xf11f_0000
                    ^ (self.position as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
            );
            rows.iter()
                .map(|_| rng.uniform() < 0.5)
                .collect::<Vec<bool>>()
        });
        self.data.sets[folder].batch(rows, flips.as_deref(), self.bridge.device())
    }

    /// One AdamW step on `batch` (none when all its rows were dropped), the EMA after an
    /// applied one; then the position moves on, and `latest` is saved every
    /// `--save-every` batches within an epoch.
    /// Returns the step's loss, if there was a step.
    pub fn step(&mut self, batch: &Batch, stats: &mut EpochStats) -> Result<Option<f32>> {
        stats.dropped(batch.dropped);
        let mut loss = None;
        if !batch.rows.is_empty() {
            let s = self.bridge.train_step(&batch.latents, &batch.targets)?;
            stats.step(s.loss, s.lr, batch.rows.len(), s.skipped);
            if let (false, Some(ema)) = (s.skipped, self.ema.as_mut()) {
                ema.update(&self.bridge)?;
            }
            loss = Some(s.loss);
        }
        self.position += 1;
        let position = self.position as i64;
        self.bridge.update_train_state(|ts| {
            ts.position = position;
            ts.dropped_rows += batch.dropped as i64;
        });
        let every = self.args.save_every;
        if every > 0
            && self.position.is_multiple_of(every)
            && !self.position.is_multiple_of(self.per_epoch)
        {
            self.save_latest()?;
        }
        Ok(loss)
    }

    /// Validation of the weights (and of their moving average) on every folder, as the
    /// record of `epoch`, printed.
    pub fn validate(&self, epoch: usize, stats: &EpochStats) -> Result<EpochRecord> {
        let eval = |b: &Bridge| -> Result<Validation> {
            self.data
                .evaluate(b, self.args.batch, self.args.pool, &self.args.loss)
        };
        let val = eval(&self.bridge)?;
        let val_ema = match &self.ema {
            Some(ema) => ema
                .bridge(&self.bridge, &self.opts)?
                .map(|b| eval(&b))
                .transpose()?,
            None => None,
        };
        let record = EpochRecord::new(epoch, self.bridge.step(), stats, val, val_ema);
        record.report();
        Ok(record)
    }

    /// Appends `record` to `metrics.jsonl`.
    pub fn log(&self, record: &EpochRecord) -> Result<()> {
        record.append_to(&self.metrics)
    }

    /// The end of an epoch: its weights (the EMA's when there is one) as `epoch_NNN` and,
    /// when the judged loss improved, as `best`; the record logged; then `latest`.
    pub fn checkpoint(&mut self, record: &EpochRecord) -> Result<()> {
        let judged = record.judged_loss();
        let improved = self.best.is_none_or(|b| judged < b);
        if improved {
            self.best = Some(judged);
        }
        let best = self.best;
        self.bridge.update_train_state(|ts| {
            ts.epoch = record.epoch as i64;
            ts.best_metric = best;
        });
        let out = &self.args.out;
        self.save_weights(&out.join(format!("epoch_{:03}.safetensors", record.epoch)))?;
        if improved {
            self.save_weights(&out.join("best.safetensors"))?;
        }
        self.log(record)?;
        self.save_latest()
    }

    /// Draws `metrics.png` from `metrics.jsonl` (a warning if it cannot).
    pub fn plot(&self) {
        if let Err(e) = crate::plot::plot_metrics(&self.metrics, &self.args.out.join("metrics.png"))
        {
            eprintln!("warning: no plot: {e}");
        }
    }

    /// A progress bar over the batches of `epoch` (hidden with `--quiet`).
    pub fn progress_bar(&self, epoch: usize) -> indicatif::ProgressBar {
        let bar = progress_bar(
            self.args.progress,
            self.per_epoch,
            epoch + 1,
            self.args.epochs,
        );
        bar.set_position((self.position % self.per_epoch) as u64);
        bar
    }

    /// The training checkpoint: weights, optimiser, train state and the EMA.
    fn save_latest(&self) -> Result<()> {
        let ema = self.ema.as_ref().and_then(Ema::tensors);
        self.bridge.save_training(&self.latest, ema)
    }

    /// Inference weights: the EMA's once it has any, else the bridge's.
    fn save_weights(&self, path: &Path) -> Result<()> {
        match &self.ema {
            Some(ema) if ema.tensors().is_some() => ema.save_weights(path, self.bridge.config()),
            _ => self.bridge.save_weights(path),
        }
    }
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
