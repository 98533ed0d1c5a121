//! The image stages of format version 4 (FFJORD's multiscale model, spec
//! §2.5–2.7): the logit transform, squeeze, and CNF blocks whose ODE net is
//! convolutional. Each acts on a prefix of the row — `C·H·W` coordinates
//! read as a `[C, H, W]` image in C order — so a multiscale model is one flat
//! chain: factoring out half the channels is the next stages acting on a
//! shorter prefix, and the latent is the whole row.
//!
//! The convolutional net's exact divergence uses forward-mode tangents as
//! the dense net does ([`crate::net`]): `P + 1` lanes (value and one tangent
//! per input coordinate), each convolved by the same kernels, the gate and
//! activation applied as one factor per output value.

use crate::error::SolveError;
use crate::format::{Activation, ConvCnfSpec, LayerKind, Weights, conv_weight_count};
use crate::math::{copy, sigmoid, tanh_with_derivative};
use crate::net::activate;
use crate::solver::Dynamics;

/// How a convolutional CNF block computes `Tr(∂f/∂z)` on the row path
/// ([`crate::Flow::with_image_trace`]). Dense CNF blocks always use the exact
/// trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageTrace {
    /// The exact trace: one forward-mode tangent per image value, at most
    /// `lanes_per_pass` of them per pass of the net (each pass recomputes
    /// the value), so the scratch is bounded by `lanes_per_pass` instead of
    /// the image size — a microcontroller trades time for RAM. `0`: all in
    /// one pass (the default, fastest).
    Exact {
        /// Tangent lanes per pass (`0`: all).
        lanes_per_pass: u16,
    },
    /// Hutchinson's unbiased estimate `(1/K) Σ_k v_kᵀ (∂f/∂z) v_k` with `K =
    /// probes` Rademacher vectors (±1) that depend only on `seed` (the same
    /// at every evaluation of a solve, as the estimator needs): `K + 1`
    /// lanes instead of `C·H·W + 1`, so log p is an unbiased estimate whose
    /// spread falls as `1/√K` (average over seeds for more).
    Hutchinson {
        /// Probe vectors `K ≥ 1`.
        probes: u16,
        /// Seed of the probes.
        seed: u32,
    },
}

impl Default for ImageTrace {
    fn default() -> Self {
        ImageTrace::Exact { lanes_per_pass: 0 }
    }
}

impl ImageTrace {
    /// Tangent lanes per pass for a block on `p` values (at least 1).
    fn tangents(self, p: usize) -> usize {
        match self {
            ImageTrace::Exact { lanes_per_pass: 0 } => p,
            ImageTrace::Exact { lanes_per_pass } => usize::from(lanes_per_pass).min(p),
            ImageTrace::Hutchinson { probes, .. } => usize::from(probes),
        }
        .max(1)
    }
}

/// Scratch floats of one evaluation of `spec`'s net with `trace`. One pass
/// (all tangents, or Hutchinson's probes): two activation buffers of
/// `1 +` tangent lanes of the widest layer and one factor per output value.
/// Exact in passes of `n < C·H·W` tangents: two buffers of `n` lanes and
/// every layer's factors (the value lane runs once, its factors serve every
/// pass).
pub(crate) fn conv_work_len(spec: &ConvCnfSpec, trace: ImageTrace) -> Option<usize> {
    let p = spec.shape.len();
    let tangents = trace.tangents(p);
    let width = spec.max_width();
    if matches!(trace, ImageTrace::Exact { .. }) && tangents < p {
        let all_layers: usize =
            spec.layers.iter().map(|l| usize::from(l.out_dim) * spec.shape.pixels()).sum();
        return tangents.checked_mul(2)?.checked_mul(width)?.checked_add(all_layers);
    }
    let lanes = tangents.checked_add(1)?;
    lanes.checked_mul(2)?.checked_add(1)?.checked_mul(width)
}

/// Probe `k`'s entry `i`, ±1, from `seed` alone (a 32-bit integer hash:
/// the same on every target).
fn rademacher(seed: u32, k: usize, i: usize) -> f32 {
    let mut h = seed ^ (k as u32).wrapping_mul(0x9E37_79B9) ^ (i as u32).wrapping_mul(0x85EB_CA6B);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    if h & 1 == 0 { 1.0 } else { -1.0 }
}

