//! Comparing a kernel with candle's ops, forward and backward (unit tests only).
use candle_core::{Tensor, Var};

/// Largest `|a - b|`, compared in f64 (any float dtypes).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    (f64s(a) - f64s(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap() as f32
}

/// Backpropagates `sum(ours * probe)` and `sum(theirs * probe)` for one random probe
/// and returns, per variable, the largest gradient difference and the reference
/// gradient's largest magnitude.
pub fn grad_gaps(ours: &Tensor, theirs: &Tensor, vars: &[&Var]) -> Vec<(f32, f32)> {
    let probe = Tensor::randn(0f32, 1.0, ours.shape(), ours.device()).unwrap();
    let g1 = (ours * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (theirs * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            (
                max_abs_diff(a, b),
                b.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// Whether the BLAS-backed kernels can be compared here. CI installs OpenBLAS, so
/// there (CI set) a missing BLAS fails the test instead of skipping the comparison.
pub fn blas_or_skip(what: &str) -> bool {
    if super::blas::blas_name().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs without a usable BLAS ({}): {what} goes untested",
        super::blas::blas_description()
    );
    eprintln!("no system BLAS here: {what} is candle's own, nothing to compare");
    false
}
