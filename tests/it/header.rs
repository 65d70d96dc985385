//! The committed `include/dino_bridge.h` is what cbindgen makes of `src/ffi` now.

#[test]
fn header_is_current() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/dino_bridge.h")).unwrap();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/dino_bridge.h"
    ))
    .unwrap();
    assert!(
        generated == committed,
        "include/dino_bridge.h is stale: regenerate it with `DINO_BRIDGE_UPDATE_HEADER=1 cargo build`"
    );
}
