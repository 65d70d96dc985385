//! Training data: a folder with `latents.npy` `[N, C, H, W]` and `targets.npy`
//! `[N, h*w, D]` on the token grid of that latent size (float16 or float32, C order),
//! memory-mapped and read a batch of rows at a time, so a target file larger than memory
//! trains fine. Several folders of different sizes (aspect buckets) train one bridge; the
//! epoch's batch plan draws each batch from one folder.

use crate::config::BridgeConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::npy::{self, NpyHeader};
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// One memory-mapped `.npy` array.
pub struct NpyArray {
    path: PathBuf,
    header: NpyHeader,
    map: Mmap,
}

impl NpyArray {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::new(ErrorKind::Io, format!("{}: file not found", path.display()))
            }
            _ => Error::io(path, e),
        })?;
        // SAFETY: read-only map; a file truncated underneath us would fault, which is the
        // usual mmap caveat for data files nobody edits while training.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = npy::parse_header(&map, map.len()).map_err(|e| e.context(path.display()))?;
        Ok(NpyArray {
            path: path.to_path_buf(),
            header,
            map,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn shape(&self) -> &[usize] {
        &self.header.shape
    }
    pub fn rows(&self) -> usize {
        self.header.shape.first().copied().unwrap_or(0)
    }
    fn row_elems(&self) -> usize {
        self.header.shape[1..].iter().product()
    }
    /// Appends row `r` as f32 to `out`, then lets the row's pages go from this process's
    /// resident memory (they stay in the page cache, and a later read faults them back
    /// in cheaply): a data set read through counts as no memory of the trainer's, however
    /// large.
    pub fn read_row(&self, r: usize, out: &mut Vec<f32>) {
        let bytes = self.row_elems() * self.header.dtype.size();
        let start = self.header.data_offset + r * bytes;
        npy::to_f32(self.header.dtype, &self.map[start..start + bytes], out);
        self.release(start, bytes);
    }

    /// Drops the whole pages of `[start, start + len)` from the process's mapping.
    fn release(&self, start: usize, len: usize) {
        const PAGE: usize = 4096;
        let (from, to) = (start.next_multiple_of(PAGE), (start + len) / PAGE * PAGE);
        if to > from {
            // SAFETY: a read-only, private mapping of a file: DONTNEED discards the
            // process's copy of the pages and the next access reads the file again; no
            // slice into the range outlives `read_row`'s copy above.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }
}

/// A validated data folder.
pub struct Dataset {
    pub latents: NpyArray,
    pub targets: NpyArray,
    pub len: usize,
    /// The latent size `(H, W)` and the token grid `(h, w)` it gives.
    pub latent_size: (usize, usize),
    pub grid: (usize, usize),
}

/// A batch ready for a train step, with the rows dropped for non-finite values.
pub struct Batch {
    pub latents: Tensor,
    pub targets: Tensor,
    pub rows: Vec<usize>,
    pub dropped: usize,
}

impl Dataset {
    /// Opens `dir/latents.npy` and `dir/targets.npy` and checks them against `config`.
    pub fn open(dir: &Path, config: &BridgeConfig) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{}: data folder not found", dir.display()),
            ));
        }
        let latents = NpyArray::open(&dir.join("latents.npy"))?;
        let targets = NpyArray::open(&dir.join("targets.npy"))?;

        let c = config;
        let lat = latents.shape();
        if lat.len() != 4 || lat[1] != c.in_ch {
            return Err(Error::shape(format!(
                "{}: shape {lat:?}; expected [N, {}, H, W]",
                latents.path().display(),
                c.in_ch
            )));
        }
        let (height, width) = (lat[2], lat[3]);
        let grid = c
            .token_grid(height as i64, width as i64)
            .map_err(|e| e.context(latents.path().display()))?;
        let want_tgt = [grid.0 * grid.1, c.target_dim];
        if targets.shape().len() != 3 || targets.shape()[1..] != want_tgt {
            return Err(Error::shape(format!(
                "{}: shape {:?}; expected [N, {}, {}] (the {}x{} token grid of {height}x{width} latents)",
                targets.path().display(),
                targets.shape(),
                want_tgt[0],
                c.target_dim,
                grid.0,
                grid.1
            )));
        }
        if latents.rows() != targets.rows() {
            return Err(Error::shape(format!(
                "{} has {} rows but {} has {}",
                latents.path().display(),
                latents.rows(),
                targets.path().display(),
                targets.rows()
            )));
        }
        if latents.rows() == 0 {
            return Err(Error::shape(format!(
                "{}: no rows",
                latents.path().display()
            )));
        }
        let len = latents.rows();
        Ok(Dataset {
            latents,
            targets,
            len,
            latent_size: (height, width),
            grid,
        })
    }

    /// Reads `rows` into tensors on `device`. Rows with a NaN or infinity in either file
    /// are left out and counted in `dropped`. `flips[i]` mirrors row `i` left-right: the
    /// latent's width axis and the columns of the target token grid together.
    pub fn batch(&self, rows: &[usize], flips: Option<&[bool]>, device: &Device) -> Result<Batch> {
        let (ln, tn) = (self.latents.row_elems(), self.targets.row_elems());
        let mut lat = Vec::with_capacity(rows.len() * ln);
        let mut tgt = Vec::with_capacity(rows.len() * tn);
        let mut kept = Vec::with_capacity(rows.len());
        let line = self.latent_size.1;
        let dim = self.targets.shape()[2];
        for (i, &r) in rows.iter().enumerate() {
            let (l0, t0) = (lat.len(), tgt.len());
            self.latents.read_row(r, &mut lat);
            self.targets.read_row(r, &mut tgt);
            if flips.is_some_and(|f| f[i]) {
                lat[l0..].chunks_exact_mut(line).for_each(|l| l.reverse());
                flip_grid(&mut tgt[t0..], self.grid.1, dim);
            }
            if lat[l0..].iter().chain(&tgt[t0..]).all(|v| v.is_finite()) {
                kept.push(r);
            } else {
                lat.truncate(l0);
                tgt.truncate(t0);
            }
        }
        let b = kept.len();
        let mut lshape = vec![b];
        lshape.extend_from_slice(&self.latents.shape()[1..]);
        let mut tshape = vec![b];
        tshape.extend_from_slice(&self.targets.shape()[1..]);
        Ok(Batch {
            latents: Tensor::from_vec(lat, lshape, device)?,
            targets: Tensor::from_vec(tgt, tshape, device)?,
            dropped: rows.len() - b,
            rows: kept,
        })
    }
}

