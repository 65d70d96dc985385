//! What a run records per epoch: one line of `metrics.jsonl` (`EpochRecord`), the
//! counters it is made from (`EpochStats`), the printed summary, and the file itself
//! (appended per epoch, trimmed when a run resumes).

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

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

/// A validation: pooled (or the one folder's) metrics, and each folder's when several.
pub type Validation = (Metrics, Vec<FolderMetrics>);

/// The counters of one epoch's training, from its start.
pub struct EpochStats {
    start: Instant,
    /// Seconds of training, once it ended (None: nothing was trained, epoch 0).
    train_secs: Option<f64>,
    loss_sum: f64,
    steps: usize,
    samples: usize,
    skipped: usize,
    dropped: usize,
    lr: f32,
}

impl EpochStats {
    pub fn start() -> Self {
        EpochStats {
            start: Instant::now(),
            train_secs: None,
            loss_sum: 0.0,
            steps: 0,
            samples: 0,
            skipped: 0,
            dropped: 0,
            lr: 0.0,
        }
    }

    /// A step on `samples` rows that reported `loss` at rate `lr` (skipped: no update).
    pub fn step(&mut self, loss: f32, lr: f32, samples: usize, skipped: bool) {
        self.lr = lr;
        if skipped {
            self.skipped += 1;
        } else {
            self.loss_sum += loss as f64;
            self.steps += 1;
            self.samples += samples;
        }
    }

    /// Rows a batch left out for non-finite values.
    pub fn dropped(&mut self, rows: usize) {
        self.dropped += rows;
    }

    /// Samples per second of training so far.
    pub fn samples_per_s(&self) -> f64 {
        self.samples as f64 / self.start.elapsed().as_secs_f64()
    }

    /// The end of training in this epoch (validation comes after).
    pub fn end_training(&mut self) {
        self.train_secs = Some(self.start.elapsed().as_secs_f64());
    }
}

impl EpochRecord {
    /// The record of `epoch` (0: before training) at optimiser step `step`.
    pub fn new(
        epoch: usize,
        step: i64,
        stats: &EpochStats,
        (val, val_folders): Validation,
        ema: Option<Validation>,
    ) -> Self {
        let (val_ema, val_ema_folders) = match ema {
            Some((m, f)) => (Some(m), f),
            None => (None, Vec::new()),
        };
        EpochRecord {
            epoch,
            step,
            train_loss: (stats.steps > 0).then(|| stats.loss_sum / stats.steps as f64),
            lr: stats.lr,
            samples_per_s: stats.train_secs.map(|s| stats.samples as f64 / s),
            seconds: stats.start.elapsed().as_secs_f64(),
            skipped_steps: stats.skipped,
            dropped_rows: stats.dropped,
            val,
            val_ema,
            val_folders,
            val_ema_folders,
        }
    }

    /// The loss the run is judged by: the moving average's when there is one.
    pub fn judged_loss(&self) -> f64 {
        self.val_ema.as_ref().unwrap_or(&self.val).loss
    }

    /// Prints the record's line (and one per folder).
    pub fn report(&self) {
        let (v, folders) = match &self.val_ema {
            Some(m) => (m, &self.val_ema_folders),
            None => (&self.val, &self.val_folders),
        };
        let retrieval = |m: &Metrics| match (m.retrieval_1, m.retrieval_5) {
            (Some(r1), Some(r5)) => format!("  R@1 {r1:.3}  R@5 {r5:.3}"),
            _ => String::new(),
        };
        println!(
            "epoch {:3}  step {:6}  train_loss {}  val_loss {:.4}  cosine {:.4}  nmse {:.4}{}  self_sim {:.3}{}{}{}",
            self.epoch,
            self.step,
            self.train_loss
                .map_or("   -   ".to_string(), |l| format!("{l:.4}")),
            v.loss,
            v.cosine,
            v.nmse,
            retrieval(v),
            v.self_sim,
            self.samples_per_s
                .map_or(String::new(), |s| format!("  {s:.1} samples/s")),
            if self.val_ema.is_some() {
                "  (EMA)"
            } else {
                ""
            },
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

    /// Appends the record as one line of `path` (`metrics.jsonl`).
    pub fn append_to(&self, path: &Path) -> Result<()> {
        let line = serde_json::to_string(self).expect("records serialise");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(path, e))
    }
}

/// Keeps the lines of `metrics.jsonl` up to `epoch` (a resumed run rewrites the rest).
pub fn trim_metrics(path: &Path, epoch: i64) -> Result<()> {
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
