//! Training through the Rust API: gradients reach every parameter, the bridge can overfit
//! a batch, a resumed run continues exactly, and bad steps change nothing.

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use dino_bridge::{Bridge, BridgeConfig, BridgeOptions, OptimConfig};

fn batch(cfg: &BridgeConfig, b: usize, seed: u64) -> (Tensor, Tensor) {
    (
        random(&[b, cfg.in_ch, cfg.latent_size, cfg.latent_size], seed),
        random(&[b, cfg.tokens(), cfg.target_dim], seed + 1),
    )
}

fn options(cfg: BridgeConfig, lr: f32) -> BridgeOptions {
    BridgeOptions {
        config: cfg,
        optim: OptimConfig {
            lr,
            warmup_steps: 10,
            total_steps: 0,
            ..Default::default()
        },
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let cfg = tiny_config(0.1);
    let bridge = Bridge::new(&options(cfg.clone(), 1e-3)).unwrap();
    let (x, t) = batch(&cfg, 2, 10);
    let (loss, grads) = bridge.param_grads(&x, &t).unwrap();
    assert!(loss.is_finite());
    assert_eq!(
        grads.len(),
        dino_bridge::model::param_specs(&cfg).unwrap().len()
    );
    for (name, g) in &grads {
        let mag = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            mag > 0.0 && mag.is_finite(),
            "parameter {name} got gradient magnitude {mag}"
        );
    }
}

#[test]
fn two_hundred_steps_overfit_a_fixed_batch() {
    let cfg = tiny_config(0.0);
    let bridge = Bridge::new(&options(cfg.clone(), 2e-3)).unwrap();
    let (x, t) = batch(&cfg, 4, 20);
    let first = bridge.train_step(&x, &t).unwrap();
    let mut last = first;
    for _ in 1..200 {
        last = bridge.train_step(&x, &t).unwrap();
        assert!(!last.skipped);
    }
    assert_eq!(last.step, 200);
    println!("loss {} -> {}", first.loss, last.loss);
    assert!(
        last.loss * 10.0 <= first.loss,
        "loss fell only from {} to {}",
        first.loss,
        last.loss
    );
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let cfg = tiny_config(0.1);
    let dir = tmp_dir("resume");
    let batches: Vec<_> = (0..6).map(|i| batch(&cfg, 2, 100 + 2 * i)).collect();
    let straight = Bridge::new(&options(cfg.clone(), 1e-3)).unwrap();
    for (x, t) in &batches {
        straight.train_step(x, t).unwrap();
    }
    let first_half = Bridge::new(&options(cfg.clone(), 1e-3)).unwrap();
    for (x, t) in &batches[..3] {
        first_half.train_step(x, t).unwrap();
    }
    let path = dir.join("half.safetensors");
    first_half.save(&path).unwrap();
    let resumed = Bridge::open(&path, &options(cfg.clone(), 1e-3)).unwrap();
    assert_eq!(resumed.step(), 3);
    for (x, t) in &batches[3..] {
        resumed.train_step(x, t).unwrap();
    }
    for ((name, a), (_, b)) in straight
        .weights()
        .unwrap()
        .iter()
        .zip(resumed.weights().unwrap().iter())
    {
        assert_eq!(values(a), values(b), "{name} differs after resume");
    }
}

#[test]
fn a_non_finite_batch_skips_the_update_and_changes_nothing() {
    let cfg = tiny_config(0.0);
    let bridge = Bridge::new(&options(cfg.clone(), 1e-3)).unwrap();
    let (x, t) = batch(&cfg, 2, 7);
    bridge.train_step(&x, &t).unwrap();
    let before = bridge.weights().unwrap();
    let mut bad = values(&t);
    bad[5] = f32::NAN;
    let bad = Tensor::from_vec(bad, t.dims(), &Device::Cpu).unwrap();
    let stats = bridge.train_step(&x, &bad).unwrap();
    assert!(stats.skipped && stats.step == 1, "{stats:?}");
    for ((name, a), (_, b)) in before.iter().zip(bridge.weights().unwrap().iter()) {
        assert_eq!(values(a), values(b), "{name} changed on a skipped step");
    }
    assert!(!bridge.train_step(&x, &t).unwrap().skipped);
}

#[test]
fn saved_weights_reload_to_the_same_outputs() {
    let cfg = tiny_config(0.0);
    let bridge = Bridge::new(&options(cfg.clone(), 1e-3)).unwrap();
    let (x, _) = batch(&cfg, 2, 1);
    let dir = tmp_dir("reload");
    let path = dir.join("w.safetensors");
    bridge.save_weights(&path).unwrap();
    let again = Bridge::open(&path, &BridgeOptions::default()).unwrap();
    assert_eq!(
        values(&bridge.forward(&x).unwrap()),
        values(&again.forward(&x).unwrap())
    );
    // Only the final file is left: no temporary files behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