/// The logit transform's two arguments `s = α + (1 − 2α) x` and
/// `s' = 1 − s = α + (1 − 2α)(1 − x)`, each computed directly (`1 − s` in
/// f32 would lose most digits next to 1).
fn logit_args(alpha: f32, x: f32) -> (f32, f32) {
    let a = 1.0 - 2.0 * alpha;
    (alpha + a * x, alpha + a * (1.0 - x))
}

/// `ln(1 − 2α) − ln s − ln s'`: the log-derivative of one coordinate.
fn logit_log_det(alpha: f32, s: f32, s1: f32) -> f32 {
    libm::logf(1.0 - 2.0 * alpha) - libm::logf(s) - libm::logf(s1)
}

/// Applies `y = logit(α + (1 − 2α) x)` to every value of `z` in place and
/// returns `log|det ∂y/∂x|`. Values outside `[0, 1]` are refused (the
/// transform is for pixels scaled to `[0, 1]`).
pub(crate) fn logit_forward(alpha: f32, z: &mut [f32]) -> Result<f32, SolveError> {
    if let Some(i) = z.iter().position(|v| !(0.0..=1.0).contains(v)) {
        return Err(SolveError::InputOutOfRange { index: i as u32 });
    }
    let mut log_det = 0.0;
    for v in z.iter_mut() {
        let (s, s1) = logit_args(alpha, *v);
        *v = libm::logf(s) - libm::logf(s1);
        log_det += logit_log_det(alpha, s, s1);
    }
    Ok(log_det)
}

/// The inverse of [`logit_forward`] in place: `x = (σ(y) − α) / (1 − 2α)`;
/// returns the same `log|det ∂y/∂x|` at the result.
pub(crate) fn logit_inverse(alpha: f32, z: &mut [f32]) -> f32 {
    let mut log_det = 0.0;
    for v in z.iter_mut() {
        let (s, s1) = (sigmoid(*v), sigmoid(-*v));
        *v = (s - alpha) / (1.0 - 2.0 * alpha);
        log_det += logit_log_det(alpha, s, s1);
    }
    log_det
}

/// Squeeze (`forward`) or unsqueeze of the `[C, H, W]` image in `z` (its
/// length `C·H·W`) through `tmp` (at least as long): `[C, H, W] ↔
/// [4C, H/2, W/2]`, channel `4c + 2dy + dx` holding pixel
/// `(2h + dy, 2w + dx)` of channel `c`, as the trainer's `Squeeze`.
pub(crate) fn squeeze(shape: crate::format::ImageShape, z: &mut [f32], tmp: &mut [f32], forward: bool) {
    let (c, h, w) = (usize::from(shape.channels), usize::from(shape.height), usize::from(shape.width));
    let (h2, w2) = (h / 2, w / 2);
    let n = shape.len();
    let (Some(z), Some(tmp)) = (z.get_mut(..n), tmp.get_mut(..n)) else { return };
    copy(tmp, z);
    for ch in 0..c {
        for dy in 0..2 {
            for dx in 0..2 {
                let out_ch = 4 * ch + 2 * dy + dx;
                for i in 0..h2 {
                    for j in 0..w2 {
                        let image = (ch * h + 2 * i + dy) * w + 2 * j + dx;
                        let squeezed = (out_ch * h2 + i) * w2 + j;
                        let (from, to) = if forward { (image, squeezed) } else { (squeezed, image) };
                        if let (Some(v), Some(dst)) = (tmp.get(from), z.get_mut(to)) {
                            *dst = *v;
                        }
                    }
                }
            }
        }
    }
}

/// One convolutional CNF block as dynamics of `[z (P values), ℓ]` with
/// `dz/dt = f(t, z)` and `dℓ/dt = −Tr(∂f/∂z)`, as [`crate::CnfBlock`].
#[derive(Clone, Debug)]
pub(crate) struct ConvCnfBlock<'a> {
    spec: ConvCnfSpec,
    weights: Weights<'a>,
    trace: ImageTrace,
}

/// One conv layer's weights, split as FORMAT.md lays them out.
struct ConvLayer<'a> {
    kind: LayerKind,
    c_in: usize,
    c_out: usize,
    /// `[c_out, cols, 3, 3]`, `cols = c_in` (+1 for concat: time first).
    kernel: Weights<'a>,
    bias: Weights<'a>,
    gate_w: Weights<'a>,
    gate_b: Weights<'a>,
    hyper_b: Weights<'a>,
}

