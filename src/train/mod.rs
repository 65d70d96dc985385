//! The training loop behind `bridge-train train`: memory-mapped data in shuffled batches
//! (from one or several folders of different latent sizes, each batch from one folder),
//! AdamW with warmup + cosine, dropout, optional flip augmentation and weight EMA, a
//! validation pass each epoch (per folder, and pooled over folders), and atomic
//! checkpoints that a resumed run continues from exactly. The loop is `train` below; the
//! run's parts are in `run.rs`, the records in `records.rs`, the EMA in `ema.rs`, the data
//! folders in `folders.rs`.

mod ema;
mod folders;
mod records;
mod run;

pub use folders::evaluate_rows;
pub use records::{EpochRecord, FolderMetrics};
pub use run::TrainArgs;

use crate::error::Result;
use records::EpochStats;
use run::Run;

/// Runs the training; returns the per-epoch records (also in `OUT/metrics.jsonl`).
pub fn train(args: &TrainArgs) -> Result<Vec<EpochRecord>> {
    // Start: fresh weights, or the run's `latest` with its optimiser, EMA and position.
    let mut run = Run::start(args)?;
    let mut records = Vec::new();
    if run.at_start() {
        // Validate the starting weights: every curve begins at step 0.
        let record = run.validate(0, &EpochStats::start())?;
        run.log(&record)?;
        records.push(record);
    }
    while run.position < run.total_batches() {
        // Train: the epoch's batches from where the run stands (a resumed run may start
        // mid-epoch), one AdamW step each.
        let epoch = run.position / run.per_epoch;
        let bar = run.progress_bar(epoch);
        let mut stats = EpochStats::start();
        for (folder, rows) in run.batches_left(epoch) {
            let batch = run.batch(folder, &rows)?;
            if let Some(loss) = run.step(&batch, &mut stats)? {
                bar.set_message(format!(
                    "loss {loss:.4}  {:.1} samples/s",
                    stats.samples_per_s()
                ));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        stats.end_training();
        // Validate the weights and their moving average on every folder.
        let record = run.validate(epoch + 1, &stats)?;
        // Checkpoint: epoch_NNN, best when the judged loss improved, the record, latest.
        run.checkpoint(&record)?;
        records.push(record);
    }
    run.plot();
    if let Some(mib) = peak_resident_mib() {
        println!("peak memory (max resident set, mapped data pages included): {mib} MiB");
    }
    Ok(records)
}

/// This process's peak resident memory so far (Linux's `VmHWM`), in MiB.
fn peak_resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}
