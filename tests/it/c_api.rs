//! Builds the C and C++ clients (`tests/c`, `tests/cpp`, `examples`) with gcc / g++
//! against the generated header, links them to the cdylib and runs them on the fixtures
//! (also under valgrind, with `--include-ignored`: `scripts/test-all --full`).

use crate::common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the cdylib of the profile and features this test runs under (once per test
/// process); returns the folder holding it.
pub fn build_cdylib() -> PathBuf {
    static LIB_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB_DIR.get_or_init(cargo_build_lib).clone()
}

fn cargo_build_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    let release = profile_dir.file_name().unwrap() == "release";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    if cfg!(feature = "cuda") {
        cmd.args(["--features", "cuda"]);
    }
    assert!(cmd.status().unwrap().success(), "cargo build --lib failed");
    assert!(profile_dir.join("libdino_bridge.so").is_file());
    profile_dir
}

fn compile(
    srcs: &[PathBuf],
    out: &Path,
    lib_dir: &Path,
    compiler: &str,
    std: &str,
    includes: &[PathBuf],
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-O1"])
        // The clients expect what a library without CUDA says to CUDA requests.
        .args(cfg!(feature = "cuda").then_some("-DDINO_BRIDGE_CUDA_BUILD"))
        .arg(format!("-I{}", root.join("include").display()))
        .arg(format!("-I{}", root.join("bindings/cpp").display()))
        .args(includes.iter().map(|dir| format!("-I{}", dir.display())))
        .args(srcs)
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib_dir.display()))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-ldino_bridge", "-lm", "-pthread"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed on {srcs:?}");
}

/// Builds `src` (relative to the crate) with `compiler -std=std` into a temporary folder;
/// returns the executable.
pub fn build(name: &str, src: &str, compiler: &str, std: &str) -> PathBuf {
    build_from(name, &[src], compiler, std, &[])
}

/// `build` of several translation units (relative to the crate), with more include
/// folders.
fn build_from(
    name: &str,
    srcs: &[&str],
    compiler: &str,
    std: &str,
    includes: &[PathBuf],
) -> PathBuf {
    let lib_dir = build_cdylib();
    let dir = tmp_dir(name);
    let exe = dir.join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let srcs: Vec<PathBuf> = srcs.iter().map(|s| root.join(s)).collect();
    compile(&srcs, &exe, &lib_dir, compiler, std, includes);
    exe
}

