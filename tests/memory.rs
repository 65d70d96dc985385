//! Resident memory over many calls. Its own test binary: RSS is per process, and the
//! tests of one binary run in parallel threads of one process.

mod common;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// 10,000 forward calls through the C entry point: resident memory after the first
/// thousand (allocator caches warm) and after all of them stays within 8 MiB.
#[test]
fn resident_memory_is_flat_over_10000_forward_calls() {
    use dino_bridge::ffi::{self, types::BridgeParams};
    let path = std::ffi::CString::new(
        common::fixtures()
            .join("model.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let mut params: BridgeParams = unsafe { std::mem::zeroed() };
    params.struct_size = std::mem::size_of::<BridgeParams>() as u32;
    let mut h = std::ptr::null_mut();
    unsafe {
        assert_eq!(ffi::bridge_params_default(&mut params), 0);
        params.checkpoint_path = path.as_ptr();
        assert_eq!(ffi::bridge_create(&params, &mut h), 0);
    }
    let lat = common::load("latents.npy")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lat = &lat[..lat.len() / 3]; // one sample
    let mut out = vec![0f32; 16 * 48];
    let mut forward = |n: usize| {
        for _ in 0..n {
            let s = unsafe {
                ffi::bridge_forward(
                    h,
                    lat.as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    1,
                    16,
                    16,
                    0,
                )
            };
            assert_eq!(s, 0);
        }
    };
    forward(1000);
    let warm = rss_kib();
    forward(9000);
    let end = rss_kib();
    eprintln!("RSS after 1,000 calls {warm} KiB, after 10,000 {end} KiB");
    assert!(
        end < warm + 8 * 1024,
        "resident memory grew from {warm} KiB to {end} KiB over 9,000 calls"
    );
    unsafe { assert_eq!(ffi::bridge_destroy(h), 0) };
}
