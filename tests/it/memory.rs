//! Resident memory over many calls, measured in a C client of its own (RSS is per
//! process, and the other tests of this binary run in parallel threads of this one).

use super::c_api::{build, os, run_exe};
use crate::common::fixtures;

/// 10,000 forward calls through the C API: resident memory after the first thousand
/// (allocator caches warm) and after all of them stays within 8 MiB.
#[test]
fn resident_memory_is_flat_over_10000_forward_calls() {
    let exe = build("forward_rss", "tests/c/forward_rss.c", "gcc", "c11");
    let (ok, text) = run_exe(&exe, &[os(fixtures())], &[]);
    assert!(ok, "forward_rss failed:\n{text}");
    let kib = |what: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(what)?.strip_suffix(" KiB")?.parse().ok())
            .unwrap_or_else(|| panic!("no `{what}` in:\n{text}"))
    };
    let (warm, end) = (
        kib("rss after 1000 calls: "),
        kib("rss after 10000 calls: "),
    );
    println!("RSS after 1,000 calls {warm} KiB, after 10,000 {end} KiB");
    assert!(
        warm > 0 && end < warm + 8 * 1024,
        "resident memory grew from {warm} KiB to {end} KiB over 9,000 calls"
    );
}