/// Runs `exe` with `args` (under `wrapper` when given, e.g. valgrind) in its folder;
/// returns whether it exited 0 and what it printed.
pub fn run_exe(exe: &Path, args: &[std::ffi::OsString], wrapper: &[&str]) -> (bool, String) {
    let mut cmd = match wrapper.split_first() {
        Some((tool, flags)) => {
            let mut c = Command::new(tool);
            c.args(flags).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let out = cmd
        .args(args)
        .current_dir(exe.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn build_and_run(
    name: &str,
    src: &str,
    compiler: &str,
    std: &str,
    args: &[std::ffi::OsString],
) -> (bool, String) {
    run_exe(&build(name, src, compiler, std), args, &[])
}

/// The working folder `build_and_run` uses for `name` (made fresh by it).
fn scratch(name: &str) -> PathBuf {
    tmp_dir(&format!("{name}-files"))
}

pub fn os(s: impl AsRef<std::ffi::OsStr>) -> std::ffi::OsString {
    s.as_ref().to_os_string()
}

/// The arguments of `test_capi`: fixtures, a scratch folder, the expected losses and a
/// checkpoint whose config asks for one more block than its tensors hold.
fn capi_args() -> Vec<std::ffi::OsString> {
    let dir = scratch("capi");
    let ckpt =
        dino_bridge::checkpoint::load(&fixtures().join("model.safetensors"), None, None).unwrap();
    let mut cfg = ckpt.config.clone();
    let weights = ckpt.ordered_weights().unwrap();
    cfg.depth += 1;
    let misfit = dir.join("misfit.safetensors");
    dino_bridge::checkpoint::save(
        &misfit,
        &dino_bridge::checkpoint::SaveParts::weights(&cfg, &weights),
    )
    .unwrap();
    let exp = expected();
    vec![
        os(fixtures()),
        os(&dir),
        os(exp["loss_grid8"].to_string()),
        os(exp["loss_latents"].to_string()),
        os(&misfit),
    ]
}

#[test]
fn c_client_round_trip_and_bad_inputs() {
    let (ok, text) = build_and_run(
        "test_capi",
        "tests/c/test_capi.c",
        "gcc",
        "c11",
        &capi_args(),
    );
    println!("{text}");
    assert!(
        ok && text.contains("all checks passed"),
        "C client failed:\n{text}"
    );
}

#[test]
fn bad_input_matrix_over_every_entry_point() {
    let args = [os(fixtures()), os(scratch("bad-inputs"))];
    let (ok, text) = build_and_run(
        "test_bad_inputs",
        "tests/c/test_bad_inputs.c",
        "gcc",
        "c11",
        &args,
    );
    println!("{text}");
    let cases = text.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        ok && cases >= 350 && text.contains(&format!("all {cases} cases passed")),
        "bad-input matrix failed:\n{text}"
    );
}

/// `tests/c/test_shapes.c`: every value of `shared/fixtures/shapes` (other latent sizes,
/// caller grids, w_gram, spatial_norm_gamma) through the C API. It reads the expected
/// losses from the folder's `expected.json` itself.
#[test]
fn c_client_matches_the_shapes_fixtures() {
    let (ok, text) = build_and_run(
        "test_shapes",
        "tests/c/test_shapes.c",
        "gcc",
        "c11",
        &[os(shapes())],
    );
    println!("{text}");
    assert!(
        ok && text.contains("checks passed"),
        "C shapes client failed:\n{text}"
    );
}

/// The include folder of the torch wheel in the repository's `.venv`, which ships the real
/// DLPack header (`ATen/dlpack.h`); None when there is no such venv, torch or header.
fn torch_include() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    // Where `import torch` would load it from, without loading it (torch takes seconds).
    let out = Command::new(&python)
        .args([
            "-c",
            "import importlib.util, os; s = importlib.util.find_spec('torch'); \
             print(os.path.join(os.path.dirname(s.origin), 'include'))",
        ])
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && dir.join("ATen/dlpack.h").is_file()).then_some(dir)
}

/// `torch_include()`, or None after saying what is skipped. CI has the venv (scripts/test-all
/// makes it first), so there (CI set) a missing header fails the test instead.
fn torch_include_or_skip(what: &str) -> Option<PathBuf> {
    let dir = torch_include();
    if dir.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs without torch's ATen/dlpack.h in .venv: {what} goes untested"
        );
        eprintln!(
            "no torch with ATen/dlpack.h in .venv (make it with scripts/test-all): {what} skipped"
        );
    }
    dir
}

/// `tests/c/test_dlpack_layout.c` and its second translation unit, against torch's
/// `ATen/dlpack.h` in `include`.
fn build_layout(name: &str, include: PathBuf) -> PathBuf {
    build_from(
        name,
        &[
            "tests/c/test_dlpack_layout.c",
            "tests/c/dlpack_layout_ours.c",
        ],
        "gcc",
        "c11",
        &[include],
    )
}

