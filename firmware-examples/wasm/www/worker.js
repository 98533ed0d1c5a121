// Every runtime call of the page runs here, off the main thread: a model that
// is slow to evaluate (or a hostile one) cannot freeze the tab, and the page
// can stop a run at any moment by terminating this worker (cancel button,
// per-file time budget) and starting a fresh one.
//
// Protocol: the page posts { id, type, ... }; each request gets one reply
// { id, ok: true, ... } or { id, ok: false, message }, and "score" requests
// also post { id, progress: { start, logp, scores, nfe } } after every chunk.
//
// The page names the build in this script's URL (?build=simd|small): the SIMD
// module with the packed path, or the small one every engine runs (one row at
// a time; the same log p as the host's one-row path).
const build = new URL(self.location.href).searchParams.get("build") === "small" ? "small" : "simd";
const ready = import(build === "small" ? "./pkg-small/ffjord_wasm.js" : "./pkg/ffjord_wasm.js")
  .then(async (m) => { await m.default(); return m.Detector; });
let Detector = null;
let detector = null;

// Rows scored together by the runtime's packed path (each keeps its own step control).
const PACKED_ROWS = 32;
// Rows per progress message.
const CHUNK = 64;
// `Detector.score_kind()`: a number (cheaper in the small module than a name).
const NEG_LOG_DENSITY = 0;
const SCORE_KINDS = ["neg-log-density", "latent-radius", "latent-base"];

/** log p of row-major `rows`: the packed path where the build has it. */
function logDensities(rows) {
  return detector.log_density_packed ? detector.log_density_packed(rows, PACKED_ROWS) : detector.log_density_batch(rows);
}

/**
 * The model's anomaly scores of `rows` and their log p. A model scored by
 * −log p needs one solve (log p is the negated score, exactly); one scored by
 * another kind (the latent radius, the base density) needs a second for log p.
 */
function scoresAndLogDensities(rows) {
  const scores = detector.score_packed ? detector.score_packed(rows, PACKED_ROWS) : detector.score_batch(rows);
  let nfe = detector.last_nfe();
  if (detector.score_kind() === NEG_LOG_DENSITY) return { scores, logp: scores.map((s) => -s), nfe };
  const logp = logDensities(rows);
  nfe += detector.last_nfe();
  return { scores, logp, nfe };
}

function applySolver(solver) {
  if (solver === "default") detector.use_default_solver();
  else if (solver.startsWith("rk4-")) detector.use_rk4(Number(solver.slice(4)));
  else if (solver.startsWith("dopri5-")) detector.use_dopri5(Number(solver.slice(7)));
}

const handlers = {
  load({ bytes, solver }) {
    const d = new Detector(bytes);
    if (detector) detector.free();
    detector = d;
    applySolver(solver);
    const t = detector.threshold();
    return {
      build, packed: Boolean(detector.log_density_packed),
      dim: detector.dim(), name: detector.name(), description: detector.description(),
      threshold: t, quantile: t === undefined ? undefined : detector.threshold_quantile(),
      scoreKind: SCORE_KINDS[detector.score_kind()] ?? "unknown",
      // [C, H, W] of an image model (a Uint16Array from the module), as an array.
      image: detector.image_shape ? Array.from(detector.image_shape() ?? []) : [],
    };
  },
  solver({ solver }) {
    applySolver(solver);
    return {};
  },
  score({ id, rows, dim }) {
    let nfe = 0;
    for (let start = 0; start * dim < rows.length; start += CHUNK) {
      const part = rows.subarray(start * dim, (start + CHUNK) * dim);
      const { scores, logp, nfe: used } = scoresAndLogDensities(part);
      nfe += used;
      postMessage({ id, progress: { start, logp, scores, nfe } });
    }
    return { nfe };
  },
  density({ n }) {
    const samples = detector.sample(7n, 600);
    const xs = [], ys = [];
    for (let i = 0; i < samples.length; i += 2) { xs.push(samples[i]); ys.push(samples[i + 1]); }
    const q = (a, p) => { const s = [...a].sort((u, v) => u - v); return s[Math.floor(p * (s.length - 1))]; };
    const pad = (lo, hi) => { const m = 0.15 * (hi - lo || 1); return [lo - m, hi + m]; };
    const [x0, x1] = pad(q(xs, 0.005), q(xs, 0.995));
    const [y0, y1] = pad(q(ys, 0.005), q(ys, 0.995));
    const logp = new Float32Array(n * n);
    for (let r = 0; r < n; r++) {
      const row = new Float32Array(2 * n);
      for (let c = 0; c < n; c++) {
        row[2 * c] = x0 + (c + 0.5) / n * (x1 - x0);
        row[2 * c + 1] = y1 - (r + 0.5) / n * (y1 - y0);
      }
      logp.set(logDensities(row), r * n);
    }
    return { view: { x0, x1, y0, y1 }, logp, xs, ys };
  },
  // One row by the one-row path (the host's values bit for bit).
  point({ x }) {
    const score = detector.score(x);
    let nfe = detector.last_nfe();
    if (detector.score_kind() === NEG_LOG_DENSITY) return { logp: -score, score, nfe };
    const logp = detector.log_density(x);
    nfe += detector.last_nfe();
    return { logp, score, nfe };
  },
  samples({ seed, n }) {
    return { xs: detector.sample(BigInt(seed), n) };
  },
};

onmessage = async ({ data }) => {
  Detector = await ready;
  try {
    if (data.type !== "load" && !detector) throw new Error("no model loaded");
    postMessage({ id: data.id, ok: true, ...handlers[data.type](data) });
  } catch (e) {
    postMessage({ id: data.id, ok: false, message: e.message ?? String(e) });
  }
};
