//! The building blocks of the bridge, written with differentiable candle ops only (no
//! fused `softmax_last_dim` / `layer_norm`, which have no backward in candle 0.11).
//! Activations in the adapter are channels-last (`[B, H, W, C]`), so that convolutions
//! become one matmul over im2col patches and the token grid falls out as a reshape.

use crate::error::Result;
use crate::kernels;
use crate::rng::Rng;
use candle_core::{D, Tensor};

/// Where a layer finds its weights: a map from `state_dict` names to tensors.
pub trait WeightSource {
    fn get(&self, name: &str) -> Result<Tensor>;
}

impl WeightSource for std::collections::HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| crate::error::Error::checkpoint(format!("missing tensor `{name}`")))
    }
}

/// `y = x W^T + b` over the last dimension of any-rank `x`.
#[derive(Clone)]
pub struct Linear {
    weight: Tensor, // [out, in], as PyTorch stores it
    bias: Tensor,
}

impl Linear {
    pub fn load(w: &dyn WeightSource, prefix: &str) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
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

/// Normalises `x` over the dimensions `dims` (kept), `(x - mean) / sqrt(var + eps)`,
/// with the biased variance as PyTorch uses.
/// Statistics are taken in f32 also when the network runs in bf16 (as autocast does):
/// a bf16 mean over thousands of values loses the digits the normalisation needs.
fn normalize<Ds: candle_core::shape::Dims + Copy>(
    x: &Tensor,
    dims: Ds,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let mean = x.mean_keepdim(dims)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(dims)?;
    Ok(centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?)
}

/// LayerNorm over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &dyn WeightSource, prefix: &str, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps as f32)? {
            return Ok(y);
        }
        let xn = normalize(x, D::Minus1, self.eps)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// GroupNorm over a channels-last map `[B, H, W, C]`.
#[derive(Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(w: &dyn WeightSource, prefix: &str, groups: usize, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
            groups,
            eps,
        })
    }
    /// `silu(self.forward(x))`, in one pass where the kernels allow.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let eps = self.eps as f32;
        if let Some(y) =
            kernels::norm::group_norm_silu(x, &self.weight, &self.bias, self.groups, eps)?
        {
            return Ok(y);
        }
        kernels::activation_owned(self.forward(x)?, kernels::Activation::Silu)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) =
            kernels::norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps as f32)?
        {
            return Ok(y);
        }
        let (b, h, wd, c) = x.dims4()?;
        let grouped = x.reshape((b, h * wd, self.groups, c / self.groups))?;
        let xn = normalize(&grouped, (1, 3), self.eps)?.reshape((b, h, wd, c))?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// 3x3 convolution, padding 1, on `[B, H, W, C]`: the fused patch-and-multiply kernel,
/// or im2col + one matmul.
#[derive(Clone)]
pub struct Conv3x3 {
    weight: Tensor, // [C_out, C_in, 3, 3], PyTorch's layout
    bias: Tensor,
}

impl Conv3x3 {
    pub fn load(w: &dyn WeightSource, prefix: &str) -> Result<Self> {
        Ok(Conv3x3 {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, wd, _) = x.dims4()?;
        // Tap-major rows `[C_out, 9*C_in]`, column (ky*3 + kx)*C_in + c: each tap's
        // channels are contiguous in a channels-last patch. A copy per call (9.4 MB for
        // 512 channels), made inside the graph so that training reaches the parameter.
        let rows = kernels::layout::tap_major(&self.weight)?;
        if let Some(y) = kernels::conv::conv3x3(x, &rows, &self.bias)? {
            return Ok(y);
        }
        let cols = match kernels::im2col::im2col_3x3(x)? {
            Some(cols) => cols,
            None => Self::patches(x)?,
        };
        let y = kernels::linear(&cols, &rows, &self.bias)?;
        Ok(y.reshape((b, h, wd, ()))?)
    }

    /// Patch rows from candle ops: nine shifted views of the padded map, stacked.
    fn patches(x: &Tensor) -> Result<Tensor> {
        let (b, h, wd, c) = x.dims4()?;
        let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
        let mut taps = Vec::with_capacity(9);
        for ky in 0..3 {
            for kx in 0..3 {
                taps.push(padded.narrow(1, ky, h)?.narrow(2, kx, wd)?);
            }
        }
        // [B, H, W, 9, C] -> rows of 9*C patch values, ordered as the weight rows.
        Ok(Tensor::stack(&taps, 3)?.reshape((b * h * wd, 9 * c))?)
    }
}

/// 2x2 stride-2 convolution on `[B, H, W, C]`: a patchify, computed as reshape + matmul.
#[derive(Clone)]
pub struct Patchify {
    weight: Tensor, // [C_out, C_in, 2, 2]
    bias: Tensor,
}

impl Patchify {
    pub fn load(w: &dyn WeightSource, prefix: &str) -> Result<Self> {
        Ok(Patchify {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
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

/// Softmax over the last dimension from differentiable ops. The max is detached: the
/// result does not depend on it, so it needs no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // In f32 also for bf16 networks, like the norms.
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

/// `x + dropout(h)`: inverted dropout on the residual branch, with masks from our own
/// RNG (so runs are reproducible and resumable); `x + h` without an RNG (evaluation).
pub fn residual_dropout(x: &Tensor, h: &Tensor, p: f32, rng: Option<&mut Rng>) -> Result<Tensor> {
    let Some(rng) = rng.filter(|_| p > 0.0) else {
        return Ok((x + h)?);
    };
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..h.elem_count())
        .map(|_| if rng.uniform() >= p { scale } else { 0.0 })
        .collect();
    kernels::dropout::add_masked(x, h, mask)
}
