//! `bridge-train`: trains bridges from memory-mapped `.npy` data and writes the
//! checkpoints the library loads; also evaluates, inspects and converts them.

use clap::{Args, Parser, Subcommand};
use dino_bridge::checkpoint::{self, SaveParts};
use dino_bridge::config::parse_size;
use dino_bridge::data::Dataset;
use dino_bridge::loss::LossWeights;
use dino_bridge::metrics::{DEFAULT_POOL, evaluate};
use dino_bridge::train::{TrainArgs, evaluate_rows, train};
use dino_bridge::{Bridge, BridgeConfig, BridgeOptions, Error, Result, npy, synth};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "bridge-train",
    version,
    about = "Train, evaluate and convert dino-bridge checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a bridge on DIR/latents.npy and DIR/targets.npy (--data repeated: one folder
    /// per latent size, each batch from one folder).
    Train(TrainCli),
    /// Metrics of a checkpoint on a data folder (or of saved predictions), as JSON.
    Eval(EvalCli),
    /// Write a synthetic data set with learnable structure.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Preset (default, repa, flux, repa-flux, repa-384/1024/1152/1280/1536, small, tiny) or a JSON config file.
        #[arg(long, default_value = "default")]
        config: String,
        /// Latent size HxW (default: the config's latent_size, square).
        #[arg(long)]
        size: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Synthetic data + a small bridge trained on it + evaluation, on the CPU (~2 minutes).
    /// `--config repa`: a small body on the repa grid (one adapter stage: 16x16 tokens from
    /// 32x32 latents), trained on two latent sizes at once, with a curve per size.
    Demo {
        /// Where data, checkpoints, metrics and the plot go (default: a temporary folder).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 1400)]
        n: usize,
        #[arg(long, default_value_t = 6)]
        epochs: usize,
        /// small (8x8 tokens from 32x32 latents) or repa (16x16 tokens, two sizes).
        #[arg(long, default_value = "small")]
        config: String,
    },
    /// Describe a checkpoint (or a preset or config file: --config), and the token grid
    /// and cost it gives for a latent size.
    Info {
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        checkpoint: Option<PathBuf>,
        /// A preset (e.g. repa-1024 for a 1024-wide teacher) or JSON config instead of a checkpoint.
        #[arg(long)]
        config: Option<String>,
        /// Latent size HxW to report the token grid and cost for.
        #[arg(long)]
        latent: Option<String>,
    },
    /// Convert a PyTorch .pt checkpoint to safetensors.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// JSON object renaming tensors {"old": "new"}; keys ending in "." rename prefixes.
        #[arg(long)]
        key_map: Option<PathBuf>,
        /// Config for a .pt file that carries none (preset or JSON file).
        #[arg(long)]
        config: Option<String>,
    },
}

#[derive(Args)]
struct TrainCli {
    /// A data folder; repeat for several latent sizes (aspect buckets).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Preset (default, repa, flux, repa-flux, repa-384/1024/1152/1280/1536, small, tiny) or a JSON config file.
    #[arg(long, default_value = "default")]
    config: String,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f32,
    /// Warmup steps (linear), then cosine decay to zero at the end.
    #[arg(long, default_value_t = 200)]
    warmup: i64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    /// Rows held out for validation.
    #[arg(long, default_value_t = 500)]
    val_count: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Continue from OUT/latest.safetensors.
    #[arg(long)]
    resume: bool,
    /// Train only the adapter (body and head from --init-backbone stay fixed).
    #[arg(long)]
    freeze_backbone: bool,
    /// Take backbone.* and head.* from this checkpoint.
    #[arg(long)]
    init_backbone: Option<PathBuf>,
    /// Random horizontal flips of the latent together with the target grid.
    #[arg(long)]
    flip_aug: bool,
    /// Keep an exponential moving average of the weights with this decay.
    #[arg(long)]
    ema: Option<f32>,
    /// Retrieval pool of the validation metrics.
    #[arg(long, default_value_t = DEFAULT_POOL)]
    pool: usize,
    /// Save OUT/latest.safetensors every N batches too (0: at epoch ends only).
    #[arg(long, default_value_t = 200)]
    save_every: usize,
    /// Weight of the spatial-structure (Gram) loss term.
    #[arg(long, default_value_t = 0.0)]
    w_gram: f32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Stop each epoch after N batches (smoke tests, benchmarks).
    #[arg(long)]
    limit_batches: Option<usize>,
}

#[derive(Args)]
struct EvalCli {
    #[arg(long, requires = "data")]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    data: Option<PathBuf>,
    /// Score saved predictions instead of running a model (needs --targets).
    #[arg(long, requires = "targets", conflicts_with = "checkpoint")]
    predictions: Option<PathBuf>,
    #[arg(long)]
    targets: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_POOL)]
    pool: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

