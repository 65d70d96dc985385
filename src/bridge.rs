//! `Bridge`: one loaded model with its optimiser, the object behind a C handle. Forward and
//! loss calls share a read lock; a train step takes the write lock, so every call sees one
//! consistent set of weights.

use crate::checkpoint::{self, Checkpoint, SaveParts, TrainState};
use crate::config::BridgeConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::loss::{GridMatch, LossWeights, alignment_loss, pool_tokens, spatial_norm};
use crate::model::{BridgeModel, ParamSpec, param_specs};
use crate::optim::{AdamW, OptimConfig};
use crate::rng::Rng;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use parking_lot::RwLock;
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
    pub loss: LossWeights,
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
        self.loss.validate()?;
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
    rng: Rng,
}

pub struct Bridge {
    config: BridgeConfig,
    loss: LossWeights,
    spatial_norm_gamma: f32,
    optim_cfg: OptimConfig,
    device: Device,
    device_ordinal: i32,
    /// The device's memory in bytes (what `check_fits` compares with), read once.
    memory: u64,
    /// The body's dtype: F32, or BF16 on CUDA (f32 master weights, f32 loss).
    compute: DType,
    state: RwLock<State>,
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

/// The seed of a GPU's dropout masks for the update with 0-based index `step`.
fn dropout_seed(seed: u64, step: i64) -> u64 {
    Rng::new(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The gradient of `t` in `grads`. A tensor on the loss's path always gets one, so a
/// missing gradient means an op without a backward cut the graph: an error, never zeros.
fn grad_of(grads: &GradStore, t: &Tensor, what: &str) -> Result<Tensor> {
    grads.get(t).cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("no gradient reached {what}: an op on its path has no backward"),
        )
    })
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
        let rng = if train.rng_state != 0 {
            Rng::from_state(train.rng_state)
        } else {
            Rng::new(train.seed)
        };
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
            rng,
        };
        Ok(Bridge {
            config,
            loss: opts.loss,
            spatial_norm_gamma: opts.spatial_norm_gamma,
            optim_cfg: opts.optim.clone(),
            memory: device_memory(&device)?,
            device,
            device_ordinal,
            compute,
            state: RwLock::new(state),
        })
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
    pub fn loss_weights(&self) -> LossWeights {
        self.loss
    }
    /// Parameters (elements of all weight tensors).
    pub fn param_count(&self) -> u64 {
        self.state
            .read()
            .params
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum()
    }
    pub fn step(&self) -> i64 {
        self.state.read().train.step
    }
    pub fn train_state(&self) -> TrainState {
        let st = self.state.read();
        TrainState {
            rng_state: st.rng.state(),
            ..st.train.clone()
        }
    }
    /// Records the trainer's progress (epoch, position, best metric) in the train state
    /// that `save` writes.
    pub fn update_train_state(&self, f: impl FnOnce(&mut TrainState)) {
        f(&mut self.state.write().train);
    }

    /// `ema = decay * ema + (1 - decay) * weights`, in parameter order; an empty `ema`
    /// starts as a copy of the weights.
    pub fn update_ema(&self, ema: &mut Vec<Tensor>, decay: f32) -> Result<()> {
        let st = self.state.read();
        if ema.is_empty() {
            *ema = st
                .params
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            return Ok(());
        }
        for (e, (_, v)) in ema.iter_mut().zip(&st.params) {
            *e = ((&*e * decay as f64)? + (v.as_tensor().detach() * (1.0 - decay as f64))?)?;
        }
        Ok(())
    }

    /// The current weights by name (copies of the values, on the bridge's device).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.state.read();
        st.params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// The batch and token grid of `latents` `[B, in_ch, H, W]`.
    fn check_latents(&self, latents: &Tensor) -> Result<(usize, (usize, usize))> {
        let c = &self.config;
        match latents.dims() {
            &[b, ch, h, w] if b > 0 && ch == c.in_ch => {
                let grid = c.token_grid(h as i64, w as i64)?;
                self.check_fits(b as i64, grid)?;
                Ok((b, grid))
            }
            dims => Err(Error::shape(format!(
                "latents have shape {dims:?}; expected [B, {}, H, W] with B > 0 and H, W \
                 multiples of {}",
                c.in_ch,
                c.side_multiple()
            ))),
        }
    }

    /// Checks that `x` is `[batch, h*w, target_dim]` for the token grid `(h, w)`.
    fn check_tokens(
        &self,
        name: &str,
        x: &Tensor,
        batch: usize,
        (h, w): (usize, usize),
    ) -> Result<()> {
        let want = [batch, h * w, self.config.target_dim];
        if x.dims() != want {
            return Err(Error::shape(format!(
                "{name} has shape {:?}; expected {want:?} (a {h}x{w} token grid)",
                x.dims()
            )));
        }
        Ok(())
    }

    /// Checks that a call on `batch` samples with the token grid `grid` can fit this
    /// device's memory: an impossible size is a shape error here, not an allocation failure
    /// (which aborts the process) half-way through the call.
    pub fn check_fits(&self, batch: i64, grid: (usize, usize)) -> Result<()> {
        let need = self.config.min_working_bytes(batch.max(0) as u64, grid);
        let have = self.memory;
        if need > have as f64 {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return Err(Error::shape(format!(
                "batch {batch} on a {}x{} token grid needs at least {:.1} GiB; this device \
                 has {:.1} GiB",
                grid.0,
                grid.1,
                gib(need),
                gib(have as f64)
            )));
        }
        Ok(())
    }

    /// Predicted DINOv2 tokens `[B, h*w, D]` for latents `[B, C, H, W]` (evaluation mode),
    /// on the token grid `(h, w) = (H, W) / 2^adapter_depth`.
    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        let st = self.state.read();
        self.run(&st, false, latents, None)
    }

    /// The model on `latents` in the compute dtype, f32 out: the eval model, or in
    /// training the model over the variables (in bf16, over differentiable casts of them,
    /// so that the gradient reaches the f32 masters).
    fn run(
        &self,
        st: &State,
        train: bool,
        latents: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let x = latents.to_dtype(self.compute)?;
        let y = match (train, self.compute) {
            (false, _) => st.eval_model.forward(&x, None)?,
            (true, DType::F32) => st.train_model.forward(&x, rng)?,
            (true, dtype) => {
                let cast: HashMap<String, Tensor> = st
                    .params
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?)))
                    .collect::<Result<_>>()?;
                BridgeModel::load(&cast, &self.config)?.forward(&x, rng)?
            }
        };
        Ok(y.to_dtype(DType::F32)?)
    }

    /// REPA alignment: the loss between the caller's `pred` `[B, ph*pw, D]` on its grid
    /// `(ph, pw)` and the frozen bridge's prediction for `latents`, and d loss / d pred.
    /// The finer of the two grids is average-pooled onto the coarser (DESIGN.md), then
    /// the target is spatially normalised when `spatial_norm_gamma > 0`.
    pub fn loss_backward(
        &self,
        pred: &Tensor,
        latents: &Tensor,
        pred_grid: (usize, usize),
    ) -> Result<(f32, Tensor)> {
        let (loss, grad) = self.loss_backward_on_device(pred, latents, pred_grid)?;
        Ok((loss.to_scalar::<f32>()?, grad))
    }

    /// `loss_backward` with the loss left where it was computed (a 0-d f32 tensor on the
    /// bridge's device): on a GPU, nothing waits for it.
    pub fn loss_backward_on_device(
        &self,
        pred: &Tensor,
        latents: &Tensor,
        pred_grid: (usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let (batch, grid) = self.check_latents(latents)?;
        let matched = GridMatch::of((pred_grid.0 as i64, pred_grid.1 as i64), grid)?;
        self.check_tokens("pred", pred, batch, pred_grid)?;
        let target = self.run(&self.state.read(), false, latents, None)?;
        let pred = Var::from_tensor(&pred.to_dtype(DType::F32)?)?;
        let (p, target) = match matched {
            GridMatch::Same => (pred.as_tensor().clone(), target),
            GridMatch::PoolPred(k) => (pool_tokens(pred.as_tensor(), pred_grid, k)?, target),
            GridMatch::PoolTarget(k) => (pred.as_tensor().clone(), pool_tokens(&target, grid, k)?),
        };
        let target = if self.spatial_norm_gamma > 0.0 {
            spatial_norm(&target, self.spatial_norm_gamma)?
        } else {
            target
        };
        let loss = alignment_loss(&p, &target, &self.loss)?;
        let grads = loss.backward()?;
        let grad = grad_of(&grads, pred.as_tensor(), "pred")?;
        Ok((loss.detach(), grad))
    }

    /// The loss between bridge(latents) and `target` (`[B, T, D]`), and its gradient with
    /// respect to the latents through the frozen bridge. The read lock is held through the
    /// backward: the eval model's weights are views of the variables' storage, so an update
    /// landing mid-backward would mix two weight versions in one gradient.
    pub fn latent_loss_backward(&self, latents: &Tensor, target: &Tensor) -> Result<(f32, Tensor)> {
        let (loss, grad) = self.latent_loss_backward_on_device(latents, target)?;
        Ok((loss.to_scalar::<f32>()?, grad))
    }

    /// `latent_loss_backward` with the loss left on the bridge's device (0-d f32).
    pub fn latent_loss_backward_on_device(
        &self,
        latents: &Tensor,
        target: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, grid) = self.check_latents(latents)?;
        self.check_tokens("target", target, batch, grid)?;
        let latents = Var::from_tensor(&latents.to_dtype(DType::F32)?)?;
        let st = self.state.read();
        let pred = self.run(&st, false, latents.as_tensor(), None)?;
        let loss = alignment_loss(&pred, &target.to_dtype(DType::F32)?, &self.loss)?;
        let grads = loss.backward()?;
        let grad = grad_of(&grads, latents.as_tensor(), "the latents")?;
        drop(st);
        Ok((loss.detach(), grad))
    }

    /// The training loss on a batch and the gradient of every parameter, by name, without
    /// updating anything (dropout on, with the masks the next train step would draw). It
    /// takes the write lock like a train step: on a GPU the masks come from the device's
    /// RNG, which it seeds.
    pub fn param_grads(
        &self,
        latents: &Tensor,
        targets: &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        let (batch, grid) = self.check_latents(latents)?;
        self.check_tokens("targets", targets, batch, grid)?;
        let st = self.state.write();
        let mut rng = st.rng.clone();
        let (loss, grads) = self.loss_and_grads(&st, latents, targets, &mut rng)?;
        let named = st
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .zip(grads)
            .collect();
        Ok((loss, named))
    }

    fn loss_and_grads(
        &self,
        st: &State,
        latents: &Tensor,
        targets: &Tensor,
        rng: &mut Rng,
    ) -> Result<(f32, Vec<Tensor>)> {
        if self.device.is_cuda() {
            // Dropout masks on a GPU come from the device's RNG, seeded from (seed, step)
            // so that a resumed run draws the same ones.
            self.device
                .set_seed(dropout_seed(st.train.seed, st.train.step))?;
        }
        let pred = self.run(st, true, latents, Some(rng))?;
        let loss = alignment_loss(&pred, &targets.to_dtype(DType::F32)?, &self.loss)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Ok((loss_value, Vec::new()));
        }
        let grads = loss.backward()?;
        let grads = st
            .params
            .iter()
            .map(|(name, v)| grad_of(&grads, v.as_tensor(), name))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss_value, grads))
    }

    /// One AdamW step on `latents` `[B, C, H, W]` and `targets` `[B, h*w, D]`. A non-finite
    /// loss or gradient norm skips the update and leaves every weight untouched.
    pub fn train_step(&self, latents: &Tensor, targets: &Tensor) -> Result<StepStats> {
        let (batch, grid) = self.check_latents(latents)?;
        self.check_tokens("targets", targets, batch, grid)?;
        let mut st = self.state.write();
        let lr = self.optim_cfg.lr_at(st.train.step);
        let mut rng = st.rng.clone();
        let (loss, grads) = self.loss_and_grads(&st, latents, targets, &mut rng)?;
        let skipped = |grad_norm: f32| StepStats {
            loss,
            grad_norm,
            lr,
            step: st.train.step,
            skipped: true,
        };
        if !loss.is_finite() {
            crate::log::emit(
                crate::log::Level::Warn,
                format!(
                    "train step {}: the loss is {loss}; the update was skipped",
                    st.train.step + 1
                ),
            );
            return Ok(skipped(f32::NAN));
        }
        let trained: Vec<Tensor> = grads
            .iter()
            .zip(&st.trainable)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.clone())
            .collect();
        let grad_norm = AdamW::global_norm(&trained)?;
        if !grad_norm.is_finite() {
            crate::log::emit(
                crate::log::Level::Warn,
                format!(
                    "train step {}: the gradient norm is {grad_norm}; the update was skipped",
                    st.train.step + 1
                ),
            );
            return Ok(skipped(grad_norm));
        }
        let clip = self.optim_cfg.grad_clip;
        let scale = if clip > 0.0 && grad_norm > clip {
            clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let t = st.train.step + 1;
        let State {
            optim,
            params,
            trainable,
            ..
        } = &mut *st;
        optim.step(&self.optim_cfg, params, trainable, &grads, lr, scale, t)?;
        if self.compute != DType::F32 {
            st.eval_model = eval_model(&st.params, &self.config, self.compute)?;
        }
        st.train.step = t;
        st.rng = rng;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            step: t,
            skipped: false,
        })
    }

    /// Writes a training checkpoint (weights, optimiser moments, train state) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_training(path, None)
    }

    /// `save`, plus a moving average of the weights (in parameter order).
    pub fn save_training(&self, path: &Path, ema: Option<&[Tensor]>) -> Result<()> {
        let st = self.state.read();
        let weights: Vec<(String, Tensor)> = st
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let train = TrainState {
            rng_state: st.rng.state(),
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
        let st = self.state.read();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_gradient_is_an_internal_error_not_zeros() {
        let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let used = (x.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let grads = used.backward().unwrap();
        let g = grad_of(&grads, x.as_tensor(), "x").unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
        // A graph cut (as an op without a backward makes it): no gradient reaches x.
        let y = Var::new(0f32, &Device::Cpu).unwrap();
        let cut = x.as_tensor().detach().sum_all().unwrap();
        let loss = (cut + y.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let err = grad_of(&grads, x.as_tensor(), "the latents").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Internal);
        assert!(
            err.message.contains("no gradient reached the latents"),
            "{}",
            err.message
        );
    }
}