/// The header's DLPack declarations have the layout of the real `dlpack.h` (torch's
/// `ATen/dlpack.h`: the C program compares the two, and calls a `*_dlpack` function with a
/// real `DLTensor`), and of the Rust mirrors the library reads them with
/// (`src/ffi/dlpack.rs`): sizes, alignments, and every field's offset and size. The C++
/// wrapper compiles after the real `dlpack.h` as well.
#[test]
fn dlpack_declarations_match_dlpack_h_and_the_rust_mirrors() {
    use dino_bridge::ffi::dlpack::{DLDataType, DLDevice, DLTensor};
    use std::mem::{align_of, offset_of, size_of, size_of_val};
    let Some(include) = torch_include_or_skip("the DLPack layout check") else {
        return;
    };
    // The C++ wrapper compiles with the real dlpack.h included first too (there
    // `DLDevice.device_type` is an enum, which `dino_bridge::Tensor` must assign).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("g++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"])
        .arg(format!("-I{}", root.join("include").display()))
        .arg(format!("-I{}", root.join("bindings/cpp").display()))
        .arg(format!("-I{}", include.display()))
        .args(["-include", "ATen/dlpack.h"])
        .arg(root.join("tests/cpp/test_cpp.cpp"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "dino_bridge.hpp does not compile after ATen/dlpack.h"
    );
    let (ok, text) = run_exe(&build_layout("test_dlpack_layout", include), &[], &[]);
    println!("{text}");
    assert!(
        ok && text.contains("all 15 entries match"),
        "DLPack layout check failed:\n{text}"
    );
    // The header's values ("ours NAME a b"): size and alignment of a struct, offset and
    // size of a field.
    let header: std::collections::HashMap<String, (usize, usize)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("ours ")?.split_whitespace().collect();
            Some((w[0].to_string(), (w[2].parse().ok()?, w[4].parse().ok()?)))
        })
        .collect();
    macro_rules! layout {
        ($t:ident) => {
            (
                stringify!($t).to_string(),
                (size_of::<$t>(), align_of::<$t>()),
            )
        };
        ($t:ident . $f:ident) => {{
            // SAFETY: the mirrors hold integers and raw pointers only: all-zero is valid.
            let v: $t = unsafe { std::mem::zeroed() };
            (
                concat!(stringify!($t), ".", stringify!($f)).to_string(),
                (offset_of!($t, $f), size_of_val(&v.$f)),
            )
        }};
    }
    let rust = [
        layout!(DLDevice),
        layout!(DLDataType),
        layout!(DLTensor),
        layout!(DLDevice.device_type),
        layout!(DLDevice.device_id),
        layout!(DLDataType.code),
        layout!(DLDataType.bits),
        layout!(DLDataType.lanes),
        layout!(DLTensor.data),
        layout!(DLTensor.device),
        layout!(DLTensor.ndim),
        layout!(DLTensor.dtype),
        layout!(DLTensor.shape),
        layout!(DLTensor.strides),
        layout!(DLTensor.byte_offset),
    ];
    assert_eq!(header.len(), rust.len(), "entries printed: {header:?}");
    for (name, value) in rust {
        assert_eq!(
            header.get(&name),
            Some(&value),
            "{name}: dino_bridge.h (left) vs src/ffi/dlpack.rs (right)"
        );
    }
}

/// The C clients under valgrind: no invalid reads or writes, no uninitialised values,
/// no definite or indirect leaks. CI installs valgrind; elsewhere it may be missing. About
/// 13 minutes on two cores (the bad-input matrix alone 4.5): `scripts/test-all --full`
/// (which CI runs) includes it.
#[test]
#[ignore = "slow (about 13 minutes): scripts/test-all --full runs it"]
fn c_clients_are_clean_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs without valgrind: the memory checks go untested"
        );
        eprintln!("valgrind is not installed: memory checks skipped");
        return;
    }
    let suppressions = format!(
        "--suppressions={}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/c/valgrind.supp")
            .display()
    );
    let valgrind = [
        "valgrind",
        suppressions.as_str(),
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,indirect",
        "--show-leak-kinds=definite,indirect",
        "-q",
    ];
    let mut runs = vec![
        (
            build("vg_capi", "tests/c/test_capi.c", "gcc", "c11"),
            capi_args(),
            "all checks passed",
        ),
        (
            build("vg_bad", "tests/c/test_bad_inputs.c", "gcc", "c11"),
            vec![os(fixtures()), os(scratch("vg-bad"))],
            "cases passed",
        ),
        (
            build("vg_shapes", "tests/c/test_shapes.c", "gcc", "c11"),
            vec![os(shapes())],
            "checks passed",
        ),
    ];
    if let Some(include) = torch_include_or_skip("the DLPack layout client under valgrind") {
        runs.push((build_layout("vg_layout", include), vec![], "entries match"));
    }
    for (exe, args, done) in runs {
        let (ok, text) = run_exe(&exe, &args, &valgrind);
        assert!(
            ok && text.contains(done) && !text.contains("=="),
            "{} under valgrind:\n{text}",
            exe.display()
        );
    }
}

