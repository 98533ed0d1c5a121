//! The FFJORD trainer as a library: data, models on tch, solvers, training
//! and model files. The `trainer` binary is a thin CLI over it.

pub mod allocator;
pub mod anomaly;
pub mod baselines;
pub mod budget;
pub mod columns;
pub mod config;
pub mod data;
pub mod flow_matching;
pub mod image_runs;
pub mod images;
pub mod json;
pub mod kde;
pub mod kernel;
pub mod model;
pub mod modelfile;
pub mod npy;
pub mod ode;
pub mod optim;
pub mod plot;
pub mod power;
pub mod run;
pub mod score_kind;
pub mod search;
pub mod shards;
pub mod train;
