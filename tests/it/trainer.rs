//! `bridge-train` as a user runs it: eval on the fixtures, resume after `kill -9`, kills
//! during checkpoint writes, bad data folders, and the adapter-only (frozen body) mode.

use crate::common;

use common::*;
use dino_bridge::checkpoint;
use dino_bridge::npy::header_bytes;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bridge-train"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn synth(dir: &Path, n: usize, config: &str) {
    synth_sized(dir, n, config, None);
}

/// `bridge-train synth`, at the config's latent size or at `size` (`HxW`).
fn synth_sized(dir: &Path, n: usize, config: &str, size: Option<&str>) {
    let mut cmd = bin();
    cmd.args(["synth", "--n", &n.to_string(), "--config", config, "--out"])
        .arg(dir);
    if let Some(s) = size {
        cmd.args(["--size", s]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
}

fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    train_cmd_with("tiny", data, out, extra)
}

fn train_cmd_with(config: &str, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args([
        "train",
        "--config",
        config,
        "--quiet",
        "--batch",
        "8",
        "--val-count",
        "40",
        "--pool",
        "40",
    ])
    .args(["--seed", "5", "--warmup", "5", "--lr", "1e-3", "--data"])
    .arg(data)
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

/// Every tensor of a checkpoint (weights, optimiser, EMA) as raw values, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn epochs_logged(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_reproduces_the_fixture_metrics() {
    let fx = fixtures();
    for (pool, key) in [
        ("2200", "eval_metrics_pool2200"),
        ("5", "eval_metrics_pool5"),
    ] {
        let out = run(bin()
            .args(["eval", "--pool", pool, "--predictions"])
            .arg(fx.join("eval_pred.npy"))
            .arg("--targets")
            .arg(fx.join("eval_target.npy")));
        assert!(out.status.success(), "{}", text(&out));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = &expected()[key];
        for name in ["cosine", "nmse", "self_sim"] {
            assert_scalar(
                name,
                got[name].as_f64().unwrap(),
                want[name].as_f64().unwrap(),
            );
        }
        for name in ["retrieval@1", "retrieval@5", "retrieval@10"] {
            assert_eq!(got[name], want[name], "{key}.{name}");
        }
    }
    // The f16 data folder holds the fixture model's own outputs as targets.
    let out = run(bin()
        .args(["eval", "--checkpoint"])
        .arg(fx.join("model.safetensors"))
        .arg("--data")
        .arg(fx.join("data_f16")));
    assert!(out.status.success(), "{}", text(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(got["cosine"].as_f64().unwrap() > 0.9999, "{got}");
    assert_eq!(got["retrieval@1"].as_f64().unwrap(), 1.0);
}

/// Two aspect buckets (16x16 and 8x16 latents: 4x4 and 2x4 tokens) with flips and an
/// EMA, killed mid-epoch and resumed: the same weights, optimiser and EMA as a straight
/// run, and validation per folder and pooled.
#[test]
fn a_run_killed_mid_epoch_resumes_to_the_same_weights() {
    let dir = tmp_dir("kill-resume");
    let data = dir.join("data");
    synth(&data, 1000, "tiny");
    let wide = dir.join("data_8x16");
    synth_sized(&wide, 400, "tiny", Some("8x16"));
    let wide = wide.to_str().unwrap();
    let extra = [
        "--data",
        wide,
        "--epochs",
        "2",
        "--save-every",
        "3",
        "--flip-aug",
        "--ema",
        "0.9",
    ];

    let straight = dir.join("straight");
    let out = run(&mut train_cmd(&data, &straight, &extra));
    assert!(out.status.success(), "{}", text(&out));

    let killed = dir.join("killed");
    let mut child = train_cmd(&data, &killed, &extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("latest.safetensors").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be killed"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let state = checkpoint::load(&killed.join("latest.safetensors"), None, None)
        .unwrap()
        .train_state
        .unwrap();
    assert!(
        state.epoch == 0 && state.position > 0,
        "killed at {state:?}: not mid-epoch"
    );

    let out = run(&mut train_cmd(
        &data,
        &killed,
        &[&extra[..], &["--resume"]].concat(),
    ));
    assert!(
        out.status.success() && text(&out).contains("resuming"),
        "{}",
        text(&out)
    );

    let (a, b) = (
        tensors(&straight.join("latest.safetensors")),
        tensors(&killed.join("latest.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().any(|(n, _)| n.starts_with("ema."))
            && a.iter().any(|(n, _)| n.starts_with("optim."))
    );
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            va == vb,
            "{na} differs between the straight and the resumed run"
        );
    }
    let (la, lb) = (epochs_logged(&straight), epochs_logged(&killed));
    assert_eq!(la.len(), 3);
    assert_eq!(lb.len(), 3, "resumed metrics.jsonl: {lb:?}");
    assert_eq!(la[2]["val"], lb[2]["val"]);
    assert_eq!(la[2]["val_ema_folders"], lb[2]["val_ema_folders"]);
    // Per folder: the grids of each size, with retrieval; pooled: no retrieval.
    let folders = la[2]["val_folders"].as_array().unwrap();
    assert_eq!(folders.len(), 2);
    assert_eq!(folders[0]["grid"], serde_json::json!([4, 4]));
    assert_eq!(folders[1]["grid"], serde_json::json!([2, 4]));
    assert_eq!(folders[1]["latent_size"], serde_json::json!([8, 16]));
    assert!(
        folders
            .iter()
            .all(|f| f["retrieval@1"].is_number() && f["rows"] == 40)
    );
    assert!(la[2]["val"]["cosine"].is_number() && la[2]["val"].get("retrieval@1").is_none());
    let pooled = la[2]["val"]["loss"].as_f64().unwrap();
    let mean = (folders[0]["loss"].as_f64().unwrap() + folders[1]["loss"].as_f64().unwrap()) / 2.0;
    assert!(
        (pooled - mean).abs() < 1e-9,
        "pooled {pooled} vs {mean} (40 rows each)"
    );
    assert!(straight.join("metrics.png").is_file() && straight.join("best.safetensors").is_file());
    assert!(straight.join("epoch_002.safetensors").is_file());
}

/// SIGKILLs inside the trainer's writes of `latest`, at each point of a write (chosen by
/// event, not time: see `c_api::kill_at`), each run resuming where the last was killed:
/// `latest` always loads whole, with its optimiser and train state, and never goes back.
#[test]
fn kills_during_checkpoint_writes_never_leave_a_broken_latest() {
    use super::c_api::{SavePoint, kill_at, temporaries_of};
    let dir = tmp_dir("kill-save");
    let data = dir.join("data");
    synth(&data, 300, "small");
    let out_dir = dir.join("run");
    let latest = out_dir.join("latest.safetensors");
    let mut last_step = 0;
    // The first kill comes after a rename, so that there is a `latest` to resume from.
    let points = SavePoint::ALL.iter().cycle().skip(2).take(9);
    for (i, point) in points.enumerate() {
        let nth = 1 + i / 3;
        let mut cmd = bin();
        cmd.args([
            "train",
            "--config",
            "small",
            "--quiet",
            "--batch",
            "2",
            "--val-count",
            "20",
            "--pool",
            "20",
        ])
        .args(["--epochs", "50", "--save-every", "1", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out_dir)
        .stdout(std::process::Stdio::null());
        if latest.exists() {
            cmd.arg("--resume");
        }
        kill_at(super::pause::Paused::spawn(cmd), &latest, nth, *point);
        let ckpt = checkpoint::load(&latest, None, None).unwrap_or_else(|e| {
            panic!("kill {i} ({point:?} of save {nth}): latest does not load: {e}")
        });
        assert!(ckpt.optim.is_some() && ckpt.train_state.is_some());
        // Resumed runs only move forward: a partial newer file never replaced latest.
        let step = ckpt.train_state.unwrap().step;
        assert!(
            step >= last_step,
            "kill {i}: latest went back from step {last_step} to {step}"
        );
        // Stale temporaries of earlier kills are removed when a run starts.
        assert_eq!(
            temporaries_of(&latest).len(),
            !point.replaced() as usize,
            "kill {i} ({point:?} of save {nth}): temporary files of latest"
        );
        last_step = step;
    }
    assert!(last_step > 0);
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], fortran: bool, bytes_per: usize) {
    let mut header = header_bytes(descr, shape);
    if fortran {
        let at = header.windows(5).position(|w| w == b"False").unwrap();
        header[at..at + 5].copy_from_slice(b"True ");
    }
    let n: usize = shape.iter().product();
    header.extend(vec![0u8; n * bytes_per]);
    std::fs::write(path, header).unwrap();
}

fn bad_data_error(name: &str, setup: impl FnOnce(&Path)) -> String {
    let dir = tmp_dir(&format!("bad-data-{name}"));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    setup(&data);
    let out = run(&mut train_cmd(&data, &dir.join("run"), &["--epochs", "1"]));
    assert!(!out.status.success(), "{name}: training accepted bad data");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{name}: {err}");
    err
}

#[test]
fn bad_data_gets_an_error_naming_the_file_and_the_problem() {
    let lat =
        |d: &Path, n: usize| write_npy(&d.join("latents.npy"), "<f4", &[n, 4, 16, 16], false, 4);
    let tgt = |d: &Path, n: usize| write_npy(&d.join("targets.npy"), "<f2", &[n, 16, 48], false, 2);
    // (case, how to break the data folder, what the error must say)
    type Case<'a> = (&'a str, Box<dyn FnOnce(&Path)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "missing",
            Box::new(move |d: &Path| lat(d, 50)),
            "targets.npy: file not found",
        ),
        (
            "rows",
            Box::new(move |d: &Path| {
                lat(d, 50);
                tgt(d, 49)
            }),
            "has 50 rows but",
        ),
        (
            "channels",
            Box::new(move |d: &Path| {
                write_npy(&d.join("latents.npy"), "<f4", &[50, 3, 16, 16], false, 4);
                tgt(d, 50)
            }),
            "latents.npy: shape [50, 3, 16, 16]; expected [N, 4, H, W]",
        ),
        (
            "side",
            Box::new(move |d: &Path| {
                write_npy(&d.join("latents.npy"), "<f4", &[50, 4, 16, 14], false, 4);
                tgt(d, 50)
            }),
            "latents.npy: latent width = 14: must be a positive multiple of 4",
        ),
        (
            // Another latent size is fine, but its targets must be on its token grid.
            "grid",
            Box::new(move |d: &Path| {
                write_npy(&d.join("latents.npy"), "<f4", &[50, 4, 8, 8], false, 4);
                tgt(d, 50)
            }),
            "targets.npy: shape [50, 16, 48]; expected [N, 4, 48] (the 2x2 token grid of 8x8 latents)",
        ),
        (
            "dtype",
            Box::new(move |d: &Path| {
                lat(d, 50);
                write_npy(&d.join("targets.npy"), "<i4", &[50, 16, 48], false, 4)
            }),
            "targets.npy: not a supported .npy file: dtype '<i4'",
        ),
        (
            "fortran",
            Box::new(move |d: &Path| {
                write_npy(&d.join("latents.npy"), "<f4", &[50, 4, 16, 16], true, 4);
                tgt(d, 50)
            }),
            "latents.npy: not a supported .npy file: Fortran order",
        ),
        (
            "truncated",
            Box::new(move |d: &Path| {
                lat(d, 50);
                tgt(d, 50);
                let p = d.join("targets.npy");
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len - 100)
                    .unwrap();
            }),
            "targets.npy: not a supported .npy file: truncated",
        ),
    ];
    for (name, setup, want) in cases {
        let err = bad_data_error(name, setup);
        assert!(
            err.contains(want),
            "{name}: error was {err:?}, want {want:?}"
        );
    }
}

#[test]
fn non_finite_rows_are_skipped_and_counted() {
    let dir = tmp_dir("nan-rows");
    let data = dir.join("data");
    synth(&data, 200, "tiny");
    // Poison rows 3 and 7 of the targets (float16 NaN = 0x7e00).
    let p = data.join("targets.npy");
    let mut bytes = std::fs::read(&p).unwrap();
    let header = dino_bridge::npy::parse_header(&bytes, bytes.len()).unwrap();
    for row in [3usize, 7] {
        let at = header.data_offset + row * 16 * 48 * 2 + 10;
        bytes[at..at + 2].copy_from_slice(&[0x00, 0x7e]);
    }
    std::fs::write(&p, &bytes).unwrap();
    let (train_rows, _) = dino_bridge::data::split(200, 40, 5);
    let poisoned_in_train = [3usize, 7]
        .iter()
        .filter(|r| train_rows.contains(r))
        .count();
    let run_dir = dir.join("run");
    let out = run(&mut train_cmd(&data, &run_dir, &["--epochs", "2"]));
    assert!(out.status.success(), "{}", text(&out));
    let log = epochs_logged(&run_dir);
    for rec in &log[1..] {
        assert_eq!(
            rec["dropped_rows"].as_u64().unwrap() as usize,
            poisoned_in_train,
            "{rec}"
        );
        assert!(rec["val"]["loss"].as_f64().unwrap().is_finite());
        assert!(rec["train_loss"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn a_new_adapter_trains_against_a_frozen_body() {
    let dir = tmp_dir("freeze");
    let data4 = dir.join("data4");
    synth(&data4, 200, "tiny");
    let donor_dir = dir.join("donor");
    let out = run(&mut train_cmd(&data4, &donor_dir, &["--epochs", "1"]));
    assert!(out.status.success(), "{}", text(&out));
    let donor = donor_dir.join("best.safetensors");

    // A 16-channel version of the tiny config (the FLUX case).
    let cfg = serde_json::json!({"in_ch": 16, "latent_size": 16, "grid": 4, "target_dim": 48,
        "adapter_mid_channels": 32, "adapter_out_channels": 64, "width": 64, "depth": 2, "heads": 4,
        "dropout": 0.0});
    let cfg_path = dir.join("flux-tiny.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let data16 = dir.join("data16");
    let out = run(bin()
        .args(["synth", "--n", "200", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&data16));
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = dir.join("adapter");
    let mut cmd = train_cmd_with(
        cfg_path.to_str().unwrap(),
        &data16,
        &run_dir,
        &["--epochs", "1", "--freeze-backbone", "--init-backbone"],
    );
    cmd.arg(&donor);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));

    let before = checkpoint::load(&donor, None, None).unwrap().weights;
    let after = checkpoint::load(&run_dir.join("latest.safetensors"), None, None).unwrap();
    assert_eq!(after.config.in_ch, 16);
    for (name, t) in &after.weights {
        if name.starts_with("backbone.") || name.starts_with("head.") {
            assert_eq!(
                values(t),
                values(&before[name]),
                "{name} moved although frozen"
            );
        }
    }
    let log = epochs_logged(&run_dir);
    let (c0, c1) = (
        log[0]["val"]["cosine"].as_f64().unwrap(),
        log[1]["val"]["cosine"].as_f64().unwrap(),
    );
    assert!(c1 > c0, "the adapter did not learn: cosine {c0} -> {c1}");
}

#[test]
fn info_and_convert() {
    let dir = tmp_dir("convert");
    let to: PathBuf = dir.join("model.safetensors");
    let map = dir.join("map.json");
    std::fs::write(&map, r#"{"head.weight": "head.weight"}"#).unwrap();
    let out = run(bin()
        .args(["convert", "--from"])
        .arg(fixtures().join("model.pt"))
        .arg("--to")
        .arg(&to)
        .arg("--key-map")
        .arg(&map));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(bin().arg("info").arg(&to));
    assert!(
        out.status.success() && text(&out).contains("\"width\":64"),
        "{}",
        text(&out)
    );
    let out = run(bin()
        .args(["eval", "--data"])
        .arg(fixtures().join("data_f16"))
        .arg("--checkpoint")
        .arg(&to));
    assert!(out.status.success(), "{}", text(&out));
}

/// `info --config` describes a preset without a checkpoint: the teacher-width presets
/// differ from `repa` only in the head (its width is the teacher's).
#[test]
fn info_describes_the_teacher_width_presets() {
    let params = |preset: &str| -> f64 {
        let out = run(bin().args(["info", "--config", preset, "--latent", "32x32"]));
        let t = text(&out);
        assert!(out.status.success() && t.contains("16x16 tokens"), "{t}");
        t.split("M parameters")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let repa = params("repa");
    for (preset, dim) in [
        ("repa-384", 384.0),
        ("repa-1024", 1024.0),
        ("repa-1152", 1152.0),
        ("repa-1280", 1280.0),
        ("repa-1536", 1536.0),
    ] {
        // The head is Linear(768 -> dim) with a bias.
        let want = repa + 769.0 * (dim - 768.0) / 1e6;
        assert!(
            (params(preset) - want).abs() < 0.011,
            "{preset}: {} vs {want}",
            params(preset)
        );
    }
    let out = run(bin().args(["info", "--config", "repa-999"]));
    assert!(
        !out.status.success() && text(&out).contains("repa-1536"),
        "{}",
        text(&out)
    );
}

/// Peak memory of a small training run on the REPA grid (a 0.6M-parameter body, 16x16
/// tokens of 768: the loss's tensors are most of a step's working set), as the trainer
/// reports it (`VmHWM`, mapped data pages included). It was 3.0 GB before the loss kept
/// three `[B, T, D]` tensors instead of a dozen, the allocator's cache stopped keeping
/// every size a run had asked for, and read data pages stopped counting (1.6 GB after).
#[test]
fn a_small_run_on_the_repa_grid_stays_within_its_memory() {
    let dir = tmp_dir("peak-memory");
    let config = dir.join("repa-small.json");
    std::fs::write(
        &config,
        r#"{"adapter_depth": 1, "grid": 16, "adapter_mid_channels": 32,
            "adapter_out_channels": 64, "width": 128, "depth": 2, "heads": 4, "dropout": 0.0}"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let data = dir.join("data");
    synth(&data, 400, config);
    // The batch the demo uses; two threads, as the development and CI machines have.
    let mut cmd = bin();
    cmd.args([
        "train", "--config", config, "--quiet", "--epochs", "2", "--batch", "32",
    ])
    .args(["--val-count", "50", "--pool", "50", "--data"])
    .arg(&data)
    .arg("--out")
    .arg(dir.join("run"))
    .env("RAYON_NUM_THREADS", "2");
    let out = run(&mut cmd);
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    let mib: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("peak memory (max resident set, mapped data pages included): ")
        })
        .and_then(|l| l.strip_suffix(" MiB")?.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory line in:\n{text}"));
    println!("peak memory of the small repa-grid run: {mib} MiB");
    assert!(
        mib < 2048,
        "peak memory {mib} MiB (it was 1.6 GB when this test was written)"
    );
}

/// `--limit-batches N` ends each epoch after N batches: the step count and the samples
/// trained say so (the trainer's split into src/train/ once lost the cut).
#[test]
fn limit_batches_cuts_each_epoch_short() {
    let dir = tmp_dir("limit-batches");
    let data = dir.join("data");
    synth(&data, 200, "tiny");
    let run_dir = dir.join("run");
    let out = run(&mut train_cmd(
        &data,
        &run_dir,
        &["--epochs", "2", "--limit-batches", "3"],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let steps: Vec<u64> = epochs_logged(&run_dir)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 3, 6], "steps after each epoch");
}
