//! `Bridge`: one loaded model with its optimiser, the object behind a C handle. Forward and
//! loss calls share a read lock; a train step takes the write lock, so every call sees one
//! consistent set of weights. This file makes bridges and holds their state; what they
//! compute is in `compute.rs`, the checked shape of a call in `shape.rs`.

mod autograd;
mod compute;
mod flat;
pub mod shape;
mod vector;

pub use vector::{FlatGrads, ParamInfo};

use crate::checkpoint::{self, Checkpoint, SaveParts, TrainState};
use crate::config::BridgeConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::log;
use crate::loss::LossWeights;
use crate::model::{BridgeModel, ParamSpec, param_specs};
use crate::optim::{AdamW, OptimConfig};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::path::Path;

/// Precision of the body's arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

/// Everything needed to create a bridge besides its weights.
#[derive(Clone, Debug)]
pub struct BridgeOptions {
    /// Model config for fresh weights (a checkpoint brings its own).
    pub config: BridgeConfig,
    /// The bridge's own training loss (train steps, validation).
    pub loss: LossWeights,
    /// Alignment's and the latent loss's weights (the calls a diffusion trainer makes):
    /// REPA's cosine loss by default.
    pub align_loss: LossWeights,
    /// iREPA's spatial normalisation of the alignment target (0 = off); applies to
    /// `loss_backward` only.
    pub spatial_norm_gamma: f32,
    pub optim: OptimConfig,
    pub seed: u64,
    /// -1 = CPU, n >= 0 = CUDA ordinal.
    pub device: i32,
    pub compute_dtype: ComputeDtype,
    /// Parameters whose names start with one of these are not trained (e.g. `backbone.`
    /// and `head.` to train only a new adapter).
    pub frozen_prefixes: Vec<String>,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            config: BridgeConfig::default(),
            loss: LossWeights::default(),
            align_loss: LossWeights::REPA,
            spatial_norm_gamma: 0.0,
            optim: OptimConfig::default(),
            seed: 0,
            device: -1,
            compute_dtype: ComputeDtype::F32,
            frozen_prefixes: Vec::new(),
        }
    }
}

impl BridgeOptions {
    /// The settings besides the config (which the bridge's weights bring).
    pub fn validate(&self) -> Result<()> {
        self.loss.validate("")?;
        self.align_loss.validate("align_")?;
        self.optim.validate()?;
        let g = self.spatial_norm_gamma;
        if !g.is_finite() || g < 0.0 {
            return Err(Error::invalid(format!(
                "spatial_norm_gamma = {g}: must be finite and >= 0 (0 = off)"
            )));
        }
        Ok(())
    }
}

/// What one train step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// Global gradient norm before clipping (NaN/inf when the step was skipped for it).
    pub grad_norm: f32,
    pub lr: f32,
    /// Updates applied so far, this one included.
    pub step: i64,
    /// True when a non-finite loss or gradient skipped the update.
    pub skipped: bool,
}

struct State {
    params: Vec<(String, Var)>,
    /// Per parameter: false when frozen.
    trainable: Vec<bool>,
    /// Built over the variables: gradients flow to them (f32 compute only; bf16 training
    /// builds its model over differentiable casts on every step).
    train_model: BridgeModel,
    /// No autograd graph to the weights: over detached views of the variables' storage
    /// (f32), or over bf16 copies made once and again after every update (bf16).
    eval_model: BridgeModel,
    optim: AdamW,
    train: TrainState,
}

pub struct Bridge {
    config: BridgeConfig,
    loss: LossWeights,
    align: LossWeights,
    spatial_norm_gamma: f32,
    optim_cfg: OptimConfig,
    device: Device,
    device_ordinal: i32,
    /// The device's memory in bytes (what `check_fits` compares with), read once.
    memory: u64,
    /// The body's dtype: F32, or BF16 on CUDA (f32 master weights, f32 loss).
    compute: DType,
    /// The flat parameter vector's layout (names and shapes never change).
    layout: Vec<ParamInfo>,
    state: RwLock<State>,
}

/// The state under the read lock. Log messages emitted meanwhile on this thread wait until
/// the lock is released (fields drop in order: the lock, then the hold), so the host's
/// callback never runs under a handle's lock.
struct Reading<'a> {
    state: RwLockReadGuard<'a, State>,
    _log: log::Held,
}

/// The state under the write lock, with messages held back as in `Reading`.
struct Writing<'a> {
    state: RwLockWriteGuard<'a, State>,
    _log: log::Held,
}

