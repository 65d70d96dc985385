//! Runtime dispatch to AVX-512 / AVX2 builds of plain loops (the default x86-64 target is
//! SSE2 only), and branch-free `exp`/`erf` approximations that such loops vectorise.

/// Defines `fn $name(args)` whose body is compiled three times (AVX-512F, AVX2+FMA,
/// baseline) and picks the best the CPU has at run time.
macro_rules! simd_fn {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        // Kernels take their buffers and sizes as plain arguments, as BLAS does.
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Accumulators per reduction: a float sum or max in one variable is a chain the
/// compiler must keep in order (no vector code); sixteen independent lanes vectorise.
pub(crate) const LANES: usize = 16;

/// `x.iter().sum()`, in lanes.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element (`-inf` for none), in lanes.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `sum(a[i] * b[i])`, in lanes.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

// Sum of squares in f64 (for gradient norms over millions of values), in lanes.
simd_fn!(
    pub(crate) fn sum_sq_f64(x: &[f32]) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += (c[i] as f64) * (c[i] as f64);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
);

/// `e^x` to about 2e-7 relative error, for |x| < 87; no branches or calls.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low mantissa bits of `shifted`: reading it from the bits
    // keeps the loop vectorised, where `n as i32` (a saturating cast) is done lane by lane.
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `erf(x)` (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-ax * ax)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_plain_loops() {
        for n in [0usize, 1, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.25)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 7) as f32 - 3.0) * 0.5).collect();
            let plain_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((sum(&a) - a.iter().sum::<f32>()).abs() < 1e-4, "sum of {n}");
            assert!((dot(&a, &b) - plain_dot).abs() < 1e-4, "dot of {n}");
            let plain_max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&a), plain_max, "max of {n}");
        }
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let e = exp(x) as f64;
            worst_exp = worst_exp.max(((e - (x as f64).exp()) / (x as f64).exp()).abs());
            let want = libm_erf(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
    }

    /// Reference erf by its series / continued fraction in f64.
    fn libm_erf(x: f64) -> f64 {
        unsafe extern "C" {
            fn erf(x: f64) -> f64;
        }
        // SAFETY: glibc's erf is a pure function.
        unsafe { erf(x) }
    }
}
