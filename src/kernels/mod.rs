//! CPU kernels that candle lacks or does slowly; each has a plain candle fallback.

pub mod blas;

pub use blas::matmul;
