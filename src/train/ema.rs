//! The exponential moving average of a run's weights: named tensors in the model's
//! parameter order, updated after each applied step, evaluated through a bridge of its
//! own, written as the run's `best` and `epoch_NNN` weights and into `latest`.

use crate::bridge::{Bridge, BridgeOptions};
use crate::checkpoint::{self, Checkpoint, SaveParts};
use crate::config::BridgeConfig;
use crate::error::{Error, Result};
use crate::model::param_specs;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub struct Ema {
    decay: f32,
    names: Vec<String>,
    /// Empty until the first update, which starts the average as a copy of the weights.
    tensors: Vec<Tensor>,
}

impl Ema {
    /// An average with `decay` in `[0, 1)` over `config`'s parameters, empty or resumed
    /// from a checkpoint's `ema.*` tensors.
    pub fn new(
        decay: f32,
        config: &BridgeConfig,
        resumed: Option<HashMap<String, Tensor>>,
    ) -> Result<Self> {
        Self::check_decay(decay)?;
        let names: Vec<String> = param_specs(config)?.into_iter().map(|s| s.name).collect();
        let tensors = match resumed {
            Some(mut by_name) => names
                .iter()
                .map(|n| {
                    by_name
                        .remove(n)
                        .ok_or_else(|| Error::checkpoint(format!("missing tensor `ema.{n}`")))
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        Ok(Ema {
            decay,
            names,
            tensors,
        })
    }

    /// A decay must be in `[0, 1)`.
    pub fn check_decay(decay: f32) -> Result<()> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid(format!(
                "--ema {decay}: the decay must be in [0, 1)"
            )));
        }
        Ok(())
    }

    /// `ema = decay * ema + (1 - decay) * weights`; the first update copies the weights.
    pub fn update(&mut self, bridge: &Bridge) -> Result<()> {
        let d = self.decay as f64;
        let tensors = &mut self.tensors;
        bridge.with_weights(|weights| {
            if tensors.is_empty() {
                *tensors = weights
                    .iter()
                    .map(|(_, w)| w.copy())
                    .collect::<candle_core::Result<_>>()?;
                return Ok(());
            }
            for (e, (_, w)) in tensors.iter_mut().zip(weights) {
                *e = ((&*e * d)? + (w * (1.0 - d))?)?;
            }
            Ok(())
        })
    }

    /// The average's tensors in parameter order, once there are any.
    pub fn tensors(&self) -> Option<&[Tensor]> {
        (!self.tensors.is_empty()).then_some(self.tensors.as_slice())
    }

    /// An evaluation-only bridge over the average, on `bridge`'s device and stream.
    pub fn bridge(&self, bridge: &Bridge, opts: &BridgeOptions) -> Result<Option<Bridge>> {
        if self.tensors.is_empty() {
            return Ok(None);
        }
        let ckpt = Checkpoint {
            config: bridge.config().clone(),
            weights: self.named().into_iter().collect(),
            optim: None,
            ema: None,
            train_state: None,
        };
        Ok(Some(bridge.derive(ckpt, opts)?))
    }

    /// Writes the average as an inference checkpoint of `config`.
    pub fn save_weights(&self, path: &Path, config: &BridgeConfig) -> Result<()> {
        checkpoint::save(path, &SaveParts::weights(config, &self.named()))
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.tensors.iter().cloned())
            .collect()
    }
}
