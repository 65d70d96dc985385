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

#[test]
fn c_client_round_trip_and_bad_inputs() {
    let lib_dir = build_cdylib();
    let dir = tmp_dir("capi");
    let exe = dir.join("test_capi");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile(
        &root.join("tests/c/test_capi.c"),
        &exe,
        &lib_dir,
        "gcc",
        "c11",
    );

    // A checkpoint whose config asks for one more block than its tensors hold.
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
    let output = Command::new(&exe)
        .arg(fixtures())
        .arg(&dir)
        .arg(exp["loss_grid8"].to_string())
        .arg(exp["loss_latents"].to_string())
        .arg(&misfit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(
        output.status.success() && text.contains("all checks passed"),
        "C client failed:\n{text}"
    );
}

#[test]
fn the_readme_c_example_builds_and_runs() {
    let lib_dir = build_cdylib();
    let dir = tmp_dir("forward-example");
    let exe = dir.join("forward");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile(
        &root.join("examples/forward.c"),
        &exe,
        &lib_dir,
        "gcc",
        "c11",
    );
    let output = Command::new(&exe)
        .arg(fixtures().join("model.pt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("tokens [2, 16, 48]"), "{text}");
}

#[test]
fn cpp_wrapper_round_trip_and_exceptions() {
    let lib_dir = build_cdylib();
    let dir = tmp_dir("cpp");
    let exe = dir.join("test_cpp");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile(
        &root.join("tests/cpp/test_cpp.cpp"),
        &exe,
        &lib_dir,
        "g++",
        "c++17",
    );
    let output = Command::new(&exe)
        .arg(fixtures())
        .arg(&dir)
        .arg(expected()["loss_grid8"].to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.contains("all checks passed"),
        "C++ client failed:\n{text}"
    );
}

#[test]
fn the_cpp_trainer_example_aligns_its_projector() {
    let lib_dir = build_cdylib();
    let dir = tmp_dir("cpp-trainer");
    let exe = dir.join("trainer");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile(
        &root.join("examples/trainer.cpp"),
        &exe,
        &lib_dir,
        "g++",
        "c++17",
    );
    let output = Command::new(&exe)
        .arg(fixtures().join("model.safetensors"))
        .arg("40")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let losses: Vec<f32> = text
        .lines()
        .filter_map(|l| l.split("loss ").nth(1)?.trim().parse().ok())
        .collect();
    assert!(
        losses.len() >= 2 && losses[losses.len() - 1] < 0.8 * losses[0],
        "{text}"
    );
}
