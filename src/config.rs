//! The model configuration (DESIGN.md, "Model"), its validation and its cost in FLOPs.
//! (The parameter tensors it implies are the model's: `model::param_specs`.)

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// GroupNorm group count used throughout the adapter.
pub const GROUPS: usize = 32;

/// The config's fields, written once: name, type, default (the published `DinoBridgeV3`)
/// and meaning. `config_fields!(m! { .. })` hands the list, in brackets, to the macro `m`
/// (after the tokens in braces and any that follow them, so that lists can be chained):
/// `define_config` below makes `BridgeConfig` and its `Default` from it, `ffi/params.rs`
/// the C structs' conversions. The C structs (`ffi/types.rs`) stay written out for
/// cbindgen; the conversions build them as struct literals, so a field missing on either
/// side does not compile.
macro_rules! config_fields {
    ($m:ident! { $($pass:tt)* } $($more:tt)*) => {
        $m! { $($pass)* $($more)* [
            /// Latent channels: 4 for SD, 16 for FLUX / SD3.
            in_ch: usize = 4,
            /// The latent side the bridge was built (and `pos_embed` trained) for.
            latent_size: usize = 32,
            /// The token grid of `latent_size`: `latent_size / 2^adapter_depth`.
            grid: usize = 8,
            /// The teacher's token width (768 for DINOv2-B).
            target_dim: usize = 768,
            adapter_mid_channels: usize = 256,
            adapter_out_channels: usize = 512,
            /// Adapter stages, each halving the latent sides.
            adapter_depth: usize = 2,
            /// The body's width, depth and heads.
            width: usize = 768,
            depth: usize = 8,
            heads: usize = 12,
            mlp_ratio: f32 = 4.0,
            /// Residual dropout of the body, in training only.
            dropout: f32 = 0.02,
            /// Latents enter as `(latents - latent_shift) * latent_scale`.
            latent_shift: f32 = 0.0,
            latent_scale: f32 = 1.0,
        ] }
    };
}
pub(crate) use config_fields;

/// `BridgeConfig` and its defaults, from the field list.
macro_rules! define_config {
    ([$($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,)*]) => {
        /// The model configuration (DESIGN.md, "Model").
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct BridgeConfig {
            $($(#[$doc])* pub $name: $ty,)*
        }

        impl Default for BridgeConfig {
            /// The published `DinoBridgeV3` configuration.
            fn default() -> Self {
                BridgeConfig { $($name: $default,)* }
            }
        }

        impl BridgeConfig {
            /// Every integer field in `1..=MAX_DIM`.
            fn check_dims(&self) -> Result<()> {
                $(Dim::check(self.$name, stringify!($name))?;)*
                Ok(())
            }
        }
    };
}
config_fields!(define_config! {});

/// A config field's range check: integers (sizes and counts) are in `1..=MAX_DIM`; float
/// fields have checks of their own in `validate`.
trait Dim: Copy {
    fn check(self, name: &str) -> Result<()>;
}

impl Dim for usize {
    fn check(self, name: &str) -> Result<()> {
        if self == 0 || self > MAX_DIM {
            return Err(Error::invalid(format!(
                "config.{name} = {self}: must be in 1..={MAX_DIM}"
            )));
        }
        Ok(())
    }
}

impl Dim for f32 {
    fn check(self, _: &str) -> Result<()> {
        Ok(())
    }
}

/// Upper bound on any single dimension: a config read from a file must not make us
/// allocate terabytes before the shapes are checked.
const MAX_DIM: usize = 1 << 16;
/// Upper bound on a latent side (a 64k px image has 8192): products of sides, channels
/// and batch are then checked for overflow where buffers are sized.
pub const MAX_SIDE: usize = 1 << 14;

/// A latent size `HxW` (or one number for a square), as the command-line tools take it.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|v| *v > 0);
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h), parse(w)),
        None => (parse(s), parse(s)),
    };
    h.zip(w)
        .ok_or_else(|| Error::invalid(format!("size {s}: expected HxW, e.g. 32x48")))
}

