//! The flow on tch: a dynamics network ([`VectorField`]) inside CNF blocks,
//! composed with other layers ([`FlowLayer`]) into a [`Chain`].
//!
//! Extension points: a new dynamics network (e.g. a convolutional ODE net for
//! images) implements [`VectorField`] and plugs into [`Cnf`] unchanged; a new
//! layer in the chain (squeeze, factor-out, logit) implements [`FlowLayer`].
//! Neither touches the solver (`ode.rs`) or the training loop (`train.rs`).

mod chain;
mod cnf;
mod conv;
mod field;
mod image;
mod layer;
mod maps;
mod options;
#[cfg(test)]
mod tests;

pub use chain::*;
pub use cnf::*;
pub use conv::*;
pub use field::*;
pub use image::*;
pub use layer::*;
pub use maps::*;
pub use options::*;