impl<'a> ConvCnfBlock<'a> {
    /// A block over validated `spec` and its `weights`.
    pub(crate) fn new(spec: ConvCnfSpec, weights: Weights<'a>, trace: ImageTrace) -> Self {
        ConvCnfBlock { spec, weights, trace }
    }

    /// Coordinates the block acts on, `P = C·H·W`.
    pub(crate) fn len(&self) -> usize {
        self.spec.shape.len()
    }

    fn layers(&self) -> impl Iterator<Item = ConvLayer<'a>> + '_ {
        let mut c_in = usize::from(self.spec.shape.channels);
        let mut offset = 0;
        self.spec.layers.iter().map(move |layer| {
            let c_out = usize::from(layer.out_dim);
            let kind = layer.kind;
            let count = conv_weight_count(kind, c_in, c_out).unwrap_or(0);
            let w = self.weights.slice(offset, count);
            let kernel_len = c_out * kind.cols(c_in).unwrap_or(0) * 9;
            let (kernel, rest) = w.split_at(kernel_len);
            let (bias, rest) = rest.split_at(c_out);
            let squash = kind == LayerKind::ConcatSquash;
            let (gate_w, rest) = rest.split_at(if squash { c_out } else { 0 });
            let (gate_b, hyper_b) = rest.split_at(gate_w.len());
            let l = ConvLayer { kind, c_in, c_out, kernel, bias, gate_w, gate_b, hyper_b };
            offset += count;
            c_in = c_out;
            l
        })
    }

    /// `f(t, z)` into `out` (P values) and `Tr(∂f/∂z)` as the block's
    /// [`ImageTrace`] computes it. Leaves `out` NaN if `work` is too short
    /// (callers check lengths up front).
    fn velocity_and_divergence(&self, t: f32, z: &[f32], out: &mut [f32], work: &mut [f32]) -> f32 {
        out.fill(f32::NAN);
        let p = self.len();
        let tangents = self.trace.tangents(p);
        match self.trace {
            // One pass: lane 1 + j carries e_j, whose entry j of J e_j is
            // ∂f_j/∂z_j.
            ImageTrace::Exact { .. } if tangents >= p => {
                let seed = |k: usize, i: usize| if i == k { 1.0 } else { 0.0 };
                let Some(result) = self.run(t, z, p, seed, work) else { return f32::NAN };
                let mut lanes = result.chunks_exact(p);
                if let Some(value) = lanes.next() {
                    copy(out, value);
                }
                lanes.enumerate().map(|(j, lane)| lane.get(j).copied().unwrap_or(f32::NAN)).sum()
            }
            ImageTrace::Exact { .. } => self.divergence_in_passes(t, z, out, tangents, work),
            ImageTrace::Hutchinson { seed, .. } => {
                let probe = |k: usize, i: usize| rademacher(seed, k, i);
                let Some(result) = self.run(t, z, tangents, probe, work) else { return f32::NAN };
                let mut lanes = result.chunks_exact(p);
                if let Some(value) = lanes.next() {
                    copy(out, value);
                }
                let sum: f32 = lanes
                    .enumerate()
                    .map(|(k, jv)| jv.iter().enumerate().map(|(i, v)| probe(k, i) * v).sum::<f32>())
                    .sum();
                sum / tangents as f32
            }
        }
    }

