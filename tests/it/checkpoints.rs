//! Bad checkpoints are refused with the right kind of error and a message naming the
//! problem.

use crate::common;

use common::*;
use dino_bridge::checkpoint;
use dino_bridge::{Bridge, BridgeOptions, ErrorKind};
use std::path::Path;

fn open_err(path: &Path) -> dino_bridge::Error {
    match Bridge::open(path, &BridgeOptions::default()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_truncated_and_corrupt_files() {
    let dir = tmp_dir("bad-ckpt");
    let e = open_err(&dir.join("nope.safetensors"));
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert!(e.message.contains("nope.safetensors"), "{e}");
    let e = open_err(&dir);
    assert_eq!(e.kind, ErrorKind::Io, "{e}");

    let good = std::fs::read(fixtures().join("model.safetensors")).unwrap();
    for cut in [4, 100, good.len() / 2, good.len() - 1] {
        let p = dir.join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &good[..cut]).unwrap();
        let e = open_err(&p);
        assert_eq!(e.kind, ErrorKind::Checkpoint, "cut at {cut}: {e}");
    }
    let mut corrupt = good.clone();
    corrupt[20] = b'}';
    let p = dir.join("corrupt.safetensors");
    std::fs::write(&p, &corrupt).unwrap();
    assert_eq!(open_err(&p).kind, ErrorKind::Checkpoint);

    let pt = std::fs::read(fixtures().join("model.pt")).unwrap();
    let p = dir.join("cut.pt");
    std::fs::write(&p, &pt[..pt.len() / 2]).unwrap();
    assert_eq!(open_err(&p).kind, ErrorKind::Checkpoint);
}

#[test]
fn tensors_that_do_not_fit_the_config_are_named() {
    let dir = tmp_dir("misfit");
    let ckpt = checkpoint::load(&fixtures().join("model.safetensors"), None, None).unwrap();
    let mut cfg = ckpt.config.clone();
    let weights = ckpt.ordered_weights().unwrap();
    cfg.depth = 3; // one more block than the tensors hold
    let p = dir.join("deeper.safetensors");
    checkpoint::save(&p, &checkpoint::SaveParts::weights(&cfg, &weights)).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind, ErrorKind::Checkpoint);
    assert!(e.message.contains("backbone.blocks.2"), "{e}");

    cfg.depth = 2;
    cfg.target_dim = 32;
    let p = dir.join("narrow.safetensors");
    checkpoint::save(&p, &checkpoint::SaveParts::weights(&cfg, &weights)).unwrap();
    let e = open_err(&p);
    assert!(
        e.message.contains("head.weight") && e.message.contains("shape"),
        "{e}"
    );
}

#[test]
fn pt_import_with_a_key_map() {
    let path = fixtures().join("model.pt");
    let mut map = std::collections::HashMap::new();
    map.insert("head.".to_string(), "token_head.".to_string());
    let Err(e) = checkpoint::load(&path, Some(&map), None) else {
        panic!("renamed head loaded")
    };
    assert!(e.message.contains("missing tensor `head"), "{e}");
    map.clear();
    map.insert("head.weight".to_string(), "head.weight".to_string());
    let ckpt = checkpoint::load(&path, Some(&map), None).unwrap();
    assert_eq!(ckpt.config.width, 64);
}