impl BridgeConfig {
    /// Named configurations: `default` (the published bridge: 8x8 tokens from 32x32
    /// latents), `repa` (REPA's own target, DINOv2-B at 224 px: 16x16 tokens from 32x32
    /// latents, one adapter stage), `flux` / `repa-flux` (the same for 16-channel
    /// latents), `small` (a fast one for demos and tests), `tiny` (the fixtures' shape).
    pub fn preset(name: &str) -> Option<Self> {
        let d = BridgeConfig::default();
        let repa = BridgeConfig {
            adapter_depth: 1,
            grid: 16,
            ..d.clone()
        };
        Some(match name {
            "default" => d,
            "flux" => BridgeConfig { in_ch: 16, ..d },
            "repa" => repa,
            "repa-flux" => BridgeConfig { in_ch: 16, ..repa },
            // The `repa` grid for teachers of other widths (DESIGN.md, "Teachers"): the body
            // stays; the head maps to the teacher's width.
            "repa-384" => BridgeConfig {
                target_dim: 384,
                ..repa
            },
            "repa-1024" => BridgeConfig {
                target_dim: 1024,
                ..repa
            },
            "repa-1152" => BridgeConfig {
                target_dim: 1152,
                ..repa
            },
            "repa-1280" => BridgeConfig {
                target_dim: 1280,
                ..repa
            },
            "repa-1536" => BridgeConfig {
                target_dim: 1536,
                ..repa
            },
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
                "--config {spec}: neither a preset ({}) nor a file",
                Self::PRESETS.join(", ")
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.context(path.display()))
    }

    /// The preset names, for messages.
    pub const PRESETS: [&'static str; 11] = [
        "default",
        "repa",
        "flux",
        "repa-flux",
        "repa-384",
        "repa-1024",
        "repa-1152",
        "repa-1280",
        "repa-1536",
        "small",
        "tiny",
    ];

    /// Tokens of the stored grid (`pos_embed`), `grid * grid`.
    pub fn tokens(&self) -> usize {
        self.grid * self.grid
    }

    /// Latent sides must be multiples of this: each adapter stage halves them.
    pub fn side_multiple(&self) -> usize {
        1 << self.adapter_depth
    }

    /// The token grid `(h, w)` for latents of `height x width`: the sides divided by
    /// `2^adapter_depth`. Sides that are not positive multiples of it, or too large for
    /// this library's sizes, are a shape error naming the size.
    pub fn token_grid(&self, height: i64, width: i64) -> Result<(usize, usize)> {
        let m = self.side_multiple();
        let side = |name: &str, v: i64| -> Result<usize> {
            match usize::try_from(v) {
                Ok(s) if s > 0 && s.is_multiple_of(m) && s <= MAX_SIDE => Ok(s / m),
                _ => Err(Error::shape(format!(
                    "latent {name} = {v}: must be a positive multiple of {m} \
                     (2^adapter_depth) and at most {MAX_SIDE}"
                ))),
            }
        };
        Ok((side("height", height)?, side("width", width)?))
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio as f64).round() as usize
    }
    /// Elements of one latent sample `[in_ch, height, width]` (sides checked by
    /// `token_grid`, so the product fits).
    pub fn latent_numel(&self, height: usize, width: usize) -> usize {
        self.in_ch * height * width
    }
    /// Elements of one output sample on the token grid `(h, w)`: `[h * w, target_dim]`.
    pub fn output_numel(&self, grid: (usize, usize)) -> usize {
        grid.0 * grid.1 * self.target_dim
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
        self.check_dims()?;
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

    /// A lower bound of the memory a forward of `batch` samples on the token grid `grid`
    /// needs, in bytes: the largest activation map of the batch, and one attention score
    /// matrix. A call above the device's memory cannot succeed.
    pub fn min_working_bytes(&self, batch: u64, grid: (usize, usize)) -> f64 {
        let m = self.side_multiple() as f64;
        let (h, w) = (grid.0 as f64, grid.1 as f64);
        let t = h * w;
        let adapter = (h * m) * (w * m) * self.adapter_mid_channels as f64;
        let body = t * (3 * self.width).max(self.mlp_hidden()) as f64;
        4.0 * (batch as f64 * adapter.max(body) + t * t)
    }

    /// Forward FLOPs (2 per multiply-add) of one sample at the stored latent size.
    pub fn forward_flops(&self) -> u64 {
        self.forward_flops_at(self.latent_size, self.latent_size)
    }

    /// Forward FLOPs (2 per multiply-add) of one `height x width` latent sample, counting
    /// convolutions, linears and the attention matmuls; norms and activations are left out.
    pub fn forward_flops_at(&self, height: usize, width: usize) -> u64 {
        let u = |x: usize| x as u64;
        let mut macs: u64 = 0;
        let (mut sh, mut sw) = (u(height), u(width));
        macs += sh * sw * u(self.adapter_mid_channels) * u(self.in_ch) * 9;
        for (c_in, c_out) in self.stage_channels() {
            sh /= 2;
            sw /= 2;
            macs += sh * sw * u(c_out) * u(c_in) * 4;
            macs += 2 * sh * sw * u(c_out) * u(c_out) * 9;
        }
        let (t, w) = (sh * sw, u(self.width));
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
        let params = crate::model::param_count(&cfg).unwrap() as f64 / 1e6;
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
