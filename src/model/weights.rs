//! Where the layers find their weights, in the style of candle's `VarBuilder`: each layer
//! asks for its tensors by `state_dict` name and by the shape the config gives them. The
//! names and shapes are written once, in the layers' `load`s; the list of parameters
//! (`param_specs`) is what a recorder saw while the model was built.

use crate::config::BridgeConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// A source of named tensors.
pub trait WeightSource {
    /// The tensor `name`, which the model needs with shape `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

/// A source seen under a name prefix: `w.pp("adapter").pp("stem").get("weight", ..)` asks
/// for `adapter.stem.weight`.
#[derive(Clone)]
pub struct Weights<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Weights<'a> {
    pub fn new(source: &'a dyn WeightSource) -> Self {
        Weights {
            source,
            prefix: String::new(),
        }
    }

    /// The same source under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Weights {
            source: self.source,
            prefix: self.name(&name.to_string()),
        }
    }

    /// The tensor `prefix.name` of shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.source.get(&self.name(name), shape)
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}

/// Tensors by name (a checkpoint's, views of a bridge's variables, casts of them): a
/// missing tensor or one of another shape is a checkpoint error naming it.
impl WeightSource for HashMap<String, Tensor> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = HashMap::get(self, name).ok_or_else(|| {
            Error::checkpoint(format!(
                "missing tensor `{name}` (config needs shape {shape:?})"
            ))
        })?;
        if t.dims() != shape {
            return Err(Error::checkpoint(format!(
                "tensor `{name}` has shape {:?}; the config needs {shape:?}",
                t.dims()
            )));
        }
        Ok(t.clone())
    }
}

/// One parameter tensor of a config: its checkpoint name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Records what the model asks for, in order, and hands out zero-stride views of one
/// zero (no memory per tensor).
struct Recorder {
    specs: RefCell<Vec<ParamSpec>>,
    zero: Tensor,
}

impl WeightSource for Recorder {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.specs.borrow_mut().push(ParamSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        });
        Ok(self.zero.broadcast_as(shape)?)
    }
}

/// The most parameters a bridge may have (its f32 weights, moments and gradients must fit
/// in memory several times over).
const MAX_PARAMS: u64 = 4_000_000_000;

/// Every parameter tensor of `config`, in the order the model loads them (the order of
/// DESIGN.md's Model section): what a checkpoint must hold, and the order of a bridge's
/// variables. A config of more than `MAX_PARAMS` parameters is an invalid argument.
pub fn param_specs(config: &BridgeConfig) -> Result<Vec<ParamSpec>> {
    let recorder = Recorder {
        specs: RefCell::new(Vec::new()),
        zero: Tensor::zeros((), DType::F32, &Device::Cpu)?,
    };
    super::BridgeModel::load(&recorder, config)?;
    let specs = recorder.specs.into_inner();
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
        assert_eq!(specs[at("backbone.blocks.7.mlp.fc1.weight")].shape, [3072, 768]);
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
        assert!(param_specs(&huge).unwrap_err().message.contains("parameters"));
    }

    #[test]
    fn a_named_source_checks_presence_and_shape() {
        let mut map = HashMap::new();
        map.insert(
            "a.b".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let w = Weights::new(&map);
        assert_eq!(w.pp("a").get("b", &[2, 3]).unwrap().dims(), [2, 3]);
        let e = w.pp("a").get("b", &[3, 2]).unwrap_err().message;
        assert!(e.contains("`a.b` has shape [2, 3]; the config needs [3, 2]"), "{e}");
        let e = w.get("c", &[1]).unwrap_err().message;
        assert!(e.contains("missing tensor `c`"), "{e}");
    }
}
