//! Which BLAS the kernels use. It is found at run time with `dlopen`, so the build needs no
//! system library: `DINO_BRIDGE_BLAS` names one or several (names or paths separated by
//! `:`, where `auto` stands for the candidates below; `off` for none), else the candidates
//! below are tried. Each library
//! found is identified (vendor, version, and the core OpenBLAS picked for this CPU) and
//! checked before any use:
//! - an OpenBLAS that runs its generic pre-AVX2 kernels on a CPU with AVX2 (it did not know
//!   the CPU: Debian's 0.3.21 says `Prescott` on recent Xeons) is passed over: its core is
//!   chosen when it initialises, so it is avoided, not repaired;
//! - its GEMM, as the kernels call it (one thread per block of rows), is timed against
//!   candle's own matmul on a product of the bridge's size; a library at less than half
//!   of candle's rate is passed over (the fused kernels that run on the BLAS win back a
//!   shortfall smaller than that: see `MIN_RATE_OF_CANDLE`).
//!
//! The first library in that order that passes is used (not the fastest: timings vary
//! between processes, and a resumed run must compute with the library it started with);
//! with none, the kernels use candle's matmul, so a BLAS does not make the bridge slower
//! than no BLAS. `description()` says
//! what was chosen and why (the C API's capabilities report it).
//! `DINO_BRIDGE_BLAS_UNCHECKED` (any value) skips the checks, for benchmarks that compare
//! libraries.

use crate::log::{Level, emit};
use candle_core::{Device, Tensor};
use once_cell::sync::Lazy;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::time::Instant;

/// `cblas_sgemm`.
pub type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Libraries tried when `DINO_BRIDGE_BLAS` names none: MKL, the OpenBLAS that the
/// `scipy-openblas32` wheel ships (its symbols carry a `scipy_` prefix; the Python package
/// points `DINO_BRIDGE_BLAS` at it), the system's OpenBLAS, BLIS.
const CANDIDATES: [&str; 6] = [
    "libmkl_rt.so.3",
    "libmkl_rt.so.2",
    "libscipy_openblas.so",
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
];

/// Symbol prefixes: plain CBLAS, and scipy-openblas's.
const PREFIXES: [&str; 2] = ["", "scipy_"];

/// OpenBLAS cores whose kernels use no AVX2: on a CPU that has it, they mean OpenBLAS did
/// not recognise the CPU and fell back to a generic core.
const PRE_AVX2_CORES: [&str; 24] = [
    "katmai",
    "coppermine",
    "northwood",
    "prescott",
    "banias",
    "yonah",
    "core2",
    "penryn",
    "dunnington",
    "nehalem",
    "sandybridge",
    "atom",
    "athlon",
    "opteron",
    "opteron_sse3",
    "barcelona",
    "shanghai",
    "istanbul",
    "bobcat",
    "bulldozer",
    "piledriver",
    "steamroller",
    "nano",
    "generic",
];

/// The least GEMM rate, as a share of candle's own matmul's, at which a BLAS is used.
const MIN_RATE_OF_CANDLE: f64 = 0.5;

/// A BLAS the kernels may use.
pub struct Blas {
    pub sgemm: Sgemm,
    /// What it is: file, vendor and version, core (OpenBLAS).
    pub name: String,
    /// Its GEMM rate over candle's, measured when it was loaded.
    pub speedup: f64,
}

/// What was chosen, and the description the capabilities report.
struct Choice {
    blas: Option<Blas>,
    description: String,
}

static CHOICE: Lazy<Choice> = Lazy::new(choose);

/// The BLAS in use, if any.
pub fn loaded() -> Option<&'static Blas> {
    CHOICE.blas.as_ref()
}

/// What the kernels multiply with and why: the library and its measured speed over
/// candle's matmul, or `none` with the reasons each library found was passed over.
pub fn description() -> &'static str {
    &CHOICE.description
}

