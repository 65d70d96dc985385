//! The bridge as a differentiable function of a flat parameter vector (ABI 5), through the
//! Rust API: gradients and VJPs against the fixtures' PyTorch reference, get/set round
//! trips, `loss_grads` + `apply_grads` equal to `train_step`, and one weight version per
//! call while `set_params` races the others.

use crate::common;

use candle_core::{Device, Tensor};
use common::*;
use dino_bridge::{Bridge, BridgeOptions, ErrorKind, OptimConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn fixture_bridge() -> Bridge {
    Bridge::open(
        &fixtures().join("model.safetensors"),
        &BridgeOptions::default(),
    )
    .unwrap()
}

/// Each tensor of the flat gradient `flat` against the reference's tensor of that name,
/// within 1e-4 of the largest magnitude of the expected tensor (the fixtures' tolerance).
/// A tensor whose gradient is zero in exact arithmetic (a bias just before a
/// normalisation, which removes it) is float noise in both implementations: it is held
/// to 1e-6 of the largest gradient of the whole vector instead.
fn assert_matches_reference(bridge: &Bridge, flat: &Tensor, reference: &str) {
    let expected =
        candle_core::safetensors::load(fixtures().join(reference), &Device::Cpu).unwrap();
    assert_eq!(
        expected.len(),
        bridge.param_layout().len(),
        "{reference}: tensor count"
    );
    let largest = |t: &Tensor| values(t).iter().fold(0f32, |m, v| m.max(v.abs()));
    let overall = expected.values().map(largest).fold(0f32, f32::max);
    for p in bridge.param_layout() {
        let got = flat.narrow(0, p.offset, p.numel()).unwrap();
        let got = got.reshape(p.shape.as_slice()).unwrap();
        let want = &expected[&p.name];
        if largest(want) > 1e-6 * overall {
            assert_close(&p.name, &got, want);
        } else {
            let err = largest(&(&got - want).unwrap());
            assert!(
                err <= 1e-6 * overall,
                "{}: {err} from a zero gradient (largest {overall})",
                p.name
            );
        }
    }
}

#[test]
fn the_layout_covers_the_vector_in_checkpoint_order() {
    let bridge = fixture_bridge();
    let layout = bridge.param_layout();
    let specs = dino_bridge::model::param_specs(bridge.config()).unwrap();
    assert_eq!(layout.len(), specs.len());
    let mut offset = 0;
    for (p, s) in layout.iter().zip(&specs) {
        assert_eq!((&p.name, &p.shape, p.offset), (&s.name, &s.shape, offset));
        assert_eq!(
            p.decays,
            p.shape.len() >= 2 && !p.name.ends_with("pos_embed"),
            "{}",
            p.name
        );
        offset += p.numel();
    }
    assert_eq!(offset, bridge.flat_len());
    assert_eq!(offset as u64, bridge.param_count());
}

#[test]
fn loss_grads_equal_the_reference_for_every_tensor() {
    let bridge = fixture_bridge();
    let (latents, target) = (load("latents.npy"), load("target.npy"));
    let (loss, grads) = bridge.loss_grads(&latents, &target, 7, true).unwrap();
    let want = expected()["loss_train_params"].as_f64().unwrap();
    assert!((loss as f64 - want).abs() < 1e-5, "loss {loss} vs {want}");
    assert_matches_reference(&bridge, &grads.params, "grad_params_train.safetensors");
    assert_close(
        "latents",
        &grads.latents.unwrap(),
        &load("grad_latents.npy"),
    );
}

#[test]
fn the_vjp_equals_the_reference_for_a_random_cotangent() {
    let bridge = fixture_bridge();
    let latents = load("latents.npy");
    let grads = bridge
        .vjp(&latents, &load("cotangent.npy"), 7, true)
        .unwrap();
    assert_matches_reference(&bridge, &grads.params, "vjp_params.safetensors");
    assert_close("latents", &grads.latents.unwrap(), &load("vjp_latents.npy"));
    // Without the latents' gradient, the same parameters' gradient.
    let params_only = bridge
        .vjp(&latents, &load("cotangent.npy"), 7, false)
        .unwrap();
    assert!(params_only.latents.is_none());
    assert_eq!(values(&params_only.params), values(&grads.params));
}

#[test]
fn get_and_set_round_trip_bit_for_bit() {
    let bridge = fixture_bridge();
    let latents = load("latents.npy");
    let before = bridge.get_params().unwrap();
    let out_before = values(&bridge.forward(&latents).unwrap());
    let other = random(&[bridge.flat_len()], 3);
    bridge.set_params(&other).unwrap();
    assert_eq!(values(&bridge.get_params().unwrap()), values(&other));
    assert_ne!(values(&bridge.forward(&latents).unwrap()), out_before);
    bridge.set_params(&before).unwrap();
    assert_eq!(values(&bridge.get_params().unwrap()), values(&before));
    assert_eq!(values(&bridge.forward(&latents).unwrap()), out_before);
    assert_eq!(bridge.step(), 0, "set_params leaves the step alone");
}

#[test]
fn bad_vectors_are_refused_and_change_nothing() {
    let bridge = fixture_bridge();
    let before = values(&bridge.get_params().unwrap());
    let n = bridge.flat_len();
    let short = random(&[n - 1], 1);
    let err = bridge.set_params(&short).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shape, "{}", err.message);
    assert!(err.message.contains(&format!("[{n}]")), "{}", err.message);
    let mut v = values(&random(&[n], 2));
    v[n / 2] = f32::NAN;
    let err = bridge
        .set_params(&Tensor::new(v, &Device::Cpu).unwrap())
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NonFinite, "{}", err.message);
    assert_eq!(values(&bridge.get_params().unwrap()), before);
    let err = bridge.apply_grads(&short).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shape, "{}", err.message);
    // A non-finite gradient is a skipped step, not an error.
    let mut g = vec![0.01f32; n];
    g[0] = f32::INFINITY;
    let stats = bridge
        .apply_grads(&Tensor::new(g, &Device::Cpu).unwrap())
        .unwrap();
    assert!(stats.skipped && stats.step == 0);
    assert_eq!(values(&bridge.get_params().unwrap()), before);
}

