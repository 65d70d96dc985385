//! Where the layers find their weights, in the style of candle's `VarBuilder`: each layer
//! asks for its tensors by `state_dict` name and by the shape the config gives them. The
//! names and shapes are written once, in the layers' `load`s; the list of parameters
//! (`model::param_specs`) is what a `Recorder` saw while the model was built.

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
/// zero (no memory per tensor): how `model::param_specs` lists the parameters.
pub struct Recorder {
    specs: RefCell<Vec<ParamSpec>>,
    zero: Tensor,
}

impl Recorder {
    pub fn new() -> Result<Self> {
        Ok(Recorder {
            specs: RefCell::new(Vec::new()),
            zero: Tensor::zeros((), DType::F32, &Device::Cpu)?,
        })
    }

    /// What was asked for, in order.
    pub fn into_specs(self) -> Vec<ParamSpec> {
        self.specs.into_inner()
    }
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
