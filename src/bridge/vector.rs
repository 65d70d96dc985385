//! The flat parameter vector's layout (ABI 5): every model tensor in f32, in parameter
//! order, each row-major; and gradients as flat vectors.

use crate::error::Result;
use crate::optim::decays;
use candle_core::{DType, Tensor, Var};

/// One tensor of the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// The checkpoint key.
    pub name: String,
    /// Its first element's index in the vector.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Whether the library's AdamW applies weight decay to it.
    pub decays: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The layout of `params`' flat vector.
pub fn layout(params: &[(String, Var)]) -> Vec<ParamInfo> {
    let mut offset = 0;
    params
        .iter()
        .map(|(name, v)| {
            let shape = v.dims().to_vec();
            let info = ParamInfo {
                name: name.clone(),
                offset,
                decays: decays(name, &shape),
                shape,
            };
            offset += info.numel();
            info
        })
        .collect()
}

/// Gradients of a training-mode call, as flat vectors.
pub struct FlatGrads {
    /// `[n]` f32, parameter order.
    pub params: Tensor,
    /// d / d latents, when asked for (latents' shape, f32).
    pub latents: Option<Tensor>,
}

/// Tensors flattened and joined into one `[n]` f32 vector.
pub fn flatten<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Result<Tensor> {
    let flat = tensors
        .map(|t| Ok(t.to_dtype(DType::F32)?.flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}
