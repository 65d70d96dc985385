//! Checkpoints: safetensors with the metadata of DESIGN.md (read, validated, written
//! atomically), and import of PyTorch `.pt` zip files by tensor name.

use crate::config::BridgeConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{ParamSpec, param_specs};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "dino-bridge";
pub const FORMAT_VERSION: &str = "1";
/// Prefix of the optimiser's tensors in a training checkpoint (`optim.m.<param>`, `optim.v.<param>`).
pub const OPTIM_PREFIX: &str = "optim.";
/// Prefix of the exponential moving average of the weights (`ema.<param>`).
pub const EMA_PREFIX: &str = "ema.";

/// Where a training run stands; stored as JSON metadata `train_state`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainState {
    /// Optimiser updates applied so far.
    pub step: i64,
    pub epoch: i64,
    pub best_metric: Option<f64>,
    pub seed: u64,
    /// The seed of the next step's dropout masks, `dropout_seed(seed, step)` (written for
    /// the record: masks are a function of seed and step, so a resumed run draws them again).
    pub rng_state: u64,
    /// Batches consumed by the trainer (skipped ones included): where a resumed run
    /// picks up its data order.
    pub position: i64,
    /// Data rows left out of training for non-finite values.
    pub dropped_rows: i64,
}

/// Optimiser moments by parameter name.
#[derive(Clone, Default)]
pub struct OptimState {
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

/// A loaded, validated checkpoint. Tensors are f32 on the CPU.
pub struct Checkpoint {
    pub config: BridgeConfig,
    pub weights: HashMap<String, Tensor>,
    pub optim: Option<OptimState>,
    /// Moving average of the weights, by parameter name.
    pub ema: Option<HashMap<String, Tensor>>,
    pub train_state: Option<TrainState>,
}

impl Checkpoint {
    /// The weights in the model's parameter order (`model::param_specs`), as `save` takes
    /// them.
    pub fn ordered_weights(&self) -> Result<Vec<(String, Tensor)>> {
        param_specs(&self.config)?
            .into_iter()
            .map(|s| {
                let t = self
                    .weights
                    .get(&s.name)
                    .cloned()
                    .ok_or_else(|| Error::checkpoint(format!("missing tensor `{}`", s.name)))?;
                Ok((s.name, t))
            })
            .collect()
    }
}

/// What `save` writes: the model, and optionally the rest of a training run's state.
pub struct SaveParts<'a> {
    pub config: &'a BridgeConfig,
    pub weights: &'a [(String, Tensor)],
    /// First and second moments, in the order of `weights`.
    pub optim: Option<(&'a [Tensor], &'a [Tensor])>,
    /// Moving average, in the order of `weights`.
    pub ema: Option<&'a [Tensor]>,
    pub train_state: Option<&'a TrainState>,
}

impl<'a> SaveParts<'a> {
    /// Weights only: an inference checkpoint.
    pub fn weights(config: &'a BridgeConfig, weights: &'a [(String, Tensor)]) -> Self {
        SaveParts {
            config,
            weights,
            optim: None,
            ema: None,
            train_state: None,
        }
    }
}

fn ckpt_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::checkpoint(format!("{}: {what}", path.display()))
}

/// Loads a checkpoint: safetensors, or a PyTorch `.pt` zip (detected by content).
/// `key_map` renames tensors (`old -> new`; entries ending in `.` rename prefixes) before
/// validation. `fallback` is the config for a `.pt` file that carries none.
pub fn load(
    path: &Path,
    key_map: Option<&HashMap<String, String>>,
    fallback: Option<&BridgeConfig>,
) -> Result<Checkpoint> {
    if path.is_dir() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{}: is a directory, not a checkpoint file", path.display()),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut ckpt = if bytes.starts_with(b"PK\x03\x04") {
        drop(bytes);
        load_pt(path, fallback)?
    } else {
        load_safetensors(path, &bytes)?
    };
    if let Some(map) = key_map {
        ckpt.weights = ckpt
            .weights
            .into_iter()
            .map(|(k, v)| (rename(&k, map), v))
            .collect();
    }
    validate_weights(path, &ckpt.config, &ckpt.weights)?;
    if let Some(optim) = &ckpt.optim {
        validate_moments(path, "optim.m", &ckpt.weights, &optim.m)?;
        validate_moments(path, "optim.v", &ckpt.weights, &optim.v)?;
    }
    if let Some(ema) = &ckpt.ema {
        validate_moments(path, "ema", &ckpt.weights, ema)?;
    }
    Ok(ckpt)
}