    /// The exact trace in passes of `n` tangent lanes: the value lane runs
    /// once and keeps every layer's factor d(output)/d(conv) (the
    /// activation's derivative times the gate); each pass then carries `n`
    /// unit vectors through the convolutions and those factors alone.
    fn divergence_in_passes(&self, t: f32, z: &[f32], out: &mut [f32], n: usize, work: &mut [f32]) -> f32 {
        let p = self.len();
        let hw = self.spec.shape.pixels();
        let width = self.spec.max_width() * n.max(1);
        let Some((a, rest)) = work.split_at_mut_checked(width) else { return f32::NAN };
        let Some((b, factors)) = rest.split_at_mut_checked(width) else { return f32::NAN };
        let (h, w) = (usize::from(self.spec.shape.height), usize::from(self.spec.shape.width));
        let n_layers = self.spec.layers.len();
        // The value lane, its factors layer after layer into `factors`.
        copy(a.get_mut(..p).unwrap_or(&mut []), z);
        let (mut input, mut output) = (&mut *a, &mut *b);
        let mut at = 0;
        let mut any = [false; crate::format::MAX_LAYERS];
        for (l, layer) in self.layers().enumerate() {
            let act = if l + 1 < n_layers { Some(self.spec.activation) } else { None };
            let len = layer.c_out * hw;
            let Some(f) = factors.get_mut(at..at + len) else { return f32::NAN };
            conv_lanes(&layer, [h, w], 1, input, output);
            let value = output.get_mut(..len).unwrap_or(&mut []);
            if let Some(slot) = any.get_mut(l) {
                *slot = value_terms(&layer, act, t, [h, w], value, f);
            }
            at += len;
            core::mem::swap(&mut input, &mut output);
        }
        copy(out, input.get(..p).unwrap_or(&[]));
        // The tangent passes.
        let mut div = 0.0;
        for start in (0..p).step_by(n.max(1)) {
            let lanes = n.min(p - start);
            let (mut input, mut output) = (&mut *a, &mut *b);
            for (k, lane) in input.chunks_exact_mut(p).take(lanes).enumerate() {
                lane.fill(0.0);
                if let Some(e) = lane.get_mut(start + k) {
                    *e = 1.0;
                }
            }
            let mut at = 0;
            for (l, layer) in self.layers().enumerate() {
                let len = layer.c_out * hw;
                conv_lanes(&layer, [h, w], lanes, input, output);
                if any.get(l).copied().unwrap_or(true) {
                    let f = factors.get(at..at + len).unwrap_or(&[]);
                    for lane in output.chunks_exact_mut(len.max(1)).take(lanes) {
                        for (y, &s) in lane.iter_mut().zip(f) {
                            *y *= s;
                        }
                    }
                }
                at += len;
                core::mem::swap(&mut input, &mut output);
            }
            div += input
                .chunks_exact(p)
                .take(lanes)
                .enumerate()
                .map(|(k, lane)| lane.get(start + k).copied().unwrap_or(f32::NAN))
                .sum::<f32>();
        }
        div
    }

    /// Runs the net on the value lane (`z`) and `n` tangent lanes, lane
    /// `1 + k` seeded with `seed(k, i)` at coordinate `i`; returns the
    /// output lanes (`(1 + n) × P`, lane-major), or `None` if `work` is too
    /// short.
    fn run<'w>(
        &self,
        t: f32,
        z: &[f32],
        n: usize,
        seed: impl Fn(usize, usize) -> f32,
        work: &'w mut [f32],
    ) -> Option<&'w [f32]> {
        let p = self.len();
        let lanes = n + 1;
        let width = self.spec.max_width() * lanes;
        let (a, rest) = work.split_at_mut_checked(width)?;
        let (b, rest) = rest.split_at_mut_checked(width)?;
        let (scale, _) = rest.split_at_mut_checked(self.spec.max_width())?;
        for (l, lane) in a.chunks_exact_mut(p).take(lanes).enumerate() {
            if l == 0 {
                copy(lane, z);
            } else {
                for (i, v) in lane.iter_mut().enumerate() {
                    *v = seed(l - 1, i);
                }
            }
        }
        let (mut input, mut output) = (a, b);
        let n_layers = self.spec.layers.len();
        let (h, w) = (usize::from(self.spec.shape.height), usize::from(self.spec.shape.width));
        for (l, layer) in self.layers().enumerate() {
            let act = if l + 1 < n_layers { Some(self.spec.activation) } else { None };
            conv_layer(&layer, act, t, [h, w], lanes, input, output, scale);
            core::mem::swap(&mut input, &mut output);
        }
        let input: &'w [f32] = input;
        input.get(..p * lanes)
    }
}

impl Dynamics for ConvCnfBlock<'_> {
    fn dim(&self) -> usize {
        self.len() + 1
    }

    fn work_len(&self) -> usize {
        conv_work_len(&self.spec, self.trace).unwrap_or(usize::MAX)
    }

    fn error_split(&self) -> usize {
        self.len()
    }

    fn eval(&self, t: f32, y: &[f32], dy: &mut [f32], work: &mut [f32]) {
        let p = self.len();
        let (z, _) = y.split_at(p.min(y.len()));
        let (dz, dl) = dy.split_at_mut(p.min(dy.len()));
        let div = self.velocity_and_divergence(t, z, dz, work);
        if let Some(dl) = dl.first_mut() {
            *dl = -div;
        }
    }
}

