//! The building blocks of the bridge: one struct per layer holding its weights, and a
//! `forward` that calls the op of `crate::kernels` (which picks the CPU kernel, the fused
//! GPU kernel or the composed candle ops; the model never chooses). Activations in the
//! adapter are channels-last (`[B, H, W, C]`), so that a convolution's patches are runs
//! of channels and the token grid falls out as a reshape.

use super::weights::Weights;
use crate::error::Result;
use crate::kernels;
use candle_core::Tensor;

/// `y = x W^T + b` over the last dimension of any-rank `x`.
#[derive(Clone)]
pub struct Linear {
    weight: Tensor, // [out, in], as PyTorch stores it
    bias: Tensor,
}

impl Linear {
    pub fn load(w: Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Linear {
            weight: w.get("weight", &[out_dim, in_dim])?,
            bias: w.get("bias", &[out_dim])?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_onto(x, None)
    }

    /// `residual + x W^T + b` (residual shaped as the output), or `forward` for `None`.
    pub fn forward_onto(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, cols) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let x = x.reshape((rows, cols))?;
        let y = match residual {
            Some(r) => kernels::blas::linear_residual(
                &x,
                &self.weight,
                &self.bias,
                &r.reshape((rows, ()))?,
            )?,
            None => kernels::linear(&x, &self.weight, &self.bias)?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// LayerNorm over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GroupNorm over a channels-last map `[B, H, W, C]`.
#[derive(Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn load(w: Weights, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.get("weight", &[channels])?,
            bias: w.get("bias", &[channels])?,
            groups,
            eps,
        })
    }
    /// `silu(group_norm(x))`: every GroupNorm of the adapter is followed by a SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        kernels::norm::group_norm_silu(x, &self.weight, &self.bias, self.groups, self.eps)
    }
}

/// 3x3 convolution, padding 1, on `[B, H, W, C]`.
#[derive(Clone)]
pub struct Conv3x3 {
    weight: Tensor, // [C_out, C_in, 3, 3], PyTorch's layout
    bias: Tensor,
}

impl Conv3x3 {
    pub fn load(w: Weights, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Conv3x3 {
            weight: w.get("weight", &[c_out, c_in, 3, 3])?,
            bias: w.get("bias", &[c_out])?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::conv::conv3x3(x, &self.weight, &self.bias)
    }
}

/// 2x2 stride-2 convolution on `[B, H, W, C]`: a patchify, computed as reshape + matmul.
#[derive(Clone)]
pub struct Patchify {
    weight: Tensor, // [C_out, C_in, 2, 2]
    bias: Tensor,
}

impl Patchify {
    pub fn load(w: Weights, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Patchify {
            weight: w.get("weight", &[c_out, c_in, 2, 2])?,
            bias: w.get("bias", &[c_out])?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, wd, _) = x.dims4()?;
        let (h2, w2) = (h / 2, wd / 2);
        // Patch rows in (ky, kx, c) order: the copy moves runs of 2*C contiguous values
        // (kx and c together), where PyTorch's (c, ky, kx) order moves single floats.
        let patches = kernels::layout::patches_2x2(x)?;
        let rows = kernels::layout::tap_major(&self.weight)?;
        let y = kernels::linear(&patches, &rows, &self.bias)?;
        Ok(y.reshape((b, h2, w2, ()))?)
    }
}