impl std::ops::Deref for Reading<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::Deref for Writing<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// The device for `ordinal`, checked against the compute dtype.
fn make_device(ordinal: i32, compute: ComputeDtype) -> Result<Device> {
    let device = new_device(ordinal)?;
    compute_fits(compute, &device)?;
    Ok(device)
}

fn new_device(ordinal: i32) -> Result<Device> {
    if ordinal < -1 {
        return Err(Error::invalid(format!(
            "device = {ordinal}: use -1 for CPU or a CUDA ordinal >= 0"
        )));
    }
    if ordinal >= 0 {
        #[cfg(feature = "cuda")]
        return crate::cuda::new_device(ordinal);
        #[cfg(not(feature = "cuda"))]
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "device = {ordinal}: this library was built without CUDA support (rebuild with `--features cuda`)"
            ),
        ));
    }
    Ok(Device::Cpu)
}

/// bf16 compute needs a CUDA device.
fn compute_fits(compute: ComputeDtype, device: &Device) -> Result<()> {
    if compute == ComputeDtype::Bf16 && !device.is_cuda() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "compute_dtype = bf16 needs a CUDA device; the CPU computes in f32",
        ));
    }
    Ok(())
}

/// The memory of `device` in bytes: the host's physical memory, or the GPU's.
fn device_memory(device: &Device) -> Result<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::cuda::total_memory(device);
    }
    let _ = device;
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return Ok(u64::MAX);
    }
    Ok(pages as u64 * page as u64)
}