/// One conv layer on `lanes` lanes: `input` holds `lanes × c_in·H·W`
/// (lane-major), `output` gets `lanes × c_out·H·W`. Lane 0 (the value)
/// gets bias, time terms, gate and activation; the tangent lanes are the
/// kernel's product times the factor d(output)/d(conv) kept in `scale`.
#[allow(clippy::too_many_arguments)]
fn conv_layer(
    layer: &ConvLayer<'_>,
    act: Option<Activation>,
    t: f32,
    [h, w]: [usize; 2],
    lanes: usize,
    input: &[f32],
    output: &mut [f32],
    scale: &mut [f32],
) {
    let len = layer.c_out * h * w;
    conv_lanes(layer, [h, w], lanes, input, output);
    let (value, tangents) = output.split_at_mut(len.min(output.len()));
    let any_scale = value_terms(layer, act, t, [h, w], value, scale);
    // Tangent lanes: chain rule through gate and activation.
    if any_scale {
        for lane in tangents.chunks_exact_mut(len.max(1)).take(lanes.saturating_sub(1)) {
            for (y, &s) in lane.iter_mut().zip(scale.iter()) {
                *y *= s;
            }
        }
    }
}

/// The kernel `[c_out, cols, 3, 3]` block for output channel `o` and input
/// channel `c` (the time channel is `c = 0` of a concat layer).
fn kernel(layer: &ConvLayer<'_>, o: usize, c: usize) -> [f32; 9] {
    let cols = layer.c_in + usize::from(layer.kind == LayerKind::Concat);
    let mut k = [0.0; 9];
    if let Some(bytes) = layer.kernel.bytes().as_chunks::<36>().0.get(o * cols + c) {
        for (v, b) in k.iter_mut().zip(bytes.as_chunks::<4>().0) {
            *v = f32::from_le_bytes(*b);
        }
    }
    k
}

/// Every lane's convolution of its input channels (no bias or time terms):
/// `output[l] = K ⋆ input[l]`, each kernel read once for all lanes.
fn conv_lanes(layer: &ConvLayer<'_>, [h, w]: [usize; 2], lanes: usize, input: &[f32], output: &mut [f32]) {
    let hw = h * w;
    let (c_in, c_out) = (layer.c_in, layer.c_out);
    let concat = usize::from(layer.kind == LayerKind::Concat);
    if let Some(out) = output.get_mut(..lanes * c_out * hw) {
        out.fill(0.0);
    }
    for o in 0..c_out {
        for c in 0..c_in {
            let k = kernel(layer, o, c + concat);
            for l in 0..lanes {
                let x = input.get((l * c_in + c) * hw..(l * c_in + c + 1) * hw).unwrap_or(&[]);
                let y = output.get_mut((l * c_out + o) * hw..(l * c_out + o + 1) * hw).unwrap_or(&mut []);
                conv3x3(&k, x, y, h, w);
            }
        }
    }
}

/// The value lane after its convolution (`value`, `c_out·H·W`, in place):
/// bias, time terms, gate and activation; `scale` gets each value's factor
/// d(output)/d(conv). Returns whether any factor differs from 1.
fn value_terms(
    layer: &ConvLayer<'_>,
    act: Option<Activation>,
    t: f32,
    [h, w]: [usize; 2],
    value: &mut [f32],
    scale: &mut [f32],
) -> bool {
    let hw = h * w;
    let mut any_scale = false;
    for (o, (v_o, s_o)) in value.chunks_exact_mut(hw).zip(scale.chunks_exact_mut(hw)).enumerate() {
        let b = layer.bias.get(o).unwrap_or(0.0);
        if layer.kind == LayerKind::Concat {
            // The time channel: t at every pixel, zero-padded like the rest.
            conv3x3_constant(&kernel(layer, o, 0), t, v_o, h, w);
        }
        let (gate, hyper) = match layer.kind {
            LayerKind::ConcatSquash => {
                let g = sigmoid(layer.gate_w.get(o).unwrap_or(0.0) * t + layer.gate_b.get(o).unwrap_or(0.0));
                (g, layer.hyper_b.get(o).unwrap_or(0.0) * t)
            }
            LayerKind::Ignore | LayerKind::Concat => (1.0, 0.0),
        };
        for (v, s) in v_o.iter_mut().zip(s_o.iter_mut()) {
            let mut pre = (*v + b) * gate + hyper;
            let mut ds = gate;
            if let Some(act) = act {
                let (y, dy) = match act {
                    Activation::Tanh => tanh_with_derivative(pre),
                    other => activate(other, pre),
                };
                pre = y;
                ds *= dy;
            }
            *v = pre;
            *s = ds;
            any_scale |= ds != 1.0;
        }
    }
    any_scale
}