/// Temporary files of saves to `path` that a kill left behind in its folder.
pub fn temporaries_of(path: &Path) -> Vec<PathBuf> {
    let prefix = format!(".{}.tmp-", path.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .collect()
}

/// Where in `bridge_save` (`checkpoint::write_atomic`) a kill lands: with the temporary
/// file written but not yet synced, synced but not yet renamed over the path, or renamed
/// with the folder not yet synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavePoint {
    SyncTemporary,
    Rename,
    SyncFolder,
}

impl SavePoint {
    pub const ALL: [SavePoint; 3] = [
        SavePoint::SyncTemporary,
        SavePoint::Rename,
        SavePoint::SyncFolder,
    ];

    /// Whether the save has replaced the file at that point.
    pub fn replaced(self) -> bool {
        self == SavePoint::SyncFolder
    }
}

/// Runs `paused` until it stops at `point` of its `nth` save to `path` (counting the saves
/// to `path` only), and kills it there. Panics if the process ends first.
pub fn kill_at(mut paused: super::pause::Paused, path: &Path, nth: usize, point: SavePoint) {
    let tmp_prefix = format!(".{}.tmp-", path.file_name().unwrap().to_string_lossy());
    let (mut saves, mut renamed) = (0, false);
    loop {
        let Some(ev) = paused.next() else {
            panic!(
                "the process ended before save {nth} of {}: {:?}",
                path.display(),
                paused.other
            );
        };
        let name = ev
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let sync_temporary = ev.call == "fsync" && name.is_some_and(|n| n.starts_with(&tmp_prefix));
        let rename = ev.call == "rename" && ev.path.file_name() == path.file_name();
        let sync_folder = ev.call == "fsync"
            && renamed
            && path.parent().unwrap().canonicalize().ok() == Some(ev.path.clone());
        if sync_temporary {
            saves += 1;
        }
        let here = match point {
            SavePoint::SyncTemporary => sync_temporary,
            SavePoint::Rename => rename,
            SavePoint::SyncFolder => sync_folder,
        };
        if saves == nth && here {
            paused.kill();
            return;
        }
        renamed = rename;
        paused.go();
    }
}

/// SIGKILLs inside `bridge_save`, at each point of its write (chosen by event, not time),
/// in the 2nd to 4th save of a train-and-save loop: the file at the path always loads and
/// holds a whole checkpoint, the previous save's until the rename and the new one after it;
/// a kill before the rename leaves the temporary file behind.
#[test]
fn kills_during_bridge_save_leave_a_whole_checkpoint() {
    let exe = build("save_loop", "tests/c/save_loop.c", "gcc", "c11");
    let dir = scratch("save-kills");
    let path = dir.join("bridge.safetensors");
    for (i, point) in SavePoint::ALL.iter().cycle().take(9).enumerate() {
        let nth = 2 + i / 3;
        let _ = std::fs::remove_file(&path);
        for t in temporaries_of(&path) {
            std::fs::remove_file(t).unwrap();
        }
        let mut cmd = Command::new(&exe);
        cmd.args([os(fixtures()), os(&path)])
            .stdout(std::process::Stdio::null());
        kill_at(super::pause::Paused::spawn(cmd), &path, nth, *point);
        let ckpt = dino_bridge::checkpoint::load(&path, None, None)
            .unwrap_or_else(|e| panic!("{point:?} of save {nth}: the file does not load: {e}"));
        let step = ckpt.train_state.map(|s| s.step).unwrap_or(-1);
        // Save k holds step k (the loop: a train step, then a save).
        let want = if point.replaced() { nth } else { nth - 1 } as i64;
        assert_eq!(
            step, want,
            "{point:?} of save {nth}: the file holds step {step}"
        );
        assert!(
            ckpt.optim.is_some(),
            "{point:?} of save {nth}: optimiser state missing"
        );
        assert_eq!(
            temporaries_of(&path).len(),
            !point.replaced() as usize,
            "{point:?} of save {nth}: temporary files left"
        );
    }
}

