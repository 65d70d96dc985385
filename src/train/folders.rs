//! A run's data: one or several folders (one latent size each), each split into training
//! and validation rows by the run's seed, and the validation of a bridge on them.

use super::records::{FolderMetrics, Validation};
use crate::bridge::Bridge;
use crate::config::BridgeConfig;
use crate::data::{Dataset, split};
use crate::error::{Error, Result};
use crate::loss::LossWeights;
use crate::metrics::{Metrics, evaluate};
use candle_core::Tensor;
use std::path::PathBuf;

/// The data folders of a run, each split into training and validation rows.
pub struct Folders {
    pub sets: Vec<Dataset>,
    pub names: Vec<String>,
    pub train: Vec<Vec<usize>>,
    pub val: Vec<Vec<usize>>,
}

impl Folders {
    pub fn open(
        dirs: &[PathBuf],
        config: &BridgeConfig,
        val_count: usize,
        seed: u64,
    ) -> Result<Self> {
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

    /// Prints each folder's rows, latent size and token grid.
    pub fn describe(&self) {
        for (i, d) in self.sets.iter().enumerate() {
            println!(
                "data: {} rows ({} train, {} val) of {}x{} latents, {}x{} tokens: {}",
                d.len,
                self.train[i].len(),
                self.val[i].len(),
                d.latent_size.0,
                d.latent_size.1,
                d.grid.0,
                d.grid.1,
                self.names[i]
            );
        }
    }

    /// Validation of `bridge` on every folder: the record's `val` and, with several
    /// folders, each folder's.
    pub fn evaluate(
        &self,
        bridge: &Bridge,
        batch: usize,
        pool: usize,
        weights: &LossWeights,
    ) -> Result<Validation> {
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
