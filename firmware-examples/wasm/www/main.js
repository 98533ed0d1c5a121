// The scoring page: loads a model, scores CSV rows and draws the density of
// 2-D models. Every runtime call runs in a Web Worker (worker.js), so no model
// or file can freeze the tab: a run can be cancelled, and one that exceeds
// its time budget is stopped (the worker is terminated and a fresh one loads
// the model again).

const $ = (id) => document.getElementById(id);
let model = null; // { bytes, label, dim, name, description, threshold, quantile, scoreKind }
// How the page names a model's anomaly score (`Detector.score_kind()`).
const SCORE_NAMES = {
  "neg-log-density": "−log p",
  "latent-radius": "the latent radius −log N(z)",
  "latent-base": "the base density's −log p(z)",
};

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// WebAssembly SIMD probe (one i8x16.popcnt): the SIMD build where the engine
// validates it, else the small build. `?build=small|simd` forces one.
const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11]);
const asked = new URLSearchParams(location.search).get("build");
const build = asked === "small" || asked === "simd" ? asked : WebAssembly.validate(SIMD_PROBE) ? "simd" : "small";

/** The worker and its pending requests. */
class Runtime {
  constructor() {
    this.nextId = 1;
    this.pending = new Map();
    this.start();
  }

  start() {
    this.worker = new Worker(new URL(`./worker.js?build=${build}`, import.meta.url), { type: "module" });
    this.worker.onmessage = ({ data }) => {
      const p = this.pending.get(data.id);
      if (!p) return;
      if (data.progress) { p.onProgress?.(data.progress); return; }
      this.pending.delete(data.id);
      if (data.ok) p.resolve(data);
      else p.reject(new Error(data.message));
    };
    this.worker.onerror = (e) => this.fail(new Error(e.message || "the scoring worker failed"));
  }

  request(type, payload = {}, onProgress) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onProgress });
      this.worker.postMessage({ id, type, ...payload });
    });
  }

  fail(error) {
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
  }

  /** Stops whatever runs now (its requests fail with `reason`) and reloads the model. */
  async restart(reason) {
    this.worker.terminate();
    this.fail(new Error(reason));
    this.start();
    if (model) await this.request("load", { bytes: model.bytes, solver: $("solver").value });
  }
}

const runtime = new Runtime();

async function loadModel(bytes, label) {
  let info;
  try {
    info = await runtime.request("load", { bytes, solver: $("solver").value });
  } catch (e) {
    $("info").innerHTML = "";
    $("info").append(Object.assign(document.createElement("span"), { className: "error", textContent: `${label}: ${e.message}` }));
    $("score").disabled = true;
    model = null;
    return;
  }
  model = { bytes, label, ...info };
  const t = model.threshold;
  $("info").textContent = `${label}: "${model.name}", ${model.dim} dimensions, ` +
    (t === undefined ? "no anomaly threshold" : `anomaly when ${SCORE_NAMES[model.scoreKind] ?? model.scoreKind} > ${t.toFixed(3)} (quantile ${Number(model.quantile.toFixed(4))})`) +
    `. Data: ${model.description}`;
  $("build").textContent = model.build === "small"
    ? "Runtime: small build (no WebAssembly SIMD; one row at a time)."
    : model.image?.length === 3
      ? "Runtime: SIMD build (image models are scored one row at a time)."
      : "Runtime: SIMD build (rows scored 32 at a time in lockstep).";
  $("score").disabled = false;
  $("results").innerHTML = "";
  $("summary").textContent = "";
  setStatus("");
  if (model.dim === 2) {
    $("density-section").hidden = false;
    await drawDensity();
  } else {
    $("density-section").hidden = true;
  }
  pad.reset(model.image);
}

