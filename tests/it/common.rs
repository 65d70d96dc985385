//! Shared test helpers: where the fixtures are, reading them, comparing within the
//! tolerances of `shared/fixtures/README.md`.

use candle_core::{Device, Tensor};
use dino_bridge::npy;
use std::path::{Path, PathBuf};

/// `../shared/fixtures/tiny` next to the repository (CI lays it there), or
/// `$DINO_BRIDGE_FIXTURES/tiny`.
pub fn fixtures() -> PathBuf {
    let base = std::env::var_os("DINO_BRIDGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let dir = base.join("tiny");
    assert!(
        dir.join("model.safetensors").is_file(),
        "fixtures not found at {}",
        dir.display()
    );
    dir
}

/// `../shared/fixtures/shapes` (or `$DINO_BRIDGE_FIXTURES/shapes`): one REPA-grid bridge
/// at several latent sizes, and the alignment options.
pub fn shapes() -> PathBuf {
    let dir = fixtures().parent().unwrap().join("shapes");
    assert!(
        dir.join("model.safetensors").is_file(),
        "fixtures not found at {}",
        dir.display()
    );
    dir
}

/// An array of `shapes/`.
pub fn load_shapes(name: &str) -> Tensor {
    let (shape, data) = npy::read_f32(&shapes().join(name)).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// `shapes/expected.json`.
pub fn expected_shapes() -> serde_json::Value {
    let text = std::fs::read_to_string(shapes().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn load(name: &str) -> Tensor {
    let (shape, data) = npy::read_f32(&fixtures().join(name)).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

pub fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Max |got - want| within `1e-4 * max |want|`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-4 * scale,
        "{what}: max error {err} > 1e-4 * {scale}"
    );
}

pub fn assert_scalar(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-5, "{what}: got {got}, want {want}");
}

pub fn tmp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The fixtures' tiny config with `dropout`.
pub fn tiny_config(dropout: f32) -> dino_bridge::BridgeConfig {
    let text = std::fs::read_to_string(fixtures().join("config.json")).unwrap();
    dino_bridge::BridgeConfig {
        dropout,
        ..dino_bridge::BridgeConfig::from_json(&text).unwrap()
    }
}

/// Standard normal values of `shape` from `Rng::new(seed)`, on the CPU.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = dino_bridge::rng::Rng::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
