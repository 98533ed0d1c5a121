//! The runtime in the browser: a [`Detector`] owns a model file's bytes and
//! converts between JavaScript and the runtime. All logic stays in
//! `ffjord-runtime`; every runtime error becomes a JavaScript exception with
//! the runtime's message.

use ffjord_runtime::{Dopri5, Flow, LogDensity, Model, SolveError, Solver, Stats, Verdict};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;
use wasm_bindgen::prelude::*;

// A free-list allocator of a few hundred bytes instead of dlmalloc's 7 KB:
// the module allocates little (the model's bytes, scratch, result vectors).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: lol_alloc::LockedAllocator<lol_alloc::FreeListAllocator> =
    lol_alloc::LockedAllocator::new(lol_alloc::FreeListAllocator::new());

fn js<E: core::fmt::Display>(e: E) -> JsError {
    JsError::new(&e.to_string())
}

self_cell::self_cell!(
    /// A model file's bytes and the model validated over them — once, at
    /// construction (the runtime's `Model` borrows the bytes it checked).
    struct LoadedModel {
        owner: Vec<u8>,
        #[covariant]
        dependent: Model,
    }
);

/// [`Flow::log_density_packed`] or [`Flow::score_packed`].
#[cfg(feature = "packed")]
type PackedCall =
    fn(&Flow<'_, '_>, &[f32], &mut [f32], usize, &mut [f32]) -> Result<Stats, ffjord_runtime::BatchError>;

/// A loaded model with a chosen solver and its working memory.
#[wasm_bindgen]
pub struct Detector {
    model: LoadedModel,
    solver: Solver,
    scratch: Vec<f32>,
    /// Working memory of the packed path.
    #[cfg(feature = "packed")]
    packed_scratch: Vec<f32>,
    stats: Stats,
}

impl Detector {
    fn model(&self) -> &Model<'_> {
        self.model.borrow_dependent()
    }

    /// One row through the flow. Not inlined: `log_density`, `score` and
    /// `is_anomaly` share it (one copy of the solve in the module, which the
    /// small build's size budget needs).
    #[inline(never)]
    fn evaluate(&mut self, x: &[f32]) -> Result<LogDensity, SolveError> {
        let flow = Flow::new(self.model.borrow_dependent(), self.solver)?;
        self.scratch.resize(flow.scratch_len(), 0.0);
        let ld = flow.log_density(x, &mut self.scratch)?;
        self.stats = ld.stats;
        Ok(ld)
    }

    /// One value per row of `xs` by a packed call of the runtime (`log p`
    /// or the model's score), with this detector's packed scratch.
    #[cfg(feature = "packed")]
    fn packed(&mut self, xs: &[f32], rows_per_block: usize, call: PackedCall) -> Result<Vec<f32>, JsError> {
        let d = self.dim();
        let mut out = vec![0.0; xs.len() / d.max(1)];
        let flow = Flow::new(self.model.borrow_dependent(), self.solver).map_err(js)?;
        self.packed_scratch.resize(flow.packed_scratch_len(rows_per_block), 0.0);
        self.stats = call(&flow, xs, &mut out, rows_per_block, &mut self.packed_scratch).map_err(js)?;
        Ok(out)
    }

    fn with_flow<T>(
        &mut self,
        f: impl FnOnce(&Flow<'_, '_>, &mut [f32]) -> Result<T, JsError>,
    ) -> Result<T, JsError> {
        let flow = Flow::new(self.model.borrow_dependent(), self.solver).map_err(js)?;
        self.scratch.resize(flow.scratch_len(), 0.0);
        f(&flow, &mut self.scratch)
    }
}

#[wasm_bindgen]
impl Detector {
    /// Loads and validates a model file.
    #[wasm_bindgen(constructor)]
    pub fn new(bytes: Vec<u8>) -> Result<Detector, JsError> {
        let model = LoadedModel::try_new(bytes, |b| Model::from_bytes(b)).map_err(js)?;
        let solver = model.borrow_dependent().default_solver();
        Ok(Detector {
            model,
            solver,
            scratch: Vec::new(),
            #[cfg(feature = "packed")]
            packed_scratch: Vec::new(),
            stats: Stats::default(),
        })
    }

    /// Data dimension.
    pub fn dim(&self) -> usize {
        self.model().dim()
    }

    /// The model's name.
    pub fn name(&self) -> String {
        self.model().metadata().name.to_string()
    }

    /// What the training data was.
    pub fn description(&self) -> String {
        self.model().metadata().description.to_string()
    }

    /// What the model's anomaly score is: 0 for −log p, 1 for the latent
    /// radius −log N(z) (format version 6). A number, not a name: a string
    /// return costs the small build half a kilobyte.
    pub fn score_kind(&self) -> u8 {
        self.model().score_kind() as u8
    }

    /// The anomaly threshold on the model's score, if the model is calibrated.
    pub fn threshold(&self) -> Option<f32> {
        self.model().threshold().map(|t| t.score)
    }