#[test]
fn the_readme_c_example_builds_and_runs() {
    let (ok, text) = build_and_run(
        "forward",
        "examples/forward.c",
        "gcc",
        "c11",
        &[os(fixtures().join("model.pt"))],
    );
    assert!(ok && text.contains("tokens [2, 16, 48]"), "{text}");
}

#[test]
fn cpp_wrapper_round_trip_and_exceptions() {
    let dir = scratch("cpp");
    let shapes = expected_shapes();
    let args = [
        os(fixtures()),
        os(&dir),
        os(expected()["loss_grid8"].to_string()),
        os(shapes["loss_fine_repa"].to_string()),
        os(shapes["loss_fine_spatialnorm0.6_gram0.5"].to_string()),
    ];
    let (ok, text) = build_and_run("test_cpp", "tests/cpp/test_cpp.cpp", "g++", "c++17", &args);
    assert!(
        ok && text.contains("all checks passed"),
        "C++ client failed:\n{text}"
    );
}

/// The C++ wrapper against a library that reports another ABI version (a preloaded
/// `bridge_abi_version` returning 1): opening a bridge throws, naming both versions.
#[test]
fn cpp_wrapper_refuses_a_library_of_another_abi() {
    let exe = build("test_cpp_abi", "tests/cpp/test_cpp.cpp", "g++", "c++17");
    let dir = scratch("cpp-abi");
    let src = dir.join("abi1.c");
    std::fs::write(
        &src,
        "#include <stdint.h>\nuint32_t bridge_abi_version(void) { return 1; }\n",
    )
    .unwrap();
    let shim = dir.join("libabi1.so");
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success(), "gcc failed on the ABI 1 shim");
    let out = Command::new(&exe)
        .arg("--expect-abi-mismatch")
        .arg(fixtures().join("model.safetensors"))
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("refused: [ABI_MISMATCH]"),
        "{text}"
    );
}

/// Two handles on two threads, their gradients averaged by hand and applied by each
/// (ABI 5): the ranks stay bit-identical and compute what one handle trained on the whole
/// batch computes.
#[test]
fn the_cpp_data_parallel_example_keeps_its_ranks_identical() {
    let args = [os(fixtures().join("model.safetensors")), os("5")];
    let (ok, text) = build_and_run(
        "data_parallel",
        "examples/data_parallel.cpp",
        "g++",
        "c++17",
        &args,
    );
    assert!(ok, "{text}");
    assert!(text.contains("ranks identical: yes"), "{text}");
    assert_eq!(text.matches("step ").count(), 5, "{text}");
}

#[test]
fn the_cpp_trainer_example_aligns_its_projector() {
    let args = [os(fixtures().join("model.safetensors")), os("40")];
    let (ok, text) = build_and_run("trainer", "examples/trainer.cpp", "g++", "c++17", &args);
    assert!(ok, "{text}");
    let losses: Vec<f32> = text
        .lines()
        .filter_map(|l| l.split("loss ").nth(1)?.trim().parse().ok())
        .collect();
    assert!(
        losses.len() >= 2 && losses[losses.len() - 1] < 0.8 * losses[0],
        "{text}"
    );
}