// The drawing pad for image models: an H × W grid of 8-bit pixels (one
// channel), painted with a soft brush, scored as one row; samples drawn from
// the model below it.
const pad = {
  shape: null,
  pixels: null,
  reset(shape) {
    const single = Array.isArray(shape) && shape.length === 3 && shape[0] === 1;
    $("pad-section").hidden = !single;
    this.shape = single ? { h: shape[1], w: shape[2] } : null;
    if (!this.shape) return;
    this.pixels = new Uint8Array(this.shape.h * this.shape.w);
    $("pad-result").textContent = "Draw a digit with the mouse (left button), then Score.";
    this.render();
  },
  /** Replaces the pixels (row-major bytes); also the tests' way to set a known image. */
  set(bytes) {
    this.pixels.set(bytes.slice(0, this.pixels.length));
    this.render();
  },
  paint(event) {
    const c = $("pad"), rect = c.getBoundingClientRect(), { h, w } = this.shape;
    const fx = (event.clientX - rect.left) / rect.width * w, fy = (event.clientY - rect.top) / rect.height * h;
    const strength = Number($("pad-brush").value);
    for (let r = 0; r < h; r++) {
      for (let q = 0; q < w; q++) {
        const d2 = (q + 0.5 - fx) ** 2 + (r + 0.5 - fy) ** 2;
        const add = strength * Math.exp(-d2 / 0.35);
        const i = r * w + q;
        this.pixels[i] = Math.min(255, this.pixels[i] + Math.round(add));
      }
    }
    this.render();
  },
  render() {
    drawGray($("pad"), this.pixels, this.shape.h, this.shape.w, 0, $("pad").width);
  },
  async score() {
    if (!this.shape) return;
    const { h, w } = this.shape;
    try {
      const { logp, score, nfe } = await runtime.request("point", { x: Float32Array.from(this.pixels) });
      const bpd = -logp / (h * w * Math.LN2);
      const t = model.threshold;
      const verdict = t === undefined ? "no threshold" : score > t ? "ANOMALY (unlike the training images)" : "normal";
      $("pad-result").textContent = `log p = ${logp.toFixed(4)}, ${bpd.toFixed(4)} bits/dim, ${verdict} (${nfe} evaluations)`;
    } catch (e) {
      $("pad-result").textContent = e.message;
    }
  },
  async sample() {
    if (!this.shape) return;
    const { h, w } = this.shape, n = 8;
    $("pad-result").textContent = "sampling…";
    try {
      const { xs } = await runtime.request("samples", { seed: Math.floor(Math.random() * 2 ** 31), n });
      const c = $("pad-samples"), cell = c.width / n;
      for (let k = 0; k < n; k++) {
        const img = Uint8Array.from(xs.subarray(k * h * w, (k + 1) * h * w), (v) => Math.max(0, Math.min(255, Math.round(v))));
        drawGray(c, img, h, w, k * cell, cell);
      }
      $("pad-result").textContent = `${n} samples from the model`;
    } catch (e) {
      $("pad-result").textContent = e.message;
    }
  },
};
window.ffjordPad = pad;

/** Draws an h × w grayscale image (bytes) into `canvas` at x offset `x0`, `size` pixels wide. */
function drawGray(canvas, bytes, h, w, x0, size) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  bytes.forEach((v, i) => img.data.set([v, v, v, 255], 4 * i));
  const tmp = Object.assign(document.createElement("canvas"), { width: w, height: h });
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, x0, 0, size, size * h / w);
}

function parseCsv(text, dim) {
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  if (lines.length === 0) throw new Error("no rows to score");
  let header = null;
  const first = lines[0].split(",").map((s) => s.trim());
  // A header only when no field of the first row is a number (as the trainer reads CSVs).
  if (first.every((f) => f === "" || isNaN(Number(f)))) {
    header = first;
    lines.shift();
  }
  const labelCol = header ? header.findIndex((h) => /^(anomaly|label)$/i.test(h)) : -1;
  const rows = [];
  const labels = [];
  lines.forEach((line, i) => {
    const fields = line.split(",").map((s) => s.trim());
    const values = fields.filter((_, j) => j !== labelCol).map(Number);
    const lineNo = i + (header ? 2 : 1);
    if (values.length !== dim) throw new Error(`line ${lineNo}: ${values.length} values, the model needs ${dim}`);
    const bad = values.findIndex((v) => !Number.isFinite(v) || Math.abs(v) > 3.4028234663852886e38);
    if (bad >= 0) throw new Error(`line ${lineNo}, column ${bad + 1}: not a finite float32 number`);
    rows.push(values);
    labels.push(labelCol >= 0 ? fields[labelCol] : null);
  });
  return { rows, labels, header };
}