    /// `[C, H, W]` when the model's rows are images (an image stage covers
    /// all of a row), for the page's drawing pad; `undefined` otherwise and
    /// in builds without image models.
    #[cfg(feature = "images")]
    pub fn image_shape(&self) -> Option<Vec<u16>> {
        let m = self.model();
        let shape = m.header().stages().find_map(|s| match s {
            ffjord_runtime::Stage::ConvCnf(c) if c.shape.len() == m.dim() => Some(c.shape),
            ffjord_runtime::Stage::Squeeze(s) if s.len() == m.dim() => Some(s),
            _ => None,
        })?;
        Some(vec![shape.channels, shape.height, shape.width])
    }

    /// The quantile of validation scores the threshold was set at.
    pub fn threshold_quantile(&self) -> Option<f32> {
        self.model().threshold().map(|t| t.quantile)
    }

    /// Use fixed-step RK4 with `steps` steps per block.
    pub fn use_rk4(&mut self, steps: u32) -> Result<(), JsError> {
        let s = Solver::Rk4 { steps };
        s.validate().map_err(js)?;
        self.solver = s;
        Ok(())
    }

    /// Use Dopri5 with rtol = atol = `tol`.
    pub fn use_dopri5(&mut self, tol: f32) -> Result<(), JsError> {
        let s = Solver::Dopri5(Dopri5::with_tolerance(tol));
        s.validate().map_err(js)?;
        self.solver = s;
        Ok(())
    }

    /// Back to the solver stored in the model file.
    pub fn use_default_solver(&mut self) {
        self.solver = self.model().default_solver();
    }

    /// `log p(x)` of one row.
    pub fn log_density(&mut self, x: &[f32]) -> Result<f32, JsError> {
        Ok(self.evaluate(x).map_err(js)?.log_p)
    }

    /// The model's anomaly score of one row ([`Detector::score_kind`]).
    pub fn score(&mut self, x: &[f32]) -> Result<f32, JsError> {
        let ld = self.evaluate(x).map_err(js)?;
        Ok(ld.score(self.model().score_kind()))
    }

    /// Whether one row is an anomaly under the stored threshold (error if uncalibrated).
    pub fn is_anomaly(&mut self, x: &[f32]) -> Result<bool, JsError> {
        let score = self.score(x)?;
        match Verdict::against(score, self.model().threshold()) {
            Verdict::Anomaly => Ok(true),
            Verdict::Normal => Ok(false),
            Verdict::Uncalibrated => Err(JsError::new("the model has no anomaly threshold")),
        }
    }

    /// `log p` of each row of `xs` (row-major, `dim()` values per row).
    pub fn log_density_batch(&mut self, xs: &[f32]) -> Result<Vec<f32>, JsError> {
        let d = self.dim();
        let mut out = vec![0.0; xs.len() / d.max(1)];
        let stats =
            self.with_flow(|flow, scratch| flow.log_density_batch(xs, &mut out, scratch).map_err(js))?;
        self.stats = stats;
        Ok(out)
    }

    /// `log p` of each row of `xs` by the packed path, `rows_per_block` rows
    /// at a time (at most the runtime's `MAX_PACKED_ROWS`): the same
    /// per-row Dopri5 control, several times the throughput; agrees with
    /// [`Detector::log_density_batch`] to about 1e-4 relative (vectorisable
    /// tanh, another summation order). `last_nfe()` is then the total.
    #[cfg(feature = "packed")]
    pub fn log_density_packed(&mut self, xs: &[f32], rows_per_block: usize) -> Result<Vec<f32>, JsError> {
        self.packed(xs, rows_per_block, |f, xs, out, n, s| f.log_density_packed(xs, out, n, s))
    }

    /// The model's anomaly score of each row of `xs` (bit for bit
    /// [`Detector::score`] of each row).
    pub fn score_batch(&mut self, xs: &[f32]) -> Result<Vec<f32>, JsError> {
        let d = self.dim();
        let mut out = vec![0.0; xs.len() / d.max(1)];
        let stats = self.with_flow(|flow, scratch| flow.score_batch(xs, &mut out, scratch).map_err(js))?;
        self.stats = stats;
        Ok(out)
    }

    /// The model's anomaly score of each row of `xs` by the packed path (as
    /// [`Detector::log_density_packed`] integrates).
    #[cfg(feature = "packed")]
    pub fn score_packed(&mut self, xs: &[f32], rows_per_block: usize) -> Result<Vec<f32>, JsError> {
        self.packed(xs, rows_per_block, |f, xs, out, n, s| f.score_packed(xs, out, n, s))
    }

    /// `n` samples from a seed chosen by JavaScript (Xoshiro128++, the same
    /// generator as the firmware examples): `n × dim()` values, row-major.
    pub fn sample(&mut self, seed: u64, n: usize) -> Result<Vec<f32>, JsError> {
        let d = self.dim();
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(seed);
        let mut out = vec![0.0f32; n * d];
        let mut total = Stats::default();
        self.with_flow(|flow, scratch| {
            for row in out.chunks_exact_mut(d) {
                total = total.merge(flow.sample(&mut rng, row, scratch).map_err(js)?.stats);
            }
            Ok(())
        })?;
        self.stats = total;
        Ok(out)
    }

    /// Function evaluations of the last call.
    pub fn last_nfe(&self) -> u32 {
        self.stats.nfe
    }

    /// Accepted steps of the last call.
    pub fn last_accepted(&self) -> u32 {
        self.stats.accepted
    }

    /// Rejected steps of the last call.
    pub fn last_rejected(&self) -> u32 {
        self.stats.rejected
    }
}
