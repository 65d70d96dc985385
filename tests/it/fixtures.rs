//! The bridge against the PyTorch fixtures: outputs, loss values and gradients.

use crate::common;

use candle_core::Var;
use common::*;
use dino_bridge::loss::{LossWeights, alignment_loss};
use dino_bridge::{Bridge, BridgeOptions};

/// The fixture bridge, aligning with the composite loss its expected values were made with
/// (alignment's own default is REPA's cosine loss).
fn open(file: &str) -> Bridge {
    let opts = BridgeOptions {
        align_loss: LossWeights::default(),
        ..Default::default()
    };
    Bridge::open(&fixtures().join(file), &opts).unwrap()
}

#[test]
fn safetensors_and_pt_checkpoints_reproduce_the_output() {
    let latents = load("latents.npy");
    let want = load("out.npy");
    for file in ["model.safetensors", "model.pt"] {
        let bridge = open(file);
        assert_eq!(bridge.config().grid, 4, "{file}: config from the file");
        assert_close(file, &bridge.forward(&latents).unwrap(), &want);
    }
}

fn loss_and_grad(weights: &LossWeights) -> (f32, candle_core::Tensor) {
    let pred = Var::from_tensor(&load("pred.npy")).unwrap();
    let loss = alignment_loss(pred.as_tensor(), &load("target.npy"), weights).unwrap();
    let grad = loss
        .backward()
        .unwrap()
        .get(pred.as_tensor())
        .unwrap()
        .clone();
    (loss.to_scalar::<f32>().unwrap(), grad)
}

#[test]
fn loss_and_its_gradient_match_for_default_and_repa_weights() {
    let exp = expected();
    let (loss, grad) = loss_and_grad(&LossWeights::default());
    assert_scalar("loss", loss as f64, exp["loss"].as_f64().unwrap());
    assert_close("grad_pred", &grad, &load("grad_pred.npy"));
    let (loss, grad) = loss_and_grad(&LossWeights::REPA);
    assert_scalar("loss_repa", loss as f64, exp["loss_repa"].as_f64().unwrap());
    assert_close("grad_pred_repa", &grad, &load("grad_pred_repa.npy"));
}

#[test]
fn caller_grid_is_pooled_and_the_gradient_spread_back() {
    let bridge = open("model.safetensors");
    let (loss, grad) = bridge
        .loss_backward(&load("pred_grid8.npy"), &load("latents.npy"), (8, 8))
        .unwrap();
    assert_scalar(
        "loss_grid8",
        loss as f64,
        expected()["loss_grid8"].as_f64().unwrap(),
    );
    assert_close("grad_pred_grid8", &grad, &load("grad_pred_grid8.npy"));
    let err = bridge
        .loss_backward(&load("pred_grid8.npy"), &load("latents.npy"), (6, 6))
        .unwrap_err();
    assert_eq!(err.kind, dino_bridge::ErrorKind::InvalidArgument);
    assert!(err.message.contains("pred grid 6x6"), "{err}");
}

#[test]
fn gradient_through_the_frozen_bridge_to_the_latents() {
    let bridge = open("model.pt");
    let (loss, grad) = bridge
        .latent_loss_backward(&load("latents.npy"), &load("target.npy"))
        .unwrap();
    assert_scalar(
        "loss_latents",
        loss as f64,
        expected()["loss_latents"].as_f64().unwrap(),
    );
    assert_close("grad_latents", &grad, &load("grad_latents.npy"));
}