fn rename(key: &str, map: &HashMap<String, String>) -> String {
    if let Some(new) = map.get(key) {
        return new.clone();
    }
    for (old, new) in map {
        if old.ends_with('.')
            && let Some(rest) = key.strip_prefix(old.as_str())
        {
            return format!("{new}{rest}");
        }
    }
    key.to_string()
}

fn to_f32_tensor(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => {
            return Err(ckpt_err(
                path,
                format!("tensor `{name}` has dtype {other:?}; expected a float type"),
            ));
        }
    };
    Ok(Tensor::from_vec(values, view.shape(), &Device::Cpu)?)
}

fn load_safetensors(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        ckpt_err(
            path,
            format!("not a valid safetensors file (corrupt or truncated): {e}"),
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| ckpt_err(path, format!("unreadable safetensors header: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        other => {
            return Err(ckpt_err(
                path,
                format!("metadata `format` is {other:?}; expected \"{FORMAT}\""),
            ));
        }
    }
    match meta.get("format_version").map(String::as_str) {
        Some(FORMAT_VERSION) => {}
        other => {
            return Err(ckpt_err(
                path,
                format!(
                    "metadata `format_version` is {other:?}; this library reads \"{FORMAT_VERSION}\""
                ),
            ));
        }
    }
    let config_json = meta
        .get("config")
        .ok_or_else(|| ckpt_err(path, "metadata has no `config`"))?;
    let config = BridgeConfig::from_json(config_json)
        .map_err(|e| ckpt_err(path, format!("metadata `config`: {}", e.message)))?;
    let train_state = match meta.get("train_state") {
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| ckpt_err(path, format!("metadata `train_state`: {e}")))?,
        ),
        None => None,
    };
    let mut weights = HashMap::new();
    let mut optim = OptimState::default();
    let mut ema = HashMap::new();
    for (name, view) in st.tensors() {
        let t = to_f32_tensor(path, &name, &view)?;
        if let Some(p) = name.strip_prefix(EMA_PREFIX) {
            ema.insert(p.to_string(), t);
        } else if let Some(rest) = name.strip_prefix(OPTIM_PREFIX) {
            match rest.split_once('.') {
                Some(("m", p)) => optim.m.insert(p.to_string(), t),
                Some(("v", p)) => optim.v.insert(p.to_string(), t),
                _ => return Err(ckpt_err(path, format!("unknown optimiser tensor `{name}`"))),
            };
        } else {
            weights.insert(name, t);
        }
    }
    let optim = if optim.m.is_empty() && optim.v.is_empty() {
        None
    } else {
        Some(optim)
    };
    let ema = if ema.is_empty() { None } else { Some(ema) };
    Ok(Checkpoint {
        config,
        weights,
        optim,
        ema,
        train_state,
    })
}

/// Every tensor the config needs is present with its shape, and there is nothing else.
pub fn validate_weights(
    path: &Path,
    config: &BridgeConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    let specs = param_specs(config)?;
    for ParamSpec { name, shape } in &specs {
        let t = weights.get(name).ok_or_else(|| {
            ckpt_err(
                path,
                format!("missing tensor `{name}` (config needs shape {shape:?})"),
            )
        })?;
        if t.dims() != shape.as_slice() {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor `{name}` has shape {:?}; the config needs {shape:?}",
                    t.dims()
                ),
            ));
        }
    }
    if weights.len() != specs.len() {
        let known: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let mut extra: Vec<&String> = weights
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        extra.sort();
        return Err(ckpt_err(
            path,
            format!("unexpected tensors not in the model: {extra:?}"),
        ));
    }
    Ok(())
}

/// A group of per-parameter tensors (optimiser moments, moving average) covers every
/// parameter with its shape.
fn validate_moments(
    path: &Path,
    what: &str,
    weights: &HashMap<String, Tensor>,
    group: &HashMap<String, Tensor>,
) -> Result<()> {
    if group.len() != weights.len() {
        return Err(ckpt_err(
            path,
            format!(
                "`{what}` covers {} of {} parameters",
                group.len(),
                weights.len()
            ),
        ));
    }
    for (name, t) in group {
        let w = weights
            .get(name)
            .ok_or_else(|| ckpt_err(path, format!("`{what}.{name}` names no parameter")))?;
        if w.dims() != t.dims() {
            return Err(ckpt_err(
                path,
                format!(
                    "`{what}.{name}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    w.dims()
                ),
            ));
        }
    }
    Ok(())
}

// ---- PyTorch .pt import -------------------------------------------------------------

use candle_core::pickle::{Object, Stack};

