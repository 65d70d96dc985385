//! CPU kernels that candle lacks or does slowly, each with a backward and a plain candle
//! fallback for other devices: BLAS matmul, fused activations, norms, im2col.

pub mod activation;
pub mod attention;
pub mod blas;
pub mod im2col;
pub(crate) mod simd;

pub use activation::{Activation, activation};
pub use blas::{linear, matmul};
pub mod norm;

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernels of this module on or off for the whole process (off: candle's own
/// ops everywhere). For side-by-side benchmarks and checks; on by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}
