//! CPU kernels that candle lacks or does slowly, each with a backward and a plain candle
//! fallback for other devices: BLAS matmul, fused activations, norms, im2col.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod blas;
mod blas_load;
pub mod conv;
mod cpu;
pub mod dropout;
pub mod im2col;
pub mod layout;
pub mod norm;
mod patches;
pub(crate) mod simd;
#[cfg(test)]
pub(crate) mod testing;
mod winograd;

pub use activation::{Activation, activation, activation_owned};
pub use blas::{linear, matmul};
pub use cpu::{enabled, set_enabled};