fn pt_top_object(path: &Path) -> Result<Object> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| ckpt_err(path, format!("not a readable zip (.pt) file: {e}")))?;
    let name = (0..zip.len())
        .filter_map(|i| {
            zip.name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.to_string())
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| ckpt_err(path, "zip has no data.pkl: not a PyTorch checkpoint"))?;
    let entry = zip
        .by_name(&name)
        .map_err(|e| ckpt_err(path, format!("{name}: {e}")))?;
    let mut reader = std::io::BufReader::new(entry);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| ckpt_err(path, format!("unreadable pickle: {e}")))?;
    stack
        .finalize()
        .map_err(|e| ckpt_err(path, format!("unreadable pickle: {e}")))
}

fn pickle_to_json(obj: &Object) -> Option<serde_json::Value> {
    use serde_json::Value;
    Some(match obj {
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => Value::from(*f),
        Object::Bool(b) => Value::from(*b),
        Object::Unicode(s) => Value::from(s.clone()),
        Object::None => Value::Null,
        Object::Dict(items) => Value::Object(
            items
                .iter()
                .map(|(k, v)| match k {
                    Object::Unicode(k) => Some((k.clone(), pickle_to_json(v)?)),
                    _ => None,
                })
                .collect::<Option<_>>()?,
        ),
        _ => return None,
    })
}

fn dict_get<'a>(obj: &'a Object, key: &str) -> Option<&'a Object> {
    match obj {
        Object::Dict(items) => items
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn load_pt(path: &Path, fallback: Option<&BridgeConfig>) -> Result<Checkpoint> {
    let top = pt_top_object(path)?;
    // The state dict is either the top-level dict or `top["model"]`.
    let key = match dict_get(&top, "model") {
        Some(Object::Dict(_)) => Some("model"),
        _ => None,
    };
    let config = match dict_get(&top, "config").and_then(pickle_to_json) {
        Some(json) => {
            let cfg: BridgeConfig = serde_json::from_value(json)
                .map_err(|e| ckpt_err(path, format!("`config` entry: {e}")))?;
            cfg.validate()
                .map_err(|e| ckpt_err(path, format!("`config` entry: {}", e.message)))?;
            cfg
        }
        None => fallback.cloned().ok_or_else(|| {
            ckpt_err(
                path,
                "the .pt file has no `config` entry and no config was given",
            )
        })?,
    };
    let tensors = candle_core::pickle::PthTensors::new(path, key)
        .map_err(|e| ckpt_err(path, format!("reading tensors: {e}")))?;
    let mut weights = HashMap::new();
    for name in tensors.tensor_infos().keys() {
        let t = tensors
            .get(name)
            .map_err(|e| ckpt_err(path, format!("tensor `{name}`: {e}")))?
            .ok_or_else(|| ckpt_err(path, format!("tensor `{name}` vanished")))?;
        if !t.dtype().is_float() {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected a float type",
                    t.dtype()
                ),
            ));
        }
        weights.insert(name.clone(), t.to_dtype(DType::F32)?.contiguous()?);
    }
    Ok(Checkpoint {
        config,
        weights,
        optim: None,
        ema: None,
        train_state: None,
    })
}

// ---- writing ------------------------------------------------------------------------

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Writes a checkpoint atomically.
pub fn save(path: &Path, parts: &SaveParts<'_>) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, (name, t)) in parts.weights.iter().enumerate() {
        named.push((name.clone(), t.dims().to_vec(), f32_bytes(t)?));
        if let Some((m, v)) = parts.optim {
            named.push((
                format!("{OPTIM_PREFIX}m.{name}"),
                m[i].dims().to_vec(),
                f32_bytes(&m[i])?,
            ));
            named.push((
                format!("{OPTIM_PREFIX}v.{name}"),
                v[i].dims().to_vec(),
                f32_bytes(&v[i])?,
            ));
        }
        if let Some(ema) = parts.ema {
            named.push((
                format!("{EMA_PREFIX}{name}"),
                ema[i].dims().to_vec(),
                f32_bytes(&ema[i])?,
            ));
        }
    }
    let views = named
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(StDtype::F32, shape.clone(), bytes).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::internal(format!("building safetensors views: {e}")))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert("config".to_string(), parts.config.to_json());
    if let Some(ts) = parts.train_state {
        meta.insert(
            "train_state".to_string(),
            serde_json::to_string(ts).expect("train state serialises"),
        );
    }
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::internal(format!("serialising checkpoint: {e}")))?;
    drop(named);
    write_atomic(path, &bytes)
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one:
/// temporary file in the same folder, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    if path.is_dir() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{}: is a directory", path.display()),
        ));
    }
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{n}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        // Make the rename itself durable.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
