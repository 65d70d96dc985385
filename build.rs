//! Generates the C header from `src/ffi` with cbindgen into OUT_DIR. The committed copy in
//! `include/` is refreshed only on request (`DINO_BRIDGE_UPDATE_HEADER=1 cargo build`),
//! so that the `header_is_current` test can catch a stale one.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=DINO_BRIDGE_UPDATE_HEADER");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("dino_bridge.h");
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi/types.rs"))
        .with_src(crate_dir.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen could not generate the header");
    bindings.write_to_file(&out);
    if std::env::var_os("DINO_BRIDGE_UPDATE_HEADER").is_some() {
        bindings.write_to_file(crate_dir.join("include/dino_bridge.h"));
    }
}