fn choose() -> Choice {
    let setting = std::env::var("DINO_BRIDGE_BLAS").unwrap_or_default();
    if setting == "off" || setting == "0" {
        return Choice {
            blas: None,
            description: "none: DINO_BRIDGE_BLAS=off (candle's own matmul)".into(),
        };
    }
    // `auto` (alone, or among named libraries) stands for the candidates below.
    let setting = if setting.is_empty() {
        "auto".to_string()
    } else {
        setting
    };
    let names: Vec<String> = setting
        .split(':')
        .filter(|s| !s.is_empty())
        .flat_map(|s| match s {
            "auto" => CANDIDATES.iter().map(|c| c.to_string()).collect(),
            named => vec![named.to_string()],
        })
        .collect();
    let named: Vec<&str> = setting.split(':').filter(|s| *s != "auto").collect();
    let mut passed_over = Vec::new();
    let mut chosen: Option<Blas> = None;
    let mut candle_rate = None;
    // dlopen hands back the same handle for a library already loaded (a path and its
    // file name, say): each is checked once.
    let mut seen = Vec::new();
    // The first that passes, never the fastest: timings differ between processes, and two
    // processes with one setting must compute with the same library (a resumed run
    // continues bit for bit only on the GEMM it started with).
    for name in names {
        let Some(lib) = open(&name, &mut seen) else {
            // A library named outright and missing is worth saying; a default one is not.
            if named.contains(&name.as_str()) {
                passed_over.push(format!("{name}: not found or no cblas_sgemm"));
            }
            continue;
        };
        match check(&lib, &mut candle_rate) {
            Ok(speedup) => {
                chosen = Some(Blas {
                    sgemm: lib.sgemm,
                    name: lib.name,
                    speedup,
                });
                break;
            }
            Err(why) => passed_over.push(format!("{}: {why}", lib.name)),
        }
    }
    let others = if passed_over.is_empty() {
        String::new()
    } else {
        format!("; passed over: {}", passed_over.join("; "))
    };
    let choice = match chosen {
        Some(b) => Choice {
            description: format!(
                "{}: GEMM {:.2}x candle's own matmul{others}",
                b.name, b.speedup
            ),
            blas: Some(b),
        },
        None => Choice {
            blas: None,
            description: format!(
                "none (candle's own matmul: the bridge runs slower than with a fast BLAS){}; \
                 install MKL (pip install mkl) or scipy-openblas32 (pip install \
                 scipy-openblas32) and set DINO_BRIDGE_BLAS to its library",
                if passed_over.is_empty() {
                    ": no BLAS found (MKL, scipy-openblas, OpenBLAS, BLIS)".to_string()
                } else {
                    others
                }
            ),
        },
    };
    let level = if choice.blas.is_some() {
        Level::Info
    } else {
        Level::Warn
    };
    emit(level, format!("BLAS: {}", choice.description));
    choice
}

/// A library opened and identified.
struct Library {
    sgemm: Sgemm,
    name: String,
    /// OpenBLAS's core for this CPU, lower case.
    core: Option<String>,
}

/// `dlopen`s `name`, finds its `cblas_sgemm`, makes it single-threaded (each product is
/// split across rayon's threads, one piece per thread: the library's own pool would
/// oversubscribe the cores, its idle workers spinning beside ours) and says what it is.
fn open(name: &str, seen: &mut Vec<usize>) -> Option<Library> {
    let cname = CString::new(name).ok()?;
    // SAFETY: dlopen with a valid C string; the handle stays open for the process (its
    // functions are used until exit), or is closed here when it has no cblas_sgemm.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() || seen.contains(&(handle as usize)) {
        return None;
    }
    seen.push(handle as usize);
    let symbol = |s: &str| -> *mut c_void {
        let c = CString::new(s).expect("no NUL");
        // SAFETY: a live handle and a valid C string.
        unsafe { libc::dlsym(handle, c.as_ptr()) }
    };
    let Some((prefix, sgemm)) = PREFIXES.iter().find_map(|p| {
        let f = symbol(&format!("{p}cblas_sgemm"));
        (!f.is_null()).then_some((*p, f))
    }) else {
        // SAFETY: the handle came from dlopen above and nothing of it is used.
        unsafe { libc::dlclose(handle) };
        return None;
    };
    // SAFETY (each call below): the symbols have these C signatures in OpenBLAS, MKL and
    // BLIS (BLIS counts threads in its 64-bit `dim_t`); the strings they return are static.
    unsafe {
        for setter in [
            format!("{prefix}openblas_set_num_threads"),
            "MKL_Set_Num_Threads".into(),
        ] {
            let f = symbol(&setter);
            if !f.is_null() {
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(f)(1);
            }
        }
        let f = symbol("bli_thread_set_num_threads");
        if !f.is_null() {
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(i64)>(f)(1);
        }
        let text = |s: &str| -> Option<String> {
            let f = symbol(s);
            if f.is_null() {
                return None;
            }
            let get =
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> *const c_char>(f);
            let p = get();
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let core = text(&format!("{prefix}openblas_get_corename"));
        let config = text(&format!("{prefix}openblas_get_config"));
        let vendor = match (&config, &core) {
            // "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...": the first two words.
            (Some(c), _) => c.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
            (None, Some(_)) => "OpenBLAS".into(),
            _ if name.contains("mkl") => "MKL".into(),
            _ if name.contains("blis") => "BLIS".into(),
            _ => "a BLAS".into(),
        };
        let name = match &core {
            Some(core) => format!("{name} ({vendor}, core {core})"),
            None => format!("{name} ({vendor})"),
        };
        Some(Library {
            sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm),
            name,
            core: core.map(|c| c.to_lowercase()),
        })
    }
}

