//! dino-bridge: predicts DINOv2-base patch tokens from Stable Diffusion VAE latents, for
//! REPA-style alignment without decoding to pixels. See `DESIGN.md` for the contract.
//!
//! Where things are: the forward pass in [`model`], the loss in [`loss`], the C boundary
//! in [`ffi`], the engine behind a handle (train step, save) in [`bridge`].

pub mod allocator;
pub mod bridge;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod ffi;
pub mod kernels;
pub mod log;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod synth;
pub mod train;

/// Large activation buffers are recycled instead of being mapped and zeroed afresh on
/// every call (see [`allocator`]). Behind the default feature `caching-allocator`: a Rust
/// program that links the rlib and wants its own global allocator turns it off
/// (`default-features = false`).
#[cfg(feature = "caching-allocator")]
#[global_allocator]
static GLOBAL: allocator::CachingAllocator = allocator::CachingAllocator;

pub use bridge::{Bridge, BridgeOptions, ComputeDtype, FlatGrads, ParamInfo, StepStats};
pub use config::BridgeConfig;
pub use error::{Error, ErrorKind, Result};
pub use loss::LossWeights;
pub use optim::OptimConfig;
