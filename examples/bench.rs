//! Forward (and train-step) throughput of the bridge on the CPU.
//!
//!   cargo run --release --example bench -- [--batch 16] [--iters 5] [--train-iters 2]
//!       [--threads N] [--config default|repa|...] [--size HxW] [--tiny] [--no-plain]
//!
//! Prints forward samples/s, `loss_backward` calls/s and train-step samples/s, achieved
//! GFLOP/s from the model's FLOP count, the share of this run's measured GEMM rate, and
//! peak resident memory. `--no-plain` skips the runs with candle's plain ops.

use candle_core::{Device, Tensor};
use dino_bridge::rng::Rng;
use dino_bridge::{Bridge, BridgeConfig, BridgeOptions};
use std::time::Instant;

/// The word after `name` on the command line.
fn text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn arg(name: &str, default: usize) -> usize {
    text(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.normal()).collect::<Vec<f32>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

fn main() -> dino_bridge::Result<()> {
    let batch = arg("--batch", 16);
    let iters = arg("--iters", 5);
    let train_iters = arg("--train-iters", 2);
    // --no-plain: skip the candle-only runs (for profiling the kernels path alone).
    let plain_runs = !std::env::args().any(|a| a == "--no-plain");
    let name = if std::env::args().any(|a| a == "--tiny") {
        "tiny".to_string()
    } else {
        text("--config").unwrap_or_else(|| "default".into())
    };
    let config = BridgeConfig::from_preset_or_file(&name)?;
    // The latent size: --size HxW, else the config's own.
    let (height, width) = match text("--size") {
        Some(s) => dino_bridge::config::parse_size(&s)?,
        None => (config.latent_size, config.latent_size),
    };
    let grid = config.token_grid(height as i64, width as i64)?;
    let threads = arg(
        "--threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    // Before any parallel work: rayon's global pool runs this crate's kernels, candle's
    // own pool its element-wise ops (it reads CANDLE_NUM_THREADS on first use).
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", threads.to_string()) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the thread pool is set up once");
    let bridge = Bridge::new(&BridgeOptions {
        config: config.clone(),
        ..Default::default()
    })?;
    let mut rng = Rng::new(1);
    let x = random(&[batch, config.in_ch, height, width], &mut rng);
    let tokens = grid.0 * grid.1;
    let t = random(&[batch, tokens, config.target_dim], &mut rng);
    let gflop = config.forward_flops_at(height, width) as f64 / 1e9;
    println!(
        "config: {name} at {height}x{width} latents, {}x{} tokens ({:.1}M params, {gflop:.2} GFLOP/sample forward), batch {batch}, f32, CPU, {threads} threads",
        grid.0,
        grid.1,
        dino_bridge::model::param_count(&config)? as f64 / 1e6
    );

    println!(
        "BLAS: {}",
        dino_bridge::kernels::blas::blas_name().unwrap_or("none (candle matmul)")
    );
    // Fused kernels on and off, interleaved in this one process: the ratio is what counts
    // on a noisy machine.
    bridge.forward(&x)?; // warm-up
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        for (enabled, times) in [(true, &mut on), (false, &mut off)] {
            if !enabled && !plain_runs {
                continue;
            }
            dino_bridge::kernels::set_enabled(enabled);
            let start = Instant::now();
            bridge.forward(&x)?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    dino_bridge::kernels::set_enabled(true);
    let median = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (secs, plain) = (median(&mut on), median(&mut off));
    let sps = batch as f64 / secs;
    let fwd_gflops = sps * gflop;
    println!(
        "forward:    {sps:8.2} samples/s  {:7.1} GFLOP/s  ({:.1} ms/batch, median of {iters})",
        sps * gflop,
        secs * 1e3
    );
    println!(
        "            plain candle ops: {:.2} samples/s; kernels speed-up {:.2}x",
        batch as f64 / plain,
        plain / secs
    );

    // loss_backward: the bridge's forward on the latents (the target) plus the gradient
    // of the loss for caller predictions at the full grid.
    let pred = random(&[batch, tokens, config.target_dim], &mut rng);
    bridge.loss_backward(&pred, &x, grid)?; // warm-up
    let mut calls = Vec::new();
    for _ in 0..iters {
        let start = Instant::now();
        bridge.loss_backward(&pred, &x, grid)?;
        calls.push(start.elapsed().as_secs_f64());
    }
    let secs = median(&mut calls);
    println!(
        "loss_backward: {:6.2} calls/s      ({:.1} ms/call at batch {batch}, median of {iters})",
        1.0 / secs,
        secs * 1e3
    );

    if train_iters > 0 {
        bridge.train_step(&x, &t)?; // warm-up
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..train_iters {
            for (enabled, times) in [(true, &mut on), (false, &mut off)] {
                if !enabled && !plain_runs {
                    continue;
                }
                dino_bridge::kernels::set_enabled(enabled);
                let start = Instant::now();
                bridge.train_step(&x, &t)?;
                times.push(start.elapsed().as_secs_f64());
            }
        }
        dino_bridge::kernels::set_enabled(true);
        let (secs, plain) = (median(&mut on), median(&mut off));
        let sps = batch as f64 / secs;
        // forward + backward ~ 3x the forward FLOPs
        println!(
            "train_step: {sps:8.2} samples/s  {:7.1} GFLOP/s  ({:.1} ms/batch, median of {train_iters})",
            sps * 3.0 * gflop,
            secs * 1e3
        );
        println!(
            "            plain candle ops: {:.2} samples/s; kernels speed-up {:.2}x",
            batch as f64 / plain,
            plain / secs
        );
    }
    // The machine's f32 GEMM rate on the body's largest product, for scale.
    let (m, k, n) = (2048, 768, 3072);
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()?;
    dino_bridge::kernels::matmul(&a, &w)?;
    let start = Instant::now();
    for _ in 0..5 {
        dino_bridge::kernels::matmul(&a, &w)?;
    }
    let gemm = 2.0 * (m * k * n) as f64 * 5.0 / start.elapsed().as_secs_f64() / 1e9;
    println!(
        "GEMM [{m}x{k}]x[{k}x{n}]: {gemm:.1} GFLOP/s; forward reaches {:.0}% of it",
        100.0 * fwd_gflops / gemm
    );
    println!("peak RSS:   {:.0} MiB", peak_rss_mib());
    let (hits, misses) = dino_bridge::allocator::hits_and_misses();
    println!(
        "large-buffer cache: {hits} reused, {misses} new, {:.0} MiB held",
        dino_bridge::allocator::cached_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}
