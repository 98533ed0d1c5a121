#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
#![doc = include_str!("../README.md")]

mod base;
pub mod error;
mod flow;
pub mod format;
mod image;
pub mod math;
mod matvec;
mod model;
mod net;
mod packed;
pub mod parts;
pub mod quant;
pub mod solver;

pub use base::fill_standard_normal;
pub use error::{Error, Field, LoadError, SolveError};
pub use flow::{BatchError, Flow, LogDensity, MAX_PACKED_ROWS, Sample, Score, Verdict};
pub use format::{
    Activation, CnfSpec, ConvCnfSpec, Header, HeaderView, ImageShape, KdeSpec, LayerKind, LayerSpec,
    Metadata, ScoreKind, Stage, Threshold,
};
pub use image::ImageTrace;
pub use model::{Model, StageWeights};
pub use net::{CnfBlock, LayerWeights};
pub use parts::{LayerParts, PartError, StageParts};
pub use quant::{Matrix, MatrixEncoding};
pub use solver::{Dopri5, Dynamics, Solver, Stats};
