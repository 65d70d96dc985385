//! Hostile bytes and concurrent use: mutated checkpoints and `.npy` headers must give an
//! error (never a panic or a huge allocation), and forward/loss calls racing train steps
//! and saves on one handle must always see one consistent set of weights.

use crate::common;

use candle_core::{Device, Tensor};
use dino_bridge::rng::Rng;
use dino_bridge::{Bridge, BridgeOptions, checkpoint, npy};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One random mutation: flip bytes, overwrite with extreme values, truncate, or splice.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    let pick = |rng: &mut Rng, n: usize| (rng.uniform() * n as f32) as usize % n.max(1);
    match pick(rng, 5) {
        0 => {
            for _ in 0..1 + pick(rng, 8) {
                let i = pick(rng, b.len());
                b[i] ^= 1 << pick(rng, 8);
            }
        }
        1 => {
            // Extreme bytes where sizes and lengths live (the first 256 bytes).
            let i = pick(rng, b.len().min(256));
            let v = [0x00, 0xff, b'9', b'-', b'"', b'{', b'}', b','][pick(rng, 8)];
            for j in i..(i + 1 + pick(rng, 8)).min(b.len()) {
                b[j] = v;
            }
        }
        2 => b.truncate(pick(rng, b.len())),
        3 => {
            let i = pick(rng, b.len());
            let junk: Vec<u8> = (0..pick(rng, 64)).map(|_| pick(rng, 256) as u8).collect();
            b.splice(i..i, junk);
        }
        _ => {
            // Digits in the header made huge: lying sizes.
            if let Some(i) = b.iter().take(512).position(|c| c.is_ascii_digit()) {
                b.splice(i..i, b"99999999999".iter().copied());
            }
        }
    }
    b
}

/// Runs `f` on thousands of mutations of `base` within `budget`; fails on any panic.
fn fuzz(name: &str, base: &[u8], budget: Duration, mut f: impl FnMut(&[u8]) -> bool) {
    let mut rng = Rng::new(0xF022 ^ base.len() as u64);
    let start = Instant::now();
    let (mut runs, mut accepted) = (0, 0);
    while start.elapsed() < budget || runs < 200 {
        let bytes = mutate(base, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| f(&bytes))) {
            Ok(ok) => accepted += ok as usize,
            Err(_) => panic!("{name}: a mutated input panicked (run {runs})"),
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} mutations, {accepted} still accepted");
    assert!(runs >= 200);
}

#[test]
fn npy_header_parser_survives_mutations() {
    let dir = common::tmp_dir("fuzz-npy");
    let base = std::fs::read(common::fixtures().join("target.npy")).unwrap();
    let path = dir.join("m.npy");
    fuzz("npy", &base, Duration::from_secs(5), |bytes| {
        let header = npy::parse_header(bytes, bytes.len());
        if let Ok(h) = &header {
            // An accepted header never claims more data than the file holds.
            assert!(h.data_len().is_some_and(|n| n <= bytes.len()));
        }
        std::fs::write(&path, bytes).unwrap();
        npy::read_f32(&path).is_ok()
    });
}

#[test]
fn checkpoint_loaders_survive_mutations() {
    let dir = common::tmp_dir("fuzz-ckpt");
    for file in ["model.safetensors", "model.pt"] {
        let base = std::fs::read(common::fixtures().join(file)).unwrap();
        let path = dir.join(file);
        fuzz(file, &base, Duration::from_secs(8), |bytes| {
            std::fs::write(&path, bytes).unwrap();
            checkpoint::load(&path, None, None).is_ok()
        });
    }
}

