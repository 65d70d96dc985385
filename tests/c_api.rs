//! Builds the C client (`tests/c/test_capi.c`) with gcc against the generated header,
//! links it to the cdylib and runs it on the fixtures.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the cdylib of the profile this test runs under; returns the folder holding it.
pub fn build_cdylib() -> PathBuf {
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
    assert!(cmd.status().unwrap().success(), "cargo build --lib failed");
    assert!(profile_dir.join("libdino_bridge.so").is_file());
    profile_dir
}

fn compile(src: &Path, out: &Path, lib_dir: &Path, compiler: &str, std: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(format!("-I{}", root.join("include").display()))
        .arg(format!("-I{}", root.join("bindings/cpp").display()))
        .arg(src)
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib_dir.display()))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-ldino_bridge", "-lm"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed on {}", src.display());
}

/// Builds `src` (relative to the crate) with `compiler -std=std` into a temporary folder
/// and runs it with `args`; returns whether it exited 0 and what it printed.
fn build_and_run(
    name: &str,
    src: &str,
    compiler: &str,
    std: &str,
    args: &[std::ffi::OsString],
) -> (bool, String) {
    let lib_dir = build_cdylib();
    let dir = tmp_dir(name);
    let exe = dir.join(name);
    compile(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(src),
        &exe,
        &lib_dir,
        compiler,
        std,
    );
    let out = Command::new(&exe)
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The working folder `build_and_run` uses for `name` (made fresh by it).
fn scratch(name: &str) -> PathBuf {
    tmp_dir(&format!("{name}-files"))
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> std::ffi::OsString {
    s.as_ref().to_os_string()
}

#[test]
fn c_client_round_trip_and_bad_inputs() {
    // A checkpoint whose config asks for one more block than its tensors hold.
    let dir = scratch("capi");
    let ckpt =
        dino_bridge::checkpoint::load(&fixtures().join("model.safetensors"), None, None).unwrap();
    let mut cfg = ckpt.config.clone();
    let weights: Vec<_> = cfg
        .param_specs()
        .into_iter()
        .map(|(n, _)| (n.clone(), ckpt.weights[&n].clone()))
        .collect();
    cfg.depth += 1;
    let misfit = dir.join("misfit.safetensors");
    dino_bridge::checkpoint::save(
        &misfit,
        &dino_bridge::checkpoint::SaveParts::weights(&cfg, &weights),
    )
    .unwrap();

    let exp = expected();
    let args = [
        os(fixtures()),
        os(&dir),
        os(exp["loss_grid8"].to_string()),
        os(exp["loss_latents"].to_string()),
        os(&misfit),
    ];
    let (ok, text) = build_and_run("test_capi", "tests/c/test_capi.c", "gcc", "c11", &args);
    println!("{text}");
    assert!(
        ok && text.contains("all checks passed"),
        "C client failed:\n{text}"
    );
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
    let args = [
        os(fixtures()),
        os(&dir),
        os(expected()["loss_grid8"].to_string()),
    ];
    let (ok, text) = build_and_run("test_cpp", "tests/cpp/test_cpp.cpp", "g++", "c++17", &args);
    assert!(
        ok && text.contains("all checks passed"),
        "C++ client failed:\n{text}"
    );
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
