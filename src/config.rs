//! The model configuration (DESIGN.md, "Model"), its validation, the list of parameter
//! tensors it implies, and its cost in FLOPs.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// GroupNorm group count used throughout the adapter.
pub const GROUPS: usize = 32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    pub in_ch: usize,
    pub latent_size: usize,
    pub grid: usize,
    pub target_dim: usize,
    pub adapter_mid_channels: usize,
    pub adapter_out_channels: usize,
    pub adapter_depth: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: f32,
    pub dropout: f32,
    pub latent_shift: f32,
    pub latent_scale: f32,
}

impl Default for BridgeConfig {
    /// The published `DinoBridgeV3` configuration.
    fn default() -> Self {
        BridgeConfig {
            in_ch: 4,
            latent_size: 32,
            grid: 8,
            target_dim: 768,
            adapter_mid_channels: 256,
            adapter_out_channels: 512,
            adapter_depth: 2,
            width: 768,
            depth: 8,
            heads: 12,
            mlp_ratio: 4.0,
            dropout: 0.02,
            latent_shift: 0.0,
            latent_scale: 1.0,
        }
    }
}

/// Upper bound on any single dimension: a config read from a file must not make us
/// allocate terabytes before the shapes are checked.
const MAX_DIM: usize = 1 << 16;

impl BridgeConfig {
    /// Named configurations: `default` (the published bridge), `flux` (16-channel
    /// latents), `small` (a fast one for demos and tests), `tiny` (the fixtures' shape).
    pub fn preset(name: &str) -> Option<Self> {
        let d = BridgeConfig::default();
        Some(match name {
            "default" => d,
            "flux" => BridgeConfig { in_ch: 16, ..d },
            "small" => BridgeConfig {
                adapter_mid_channels: 32,
                adapter_out_channels: 64,
                width: 128,
                depth: 2,
                heads: 4,
                dropout: 0.0,
                ..d
            },
            "tiny" => BridgeConfig {
                latent_size: 16,
                grid: 4,
                target_dim: 48,
                adapter_mid_channels: 32,
                adapter_out_channels: 64,
                width: 64,
                depth: 2,
                heads: 4,
                dropout: 0.0,
                latent_shift: 0.1,
                latent_scale: 0.5,
                ..d
            },
            _ => return None,
        })
    }

