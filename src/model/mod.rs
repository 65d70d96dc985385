//! The bridge network: latents `[B, C, H, W]` -> adapter -> body -> head -> tokens
//! `[B, h*w, D]` on the grid `(H, W) / 2^adapter_depth`.

pub mod adapter;
pub mod backbone;
pub mod head;
pub mod layers;
pub mod position;
pub mod weights;

use crate::config::BridgeConfig;
use crate::error::Error;
use crate::error::Result;
use crate::rng::Rng;
use candle_core::Tensor;
use weights::Recorder;
pub use weights::{ParamSpec, WeightSource, Weights};

#[derive(Clone)]
pub struct BridgeModel {
    adapter: adapter::Adapter,
    backbone: backbone::Backbone,
    head: head::Head,
}

impl BridgeModel {
    /// Builds the model over the given weights (shared, not copied: a model built over
    /// variables trains them). Every tensor name and shape of the model is written in the
    /// layers' `load`s, which this calls in DESIGN.md's order.
    pub fn load(source: &dyn WeightSource, cfg: &BridgeConfig) -> Result<Self> {
        let w = Weights::new(source);
        Ok(BridgeModel {
            adapter: adapter::Adapter::load(w.pp("adapter"), cfg)?,
            backbone: backbone::Backbone::load(w.pp("backbone"), cfg)?,
            head: head::Head::load(w.pp("head"), cfg)?,
        })
    }

    /// `rng` is `Some` in training (dropout on), `None` in evaluation.
    /// Latents `[B, C, H, W]` to predicted tokens `[B, h*w, target_dim]` on the token
    /// grid `(H, W) / 2^adapter_depth`.
    pub fn forward(&self, latents: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (tokens, grid) = self.adapter.forward(latents)?;
        let (b, t, _) = tokens.dims3()?;
        let rows = self.backbone.forward(&tokens, grid, rng)?;
        Ok(self.head.forward(&rows)?.reshape((b, t, ()))?)
    }
}

/// The most parameters a bridge may have (its f32 weights, moments and gradients must fit
/// in memory several times over).
const MAX_PARAMS: u64 = 4_000_000_000;

/// Every parameter tensor of `config`, in the order the model loads them (the order of
/// DESIGN.md's Model section): what a checkpoint must hold, and the order of a bridge's
/// variables. A config of more than `MAX_PARAMS` parameters is an invalid argument.
pub fn param_specs(config: &BridgeConfig) -> Result<Vec<ParamSpec>> {
    let recorder = Recorder::new()?;
    BridgeModel::load(&recorder, config)?;
    let specs = recorder.into_specs();
    let count: u64 = specs.iter().map(|s| s.numel() as u64).sum();
    if count > MAX_PARAMS {
        return Err(Error::invalid(format!(
            "config: {count} parameters is more than this library supports ({MAX_PARAMS})"
        )));
    }
    Ok(specs)
}

/// The number of parameters of `config`.
pub fn param_count(config: &BridgeConfig) -> Result<u64> {
    Ok(param_specs(config)?.iter().map(|s| s.numel() as u64).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameters_are_listed_in_the_design_order_with_their_shapes() {
        let cfg = BridgeConfig::default();
        let specs = param_specs(&cfg).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let at = |n: &str| names.iter().position(|m| *m == n).unwrap();
        assert_eq!(names[0], "adapter.stem.weight");
        assert_eq!(specs[0].shape, [256, 4, 3, 3]);
        assert!(at("adapter.stages.1.res.conv2.bias") < at("adapter.norm_out.weight"));
        assert_eq!(at("backbone.pos_embed"), at("adapter.proj.bias") + 1);
        assert_eq!(specs[at("backbone.pos_embed")].shape, [1, 64, 768]);
        assert_eq!(
            specs[at("backbone.blocks.7.mlp.fc1.weight")].shape,
            [3072, 768]
        );
        assert_eq!(names[names.len() - 2..], ["head.weight", "head.bias"]);
        // stem 2 + 2 stages * 10 + norm_out and proj 4 (adapter), 1 + 8 blocks * 12 + 2
        // (body), 2 (head).
        assert_eq!(specs.len(), 26 + 99 + 2);
        let count = param_count(&cfg).unwrap();
        assert_eq!(count, specs.iter().map(|s| s.numel() as u64).sum::<u64>());
        assert!((64.0e6..65.0e6).contains(&(count as f64)), "{count}");
        let huge = BridgeConfig {
            width: 1 << 15,
            heads: 1 << 5,
            depth: 1 << 10,
            ..cfg
        };
        assert!(
            param_specs(&huge)
                .unwrap_err()
                .message
                .contains("parameters")
        );
    }

    #[test]
    fn a_named_source_checks_presence_and_shape() {
        use candle_core::{DType, Device};
        use std::collections::HashMap;
        let mut map = HashMap::new();
        map.insert(
            "a.b".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let w = Weights::new(&map);
        assert_eq!(w.pp("a").get("b", &[2, 3]).unwrap().dims(), [2, 3]);
        let e = w.pp("a").get("b", &[3, 2]).unwrap_err().message;
        assert!(
            e.contains("`a.b` has shape [2, 3]; the config needs [3, 2]"),
            "{e}"
        );
        let e = w.get("c", &[1]).unwrap_err().message;
        assert!(e.contains("missing tensor `c`"), "{e}");
    }
}
