//! What the bridge's gradient code shares: a gradient read from candle's `GradStore` (an
//! error, never zeros, when the graph was cut) and the seed of a step's dropout masks.

use crate::error::{Error, ErrorKind, Result};
use crate::rng::Rng;
use candle_core::Tensor;
use candle_core::backprop::GradStore;

/// The seed of the dropout masks of the update with 0-based index `step` (CPU and GPU).
pub fn dropout_seed(seed: u64, step: i64) -> u64 {
    Rng::new(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The gradient of `t` in `grads`. A tensor on the loss's path always gets one, so a
/// missing gradient means an op without a backward cut the graph: an error, never zeros.
pub fn grad_of(grads: &GradStore, t: &Tensor, what: &str) -> Result<Tensor> {
    grads.get(t).cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("no gradient reached {what}: an op on its path has no backward"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_missing_gradient_is_an_internal_error_not_zeros() {
        let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let used = (x.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let grads = used.backward().unwrap();
        let g = grad_of(&grads, x.as_tensor(), "x").unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
        // A graph cut (as an op without a backward makes it): no gradient reaches x.
        let y = Var::new(0f32, &Device::Cpu).unwrap();
        let cut = x.as_tensor().detach().sum_all().unwrap();
        let loss = (cut + y.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let err = grad_of(&grads, x.as_tensor(), "the latents").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Internal);
        assert!(
            err.message.contains("no gradient reached the latents"),
            "{}",
            err.message
        );
    }
}
