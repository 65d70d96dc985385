//! The bridge end to end on the default (published) configuration, fresh weights:
//! forward, the REPA loss on a SiT/2-style 16x16 token grid, a few train steps, save and
//! reload.
//!
//!   cargo run --release --example quickstart

use candle_core::{Device, Tensor};
use dino_bridge::rng::Rng;
use dino_bridge::{Bridge, BridgeOptions, OptimConfig};
use std::time::Instant;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.normal()).collect::<Vec<f32>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

fn main() -> dino_bridge::Result<()> {
    let opts = BridgeOptions {
        optim: OptimConfig {
            lr: 5e-4,
            warmup_steps: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let bridge = Bridge::new(&opts)?;
    let c = bridge.config().clone();
    println!(
        "bridge: {:.1}M parameters, {:.1} GFLOP/sample",
        bridge.param_count() as f64 / 1e6,
        c.forward_flops() as f64 / 1e9
    );

    let mut rng = Rng::new(0);
    let latents = random(&[4, c.in_ch, c.latent_size, c.latent_size], &mut rng);
    let t0 = Instant::now();
    let tokens = bridge.forward(&latents)?;
    println!(
        "forward: latents {:?} -> tokens {:?} in {:.0} ms",
        latents.dims(),
        tokens.dims(),
        t0.elapsed().as_secs_f64() * 1e3
    );

    // A REPA projector's output on a 16x16 grid, pooled to the bridge's 8x8.
    let pred = random(&[4, 256, c.target_dim], &mut rng);
    let (loss, grad) = bridge.loss_backward(&pred, &latents, (16, 16))?;
    println!(
        "REPA loss on a 16x16 caller grid: {loss:.4}, gradient {:?}",
        grad.dims()
    );

    let targets = random(&[4, c.tokens(), c.target_dim], &mut rng);
    for _ in 0..3 {
        let s = bridge.train_step(&latents, &targets)?;
        println!(
            "train step {}: loss {:.4}, grad norm {:.3}, lr {:.1e}",
            s.step, s.loss, s.grad_norm, s.lr
        );
    }

    let dir = std::env::temp_dir().join(format!("dino-bridge-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| dino_bridge::Error::io(&dir, e))?;
    let path = dir.join("bridge.safetensors");
    bridge.save(&path)?;
    let reloaded = Bridge::open(&path, &BridgeOptions::default())?;
    let same = reloaded
        .forward(&latents)?
        .sub(&bridge.forward(&latents)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "saved {} (step {}), reloaded: max output difference {same}",
        path.display(),
        reloaded.step()
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