fn tiny_options(dropout: f32) -> BridgeOptions {
    BridgeOptions {
        config: tiny_config(dropout),
        optim: OptimConfig {
            lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            ..Default::default()
        },
        seed: 11,
        ..Default::default()
    }
}

/// With dropout on: `loss_grads` with the seed the train step draws, then `apply_grads`,
/// is the train step, for 5 steps, bit for bit (weights, moments through the weights, step).
#[test]
fn loss_grads_then_apply_grads_is_a_train_step_bit_for_bit() {
    let opts = tiny_options(0.1);
    let (host, library) = (Bridge::new(&opts).unwrap(), Bridge::new(&opts).unwrap());
    let cfg = &opts.config;
    for step in 0..5u64 {
        let x = random(
            &[2, cfg.in_ch, cfg.latent_size, cfg.latent_size],
            100 + step,
        );
        let t = random(&[2, cfg.tokens(), cfg.target_dim], 200 + step);
        let (loss, grads) = host.loss_grads(&x, &t, host.step_seed(), false).unwrap();
        let applied = host.apply_grads(&grads.params).unwrap();
        let stepped = library.train_step(&x, &t).unwrap();
        assert_eq!(loss, stepped.loss, "step {step}: loss");
        assert_eq!(
            (applied.grad_norm, applied.lr, applied.step, applied.skipped),
            (stepped.grad_norm, stepped.lr, stepped.step, stepped.skipped),
            "step {step}"
        );
        assert_eq!(
            values(&host.get_params().unwrap()),
            values(&library.get_params().unwrap()),
            "step {step}"
        );
    }
    // Another seed draws other masks.
    let x = random(&[2, cfg.in_ch, cfg.latent_size, cfg.latent_size], 9);
    let a = host.forward_train(&x, 1).unwrap();
    assert_eq!(values(&a), values(&host.forward_train(&x, 1).unwrap()));
    assert_ne!(values(&a), values(&host.forward_train(&x, 2).unwrap()));
}

/// `set_params` racing forward and gradient calls: each call sees one whole version.
#[test]
fn calls_racing_set_params_see_one_weight_version() {
    let bridge = Arc::new(fixture_bridge());
    let latents = load("latents.npy");
    let versions = [
        bridge.get_params().unwrap(),
        random(&[bridge.flat_len()], 5),
    ];
    let mut outs = Vec::new();
    let mut grads = Vec::new();
    for v in &versions {
        bridge.set_params(v).unwrap();
        outs.push(values(&bridge.forward(&latents).unwrap()));
        grads.push(values(
            &bridge
                .vjp(&latents, &load("cotangent.npy"), 0, false)
                .unwrap()
                .params,
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let (bridge, stop, versions) = (bridge.clone(), stop.clone(), versions.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                bridge.set_params(&versions[i % 2]).unwrap();
                i += 1;
            }
            i
        })
    };
    let cot = load("cotangent.npy");
    for _ in 0..20 {
        let out = values(&bridge.forward(&latents).unwrap());
        assert!(outs.contains(&out), "a forward mixed two weight versions");
        let g = values(&bridge.vjp(&latents, &cot, 0, false).unwrap().params);
        assert!(grads.contains(&g), "a VJP mixed two weight versions");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(setter.join().unwrap() > 0);
}
