//! The integration tests, in one binary (one link instead of eleven): each module is one
//! former test file. Tests that measure the whole process (resident memory) or kill
//! processes run what they measure in a process of their own.

mod c_api;
mod checkpoints;
mod common;
mod fixtures;
mod gpu_path;
mod header;
mod host_training;
mod memory;
mod metrics;
mod pause;
mod reliability;
mod shapes;
mod trainer;
mod training;