fn parse_device(s: &str) -> Result<i32> {
    if s == "cpu" {
        return Ok(-1);
    }
    s.strip_prefix("cuda:")
        .and_then(|n| n.parse::<i32>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| Error::invalid(format!("--device {s}: use cpu or cuda:N")))
}

fn train_args(c: TrainCli) -> Result<TrainArgs> {
    Ok(TrainArgs {
        config: BridgeConfig::from_preset_or_file(&c.config)?,
        device: parse_device(&c.device)?,
        data: c.data,
        out: c.out,
        epochs: c.epochs,
        batch: c.batch,
        lr: c.lr,
        weight_decay: c.weight_decay,
        warmup: c.warmup,
        grad_clip: c.grad_clip,
        val_count: c.val_count,
        seed: c.seed,
        resume: c.resume,
        freeze_backbone: c.freeze_backbone,
        init_backbone: c.init_backbone,
        flip_aug: c.flip_aug,
        ema: c.ema,
        pool: c.pool,
        save_every: c.save_every,
        loss: LossWeights {
            gram: c.w_gram,
            ..LossWeights::default()
        },
        progress: !c.quiet,
        limit_batches: c.limit_batches,
    })
}

fn eval(c: EvalCli) -> Result<()> {
    let metrics = if let Some(pred) = c.predictions {
        let targets = c.targets.expect("clap requires --targets");
        let load = |p: &Path| -> Result<candle_core::Tensor> {
            let (shape, data) = npy::read_f32(p)?;
            Ok(candle_core::Tensor::from_vec(
                data,
                shape,
                &candle_core::Device::Cpu,
            )?)
        };
        evaluate(
            &load(&pred)?,
            &load(&targets)?,
            &LossWeights::default(),
            c.pool,
        )?
    } else {
        let (Some(ckpt), Some(data)) = (c.checkpoint, c.data) else {
            return Err(Error::invalid(
                "eval needs --checkpoint and --data, or --predictions and --targets",
            ));
        };
        let bridge = Bridge::open(&ckpt, &BridgeOptions::default())?;
        let data = Dataset::open(&data, bridge.config())?;
        let rows: Vec<usize> = (0..data.len).collect();
        evaluate_rows(
            &bridge,
            &data,
            &rows,
            c.batch,
            c.pool,
            &bridge.loss_weights(),
        )?
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&metrics).expect("metrics serialise")
    );
    Ok(())
}

fn info(path: &Path, latent: Option<&str>) -> Result<()> {
    let ckpt = checkpoint::load(path, None, None)?;
    println!("{}", path.display());
    describe_config(&ckpt.config, latent)?;
    println!(
        "  optimiser state: {}",
        if ckpt.optim.is_some() { "yes" } else { "no" }
    );
    println!(
        "  weight EMA: {}",
        if ckpt.ema.is_some() { "yes" } else { "no" }
    );
    if let Some(ts) = ckpt.train_state {
        println!(
            "  train state: {}",
            serde_json::to_string(&ts).expect("serialises")
        );
    }
    Ok(())
}

/// `info` of a preset or a JSON config: what a bridge of it would be.
fn info_of_config(spec: &str, latent: Option<&str>) -> Result<()> {
    let config = BridgeConfig::from_preset_or_file(spec)?;
    println!("--config {spec}");
    describe_config(&config, latent)
}

/// The config, its parameters, and the token grid and cost at a latent size (the stored one
/// by default).
fn describe_config(c: &BridgeConfig, latent: Option<&str>) -> Result<()> {
    println!("  config: {}", c.to_json());
    let (h, w) = match latent {
        Some(s) => parse_size(s)?,
        None => (c.latent_size, c.latent_size),
    };
    let (gh, gw) = c.token_grid(h as i64, w as i64)?;
    let specs = dino_bridge::model::param_specs(c)?;
    println!(
        "  {:.2}M parameters in {} tensors; target_dim {} (the teacher's width)",
        dino_bridge::model::param_count(c)? as f64 / 1e6,
        specs.len(),
        c.target_dim
    );
    println!(
        "  {h}x{w} latents -> {gh}x{gw} tokens ({} per sample; stored grid {}x{}), {:.2} GFLOP/sample forward",
        gh * gw,
        c.grid,
        c.grid,
        c.forward_flops_at(h, w) as f64 / 1e9
    );
    Ok(())
}