/// Mirrors a row-major token map `[h*w, dim]` with `w` columns left-right.
fn flip_grid(tokens: &mut [f32], w: usize, dim: usize) {
    for row in tokens.chunks_exact_mut(w * dim) {
        for c in 0..w / 2 {
            let (left, right) = row.split_at_mut((w - 1 - c) * dim);
            left[c * dim..(c + 1) * dim].swap_with_slice(&mut right[..dim]);
        }
    }
}

/// Deterministic split: a seeded permutation of `0..n`; the last `val_count` rows of it
/// validate, the rest train (both returned sorted).
pub fn split(n: usize, val_count: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ SPLIT_SALT).shuffle(&mut order);
    let val_count = val_count.min(n.saturating_sub(1));
    let mut val = order.split_off(n - val_count);
    order.sort_unstable();
    val.sort_unstable();
    (order, val)
}

/// The order of the training rows in `epoch`: a permutation seeded by (seed, epoch), so a
/// resumed run sees the same batches.
pub fn epoch_order(train_rows: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train_rows.to_vec();
    Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)).shuffle(&mut order);
    order
}

/// The batches of one epoch over several folders: each folder's training rows in their
/// epoch order (`epoch_order`, salted per folder), cut into batches of `batch`, and the
/// batches of all folders in a seeded order of their own; each batch is `(folder, rows)`
/// from one folder. One folder keeps its batches in order. Deterministic in
/// (seed, epoch), so a resumed run continues with the same batches.
pub fn epoch_batches(
    train_rows: &[Vec<usize>],
    batch: usize,
    seed: u64,
    epoch: usize,
) -> Vec<(usize, Vec<usize>)> {
    let mut plan: Vec<(usize, Vec<usize>)> = train_rows
        .iter()
        .enumerate()
        .flat_map(|(f, rows)| {
            let salt = (f as u64).wrapping_mul(0xa076_1d64_78bd_642f);
            epoch_order(rows, seed ^ salt, epoch)
                .chunks(batch.max(1))
                .map(|c| (f, c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    if train_rows.len() > 1 {
        Rng::new(seed ^ BUCKET_SALT ^ epoch as u64).shuffle(&mut plan);
    }
    plan
}

const SPLIT_SALT: u64 = 0x5917_7a11_0000_0001;
const BUCKET_SALT: u64 = 0xb0c4_e750_0000_0002;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_batches_come_from_one_folder_each_and_cover_every_row_once() {
        let folders = vec![(0..10).collect::<Vec<_>>(), (0..7).collect::<Vec<_>>()];
        let plan = epoch_batches(&folders, 3, 5, 2);
        assert_eq!(plan.len(), 4 + 3);
        for (f, rows) in folders.iter().enumerate() {
            let mut seen: Vec<usize> = plan
                .iter()
                .filter(|(g, _)| *g == f)
                .flat_map(|(_, r)| r.clone())
                .collect();
            seen.sort();
            assert_eq!(&seen, rows);
        }
        assert_eq!(plan, epoch_batches(&folders, 3, 5, 2));
        assert_ne!(plan, epoch_batches(&folders, 3, 5, 3));
        // One folder: its batches in order, as before buckets existed.
        let one = epoch_batches(&folders[..1], 3, 5, 2);
        let rows: Vec<usize> = one.iter().flat_map(|(_, r)| r.clone()).collect();
        assert_eq!(rows, epoch_order(&folders[0], 5, 2));
    }

    #[test]
    fn flipping_mirrors_columns_and_twice_is_identity() {
        // 2x2 grid of 1-dim tokens: [a b; c d] -> [b a; d c]
        let mut t = vec![1.0, 2.0, 3.0, 4.0];
        flip_grid(&mut t, 2, 1);
        assert_eq!(t, [2.0, 1.0, 4.0, 3.0]);
        // A 2x3 grid: [a b c; d e f] -> [c b a; f e d]
        let mut t = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        flip_grid(&mut t, 3, 1);
        assert_eq!(t, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
        let orig: Vec<f32> = (0..3 * 3 * 2).map(|v| v as f32).collect();
        let mut t = orig.clone();
        flip_grid(&mut t, 3, 2);
        assert_eq!(&t[..6], &[4.0, 5.0, 2.0, 3.0, 0.0, 1.0]);
        flip_grid(&mut t, 3, 2);
        assert_eq!(t, orig);
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let (a, b) = split(100, 10, 3);
        assert_eq!((a.len(), b.len()), (90, 10));
        assert!(b.iter().all(|r| !a.contains(r)));
        assert_eq!(split(100, 10, 3), (a, b.clone()));
        assert_ne!(split(100, 10, 4).1, b);
        assert_ne!(
            epoch_order(&(0..50).collect::<Vec<_>>(), 1, 0),
            epoch_order(&(0..50).collect::<Vec<_>>(), 1, 1)
        );
    }
}