async function scoreRows() {
  if (!model) return;
  let parsed;
  try {
    parsed = parseCsv($("csv").value, model.dim);
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const { rows, labels } = parsed;
  const d = model.dim;
  const threshold = model.threshold;
  const table = $("results");
  table.innerHTML = "";
  $("summary").textContent = "";
  const head = table.insertRow();
  const cols = ["row", ...Array.from({ length: Math.min(d, 4) }, (_, j) => `x${j}`), ...(d > 4 ? ["…"] : []),
    "log p", "score", "verdict", ...(labels[0] !== null ? ["label"] : [])];
  for (const c of cols) head.append(Object.assign(document.createElement("th"), { textContent: c }));
  $("progress").hidden = false;
  $("progress").value = 0;
  $("score").disabled = true;
  $("cancel").hidden = false;
  const budget = Number($("budget").value);
  const timer = setTimeout(() => runtime.restart(`stopped: scoring exceeded the ${budget} s time limit`), budget * 1000);
  let anomalies = 0;
  let nfe = 0;
  const t0 = performance.now();
  const onProgress = ({ start, logp, scores, nfe: total }) => {
    nfe = total;
    logp.forEach((lp, k) => {
      const i = start + k;
      const score = scores[k];
      const anomaly = threshold !== undefined && score > threshold;
      if (anomaly) anomalies++;
      const tr = table.insertRow();
      tr.className = anomaly ? "anomaly" : "";
      const cells = [i + 1, ...rows[i].slice(0, 4).map((v) => v.toPrecision(6)), ...(d > 4 ? ["…"] : []),
        lp.toFixed(6), score.toFixed(6), threshold === undefined ? "—" : anomaly ? "anomaly" : "normal",
        ...(labels[i] !== null ? [labels[i]] : [])];
      for (const c of cells) tr.insertCell().textContent = c;
    });
    const done = start + logp.length;
    $("progress").value = Math.min(1, done / rows.length);
    setStatus(`scoring… ${done} / ${rows.length}`);
  };
  let failure = null;
  try {
    await runtime.request("score", { rows: new Float32Array(rows.flat()), dim: d }, onProgress);
  } catch (e) {
    failure = e;
  }
  clearTimeout(timer);
  $("progress").hidden = true;
  $("score").disabled = false;
  $("cancel").hidden = true;
  if (failure) {
    setStatus(failure.message, true);
    return;
  }
  const ms = performance.now() - t0;
  $("summary").textContent = `${rows.length} rows, ${anomalies} anomalies` +
    (threshold === undefined ? " (uncalibrated model)" : "") + `, ${nfe} function evaluations, ${ms.toFixed(0)} ms`;
  setStatus("done");
}

let view = null;

async function drawDensity() {
  const canvas = $("density");
  const ctx = canvas.getContext("2d");
  const n = 90;
  $("density-status").textContent = "drawing…";
  let grid;
  try {
    grid = await runtime.request("density", { n });
  } catch (e) {
    $("density-status").textContent = e.message;
    return;
  }
  const { logp, xs, ys } = grid;
  view = grid.view;
  const max = Math.max(...logp);
  const img = ctx.createImageData(n, n);
  for (let i = 0; i < n * n; i++) {
    const [r, g, b] = magma(Math.exp(logp[i] - max));
    img.data.set([r, g, b, 255], 4 * i);
  }
  const tmp = Object.assign(document.createElement("canvas"), { width: n, height: n });
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
  if ($("show-samples").checked) {
    ctx.fillStyle = "rgba(255,255,255,0.8)";
    for (let i = 0; i < xs.length; i++) {
      const [px, py] = toCanvas(xs[i], ys[i]);
      ctx.fillRect(px - 1, py - 1, 2, 2);
    }
  }
  $("density-status").textContent = `grid ${n}×${n}, ${xs.length} samples`;
}

// A dark-to-bright colour map (magma-like anchors), v in [0, 1].
const MAP = [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]];
function magma(v) {
  const t = Math.min(1, Math.max(0, v)) * (MAP.length - 1);
  const i = Math.min(MAP.length - 2, Math.floor(t)), f = t - i;
  return MAP[i].map((a, k) => Math.round(a * (1 - f) + MAP[i + 1][k] * f));
}

function toCanvas(x, y) {
  const c = $("density");
  return [(x - view.x0) / (view.x1 - view.x0) * c.width, (view.y1 - y) / (view.y1 - view.y0) * c.height];
}

function fromCanvas(event) {
  const c = $("density");
  const rect = c.getBoundingClientRect();
  const px = (event.clientX - rect.left) / rect.width, py = (event.clientY - rect.top) / rect.height;
  return [view.x0 + px * (view.x1 - view.x0), view.y1 - py * (view.y1 - view.y0)];
}

async function showCursor(event) {
  if (!model || !view) return;
  const [x, y] = fromCanvas(event);
  try {
    const { logp } = await runtime.request("point", { x: new Float32Array([x, y]) });
    $("cursor").textContent = `log p at (${x.toFixed(3)}, ${y.toFixed(3)}): ${logp.toFixed(4)}`;
  } catch (e) {
    $("cursor").textContent = e.message;
  }
}

async function main() {
  $("bundled").addEventListener("change", async (e) => {
    if (!e.target.value) return;
    const res = await fetch(e.target.value);
    await loadModel(new Uint8Array(await res.arrayBuffer()), e.target.value.split("/").pop());
  });
  $("model-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) await loadModel(new Uint8Array(await f.arrayBuffer()), f.name);
  });
  $("csv-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) $("csv").value = await f.text();
  });
  $("solver").addEventListener("change", async () => {
    if (!model) return;
    try {
      await runtime.request("solver", { solver: $("solver").value });
    } catch (e) {
      setStatus(e.message, true);
    }
  });
  $("score").addEventListener("click", scoreRows);
  $("cancel").addEventListener("click", () => runtime.restart("cancelled"));
  $("density").addEventListener("mousemove", showCursor);
  $("density").addEventListener("click", showCursor);
  $("show-samples").addEventListener("change", () => model && drawDensity());
  let drawing = false;
  $("pad").addEventListener("mousedown", (e) => { drawing = true; pad.paint(e); });
  $("pad").addEventListener("mousemove", (e) => drawing && pad.paint(e));
  window.addEventListener("mouseup", () => { drawing = false; });
  $("pad-clear").addEventListener("click", () => pad.reset([1, pad.shape.h, pad.shape.w]));
  $("pad-score").addEventListener("click", () => pad.score());
  $("pad-sample").addEventListener("click", () => pad.sample());
  document.body.dataset.ready = "true";
}

main();