fn convert(from: &Path, to: &Path, key_map: Option<PathBuf>, config: Option<String>) -> Result<()> {
    let map: Option<HashMap<String, String>> = match key_map {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::invalid(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let fallback = config
        .map(|c| BridgeConfig::from_preset_or_file(&c))
        .transpose()?;
    let ckpt = checkpoint::load(from, map.as_ref(), fallback.as_ref())?;
    let weights = ckpt.ordered_weights()?;
    checkpoint::save(to, &SaveParts::weights(&ckpt.config, &weights))?;
    println!("wrote {} ({} tensors)", to.display(), weights.len());
    Ok(())
}

fn demo(out: Option<PathBuf>, n: usize, epochs: usize, which: &str) -> Result<()> {
    let out = out.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("dino-bridge-demo-{}", std::process::id()))
    });
    let small = BridgeConfig::preset("small").expect("preset");
    // The repa demo: the small body on REPA's grid, two latent sizes (a square and a
    // wide aspect bucket) sharing one set of weights.
    let (config, sizes): (BridgeConfig, Vec<(usize, usize)>) = match which {
        "small" => (small, vec![(32, 32)]),
        "repa" => (
            BridgeConfig {
                adapter_depth: 1,
                grid: 16,
                ..small
            },
            vec![(32, 32), (24, 40)],
        ),
        other => {
            return Err(Error::invalid(format!(
                "demo --config {other}: use small or repa"
            )));
        }
    };
    let t0 = std::time::Instant::now();
    let mut data = Vec::new();
    for &(h, w) in &sizes {
        let dir = out.join(format!("data_{h}x{w}"));
        let rows = n / sizes.len();
        synth::make(&dir, rows, &config, (h, w), 0)?;
        let (gh, gw) = config.token_grid(h as i64, w as i64)?;
        println!(
            "synthetic data: {rows} rows of {h}x{w} latents ({gh}x{gw} tokens) in {}",
            dir.display()
        );
        data.push(dir);
    }
    println!("({:.1}s)", t0.elapsed().as_secs_f64());
    let args = TrainArgs {
        data,
        out: out.join("run"),
        config,
        epochs,
        batch: 32,
        lr: 2e-3,
        warmup: 30,
        val_count: 200 / sizes.len(),
        save_every: 0,
        ..Default::default()
    };
    let records = train(&args)?;
    println!("\nvalidation curve (epoch: cosine, R@1 per latent size):");
    let r1 =
        |m: &dino_bridge::metrics::Metrics| m.retrieval_1.map_or("-".into(), |r| format!("{r:.3}"));
    for r in &records {
        let per: Vec<String> = if r.val_folders.is_empty() {
            vec![format!("{:.4}  {}", r.val.cosine, r1(&r.val))]
        } else {
            r.val_folders
                .iter()
                .map(|f| {
                    format!(
                        "{}x{}: {:.4}  {}",
                        f.latent_size[0],
                        f.latent_size[1],
                        f.metrics.cosine,
                        r1(&f.metrics)
                    )
                })
                .collect()
        };
        println!("  {:2}: {}", r.epoch, per.join("    "));
    }
    let (first, last) = (&records[0].val, &records[records.len() - 1].val);
    println!(
        "\ncosine {:.4} -> {:.4} ({:+.4}){}, in {:.0}s total",
        first.cosine,
        last.cosine,
        last.cosine - first.cosine,
        if sizes.len() > 1 {
            " pooled over sizes"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    );
    println!(
        "checkpoints, metrics.jsonl and metrics.png in {}",
        args.out.display()
    );
    Ok(())
}

/// Says on stderr, once, what the CPU's matrix products run on when it is not a fast BLAS,
/// and how to get one (the training and evaluation on the CPU are mostly GEMMs).
fn say_if_no_fast_blas(device: i32) {
    let blas = dino_bridge::kernels::blas::blas_description();
    if device < 0 && blas.starts_with("none") {
        eprintln!("bridge-train: BLAS: {blas}");
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(c) => {
            let args = train_args(c)?;
            say_if_no_fast_blas(args.device);
            train(&args).map(drop)
        }
        Command::Eval(c) => {
            say_if_no_fast_blas(-1);
            eval(c)
        }
        Command::Synth {
            out,
            n,
            config,
            size,
            seed,
        } => {
            let config = BridgeConfig::from_preset_or_file(&config)?;
            let size = match size {
                Some(s) => parse_size(&s)?,
                None => (config.latent_size, config.latent_size),
            };
            synth::make(&out, n, &config, size, seed)?;
            println!(
                "wrote {n} rows of {}x{} latents to {}",
                size.0,
                size.1,
                out.display()
            );
            Ok(())
        }
        Command::Demo {
            out,
            n,
            epochs,
            config,
        } => {
            say_if_no_fast_blas(-1);
            demo(out, n, epochs, &config)
        }
        Command::Info {
            checkpoint: Some(path),
            latent,
            ..
        } => info(&path, latent.as_deref()),
        Command::Info {
            config: Some(spec),
            latent,
            ..
        } => info_of_config(&spec, latent.as_deref()),
        Command::Info { .. } => Err(Error::invalid("info: give a checkpoint or --config")),
        Command::Convert {
            from,
            to,
            key_map,
            config,
        } => convert(&from, &to, key_map, config),
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(match e.kind {
            dino_bridge::ErrorKind::InvalidArgument | dino_bridge::ErrorKind::Shape => 2,
            _ => 1,
        });
    }
}
