//! Metrics against the fixtures' `expected.json`, and the data folder reader.

use crate::common;

use candle_core::Device;
use common::*;
use dino_bridge::data::Dataset;
use dino_bridge::loss::LossWeights;
use dino_bridge::metrics::evaluate;
use dino_bridge::{Bridge, BridgeOptions};

fn check(pool: usize, key: &str) {
    let m = evaluate(
        &load("eval_pred.npy"),
        &load("eval_target.npy"),
        &LossWeights::default(),
        pool,
    )
    .unwrap();
    let exp = &expected()[key];
    let got = serde_json::to_value(&m).unwrap();
    for name in ["cosine", "nmse", "self_sim"] {
        assert_scalar(
            &format!("{key}.{name}"),
            got[name].as_f64().unwrap(),
            exp[name].as_f64().unwrap(),
        );
    }
    for name in ["retrieval@1", "retrieval@5", "retrieval@10"] {
        assert_eq!(
            got[name].as_f64().unwrap(),
            exp[name].as_f64().unwrap(),
            "{key}.{name}"
        );
    }
}

#[test]
fn metrics_match_expected_json_for_both_pools() {
    check(2200, "eval_metrics_pool2200");
    check(5, "eval_metrics_pool5");
}

#[test]
fn the_f16_data_folder_reads_and_matches_the_model() {
    let bridge = Bridge::open(
        &fixtures().join("model.safetensors"),
        &BridgeOptions::default(),
    )
    .unwrap();
    let data = Dataset::open(&fixtures().join("data_f16"), bridge.config()).unwrap();
    assert_eq!(data.len, 40);
    let rows: Vec<usize> = (0..40).collect();
    let batch = data.batch(&rows, None, &Device::Cpu).unwrap();
    assert_eq!(batch.dropped, 0);
    let pred = bridge.forward(&batch.latents).unwrap();
    let m = evaluate(&pred, &batch.targets, &LossWeights::default(), 2200).unwrap();
    // The folder's targets are the model's own outputs stored as float16.
    assert!(m.cosine > 0.9999 && m.nmse < 1e-5, "{m:?}");
    assert_eq!(
        (m.retrieval_1, m.self_sim > 0.9999),
        (Some(1.0), true),
        "{m:?}"
    );
}