/// Adds the 3×3 cross-correlation (zero padding 1, as PyTorch's `Conv2d`)
/// of the `h × w` image `x` with `k` (row-major `[3, 3]`) to `y`. Each output
/// row is read and written once: its interior pixels take all nine products
/// in one pass over three input rows (windows of three), the edge columns
/// and the top and bottom rows the products that land inside the image.
fn conv3x3(k: &[f32; 9], x: &[f32], y: &mut [f32], h: usize, w: usize) {
    let [k0, k1, k2, k3, k4, k5, k6, k7, k8] = *k;
    let (ka, km, kb) = ([k0, k1, k2], [k3, k4, k5], [k6, k7, k8]);
    let row = |r: usize| if r < h { x.get(r * w..(r + 1) * w) } else { None };
    for (i, y_row) in y.chunks_exact_mut(w).take(h).enumerate() {
        let Some(mid) = row(i) else { continue };
        let above = i.checked_sub(1).and_then(row);
        let below = row(i + 1);
        match (above, below) {
            (Some(a), Some(b)) if w >= 3 => {
                let interior = y_row.iter_mut().skip(1).take(w - 2);
                for (((v, ra), rm), rb) in interior.zip(a.windows(3)).zip(mid.windows(3)).zip(b.windows(3)) {
                    if let ([a0, a1, a2], [m0, m1, m2], [b0, b1, b2]) = (ra, rm, rb) {
                        *v += ka[0] * a0
                            + ka[1] * a1
                            + ka[2] * a2
                            + km[0] * m0
                            + km[1] * m1
                            + km[2] * m2
                            + kb[0] * b0
                            + kb[1] * b1
                            + kb[2] * b2;
                    }
                }
                for (r, kr) in [(a, ka), (mid, km), (b, kb)] {
                    add_row_edges(y_row, r, kr);
                }
            }
            _ => {
                for (r, kr) in [(above, ka), (Some(mid), km), (below, kb)] {
                    if let Some(r) = r {
                        add_row(y_row, r, kr);
                    }
                }
            }
        }
    }
}

/// Adds one input row's three products `k0·r[j−1] + k1·r[j] + k2·r[j+1]`
/// (zero outside) to every pixel of the output row `y`.
fn add_row(y: &mut [f32], r: &[f32], [k0, k1, k2]: [f32; 3]) {
    for (v, x) in y.iter_mut().zip(r) {
        *v += k1 * x;
    }
    for (v, x) in y.iter_mut().skip(1).zip(r) {
        *v += k0 * x;
    }
    for (v, x) in y.iter_mut().zip(r.iter().skip(1)) {
        *v += k2 * x;
    }
}

/// [`add_row`] for the first and last pixel only (`w ≥ 3`; the interior is
/// done).
fn add_row_edges(y: &mut [f32], r: &[f32], [k0, k1, k2]: [f32; 3]) {
    let w = y.len();
    if let (Some(v), Some(x0), Some(x1)) = (y.first_mut(), r.first(), r.get(1)) {
        *v += k1 * x0 + k2 * x1;
    }
    if let (Some(v), Some(xa), Some(xb)) = (y.last_mut(), r.get(w.wrapping_sub(2)), r.get(w.wrapping_sub(1)))
    {
        *v += k0 * xa + k1 * xb;
    }
}

/// Adds the 3×3 cross-correlation of a constant image `value` (zero
/// padding 1) with `k` to `y`: each pixel gets `value` times the kernel
/// entries that land inside the image.
fn conv3x3_constant(k: &[f32; 9], value: f32, y: &mut [f32], h: usize, w: usize) {
    for (i, y_row) in y.chunks_exact_mut(w).take(h).enumerate() {
        for (j, yv) in y_row.iter_mut().enumerate() {
            let mut sum = 0.0;
            for (di, kr) in k.chunks_exact(3).enumerate() {
                if (i + di).checked_sub(1).is_none_or(|r| r >= h) {
                    continue;
                }
                for (dj, kv) in kr.iter().enumerate() {
                    if (j + dj).checked_sub(1).is_some_and(|c| c < w) {
                        sum += kv;
                    }
                }
            }
            *yv += value * sum;
        }
    }
}
