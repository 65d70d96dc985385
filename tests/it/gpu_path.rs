//! The ops a GPU takes, run here on the CPU: with the CPU kernels switched off, every op
//! of `dino_bridge::kernels` picks the path it picks on CUDA (candle-nn's fused layer
//! norm and softmax and candle's conv2d where no gradient is tracked, the composed ops
//! where one is). The model must still match PyTorch's fixtures within their tolerance:
//! this is where the one-pass variance of the fused layer norm is checked.
//!
//! The switch is per thread: the other tests, on other threads, keep the CPU kernels.

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use dino_bridge::{Bridge, BridgeConfig, BridgeOptions, kernels};

#[test]
fn the_gpu_paths_match_the_fixtures_and_the_cpu_kernels() {
    // The latent loss with the composite weights the fixtures were made with.
    let opts = BridgeOptions {
        align_loss: dino_bridge::LossWeights::default(),
        ..Default::default()
    };
    let bridge = Bridge::open(&fixtures().join("model.safetensors"), &opts).unwrap();
    let latents = load("latents.npy");

    // The CPU kernels' answers first, then the same calls on the GPU's paths.
    let default = Bridge::new(&BridgeOptions {
        config: BridgeConfig {
            dropout: 0.0,
            ..Default::default()
        },
        seed: 7,
        ..Default::default()
    })
    .unwrap();
    let c = default.config().clone();
    let x = Tensor::randn(
        0f32,
        1.0,
        (2, c.in_ch, c.latent_size, c.latent_size),
        &Device::Cpu,
    )
    .unwrap();
    let with_kernels = default.forward(&x).unwrap();

    kernels::set_enabled(false);
    // Untracked: the fused kernels.
    assert_close(
        "out (gpu paths)",
        &bridge.forward(&latents).unwrap(),
        &load("out.npy"),
    );
    let on_gpu_paths = default.forward(&x).unwrap();
    assert_close(
        "default config: gpu paths vs cpu kernels",
        &on_gpu_paths,
        &with_kernels,
    );
    // Other paths, really: other roundings (the fused layer norm's one-pass variance,
    // candle's own GEMM) give other bits somewhere.
    assert_ne!(
        values(&on_gpu_paths),
        values(&with_kernels),
        "the switch changed no path"
    );
    // Tracked: the composed ops, through the latent gradient.
    let (loss, grad) = bridge
        .latent_loss_backward(&latents, &load("target.npy"))
        .unwrap();
    assert_scalar(
        "loss_latents (gpu paths)",
        loss as f64,
        expected()["loss_latents"].as_f64().unwrap(),
    );
    assert_close("grad_latents (gpu paths)", &grad, &load("grad_latents.npy"));
    // And every parameter is reached on those paths.
    let (_, grads) = bridge.param_grads(&latents, &load("target.npy")).unwrap();
    for (name, g) in &grads {
        let n = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient on the gpu paths");
    }
}