    /// A preset name, or a JSON file with config fields (missing fields take defaults).
    pub fn from_preset_or_file(spec: &str) -> Result<Self> {
        if let Some(cfg) = Self::preset(spec) {
            return Ok(cfg);
        }
        let path = std::path::Path::new(spec);
        if !path.is_file() {
            return Err(Error::invalid(format!(
                "--config {spec}: neither a preset (default, flux, small, tiny) nor a file"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.context(path.display()))
    }

    pub fn tokens(&self) -> usize {
        self.grid * self.grid
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio as f64).round() as usize
    }
    /// Elements of one latent sample `[in_ch, latent_size, latent_size]`.
    pub fn latent_numel(&self) -> usize {
        self.in_ch * self.latent_size * self.latent_size
    }
    /// Elements of one output sample `[tokens, target_dim]`.
    pub fn output_numel(&self) -> usize {
        self.tokens() * self.target_dim
    }
    /// `(c_in, c_out)` of each adapter stage.
    pub fn stage_channels(&self) -> Vec<(usize, usize)> {
        let mut c_in = self.adapter_mid_channels;
        (0..self.adapter_depth)
            .map(|s| {
                let c_out = if s + 1 == self.adapter_depth {
                    self.adapter_out_channels
                } else {
                    self.adapter_mid_channels
                };
                let pair = (c_in, c_out);
                c_in = c_out;
                pair
            })
            .collect()
    }

    pub fn validate(&self) -> Result<()> {
        let ints = [
            ("in_ch", self.in_ch),
            ("latent_size", self.latent_size),
            ("grid", self.grid),
            ("target_dim", self.target_dim),
            ("adapter_mid_channels", self.adapter_mid_channels),
            ("adapter_out_channels", self.adapter_out_channels),
            ("adapter_depth", self.adapter_depth),
            ("width", self.width),
            ("depth", self.depth),
            ("heads", self.heads),
        ];
        for (name, v) in ints {
            if v == 0 || v > MAX_DIM {
                return Err(Error::invalid(format!(
                    "config.{name} = {v}: must be in 1..={MAX_DIM}"
                )));
            }
        }
        if self.adapter_depth > 8
            || self.grid.checked_shl(self.adapter_depth as u32) != Some(self.latent_size)
        {
            return Err(Error::invalid(format!(
                "config: latent_size ({}) must equal grid ({}) * 2^adapter_depth ({})",
                self.latent_size, self.grid, self.adapter_depth
            )));
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(Error::invalid(format!(
                "config: width ({}) must be divisible by heads ({})",
                self.width, self.heads
            )));
        }
        for (name, c) in [
            ("adapter_mid_channels", self.adapter_mid_channels),
            ("adapter_out_channels", self.adapter_out_channels),
        ] {
            if c % GROUPS != 0 {
                return Err(Error::invalid(format!(
                    "config.{name} = {c}: must be divisible by {GROUPS} (GroupNorm groups)"
                )));
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_hidden() >= 1)
            || self.mlp_hidden() > MAX_DIM * 4
        {
            return Err(Error::invalid(format!(
                "config.mlp_ratio = {}: must be > 0",
                self.mlp_ratio
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!(
                "config.dropout = {}: must be in [0, 1)",
                self.dropout
            )));
        }
        if !self.latent_shift.is_finite() || !self.latent_scale.is_finite() {
            return Err(Error::invalid(
                "config: latent_shift and latent_scale must be finite",
            ));
        }
        let params = self.param_count();
        if params > 4_000_000_000 {
            return Err(Error::invalid(format!(
                "config: {params} parameters is more than this library supports"
            )));
        }
        Ok(())
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: BridgeConfig =
            serde_json::from_str(text).map_err(|e| Error::invalid(format!("config JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    /// Every parameter tensor, in a fixed order, with its shape (PyTorch `state_dict` names).
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut specs: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: &[usize]| specs.push((name, shape.to_vec()));
        let (mid, out, w) = (
            self.adapter_mid_channels,
            self.adapter_out_channels,
            self.width,
        );
        add("adapter.stem.weight".into(), &[mid, self.in_ch, 3, 3]);
        add("adapter.stem.bias".into(), &[mid]);
        for (s, (c_in, c_out)) in self.stage_channels().into_iter().enumerate() {
            let p = format!("adapter.stages.{s}");
            add(format!("{p}.down.weight"), &[c_out, c_in, 2, 2]);
            add(format!("{p}.down.bias"), &[c_out]);
            for (norm, conv) in [("norm1", "conv1"), ("norm2", "conv2")] {
                add(format!("{p}.res.{norm}.weight"), &[c_out]);
                add(format!("{p}.res.{norm}.bias"), &[c_out]);
                add(format!("{p}.res.{conv}.weight"), &[c_out, c_out, 3, 3]);
                add(format!("{p}.res.{conv}.bias"), &[c_out]);
            }
        }
        add("adapter.norm_out.weight".into(), &[out]);
        add("adapter.norm_out.bias".into(), &[out]);
        add("adapter.proj.weight".into(), &[w, out]);
        add("adapter.proj.bias".into(), &[w]);
        add("backbone.pos_embed".into(), &[1, self.tokens(), w]);
        let hid = self.mlp_hidden();
        for i in 0..self.depth {
            let p = format!("backbone.blocks.{i}");
            add(format!("{p}.norm1.weight"), &[w]);
            add(format!("{p}.norm1.bias"), &[w]);
            add(format!("{p}.attn.qkv.weight"), &[3 * w, w]);
            add(format!("{p}.attn.qkv.bias"), &[3 * w]);
            add(format!("{p}.attn.proj.weight"), &[w, w]);
            add(format!("{p}.attn.proj.bias"), &[w]);
            add(format!("{p}.norm2.weight"), &[w]);
            add(format!("{p}.norm2.bias"), &[w]);
            add(format!("{p}.mlp.fc1.weight"), &[hid, w]);
            add(format!("{p}.mlp.fc1.bias"), &[hid]);
            add(format!("{p}.mlp.fc2.weight"), &[w, hid]);
            add(format!("{p}.mlp.fc2.bias"), &[w]);
        }
        add("backbone.norm.weight".into(), &[w]);
        add("backbone.norm.bias".into(), &[w]);
        add("head.weight".into(), &[self.target_dim, w]);
        add("head.bias".into(), &[self.target_dim]);
        specs
    }

    pub fn param_count(&self) -> u64 {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }

    /// Forward FLOPs (2 per multiply-add) of one sample, counting convolutions, linears
    /// and the attention matmuls; norms and activations are left out.
    pub fn forward_flops(&self) -> u64 {
        let u = |x: usize| x as u64;
        let mut macs: u64 = 0;
        let l = u(self.latent_size);
        macs += l * l * u(self.adapter_mid_channels) * u(self.in_ch) * 9;
        let mut side = l;
        for (c_in, c_out) in self.stage_channels() {
            side /= 2;
            macs += side * side * u(c_out) * u(c_in) * 4;
            macs += 2 * side * side * u(c_out) * u(c_out) * 9;
        }
        let (t, w) = (u(self.tokens()), u(self.width));
        macs += t * u(self.adapter_out_channels) * w;
        let block = t * w * 3 * w + 2 * t * t * w + t * w * w + 2 * t * w * u(self.mlp_hidden());
        macs += u(self.depth) * block;
        macs += t * w * u(self.target_dim);
        2 * macs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design_costs() {
        let cfg = BridgeConfig::default();
        cfg.validate().unwrap();
        let params = cfg.param_count() as f64 / 1e6;
        assert!((60.0..68.0).contains(&params), "{params}M parameters");
        let gflop = cfg.forward_flops() as f64 / 1e9;
        assert!((8.5..9.3).contains(&gflop), "{gflop} GFLOP");
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let bad = BridgeConfig {
            latent_size: 30,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().message.contains("latent_size"));
        let bad = BridgeConfig {
            heads: 7,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().message.contains("heads"));
        let bad = BridgeConfig {
            adapter_mid_channels: 100,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().message.contains("GroupNorm"));
        assert!(BridgeConfig::from_json(r#"{"widht": 3}"#).is_err());
    }
}