/// Whether the CPU has AVX2 (x86-64); elsewhere OpenBLAS's cores are not judged.
fn cpu_has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The checks of a library found: its core (OpenBLAS), then its speed over candle's
/// matmul (measured once, `candle_rate`). Returns that speedup, or why it is passed over.
fn check(lib: &Library, candle_rate: &mut Option<f64>) -> Result<f64, String> {
    // For benchmarks that compare libraries: take them as they are, unmeasured.
    if std::env::var_os("DINO_BRIDGE_BLAS_UNCHECKED").is_some() {
        return Ok(1.0);
    }
    if let Some(core) = &lib.core
        && PRE_AVX2_CORES.contains(&core.as_str())
        && cpu_has_avx2()
    {
        return Err(format!(
            "OpenBLAS picked its generic '{core}' kernels, which use none of this CPU's \
             AVX2/AVX-512 (it does not know this CPU; OPENBLAS_CORETYPE=Haswell or SkylakeX, \
             set before the process starts, picks others)"
        ));
    }
    let blas = gemm_rate(|a, b, c, (m, k, n)| blas_gemm(lib.sgemm, a, b, c, (m, k, n)))
        .map_err(|e| format!("its GEMM failed: {e}"))?;
    let candle = match candle_rate {
        Some(r) => *r,
        None => {
            let r = gemm_rate(candle_gemm).map_err(|e| format!("candle's GEMM failed: {e}"))?;
            *candle_rate = Some(r);
            r
        }
    };
    // The bridge's fused kernels (attention, convolutions) run on the BLAS too, and with
    // one whose GEMM is 0.7x candle's the bridge still ran 1.3x faster than without (an
    // AVX-512 Zen 4, f32, 2 threads); OpenBLAS on its generic core made it 0.5x.
    // Below half of candle's rate, a BLAS costs more than its kernels win.
    if blas < MIN_RATE_OF_CANDLE * candle {
        return Err(format!(
            "its GEMM ran at {blas:.0} GFLOP/s, less than half of candle's own matmul ({candle:.0})"
        ));
    }
    Ok(blas / candle)
}

/// `C [m, n] = A [m, k] @ W^T` with `W` `[n, k]` (a linear's weight as PyTorch stores it,
/// read transposed, as the kernels do) through `sgemm`, one block of rows per thread as
/// the kernels split their products.
fn blas_gemm(sgemm: Sgemm, a: &[f32], b: &[f32], c: &mut [f32], (m, k, n): (usize, usize, usize)) {
    let threads = rayon::current_num_threads().max(1);
    let rows = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, block) in c.chunks_mut(rows * n).enumerate() {
            let a = &a[i * rows * k..];
            s.spawn(move || {
                let r = block.len() / n;
                // SAFETY: `a` holds at least `r` rows of `k`, `b` `n` rows of `k`, `block` `r`
                // rows of `n`, all row-major and contiguous.
                unsafe {
                    sgemm(
                        ROW_MAJOR,
                        NO_TRANS,
                        TRANS,
                        r as c_int,
                        n as c_int,
                        k as c_int,
                        1.0,
                        a.as_ptr(),
                        k as c_int,
                        b.as_ptr(),
                        k as c_int,
                        0.0,
                        block.as_mut_ptr(),
                        n as c_int,
                    )
                };
            });
        }
    });
}

/// The same product with candle's own matmul.
fn candle_gemm(a: &[f32], b: &[f32], c: &mut [f32], (m, k, n): (usize, usize, usize)) {
    let product = || -> candle_core::Result<Vec<f32>> {
        let a = Tensor::from_slice(a, (m, k), &Device::Cpu)?;
        let w = Tensor::from_slice(b, (n, k), &Device::Cpu)?;
        a.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()
    };
    if let Ok(v) = product() {
        c.copy_from_slice(&v);
    }
}

/// GFLOP/s of `gemm` on a product the size of the bridge's linears (1024 token rows, width
/// 768), best of three after a warm-up, checked against a plain reference on a few entries.
fn gemm_rate(
    gemm: impl Fn(&[f32], &[f32], &mut [f32], (usize, usize, usize)),
) -> std::result::Result<f64, String> {
    let (m, k, n) = (1024, 768, 768);
    let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 500.0;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let b: Vec<f32> = (0..n * k).map(|i| value(i + 13)).collect(); // W [n, k]
    let mut c = vec![0f32; m * n];
    gemm(&a, &b, &mut c, (m, k, n));
    for &(i, j) in &[(0, 0), (m - 1, n - 1), (m / 2, n / 3)] {
        let want: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
        if (c[i * n + j] - want).abs() > 1e-3 * want.abs().max(1.0) {
            return Err(format!("C[{i}, {j}] = {}, expected {want}", c[i * n + j]));
        }
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        gemm(&a, &b, &mut c, (m, k, n));
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_described_and_never_slower_than_candle() {
        let d = description();
        match loaded() {
            Some(b) => {
                assert!(b.speedup >= MIN_RATE_OF_CANDLE, "{d}");
                assert!(
                    d.starts_with(&b.name) && d.contains("candle's own matmul"),
                    "{d}"
                );
            }
            None => assert!(d.starts_with("none"), "{d}"),
        }
    }

    #[test]
    fn generic_openblas_cores_are_known() {
        assert!(PRE_AVX2_CORES.contains(&"prescott") && PRE_AVX2_CORES.contains(&"katmai"));
        assert!(!PRE_AVX2_CORES.contains(&"haswell") && !PRE_AVX2_CORES.contains(&"skylakex"));
    }
}
