//! How a pass through the chain is run ([`SolveOptions`]) and what it cost ([`PassStats`]).

use tch::Tensor;

use ffjord_runtime::Solver;
use ffjord_runtime::Stats;

use super::*;

/// How training gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Gradient {
    /// Backpropagate through the solver's steps (memory grows with the steps).
    Backprop,
    /// Continuous adjoint (spec §5): constant memory, a second solve backwards.
    Adjoint,
}

/// Settings of one evaluation of the chain.
#[derive(Clone, Copy, Debug)]
pub struct SolveOptions {
    pub method: Solver,
    pub trace: TraceMode,
    /// Build a differentiable graph (training); otherwise results are detached.
    pub create_graph: bool,
    /// Leave the parameter adjoints out of the backward solve's error norm
    /// (Kidger, Chen & Lyons 2021).
    pub seminorm: bool,
    /// RNODE regularization (zero: off).
    pub regularization: Regularization,
    /// Graph-free forward solves keep their accepted steps, so that
    /// [`FlowLayer::backward`] backpropagates through the solver by reversing
    /// them with the field's hand-written VJP instead of the adjoint solve.
    pub record_steps: bool,
}

/// RNODE's regularizers (Finlay et al. 2020), integrated along the solve as
/// extra state channels that are excluded from error control:
/// kinetic energy ∫ ½·mean_i f_i² dt and Jacobian Frobenius ∫ ‖eᵀ∂f/∂z‖²/D dt
/// (the Hutchinson VJP reused), each per row, averaged over the batch and
/// added to the loss with its coefficient.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Regularization {
    pub kinetic: f64,
    pub jacobian: f64,
}

impl Regularization {
    pub fn active(&self) -> bool {
        self.kinetic != 0.0 || self.jacobian != 0.0
    }
}

impl SolveOptions {
    /// Evaluation: exact trace, no graph.
    pub fn eval(method: Solver) -> Self {
        SolveOptions {
            method,
            trace: TraceMode::Exact,
            create_graph: false,
            seminorm: false,
            regularization: Regularization::default(),
            record_steps: false,
        }
    }
}

/// What one pass through the chain did.
#[derive(Debug, Default)]
pub struct PassStats {
    pub solve: Stats,
    /// Backward (adjoint) solves.
    pub backward: Stats,
    /// Σ over blocks of the weighted RNODE terms (a scalar with a graph in
    /// backprop training), if regularization is on.
    pub regularization: Option<Tensor>,
}

impl PassStats {
    pub(super) fn add(&mut self, s: Stats) {
        self.solve = self.solve.merge(s);
    }

    pub(super) fn add_regularization(&mut self, r: Tensor) {
        self.regularization = Some(match self.regularization.take() {
            Some(acc) => acc + r,
            None => r,
        });
    }
}
