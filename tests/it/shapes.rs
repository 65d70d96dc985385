//! One bridge, any latent size: the `shapes/` fixtures (PyTorch, float64, stored as
//! float32) for outputs on grids other than the stored one (bicubic position embedding),
//! caller grids finer and coarser than the bridge's, the Gram term and iREPA's spatial
//! normalisation, and the training gradients through the resized position embedding.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dino_bridge::{Bridge, BridgeOptions, ErrorKind, LossWeights};

const GRAM: LossWeights = LossWeights {
    cos: 1.0,
    norm: 0.25,
    raw: 0.05,
    gram: 0.5,
};

/// The shapes bridge with `loss` as both its training and its alignment weights (the
/// fixtures use one set of weights per case).
fn bridge(loss: LossWeights, spatial_norm_gamma: f32) -> Bridge {
    let opts = BridgeOptions {
        loss,
        align_loss: loss,
        spatial_norm_gamma,
        ..Default::default()
    };
    Bridge::open(&shapes().join("model.safetensors"), &opts).unwrap()
}

fn expect(key: &str) -> f64 {
    expected_shapes()[key].as_f64().unwrap()
}

#[test]
fn outputs_on_the_stored_the_upsampled_and_the_downsampled_grid() {
    let b = bridge(LossWeights::default(), 0.0);
    assert_eq!((b.config().grid, b.config().adapter_depth), (4, 1));
    for (size, grid) in [
        ("base", "grid_base"),
        ("rect", "grid_rect"),
        ("small", "grid_small"),
    ] {
        let want = &expected_shapes()[grid];
        let (h, w) = (
            want[0].as_u64().unwrap() as usize,
            want[1].as_u64().unwrap() as usize,
        );
        let latents = load_shapes(&format!("latents_{size}.npy"));
        let (_, _, lh, lw) = latents.dims4().unwrap();
        assert_eq!(b.config().token_grid(lh as i64, lw as i64).unwrap(), (h, w));
        let out = b.forward(&latents).unwrap();
        assert_eq!(out.dims(), [2, h * w, 48], "{size}");
        assert_close(
            &format!("out_{size}"),
            &out,
            &load_shapes(&format!("out_{size}.npy")),
        );
    }
}

/// REPA alignment of caller tokens on a finer (12x20, pooled 2x2) and a coarser (3x5,
/// the target pooled 2x2) grid than the bridge's 6x10, with and without the options.
#[test]
fn alignment_on_finer_and_coarser_caller_grids() {
    let latents = load_shapes("latents_rect.npy");
    let cases = [
        (
            "fine",
            (12, 20),
            LossWeights::REPA,
            0.0,
            "loss_fine_repa",
            "grad_pred_fine_repa",
        ),
        (
            "fine",
            (12, 20),
            LossWeights::default(),
            0.0,
            "loss_fine_default",
            "grad_pred_fine_default",
        ),
        (
            "coarse",
            (3, 5),
            LossWeights::REPA,
            0.0,
            "loss_coarse_repa",
            "grad_pred_coarse_repa",
        ),
        (
            "same",
            (6, 10),
            GRAM,
            0.6,
            "loss_same_spatialnorm0.6_gram0.5",
            "grad_pred_same_spatialnorm0.6_gram0.5",
        ),
        (
            "fine",
            (12, 20),
            GRAM,
            0.6,
            "loss_fine_spatialnorm0.6_gram0.5",
            "grad_pred_fine_spatialnorm0.6_gram0.5",
        ),
        (
            "coarse",
            (3, 5),
            GRAM,
            0.6,
            "loss_coarse_spatialnorm0.6_gram0.5",
            "grad_pred_coarse_spatialnorm0.6_gram0.5",
        ),
    ];
    assert_eq!(expect("w_gram"), 0.5);
    assert_eq!(expect("spatial_norm_gamma") as f32, 0.6);
    for (pred, grid, weights, gamma, loss_key, grad_key) in cases {
        let b = bridge(weights, gamma);
        let (loss, grad) = b
            .loss_backward(&load_shapes(&format!("pred_{pred}.npy")), &latents, grid)
            .unwrap();
        assert_scalar(loss_key, loss as f64, expect(loss_key));
        assert_close(grad_key, &grad, &load_shapes(&format!("{grad_key}.npy")));
    }
}

#[test]
fn caller_grids_that_do_not_divide_are_invalid_arguments() {
    let b = bridge(LossWeights::REPA, 0.0);
    let latents = load_shapes("latents_rect.npy"); // bridge grid 6x10
    for (grid, tokens) in [((12, 10), 120), ((9, 15), 135), ((4, 5), 20), ((0, 10), 0)] {
        let pred = candle_core::Tensor::zeros(
            (2, tokens, 48),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let err = b.loss_backward(&pred, &latents, grid).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{grid:?}: {err}");
        assert!(err.message.contains("6x10"), "{err}");
    }
    // Spatial normalisation needs more than one token on the loss grid: a 1x1 caller
    // grid on a 4x4 bridge grid pools the target to one token.
    let one = bridge(LossWeights::REPA, 0.6);
    let pred = Tensor::zeros((2, 1, 48), DType::F32, &Device::Cpu).unwrap();
    let err = one
        .loss_backward(&pred, &load_shapes("latents_base.npy"), (1, 1))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.contains("spatial_norm_gamma"), "{err}");
}

#[test]
fn training_gradients_through_the_resized_position_embedding() {
    let b = bridge(GRAM, 0.0);
    let latents = load_shapes("latents_rect.npy");
    let target = load_shapes("target_rect.npy");
    let key = "loss_rect_train_gram0.5";
    let (loss, grad) = b.latent_loss_backward(&latents, &target).unwrap();
    assert_scalar(key, loss as f64, expect(key));
    assert_close(
        "grad_latents_rect",
        &grad,
        &load_shapes("grad_latents_rect.npy"),
    );
    let (loss, grads) = b.param_grads(&latents, &target).unwrap();
    assert_scalar(key, loss as f64, expect(key));
    let get = |name: &str| grads.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_close(
        "grad_pos_embed_rect",
        &get("backbone.pos_embed"),
        &load_shapes("grad_pos_embed_rect.npy"),
    );
    assert_close(
        "grad_stem_weight_rect",
        &get("adapter.stem.weight"),
        &load_shapes("grad_stem_weight_rect.npy"),
    );
}

#[test]
fn latent_sizes_that_do_not_fit_are_shape_errors() {
    let b = bridge(LossWeights::default(), 0.0);
    for (h, w) in [(7, 8), (8, 9)] {
        let x = Tensor::zeros((1, 4, h, w), DType::F32, &Device::Cpu).unwrap();
        let err = b.forward(&x).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shape, "{h}x{w}: {err}");
        assert!(err.message.contains("multiple of 2"), "{err}");
    }
    // Too large for this machine's memory: refused before anything is allocated.
    let err = b.check_fits(1 << 40, (8, 8)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shape);
    assert!(err.message.contains("GiB"), "{err}");
    let err = b.config().token_grid(1 << 20, 8).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shape);
}