/// Fresh weights: truncated-normal (std 0.02) linears and position embedding, PyTorch's
/// default (Kaiming-uniform) convolution kernels, zero biases, unit norm scales.
pub fn init_weights(config: &BridgeConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for ParamSpec { name, shape } in param_specs(config)? {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 4 {
            let bound = 1.0 / ((shape[1] * shape[2] * shape[3]) as f32).sqrt();
            (0..n)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect()
        } else if shape.len() >= 2 {
            (0..n).map(|_| rng.trunc_normal(0.02)).collect()
        } else if name.ends_with(".weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// The eval model over `params`: detached views of their storage in f32 (an update is
/// seen at once), bf16 copies otherwise (rebuilt after every update).
fn eval_model(
    params: &[(String, Var)],
    config: &BridgeConfig,
    dtype: DType,
) -> Result<BridgeModel> {
    let weights: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    BridgeModel::load(&weights, config)
}

impl Bridge {
    /// A bridge with fresh weights from `opts.config`.
    pub fn new(opts: &BridgeOptions) -> Result<Self> {
        // Settings and device first: a bad one is refused before 64M weights are drawn.
        opts.config.validate()?;
        opts.validate()?;
        let device = make_device(opts.device, opts.compute_dtype)?;
        let ckpt = Checkpoint {
            config: opts.config.clone(),
            weights: init_weights(&opts.config, opts.seed)?,
            optim: None,
            ema: None,
            train_state: None,
        };
        Self::on_device(ckpt, opts, device, opts.device)
    }

    /// A bridge loaded from a checkpoint (safetensors or `.pt`); the model config comes
    /// from the file, the rest from `opts`.
    pub fn open(path: &Path, opts: &BridgeOptions) -> Result<Self> {
        let ckpt = checkpoint::load(path, None, Some(&opts.config))?;
        Self::from_checkpoint(ckpt, opts)
    }

    /// A bridge over `ckpt` on a device of its own (`opts.device`; on CUDA, a stream of
    /// its own).
    pub fn from_checkpoint(ckpt: Checkpoint, opts: &BridgeOptions) -> Result<Self> {
        opts.validate()?;
        let device = make_device(opts.device, opts.compute_dtype)?;
        Self::on_device(ckpt, opts, device, opts.device)
    }

    /// A bridge over `ckpt` on this bridge's device and stream (`opts.device` is not
    /// read): the trainer's EMA and evaluation copies, whose tensors then mix with this
    /// bridge's and whose GPU work is ordered with it.
    pub fn derive(&self, ckpt: Checkpoint, opts: &BridgeOptions) -> Result<Self> {
        opts.validate()?;
        compute_fits(opts.compute_dtype, &self.device)?;
        Self::on_device(ckpt, opts, self.device.clone(), self.device_ordinal)
    }

    fn on_device(
        ckpt: Checkpoint,
        opts: &BridgeOptions,
        device: Device,
        device_ordinal: i32,
    ) -> Result<Self> {
        let config = ckpt.config;
        let mut weights = ckpt.weights;
        let mut params = Vec::new();
        for ParamSpec { name, .. } in param_specs(&config)? {
            let t = weights
                .remove(&name)
                .ok_or_else(|| Error::checkpoint(format!("missing tensor `{name}`")))?;
            params.push((
                name,
                Var::from_tensor(&t.to_device(&device)?.to_dtype(DType::F32)?)?,
            ));
        }
        let mut optim = AdamW::new(&params)?;
        if let Some(state) = ckpt.optim {
            for (i, (name, _)) in params.iter().enumerate() {
                optim.m[i] = state.m[name].to_device(&device)?;
                optim.v[i] = state.v[name].to_device(&device)?;
            }
        }
        let train = ckpt.train_state.unwrap_or(TrainState {
            seed: opts.seed,
            ..Default::default()
        });
        let var_map: HashMap<String, Tensor> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let compute = match opts.compute_dtype {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        };
        let trainable = params
            .iter()
            .map(|(n, _)| {
                !opts
                    .frozen_prefixes
                    .iter()
                    .any(|p| n.starts_with(p.as_str()))
            })
            .collect();
        let state = State {
            trainable,
            train_model: BridgeModel::load(&var_map, &config)?,
            eval_model: eval_model(&params, &config, compute)?,
            params,
            optim,
            train,
        };
        Ok(Bridge {
            layout: vector::layout(&state.params),
            config,
            loss: opts.loss,
            align: opts.align_loss,
            spatial_norm_gamma: opts.spatial_norm_gamma,
            optim_cfg: opts.optim.clone(),
            memory: device_memory(&device)?,
            device,
            device_ordinal,
            compute,
            state: RwLock::new(state),
        })
    }

    fn read(&self) -> Reading<'_> {
        let log = log::hold();
        Reading {
            state: self.state.read(),
            _log: log,
        }
    }

    fn write(&self) -> Writing<'_> {
        let log = log::hold();
        Writing {
            state: self.state.write(),
            _log: log,
        }
    }

    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn device_ordinal(&self) -> i32 {
        self.device_ordinal
    }
    /// The training loss's weights.
    pub fn loss_weights(&self) -> LossWeights {
        self.loss
    }
    /// Alignment's and the latent loss's weights.
    pub fn align_weights(&self) -> LossWeights {
        self.align
    }
    /// Parameters (elements of all weight tensors).
    pub fn param_count(&self) -> u64 {
        self.flat_len() as u64
    }
    pub fn step(&self) -> i64 {
        self.read().train.step
    }
    pub fn train_state(&self) -> TrainState {
        let st = self.read();
        TrainState {
            rng_state: autograd::dropout_seed(st.train.seed, st.train.step),
            ..st.train.clone()
        }
    }
    /// Records the trainer's progress (epoch, position, best metric) in the train state
    /// that `save` writes.
    pub fn update_train_state(&self, f: impl FnOnce(&mut TrainState)) {
        f(&mut self.write().train);
    }

    /// `f` on the current weights by name, in parameter order, under the read lock: a
    /// train step waits until it returns (the tensors are the variables' own, detached).
    pub fn with_weights<R>(
        &self,
        f: impl FnOnce(&[(&str, Tensor)]) -> candle_core::Result<R>,
    ) -> Result<R> {
        let st = self.read();
        let weights: Vec<(&str, Tensor)> = st
            .params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_tensor().detach()))
            .collect();
        Ok(f(&weights)?)
    }

    /// The current weights by name (copies of the values, on the bridge's device).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.read();
        st.params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Writes a training checkpoint (weights, optimiser moments, train state) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_training(path, None)
    }

    /// `save`, plus a moving average of the weights (in parameter order).
    pub fn save_training(&self, path: &Path, ema: Option<&[Tensor]>) -> Result<()> {
        let st = self.read();
        let weights: Vec<(String, Tensor)> = st
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let train = TrainState {
            rng_state: autograd::dropout_seed(st.train.seed, st.train.step),
            ..st.train.clone()
        };
        checkpoint::save(
            path,
            &SaveParts {
                config: &self.config,
                weights: &weights,
                optim: Some((&st.optim.m, &st.optim.v)),
                ema,
                train_state: Some(&train),
            },
        )
    }

    /// Writes the weights only (for inference).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let st = self.read();
        let weights: Vec<(String, Tensor)> = st
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(path, &SaveParts::weights(&self.config, &weights))
    }
}

impl Drop for Bridge {
    /// Work still queued on a CUDA bridge's stream may read the weights about to be freed:
    /// drain it first. (Derived bridges share the stream; draining it is only a wait.)
    fn drop(&mut self) {
        if self.device.is_cuda() {
            let _ = self.device.synchronize();
        }
    }
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("config", &self.config)
            .field("device", &self.device_ordinal)
            .field("step", &self.step())
            .finish()
    }
}