fn tiny_bridge(seed: u64) -> Bridge {
    let ckpt = checkpoint::load(&common::fixtures().join("model.safetensors"), None, None).unwrap();
    Bridge::from_checkpoint(
        ckpt,
        &BridgeOptions {
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// 8 threads run forward and loss_backward while another runs train steps and saves.
/// Every forward must equal, bit for bit, the forward of one of the weight versions the
/// trainer produced (never a half-updated mix), and the run must finish (no deadlock).
#[test]
fn concurrent_calls_see_whole_weight_versions() {
    let dir = common::tmp_dir("concurrency");
    let bridge = Arc::new(tiny_bridge(3));
    let c = bridge.config().clone();
    let x = Tensor::randn(
        0f32,
        1.0,
        (2, c.in_ch, c.latent_size, c.latent_size),
        &Device::Cpu,
    )
    .unwrap();
    let t = Tensor::randn(0f32, 1.0, (2, c.tokens(), c.target_dim), &Device::Cpu).unwrap();
    let pred = Tensor::randn(0f32, 1.0, (2, c.tokens(), c.target_dim), &Device::Cpu).unwrap();
    let versions = Arc::new(Mutex::new(vec![bits(&bridge.forward(&x).unwrap())]));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let steps = 12;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trainer = {
        let (bridge, x, t, versions, done, dir) = (
            bridge.clone(),
            x.clone(),
            t.clone(),
            versions.clone(),
            done.clone(),
            dir.clone(),
        );
        std::thread::spawn(move || {
            for i in 0..steps {
                bridge.train_step(&x, &t).unwrap();
                // A forward by the trainer right after its own step, before the next one:
                // the outputs of this weight version.
                versions
                    .lock()
                    .unwrap()
                    .push(bits(&bridge.forward(&x).unwrap()));
                bridge
                    .save(&dir.join(format!("s{}.safetensors", i % 2)))
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let readers: Vec<_> = (0..8)
        .map(|r| {
            let (bridge, x, pred, seen, done) = (
                bridge.clone(),
                x.clone(),
                pred.clone(),
                seen.clone(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) || n < 2 {
                    if r % 2 == 0 {
                        let y = bits(&bridge.forward(&x).unwrap());
                        seen.lock().unwrap().push(y);
                    } else {
                        let (loss, grad) =
                            bridge.loss_backward(&pred, &x, (c.grid, c.grid)).unwrap();
                        assert!(loss.is_finite());
                        assert_eq!(grad.dims(), pred.dims());
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    trainer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert!(Instant::now() < deadline, "took too long (deadlock?)");
    let versions = versions.lock().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(versions.len(), steps + 1);
    assert!(seen.len() >= 8, "readers made too few calls");
    for (i, y) in seen.iter().enumerate() {
        assert!(
            versions.contains(y),
            "forward {i} matches none of the {} weight versions: a half-updated read",
            versions.len()
        );
    }
    // Both saved files load, and the run repeats: a fresh bridge trained the same way
    // ends at the same weights (readers do not disturb training).
    let again = tiny_bridge(3);
    for _ in 0..steps {
        again.train_step(&x, &t).unwrap();
    }
    assert_eq!(
        bits(&again.forward(&x).unwrap()),
        *versions.last().unwrap(),
        "the concurrent run did not repeat"
    );
    for f in ["s0.safetensors", "s1.safetensors"] {
        checkpoint::load(&dir.join(f), None, None).unwrap();
    }
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A latent-gradient call at a large batch (a long backward) races train steps at batch 1
/// on one handle. Every gradient must be the gradient of one weight version, computed
/// alone afterwards: a backward that ran while an update landed would mix two versions.
#[test]
fn latent_gradients_racing_train_steps_see_one_weight_version() {
    let ckpt = checkpoint::load(&common::fixtures().join("model.safetensors"), None, None).unwrap();
    let config = ckpt.config.clone();
    let mut opts = BridgeOptions {
        seed: 5,
        ..Default::default()
    };
    // A large, constant rate: consecutive versions must differ by far more than float noise.
    opts.optim.lr = 1e-2;
    opts.optim.warmup_steps = 0;
    let bridge = Arc::new(Bridge::from_checkpoint(ckpt, &opts).unwrap());
    let c = config.clone();
    let big = 32;
    let mut rng = Rng::new(11);
    let mut randn = |dims: &[usize]| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let x = randn(&[big, c.in_ch, c.latent_size, c.latent_size]);
    let target = randn(&[big, c.tokens(), c.target_dim]);
    let x1 = randn(&[1, c.in_ch, c.latent_size, c.latent_size]);
    let t1 = randn(&[1, c.tokens(), c.target_dim]);

    let steps = 24;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Training starts when both readers are running.
    let start = Arc::new(std::sync::Barrier::new(3));
    let trainer = {
        let (bridge, done, start) = (bridge.clone(), done.clone(), start.clone());
        std::thread::spawn(move || {
            start.wait();
            let mut versions = vec![bridge.weights().unwrap()];
            for _ in 0..steps {
                bridge.train_step(&x1, &t1).unwrap();
                // Only this thread writes, so these are exactly the weights of this version.
                versions.push(bridge.weights().unwrap());
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            versions
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (bridge, x, target, done, start) = (
                bridge.clone(),
                x.clone(),
                target.clone(),
                done.clone(),
                start.clone(),
            );
            std::thread::spawn(move || {
                start.wait();
                let mut got = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) || got.len() < 2 {
                    let (loss, grad) = bridge.latent_loss_backward(&x, &target).unwrap();
                    got.push((loss, common::values(&grad)));
                }
                got
            })
        })
        .collect();
    let versions = trainer.join().unwrap();
    let seen: Vec<(f32, Vec<f32>)> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();

    // Each version's gradient, computed alone on a bridge of its own.
    let alone: Vec<Vec<f32>> = versions
        .iter()
        .map(|w| {
            let b = Bridge::from_checkpoint(
                checkpoint::Checkpoint {
                    config: config.clone(),
                    weights: w.iter().cloned().collect(),
                    optim: None,
                    ema: None,
                    train_state: None,
                },
                &BridgeOptions::default(),
            )
            .unwrap();
            common::values(&b.latent_loss_backward(&x, &target).unwrap().1)
        })
        .collect();
    let noise = 1e-5;
    let closest_neighbours = alone
        .windows(2)
        .map(|w| max_rel_diff(&w[1], &w[0]))
        .fold(f32::INFINITY, f32::min);
    assert!(
        closest_neighbours > 100.0 * noise,
        "consecutive versions differ by only {closest_neighbours:.2e}: the test cannot tell them apart"
    );
    // Per raced gradient: the nearest version alone, and how far it is.
    let nearest: Vec<(usize, f32)> = seen
        .iter()
        .map(|(_, g)| {
            alone.iter().map(|a| max_rel_diff(g, a)).enumerate().fold(
                (0, f32::INFINITY),
                |m, (v, d)| if d < m.1 { (v, d) } else { m },
            )
        })
        .collect();
    let mixed: Vec<(usize, f32)> = nearest
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| *d > noise)
        .map(|(i, (_, d))| (i, *d))
        .collect();
    let mut matched: Vec<usize> = nearest
        .iter()
        .filter(|(_, d)| *d <= noise)
        .map(|(v, _)| *v)
        .collect();
    matched.sort();
    matched.dedup();
    eprintln!(
        "{} raced gradients, {} weight versions (closest pair {closest_neighbours:.2e} apart), {} mixed, {} versions matched",
        seen.len(),
        versions.len(),
        mixed.len(),
        matched.len()
    );
    assert!(
        mixed.is_empty(),
        "{} of {} raced gradients match none of the {} weight versions (first: #{} off by {:.2e}): a backward saw two versions",
        mixed.len(),
        seen.len(),
        versions.len(),
        mixed[0].0,
        mixed[0].1
    );
    assert!(
        matched.len() >= 2,
        "every gradient matched version {matched:?}: the readers never overlapped training"
    );
}

/// What the log callback of `log_callbacks_run_with_no_handle_lock_held` saw.
struct LogProbe {
    handle: *mut dino_bridge::ffi::types::BridgeHandle,
    /// The thread whose train step the probe watches (other tests' messages are ignored).
    thread: std::thread::ThreadId,
    in_callback: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    forward_done: Mutex<std::sync::mpsc::Receiver<i32>>,
    /// (forward's status, seen while the callback ran; get_info's status and step)
    seen: Mutex<Option<(i32, i32, i64)>>,
}

unsafe extern "C" fn probe_log(
    _level: i32,
    msg: *const std::os::raw::c_char,
    user: *mut std::ffi::c_void,
) {
    use dino_bridge::ffi::*;
    // SAFETY: the test passes a LogProbe that outlives the callback's installation.
    let probe = unsafe { &*(user as *const LogProbe) };
    // SAFETY: the library passes a live NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    if std::thread::current().id() != probe.thread || !text.contains("update was skipped") {
        return;
    }
    let Some(tx) = probe.in_callback.lock().unwrap().take() else {
        return;
    };
    // Another thread's forward on the same handle must finish while this callback runs.
    tx.send(()).unwrap();
    let forward = probe
        .forward_done
        .lock()
        .unwrap()
        .recv_timeout(Duration::from_secs(300)) // a hang guard, not a verdict
        .unwrap_or(-1);
    // Calling back into the same handle (what the header used to forbid) must not deadlock;
    // tried only once the forward showed that no lock is held.
    let (mut status, mut step) = (-1, -1);
    if forward == 0 {
        let mut info = types::BridgeInfo {
            struct_size: std::mem::size_of::<types::BridgeInfo>() as u32,
            ..Default::default()
        };
        // SAFETY: a live handle and a struct of our size.
        status = unsafe { bridge_get_info(probe.handle, &mut info) };
        step = info.step;
    }
    *probe.seen.lock().unwrap() = Some((forward, status, step));
}

/// A train step skipped for a NaN logs a warning: the host's callback runs with no lock of
/// the handle held, so a slow callback stalls no other call on it, and one that calls back
/// into the handle does not deadlock. (Before: the warning was delivered under the train
/// step's write lock; the forward waited for it, and `bridge_get_info` deadlocked.)
#[test]
fn log_callbacks_run_with_no_handle_lock_held() {
    use dino_bridge::ffi::*;
    use std::ffi::CString;
    let path = CString::new(
        common::fixtures()
            .join("model.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let mut p: types::BridgeParams = unsafe { std::mem::zeroed() };
    p.struct_size = std::mem::size_of::<types::BridgeParams>() as u32;
    let mut h = std::ptr::null_mut();
    // SAFETY: a zeroed struct of our size, a live path string and an out pointer.
    unsafe {
        assert_eq!(bridge_params_default(&mut p), 0);
        p.checkpoint_path = path.as_ptr();
        assert_eq!(bridge_create(&p, &mut h), 0);
    }
    let (b, c, s) = (2usize, 4usize, 16usize);
    let (tokens, d) = (16usize, 48usize);
    let mut latents = vec![0.5f32; b * c * s * s];
    latents[3] = f32::NAN; // a NaN loss: the step is skipped, with a warning
    let targets = vec![0.1f32; b * tokens * d];
    let (in_tx, in_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let probe = Box::new(LogProbe {
        handle: h,
        thread: std::thread::current().id(),
        in_callback: Mutex::new(Some(in_tx)),
        forward_done: Mutex::new(done_rx),
        seen: Mutex::new(None),
    });
    let handle_token = h as usize;
    let forward = std::thread::spawn(move || {
        if in_rx.recv_timeout(Duration::from_secs(300)).is_err() {
            return;
        }
        let x = vec![0.25f32; 2 * 4 * 16 * 16];
        let mut out = vec![0f32; 2 * 16 * 48];
        // SAFETY: host buffers of two samples; the handle is live until the test ends.
        let st = unsafe {
            bridge_forward(
                handle_token as *mut types::BridgeHandle,
                x.as_ptr().cast(),
                out.as_mut_ptr().cast(),
                2,
                16,
                16,
                0,
            )
        };
        let _ = done_tx.send(st);
    });
    let mut stats = types::BridgeStepStats {
        struct_size: std::mem::size_of::<types::BridgeStepStats>() as u32,
        ..Default::default()
    };
    // SAFETY: the probe outlives the callback (removed below); buffers of two samples.
    let status = unsafe {
        bridge_set_log_callback(Some(probe_log), &*probe as *const LogProbe as *mut _);
        let st = bridge_train_step(
            h,
            latents.as_ptr().cast(),
            targets.as_ptr().cast(),
            b as i64,
            s as i32,
            s as i32,
            0,
            &mut stats,
            std::ptr::null_mut(),
        );
        bridge_set_log_callback(None, std::ptr::null_mut());
        st
    };
    forward.join().unwrap();
    assert_eq!(status, 0);
    assert_eq!(stats.skipped, 1, "the NaN step was not skipped");
    let seen = probe.seen.lock().unwrap().take();
    assert_eq!(
        seen,
        Some((0, 0, 0)),
        "(forward status while the callback ran, bridge_get_info status, step): \
         -1 = the forward never finished, a lock was held"
    );
    // SAFETY: the handle is live and no longer used.
    unsafe { assert_eq!(bridge_destroy(h), 0) };
}
